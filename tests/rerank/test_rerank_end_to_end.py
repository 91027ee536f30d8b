"""Re-ranking in a map: stored vs on-the-fly patches, storage dtypes, the CLI, a planted homography
on a real image, and ``match-two``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vprkit import pipeline
from vprkit.cli import cli
from vprkit.config import RerankConfig
from vprkit.images import ImageSpec
from vprkit.presets import resolve
from vprkit.images import iter_batches
from vprkit.pipeline import match_two
from vprkit.rerank import PatchesExtension, ransac_score, score_pair
from helpers import copy_first_images

CORRIDOR_IMAGES = 16
SETTINGS = RerankConfig(
    "test",
    "two scales, RANSAC",
    scales=((2, 1), (3, 1)),
    weights=(0.5, 0.5),
    scorer="ransac",
    pca_dim=48,
    dtype="float32",
    shortlist=8,
)


@pytest.fixture(scope="module")
def corridor_refs(shared_datasets, tmp_path_factory) -> Path:
    """A few real Corridor reference images (copied to a temporary folder, never into the repo)."""
    return copy_first_images(
        shared_datasets / "corridor" / "ref", tmp_path_factory.mktemp("corridor_refs"), CORRIDOR_IMAGES
    )


@pytest.fixture(scope="module")
def rerank_config(small_config):
    """The session's small configuration at 160×128: patch sizes 2 and 3 need a feature grid of several cells."""
    return small_config.replace(image=ImageSpec((128, 160), "fixed"))


def _with(config, settings):
    return config.replace(extensions={"patches": {**settings.extension_options(), "fit_images": 8}})


