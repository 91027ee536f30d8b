"""Every JSON the CLI prints is valid JSON (RFC 8259: no NaN, no Infinity), on a map whose poses sit at the edges
of their valid ranges: ``map info``, ``localize`` (files and a stream, with its ``--jsonl`` log), ``loops``,
``map compress`` and ``hloc import`` (issue 26, item 1: ``"spread_m": Infinity`` was printed)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from vprkit.cli import main

from helpers import run_main as run
from vprkit.cli.output import echo_json, non_finite_paths, to_json
from vprkit.datasets.pose_values import LOCAL_COORDINATE, TIMESTAMP

MAP_IMAGES = 8
QUERIES = 3
SMALL = ["--preset", "effnet-gem", "--image-size", "64x64"]


def strict(text: str):
    """Parse as strict JSON and serialise again with ``allow_nan=False``: NaN / Infinity fail either way."""

    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    data = json.loads(text, parse_constant=refuse)
    json.dumps(data, allow_nan=False)
    return data


@pytest.fixture(scope="module")
def extreme_map(tmp_path_factory, shared_datasets: Path) -> Path:
    """Corridor references 0…7 with poses at the corners of local metres' range (±100,000 km), headings just
    under a full turn and timestamps at both ends of the valid range: valid values, extreme ones."""
    root = tmp_path_factory.mktemp("json-map")
    images = root / "images"
    images.mkdir()
    keys = [f"{i:07d}.jpg" for i in range(MAP_IMAGES)]
    for key in keys:
        shutil.copy(shared_datasets / "corridor" / "ref" / key, images / key)
    corners = [(LOCAL_COORDINATE.low, LOCAL_COORDINATE.high), (LOCAL_COORDINATE.high, LOCAL_COORDINATE.low)]
    rows = [
        f"{k},{corners[i % 2][0]},{corners[i % 2][1]},359.99999999999994,{(TIMESTAMP.low, TIMESTAMP.high)[i % 2]}"
        for i, k in enumerate(keys)
    ]
    (root / "poses.csv").write_text("image,easting,northing,heading,timestamp\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def built(extreme_map: Path) -> Path:
    out = extreme_map / "map"
    mp = pytest.MonkeyPatch()
    args = ["map", "build", extreme_map / "images", "--out", out, "--poses", extreme_map / "poses.csv", *SMALL]
    mp.setattr(sys, "argv", ["vprkit", *map(str, args), "--quiet"])
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, exc.code
    finally:
        mp.undo()
    return out


def test_map_info_and_localize_json_are_valid(built, shared_datasets, monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, "map", "info", built, "--json")
    info = strict(out)
    assert code == 0 and info["poses"]["extent"]["easting"] == [LOCAL_COORDINATE.low, LOCAL_COORDINATE.high], err
    assert info["poses"]["time_range"] == ["1900-01-01T00:00:00+00:00", "2100-01-01T00:00:00+00:00"]
    queries = [shared_datasets / "corridor" / "query" / f"{i:07d}.jpg" for i in range(QUERIES)]
    code, out, err = run(monkeypatch, capsys, "localize", built, *queries, "--json", "--top-k", "5")
    results = strict(out)
    assert code == 0 and len(results) == QUERIES, err
    for r in results:
        spread = r["estimate"].get("spread_m")
        assert spread is None or math.isfinite(spread)  # was Infinity with an easting of 1e160
        assert all(m["heading_deg"] is None or 0.0 <= m["heading_deg"] < 360.0 for m in r["matches"])


def test_stream_json_lines_are_valid(built, extreme_map, tmp_path, monkeypatch, capsys):
    log = tmp_path / "stream.jsonl"
    code, out, err = run(monkeypatch, capsys, "localize", built, "--frames", extreme_map / "images", "--json",
                         "--jsonl", log, "--max-frames", QUERIES, "--top-k", "3")  # fmt: skip
    assert code == 0, err
    printed = [strict(line) for line in out.splitlines() if line.strip()]
    logged = [strict(line) for line in log.read_text().splitlines()]
    assert len(printed) == len(logged) == QUERIES


def test_loops_compress_and_hloc_import_json_are_valid(built, extreme_map, tmp_path, monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, "loops", extreme_map / "images", "--exclude-recent", "2",
                         "--ground-truth", extreme_map / "poses.csv", *SMALL, "--quiet", "--json")  # fmt: skip
    summary = strict(out)
    assert code == 0 and summary["frames"] == MAP_IMAGES, err
    copy = Path(shutil.copytree(built, tmp_path / "map"))
    code, out, err = run(monkeypatch, capsys, "map", "compress", copy, "--index", "SQ8", "--json")
    assert code == 0 and strict(out)["ntotal"] == MAP_IMAGES, err
    features = tmp_path / "features.h5"
    code, _, err = run(monkeypatch, capsys, "hloc", "export", built, "--out", features)
    assert code == 0, err
    code, out, err = run(monkeypatch, capsys, "hloc", "import", features, "--out", tmp_path / "imported", "--json")
    assert code == 0 and strict(out)["counts"]["images"] == MAP_IMAGES, err


def test_to_json_refuses_non_finite_numbers_and_names_where():
    record = {"estimate": {"spread_m": float("inf"), "position": [1.0, np.float32("nan")]}, "ok": [np.int64(3)]}
    assert list(non_finite_paths(record)) == ["estimate.spread_m", "estimate.position[1]"]
    with pytest.raises(ValueError, match=r"estimate\.spread_m, estimate\.position\[1\]"):
        to_json(record)
    plain = {"path": Path("/a/b"), "n": np.int64(3), "x": np.float32(0.5), "v": np.arange(2), "none": None}
    assert json.loads(to_json(plain)) == {"path": "/a/b", "n": 3, "x": 0.5, "v": [0, 1], "none": None}
    with pytest.raises(TypeError):
        to_json({"object": object()})


def test_echo_json_prints_one_document(capsys):
    echo_json({"a": [1, 2]}, indent=None)
    assert capsys.readouterr().out == '{"a": [1, 2]}\n'
