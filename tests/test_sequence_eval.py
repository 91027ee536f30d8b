"""`vprkit eval --sequence-length` (issue 27 item 4): two synchronised traversals in any layout whose names pair up
(ref/ + query/, with or without ground_truth.csv; Nordland's seasons), every query with an estimate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import run_cli
from vprkit import pipeline
from vprkit.datasets import load_dataset
from vprkit.errors import ConfigError
from vprkit.presets import resolve

FRAMES = 30  # Corridor frames per traversal in the generated folder
LENGTH = 5
NORDLAND_PLACES = 120  # every 4th file: 480 files of the route, exact-frame ground truth
FAST = ["--preset", "effnet-gem", "--image-size", "160x120", "--quiet"]


def _traversals(root: Path, corridor: Path, query_prefix: str = "") -> Path:
    """ref/ and query/ of Corridor's first frames, named alike (0000.jpg …): two synchronised traversals."""
    for sub, prefix in (("ref", ""), ("query", query_prefix)):
        (root / sub).mkdir(parents=True)
        for i in range(FRAMES):
            shutil.copyfile(corridor / sub / f"{i:07d}.jpg", root / sub / f"{prefix}{i:04d}.jpg")
    return root


def test_eval_with_a_sequence_length_takes_a_ref_query_folder_of_two_traversals(tmp_path, shared_datasets):
    folder = _traversals(tmp_path / "walk", shared_datasets / "corridor")
    ds = load_dataset(folder)
    assert ds.layout == "vpr-bench" and ds.ground_truth.positives[7].tolist() == [7]  # same name: exact frame
    out = tmp_path / "run"
    r = run_cli(["eval", folder, *FAST, "--sequence-length", LENGTH, "--out", out])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["queries"] == FRAMES and summary["recall"]["R@5"] >= 0.9
    estimates = summary["estimates"]
    assert estimates["frames"] == FRAMES and estimates["with_confidence"] + estimates["undecided"] >= FRAMES
    assert "estimates:" in r.output and f"/{FRAMES} with a confidence" in r.output
    lines = [json.loads(x) for x in (out / "estimates.jsonl").read_text().splitlines()]
    assert [x["query"] for x in lines] == [f"{i:04d}.jpg" for i in range(FRAMES)]
    for x in lines:
        est = x["estimate"]
        assert "confidence" in est and est["unknown"] in (True, False, None)
        assert est["confidence"] is not None or est["unknown"] is None  # never "known" without a confidence
        assert est["route_position"] is not None and 0 <= est["evidence"]["sequence"]["support"] <= 1


def test_a_ground_truth_list_is_kept_and_unpaired_names_are_refused(tmp_path, shared_datasets):
    folder = _traversals(tmp_path / "walk", shared_datasets / "corridor", query_prefix="q")
    (folder / "ground_truth.csv").write_text(
        "query,positives\n" + "".join(f"query/q{i:04d}.jpg,ref/{i:04d}.jpg\n" for i in range(FRAMES))
    )
    ds = load_dataset(folder)
    assert ds.ground_truth.positives[3].tolist() == [3]
    with pytest.raises(ConfigError, match="synchronised traversals.*pairs only 0%"):
        pipeline.evaluate(ds, "effnet-gem", sequence_length=LENGTH, progress=False)
    # the same folder without the prefix pairs up, and keeps its list as the ground truth
    for p in (folder / "query").iterdir():
        p.rename(p.with_name(p.name[1:]))
    (folder / "ground_truth.csv").write_text(
        "query,positives\n" + "".join(f"query/{i:04d}.jpg,ref/{max(i - 1, 0):04d}.jpg\n" for i in range(FRAMES))
    )
    ds = load_dataset(folder)
    assert ds.ground_truth.positives[3].tolist() == [2]  # the list, not the file names


def test_nordland_with_a_sequence_length_gives_every_query_an_estimate(shared_datasets):
    ds = load_dataset("nordland-64x32", data_root=shared_datasets, places=NORDLAND_PLACES)
    config = resolve("effnet-gem", image_size=(32, 64))
    single = pipeline.evaluate(ds, config, progress=False)
    summary = pipeline.evaluate(ds, config, sequence_length=10, progress=False)
    assert summary["recall"]["R@1"] > single["recall"]["R@1"]  # the sequence is the accurate mode
    estimates = summary["estimates"]
    assert estimates["frames"] == NORDLAND_PLACES and estimates["with_confidence"] == NORDLAND_PLACES
    assert 0.0 <= estimates["unknown_share"] <= 1.0 and "estimates" not in single
