"""Re-ranking a map built without ``--rerank``: the patch state is fitted once and saved into the map
(with the candidates' patches), so later calls — even read-only opens — never refit; ``save=False``
writes nothing; ``vprkit rerank prepare`` saves every image's patches; the CLI's second call reuses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vprkit import pipeline
from vprkit.cli import cli
from vprkit.config import RerankConfig
from vprkit.images import ImageSpec
from vprkit.rerank import PatchesExtension
from vprkit.rerank.reranker import ComputedPatches
from vprkit.rerank.saved import STATE_FILE
from helpers import copy_first_images

IMAGES = 8
SETTINGS = RerankConfig(
    "saved-test",
    "one scale, rapid",
    scales=((3, 1),),
    weights=(1.0,),
    scorer="rapid",
    pca_dim=32,
    dtype="float16",
    shortlist=6,
)


@pytest.fixture(scope="module")
def refs(shared_datasets, tmp_path_factory) -> Path:
    return copy_first_images(shared_datasets / "corridor" / "ref", tmp_path_factory.mktemp("saved_refs"), IMAGES)


@pytest.fixture(scope="module")
def built_map(refs, small_config, tmp_path_factory) -> Path:
    """A map built without re-ranking (no patches stored), built once."""
    config = small_config.replace(image=ImageSpec((96, 128), "fixed"))
    out = tmp_path_factory.mktemp("saved_map") / "plain"
    pipeline.build_map(refs, out, config, progress=False, log=lambda _: None)
    return out


@pytest.fixture()
def plain_map(built_map, tmp_path) -> Path:
    """A fresh copy of the plain map for each test (saving adds files to it)."""
    return Path(shutil.copytree(built_map, tmp_path / "plain"))


@pytest.fixture()
def counters(monkeypatch):
    """How often the patch state is fitted and how many candidate images are computed from pixels."""
    seen = {"fit": 0, "computed": 0}
    fit, compute = PatchesExtension.fit, ComputedPatches.compute

    def counting_fit(self, samples):
        seen["fit"] += 1
        return fit(self, samples)

    def counting_compute(self, rows, progress=False):
        seen["computed"] += len(rows)
        return compute(self, rows, progress)

    monkeypatch.setattr(PatchesExtension, "fit", counting_fit)
    monkeypatch.setattr(ComputedPatches, "compute", counting_compute)
    return seen


def _rerank(map_dir: Path, refs: Path, keys: list[str], save: bool = True, log=None):
    m = pipeline.open_map(map_dir, read_only=True)
    rr = pipeline.get_reranker(m, SETTINGS, log=log if log is not None else (lambda _: None), save=save)
    qb = next(pipeline.query_batches(m, refs, keys))
    rows, scores = pipeline.search(m, qb, 4, rr)
    rr.close()
    return rows, scores, rr


def test_state_is_fitted_once_and_saved_then_reused_by_read_only_opens(plain_map, refs, counters):
    keys = sorted(p.name for p in refs.iterdir())[2:4]
    r1, s1, rr = _rerank(plain_map, refs, keys)
    computed = counters["computed"]
    assert counters["fit"] == 1 and SETTINGS.shortlist <= computed <= IMAGES  # the shortlists' union
    folder = rr.candidates.saved.folder
    shards = sorted(folder.glob("rows-*.npz"))
    assert (folder / STATE_FILE).is_file() and 1 <= len(shards) <= len(keys)  # one per query that computed some
    logs: list[str] = []
    r2, s2, _ = _rerank(plain_map, refs, keys, log=logs.append)
    assert counters["fit"] == 1, "the second call refitted the patch state"
    assert counters["computed"] == computed, "the second call recomputed saved candidates"
    assert any("saved in" in line for line in logs)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_allclose(s1, s2, atol=1e-9)
    assert [pipeline.open_map(plain_map).keys[r] for r in r2[:, 0]] == keys


def test_save_false_writes_nothing_and_says_how_to_persist(plain_map, refs, counters):
    before = sorted(p.relative_to(plain_map) for p in plain_map.rglob("*"))
    logs: list[str] = []
    _rerank(plain_map, refs, sorted(p.name for p in refs.iterdir())[:1], save=False, log=logs.append)
    assert sorted(p.relative_to(plain_map) for p in plain_map.rglob("*")) == before
    assert any("vprkit rerank prepare" in line for line in logs)
    _rerank(plain_map, refs, sorted(p.name for p in refs.iterdir())[:1], save=False)
    assert counters["fit"] == 2  # nothing saved, so fitted again


def test_a_held_write_lock_keeps_the_state_in_memory(plain_map, refs, counters):
    from vprkit.maps.lock import map_write_lock

    logs: list[str] = []
    with map_write_lock(plain_map):  # a build is running
        _rerank(plain_map, refs, sorted(p.name for p in refs.iterdir())[:1], log=logs.append)
    assert not list(plain_map.glob("extensions/patches-*/*.npz"))
    assert any("kept in memory only" in line for line in logs)


def test_a_re_encoded_image_is_not_read_from_the_saved_patches(plain_map, refs):
    from vprkit.rerank.saved import SavedState

    m = pipeline.open_map(plain_map)
    rr = pipeline.get_reranker(m, SETTINGS, log=lambda _: None)
    rr.prepare(progress=False)
    saved: SavedState = rr.candidates.saved
    sha = list(rr.candidates.sha256)
    assert len(saved.index(m.keys, sha)) == len(m.keys)
    sha[0] = b"0" * 64  # the map's row 0 now describes other pixels
    assert 0 not in saved.index(m.keys, sha) and len(saved.index(m.keys, sha)) == len(m.keys) - 1


def test_cli_prepare_and_second_localize_do_not_refit(plain_map, refs):
    runner = CliRunner()
    query = str(refs / sorted(p.name for p in refs.iterdir())[5])
    first = runner.invoke(cli, ["localize", str(plain_map), query, "--rerank", "storage", "--json", "--top-k", "3"])
    assert first.exit_code == 0, first.output
    assert "re-ranking fit" in first.output  # the fit's progress bar (stderr)
    second = runner.invoke(cli, ["localize", str(plain_map), query, "--rerank", "storage", "--json", "--top-k", "3"])
    assert second.exit_code == 0, second.output
    assert "re-ranking fit" not in second.output
    a, b = (json.loads(r.output[r.output.index("[\n") :].rsplit("]", 1)[0] + "]") for r in (first, second))
    assert [m["image"] for m in a[0]["matches"]] == [m["image"] for m in b[0]["matches"]]
    r = runner.invoke(cli, ["rerank", "prepare", str(plain_map), "--rerank", "storage"])
    assert r.exit_code == 0, r.output
    # the guarded fusion matches the global top STATISTICS_MIN_CANDIDATES (≥ this 8-image map), so the
    # localize above may already have saved every image; prepare then completes whatever is left
    assert "computed and saved" in r.output
    r = runner.invoke(cli, ["rerank", "prepare", str(plain_map), "--rerank", "storage"])
    assert "0 images' patches computed" in r.output, r.output
