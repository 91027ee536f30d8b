"""Build a SegVLAD map on a few Corridor images and localise queries through the public pipeline."""

from __future__ import annotations


import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from vprkit import pipeline
from vprkit.presets import resolve
from vprkit.segments.retriever import INDEX_FILE, ROWS_FILE, SegmentIndex, SegVLADRetriever

import os
from pathlib import Path

DATASETS = Path(os.environ.get("VPRKIT_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"))

CORRIDOR = DATASETS / "corridor"
REFS = [f"{i:07d}.jpg" for i in range(0, 48, 3)]  # 16 map images, every 3rd frame
QUERIES = [f"{i:07d}.jpg" for i in (6, 21, 39)]


@pytest.fixture(scope="module")
def slic_map(tmp_path_factory):
    out = tmp_path_factory.mktemp("segmap")
    info = pipeline.build_map(CORRIDOR / "ref", out, "segvlad-slic", keys=REFS, progress=False, log=lambda m: None)
    assert info["counts"]["images"] == len(REFS)
    return out


def test_map_files_and_float16_payload(slic_map):
    assert (slic_map / INDEX_FILE).exists() and (slic_map / ROWS_FILE).exists()
    assert (slic_map / "extensions" / "segments.npz").exists()  # fitted PCA
    with h5py.File(slic_map / "store.h5", "r") as f:
        g = f["extras/segments/0"]
        assert g["desc_f16"].dtype == np.uint16  # float16 bits
        assert g["members"].dtype == np.uint8
        assert 1 <= g["desc_f16"].shape[0] <= 64
    m = pipeline.open_map(slic_map)
    idx = m.extensions["segments"].index(m.store, len(m.keys), m.dir)
    assert idx.n_images == len(REFS) and idx.ntotal >= len(REFS)
    assert set(np.unique(idx.image)) == set(range(len(REFS)))
    loaded = SegmentIndex.load(slic_map)
    assert loaded.ntotal == idx.ntotal


def test_localize_finds_the_right_places(slic_map):
    m = pipeline.open_map(slic_map)
    results = pipeline.localize(m, [CORRIDOR / "query" / q for q in QUERIES], top_k=3)
    assert len(results) == len(QUERIES)
    hits = 0
    for q, r in zip(QUERIES, results):
        assert len(r.matches) == 3
        scores = [x.score for x in r.matches]
        assert scores == sorted(scores, reverse=True)
        # ground-truth tolerance is ±2 frames; the map holds every 3rd frame, so allow the neighbours
        frame = int(q[:7])
        hits += abs(int(r.matches[0].key[:7]) - frame) <= 3
    assert hits >= 2


def test_retriever_options(slic_map):
    m = pipeline.open_map(slic_map)
    qb = next(pipeline.query_batches(m, CORRIDOR / "query", QUERIES))
    base_rows, _ = SegVLADRetriever(m.search_space(), {}).search(qb, 5)
    for opts in ({"voting": "maxseg"}, {"voting": "maxsim"}, {"fuse": 0.5}, {"shortlist": 4}, {"k_prime": 5}):
        rows, scores = SegVLADRetriever(m.search_space(), opts).search(qb, 5)
        assert rows.shape == (3, 5) and np.isfinite(scores[rows >= 0]).all()
    rows, _ = SegVLADRetriever(m.search_space(), {"shortlist": 4}).search(qb, 6)
    g_rows, _ = m.index.search(qb.global_descriptors, 4)
    for r, g in zip(rows, g_rows):  # only the global top 4 are re-scored
        assert set(r[r >= 0]) == set(g)
        assert (r[4:] == -1).all()
    with pytest.raises(Exception):
        SegVLADRetriever(m.search_space(), {"voting": "borda"})


def test_explain_writes_a_picture(slic_map, tmp_path):
    from vprkit.cli import cli
    from vprkit.pipeline import explain

    exp = explain(slic_map, CORRIDOR / "query" / QUERIES[0], out=tmp_path / "why.png", top=3)
    assert (tmp_path / "why.png").stat().st_size > 10_000
    assert 1 <= len(exp.pairs) <= 3
    sims = [p.similarity for p in exp.pairs]
    assert sims == sorted(sims, reverse=True)
    res = CliRunner().invoke(
        cli,
        [
            "explain",
            str(slic_map),
            str(CORRIDOR / "query" / QUERIES[1]),
            "--out",
            str(tmp_path / "cli.png"),
            "--top",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "similarity" in res.output and (tmp_path / "cli.png").exists()


def test_grid_sap_map_without_pca(tmp_path):
    """SAP pooling (an ablation) has 112-d descriptors: no PCA fit, float32 storage."""
    cfg = resolve("segvlad-grid")
    seg = {**cfg.extensions["segments"], "pooling": "sap", "order": 0, "storage": "float32"}
    cfg = cfg.replace(name="test-grid-sap", extensions={"segments": seg})
    pipeline.build_map(CORRIDOR / "ref", tmp_path, cfg, keys=REFS[:6], progress=False, log=lambda m: None)
    assert not (tmp_path / "extensions" / "segments.npz").exists()
    m = pipeline.open_map(tmp_path)
    res = pipeline.localize(m, [CORRIDOR / "query" / QUERIES[0]], top_k=2)
    assert len(res[0].matches) == 2
    with h5py.File(tmp_path / "store.h5", "r") as f:
        assert f["extras/segments/0/desc"].shape == (
            30,
            112,
        )  # 6×5 grid cells of 54 px at 320×240 (last row: the 24-px remainder)


def test_cli_map_build_and_localize_with_a_segvlad_preset(tmp_path):
    import shutil

    from vprkit.cli import cli

    images = tmp_path / "images"
    images.mkdir()
    for k in REFS[:6]:
        shutil.copy(CORRIDOR / "ref" / k, images / k)
    runner = CliRunner()
    res = runner.invoke(
        cli, ["map", "build", str(images), "--out", str(tmp_path / "map"), "--preset", "segvlad-grid", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "map" / INDEX_FILE).exists()
    res = runner.invoke(
        cli, ["localize", str(tmp_path / "map"), str(CORRIDOR / "query" / QUERIES[0]), "--top-k", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert REFS[0][:4] in res.output  # a map image name is printed
