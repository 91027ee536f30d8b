"""Mutual nearest neighbours, spatial scorers and score fusion on constructed examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vprkit.numerics import zscore
from vprkit.rerank.fusion import fuse_scales, fuse_with_global
from vprkit.rerank.matching import Matches, mutual_nn, mutual_nn_grouped
from vprkit.rerank.scoring import SCORERS, rapid_spatial_score, ransac_score, usac_score
from helpers import grid_patch_set as grid_set


def unit(*rows):
    t = torch.tensor(rows, dtype=torch.float32)
    return torch.nn.functional.normalize(t, dim=1)


def test_mutual_nn_constructed_example():
    q = unit([1, 0, 0], [0, 1, 0], [0.9, 0.1, 0])
    d = unit([1, 0.05, 0], [0, 0, 1], [0, 1, 0.1])
    m = mutual_nn(q, d)[0]
    # q0 ↔ d0 mutual; q1 ↔ d2 mutual; q2's nearest is d0, whose nearest is q0 → not mutual
    pairs = sorted(zip(m.query.tolist(), m.candidate.tolist()))
    assert pairs == [(0, 0), (1, 2)]
    np.testing.assert_allclose(m.similarity, [(q[0] @ d[0]).item(), (q[1] @ d[2]).item()], rtol=1e-6)


def test_grouped_matching_equals_one_by_one():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(12, 8), dim=1)
    cands = [torch.nn.functional.normalize(torch.randn(n, 8), dim=1) for n in (10, 7, 10, 0)]
    grouped = mutual_nn_grouped(q, cands)
    for c, g in zip(cands, grouped):
        if len(c) == 0:
            assert len(g) == 0
            continue
        single = mutual_nn(q, c)[0]
        assert g.query.tolist() == single.query.tolist() and g.candidate.tolist() == single.candidate.tolist()


def test_rapid_scoring_ranks_a_consistent_shift_above_random_matches():
    q, d = grid_set(8, 10), grid_set(8, 10)
    rng = np.random.default_rng(0)
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    qi = (rows * 10 + cols).ravel()
    shifted = Matches(qi, qi + 2, np.ones(64))  # every match moved by 2 columns: perfectly consistent
    random = Matches(qi, rng.integers(0, 80, 64), np.ones(64))
    s_shift, s_rand = rapid_spatial_score(q, d, shifted), rapid_spatial_score(q, d, random)
    assert s_shift.value > s_rand.value
    # consistent displacements have r = 0: score = m·(x_max² + y_max²)/n_q, with x_max = cols − 1 = 9
    # and y_max = rows − 1 = 7 (the largest patch indices, as the reference; not the grid size)
    assert s_shift.value == pytest.approx(64 * (9**2 + 7**2) / 80)
    assert s_shift.inliers.all()
    assert rapid_spatial_score(q, d, Matches(np.zeros(0, int), np.zeros(0, int), np.zeros(0))).value == 0.0


@pytest.mark.parametrize("scorer", [ransac_score, usac_score], ids=["ransac", "usac"])
def test_ransac_recovers_a_planted_homography_on_synthetic_points(scorer):
    q, d = grid_set(10, 12), grid_set(10, 12)
    h = np.array([[0.95, 0.02, 6.0], [-0.01, 1.0, 3.0], [1e-4, 0, 1.0]])
    pts = np.c_[q.centres, np.ones(len(q))] @ h.T
    d.centres = (pts[:, :2] / pts[:, 2:]).astype(np.float32)
    rng = np.random.default_rng(1)
    qi = np.arange(len(q))
    di = qi.copy()
    outliers = rng.choice(len(q), 30, replace=False)
    di[outliers] = rng.permutation(di[outliers])
    s = scorer(q, d, Matches(qi, di, np.ones(len(qi))))
    moved = di != qi
    assert s.inliers[~moved].all() and s.inliers[moved].mean() < 0.2

    def project(m, xy):
        p = np.c_[xy, np.ones(len(xy))] @ m.T
        return p[:, :2] / p[:, 2:]

    # the recovered homography maps the query grid where the planted one does, to a fraction of a
    # patch step (outliers within the 1.5-step threshold may pull the refit slightly)
    assert np.abs(project(s.model, q.centres) - project(h, q.centres)).max() < q.step_px / 8
    assert s.value == pytest.approx(s.inliers.sum() / len(q))
    assert scorer(q, d, Matches(qi[:3], di[:3], np.ones(3))).value == 0.0


def test_usac_is_a_registered_scorer_with_ransacs_score_kind():
    from vprkit.retrieval.estimate import patch_score_kind

    assert SCORERS.get("usac") is usac_score
    assert patch_score_kind("usac") == patch_score_kind("ransac") == "inlier_ratio"


def test_zscore_and_fusion_arithmetic():
    s = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    z = zscore(s)
    np.testing.assert_allclose(z[0], [-1.224744871, 0.0, 1.224744871])
    np.testing.assert_allclose(z[1], 0.0)  # constant scores carry no information
    a, b = np.array([1.0, 2.0, 3.0]), np.array([3.0, 1.0, 2.0])
    np.testing.assert_allclose(fuse_scales([a, b], [0.25, 0.75]), 0.25 * zscore(a) + 0.75 * zscore(b))
    np.testing.assert_allclose(fuse_with_global(a, b, 0.0), zscore(a))
    np.testing.assert_allclose(fuse_with_global(a, b, 1.0), zscore(b))
    np.testing.assert_allclose(fuse_with_global(a, b, 0.4), 0.6 * zscore(a) + 0.4 * zscore(b))
    # padding (invalid entries) neither shifts the statistics nor gets a score
    v = np.array([True, True, True, False])
    np.testing.assert_allclose(zscore(np.array([1.0, 2.0, 3.0, 100.0]), v), [*zscore(a), 0.0])
    with pytest.raises(ValueError):
        fuse_scales([a], [0.5, 0.5])