@pytest.fixture(scope="module")
def stored_map(corridor_refs, rerank_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("rr") / "map"
    pipeline.build_map(corridor_refs, out, _with(rerank_config, SETTINGS), progress=False, log=lambda _: None)
    return out


def test_reranking_keeps_the_exact_match_first_and_orders_scores(stored_map, corridor_refs):
    m = pipeline.open_map(stored_map)
    rr = pipeline.get_reranker(m, SETTINGS, log=lambda _: None)
    assert rr.stored
    keys = sorted(p.name for p in corridor_refs.iterdir())
    qb = next(pipeline.query_batches(m, corridor_refs, keys[3:5]))
    rows, scores = pipeline.search(m, qb, 5, rr)
    assert [m.keys[r] for r in rows[:, 0]] == keys[3:5]
    assert (np.diff(scores, axis=1) <= 1e-9).all()
    assert len(rr.timings) == 2


def test_stored_and_on_the_fly_patches_give_the_same_ranking(stored_map, corridor_refs, rerank_config, tmp_path):
    plain = tmp_path / "plain"
    same_vocabulary = dataclasses.replace(rerank_config.vocabulary, source=str(stored_map / "vocabulary.npz"))
    pipeline.build_map(
        corridor_refs, plain, rerank_config.replace(vocabulary=same_vocabulary), progress=False, log=lambda _: None
    )
    m_stored, m_plain = pipeline.open_map(stored_map), pipeline.open_map(plain)
    settings = SETTINGS
    a = pipeline.get_reranker(m_stored, settings, log=lambda _: None)
    logs = []
    b = pipeline.get_reranker(m_plain, settings, log=logs.append)
    assert a.stored and not b.stored and "computing them from" in logs[0]
    # the on-the-fly fit uses fit_images=100 (all 16 images); the stored map's used 8 — align them
    b.extension.load_state(a.extension.state())
    keys = sorted(p.name for p in corridor_refs.iterdir())
    qa = next(pipeline.query_batches(m_stored, corridor_refs, keys[:4]))
    ra, sa = pipeline.search(m_stored, qa, 8, a)
    rb, sb = pipeline.search(m_plain, qa, 8, b)
    np.testing.assert_array_equal(ra, rb)
    np.testing.assert_allclose(sa, sb, atol=1e-6)


def test_storage_dtypes_and_bytes_per_image(corridor_refs, rerank_config, tmp_path):
    base = SETTINGS.replace(scales=((3, 1),), weights=(1.0,), scorer="rapid", pca_dim=32)
    sizes, decoded = {}, {}
    for dtype in ("float32", "float16", "int8"):
        out = tmp_path / dtype
        pipeline.build_map(
            corridor_refs, out, _with(rerank_config, base.replace(dtype=dtype)), progress=False, log=lambda _: None
        )
        m = pipeline.open_map(out)
        sizes[dtype] = m.store.extra_bytes()["patches"]
        with m.store.open_extras() as r:
            decoded[dtype] = m.extensions["patches"].decode(r.extras("patches", 0))[0].descriptors
    # 8×10 grid, 3×3 patches → 6×8 = 48 patches × 32 dims (+ the 2-int grid)
    assert sizes["float32"] == pytest.approx(48 * 32 * 4 + 8)
    assert sizes["float16"] == pytest.approx(48 * 32 * 2 + 8)
    assert sizes["int8"] == pytest.approx(48 * 32 + 8)
    for dtype in ("float16", "int8"):
        cos = (decoded[dtype] * decoded["float32"]).sum(1)
        assert cos.min() > (0.999 if dtype == "float16" else 0.99)
        assert torch.allclose(decoded[dtype].norm(dim=1), torch.ones(len(cos)), atol=1e-5)


def test_ransac_recovers_a_planted_homography_on_a_real_image(shared_datasets, tmp_path):
    """Warp a real Corridor frame by a known homography; RANSAC on the patch matches recovers it."""
    refs = sorted((shared_datasets / "corridor" / "ref").iterdir())
    img = cv2.imread(str(refs[10]))
    img = cv2.resize(img, (320, 240), interpolation=cv2.INTER_CUBIC)
    h_true = np.array([[1.08, 0.03, -14.0], [0.01, 1.08, -9.0], [4e-5, 0.0, 1.0]])
    cv2.imwrite(str(tmp_path / "a.png"), img)
    cv2.imwrite(str(tmp_path / "b.png"), cv2.warpPerspective(img, h_true, (320, 240), borderMode=cv2.BORDER_REFLECT))
    cv2.imwrite(str(tmp_path / "c.png"), cv2.resize(cv2.imread(str(refs[60])), (320, 240)))
    config = resolve("effnet-vlad")
    backbone = pipeline.load_backbone(config)
    settings = SETTINGS.replace(scales=((2, 1),), weights=(1.0,))
    ext = PatchesExtension({**settings.extension_options(), "pca_dim": 0, "k": 16}, backbone, None)
    batches = [
        next(iter_batches(tmp_path, [n], config.image, backbone.size_multiple, 1, 1))
        for n in ("a.png", "b.png", "c.png")
    ]
    with torch.inference_mode():
        feats = [backbone(torch.from_numpy(b.pixels)) for b in batches]
    ext.fit(zip(batches, feats))
    sets = [ext.describe_batch(b, f)[0] for b, f in zip(batches, feats)]
    same = score_pair(sets[0], sets[1], ransac_score)
    other = score_pair(sets[0], sets[2], ransac_score)
    assert same.scores[0].value > 2 * other.scores[0].value
    inl = same.matches[0].query[same.scores[0].inliers]
    pts = sets[0][0].centres[inl]

    def project(m, xy):
        p = np.c_[xy, np.ones(len(xy))] @ m.T
        return p[:, :2] / p[:, 2:]

    # where the inlier patches land: within the RANSAC threshold (1.5 cells) of the true warp
    err = np.linalg.norm(project(same.scores[0].model, pts) - project(h_true, pts), axis=1)
    assert np.median(err) < 0.5 * sets[0][0].step_px and err.max() < 1.5 * sets[0][0].step_px


def test_cli_build_info_localize_and_match_two(corridor_refs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "map"
    r = runner.invoke(cli, ["map", "build", str(corridor_refs), "--out", str(out), "--rerank", "storage", "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["map", "info", str(out)])
    assert "patches" in r.output, r.output
    keys = sorted(p.name for p in corridor_refs.iterdir())
    r = runner.invoke(
        cli, ["localize", str(out), str(corridor_refs / keys[5]), "--rerank", "storage", "--json", "--top-k", "3"]
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("[") :])
    assert res[0]["matches"][0]["image"] == keys[5]
    png = tmp_path / "match.png"
    r = runner.invoke(
        cli,
        [
            "match-two",
            str(corridor_refs / keys[5]),
            str(corridor_refs / keys[6]),
            "--out",
            str(png),
            "--rerank",
            "speed",
        ],
    )
    assert r.exit_code == 0, r.output
    assert png.stat().st_size > 1000 and "score" in r.output and "mutual matches" in r.output
    r = runner.invoke(cli, ["presets"])
    assert "performance" in r.output and "storage" in r.output


def test_match_two_with_a_map_uses_its_fitted_state(stored_map, corridor_refs, tmp_path):
    keys = sorted(p.name for p in corridor_refs.iterdir())
    tm = match_two(
        corridor_refs / keys[2], corridor_refs / keys[2], rerank="speed", map_dir=stored_map, out=tmp_path / "m.png"
    )
    # an image against itself: every patch is its own mutual nearest neighbour, all consistent
    s = tm.result
    assert len(s.matches[0]) == len(s.query_sets[0]) and s.scores[0].inliers.all()
    assert (tmp_path / "m.png").exists()
