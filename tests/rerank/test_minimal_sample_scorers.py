"""The vectorised minimal-sample scorers (``similarity``, ``affine``): what ``performance``'s cascade
pre-scores every shortlist candidate with before RANSAC verifies the best few.

They are pinned down on constructed patch matches whose true map is known: the inliers found are
exactly the matches the map explains, the score is RANSAC's unit (inliers over the query's patches),
the batched form equals the pair-by-pair one and does not depend on what else is in the batch, and
each motion model accepts what it can represent (rotation and zoom for both; shear only for affine).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vprkit.config import RerankConfig
from vprkit.errors import ConfigError
from vprkit.rerank import scoring
from vprkit.rerank.cascade import cascade_scores
from vprkit.rerank.matching import Matches
from vprkit.rerank.scoring import (
    SCORERS,
    PatchSet,
    affine_score,
    affine_scores,
    ransac_score,
    score_candidates,
    similarity_score,
    similarity_scores,
)
from vprkit.retrieval.estimate import patch_score_kind

STEP = 16.0
GRID = (8, 12)  # rows, cols: 96 patches
THRESHOLD = scoring.RANSAC_THRESHOLD_STEPS * STEP


def _grid_set(rows: int = GRID[0], cols: int = GRID[1]) -> PatchSet:
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    pos = np.stack([xs.ravel(), ys.ravel()], 1)
    return PatchSet(torch.zeros(len(pos), 4), (pos * STEP + STEP / 2).astype(np.float64), pos, (rows, cols), STEP)


def _rotation(deg: float, zoom: float = 1.0) -> np.ndarray:
    a = np.deg2rad(deg)
    return zoom * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


def _pair(linear: np.ndarray, shift, n_in: int, n_out: int, seed: int = 0):
    """A query grid and a candidate whose first ``n_in`` matched centres map onto their query patches by
    ``query = linear · candidate + shift`` exactly; ``n_out`` further matches are far off that map."""
    rng = np.random.default_rng(seed)
    query, cand = _grid_set(), _grid_set()
    q_idx = rng.choice(len(query), n_in + n_out, replace=False)
    c_idx = rng.choice(len(cand), n_in + n_out, replace=False)
    centres = cand.centres.copy()
    inverse = np.linalg.inv(linear)
    centres[c_idx[:n_in]] = (inverse @ (query.centres[q_idx[:n_in]] - shift).T).T
    # outliers: where the map would put them, pushed 20 thresholds away in a random direction
    away = rng.normal(size=(n_out, 2))
    away *= 20 * THRESHOLD / np.linalg.norm(away, axis=1, keepdims=True)
    centres[c_idx[n_in:]] = (inverse @ (query.centres[q_idx[n_in:]] + away - shift).T).T
    cand = PatchSet(cand.descriptors, centres, cand.positions, cand.grid, STEP)
    return query, cand, Matches(q_idx, c_idx, np.ones(n_in + n_out, np.float32))


@pytest.mark.parametrize("scorer", [similarity_score, affine_score], ids=["similarity", "affine"])
@pytest.mark.parametrize("deg, zoom", [(0.0, 1.0), (15.0, 1.0), (90.0, 1.0), (-30.0, 1.3), (10.0, 0.7)])
def test_rotation_and_zoom_inliers_are_exactly_the_true_matches(scorer, deg, zoom):
    n_in, n_out = 14, 9
    query, cand, matches = _pair(_rotation(deg, zoom), np.array([11.0, -7.0]), n_in, n_out, seed=int(deg) + 100)
    found = scorer(query, cand, matches)
    np.testing.assert_array_equal(found.inliers, np.arange(n_in + n_out) < n_in)
    assert found.value == pytest.approx(n_in / len(query))
    # the model maps query pixels to candidate pixels, as the RANSAC scorer reports it
    mapped = (found.model @ np.c_[query.centres[matches.query[:n_in]], np.ones(n_in)].T).T
    np.testing.assert_allclose(mapped[:, :2] / mapped[:, 2:], cand.centres[matches.candidate[:n_in]], atol=1e-3)


def test_shear_is_affine_not_similarity():
    sheared = np.array([[1.0, 1.2], [0.0, 1.0]])
    query, cand, matches = _pair(sheared, np.array([3.0, 5.0]), 20, 4, seed=7)
    assert affine_score(query, cand, matches).value == pytest.approx(20 / len(query))
    # a similarity explains only part of a sheared layout
    assert similarity_score(query, cand, matches).value <= 0.75 * 20 / len(query)


def test_an_exact_affine_scores_as_ransac_does():
    """With exact inliers and far outliers both fits find every inlier: the same number, the same unit."""
    query, cand, matches = _pair(np.array([[1.1, 0.1], [-0.05, 0.95]]), np.array([4.0, 2.0]), 18, 10, seed=3)
    assert affine_score(query, cand, matches).value == pytest.approx(ransac_score(query, cand, matches).value)


def test_batched_equals_pair_by_pair_and_ignores_the_rest_of_the_batch():
    pairs = [
        _pair(_rotation(d, z), np.array([d, -d]), n_in, n_out, seed=s)
        for s, (d, z, n_in, n_out) in enumerate(
            [(5, 1.0, 12, 6), (40, 1.2, 5, 20), (0, 1.0, 2, 0), (-20, 0.9, 30, 3), (0, 1.0, 0, 1), (70, 1.0, 7, 7)]
        )
    ]
    query = pairs[0][0]
    cands, matches = [p[1] for p in pairs], [p[2] for p in pairs]
    for batched, single in ((similarity_scores, similarity_score), (affine_scores, affine_score)):
        together = batched(query, cands, matches)
        np.testing.assert_allclose(together, [single(query, c, m).value for c, m in zip(cands, matches)])
        order = [3, 0, 5, 1, 4, 2]
        np.testing.assert_allclose(
            batched(query, [cands[i] for i in order], [matches[i] for i in order]), together[order]
        )
        np.testing.assert_allclose(batched(query, cands[1:2], matches[1:2]), together[1:2])
        np.testing.assert_array_equal(batched(query, cands, matches), together)  # deterministic


def test_too_few_matches_and_degenerate_samples_score_zero():
    query = _grid_set()
    cand = _grid_set()
    two = Matches(np.array([0, 1]), np.array([0, 1]), np.ones(2, np.float32))
    assert affine_score(query, cand, two).value == 0.0  # an affine needs three
    assert similarity_score(query, cand, Matches(np.array([0]), np.array([0]), np.ones(1, np.float32))).value == 0.0
    # three matches on one line (collinear candidate centres) fix no affine map
    line = Matches(np.array([0, 1, 2]), np.array([0, 1, 2]), np.ones(3, np.float32))
    found = affine_score(query, cand, line)
    assert found.value == 0.0 and found.model is None and not found.inliers.any()


def test_the_batch_is_scored_in_bounded_blocks(monkeypatch):
    """Memory stays bounded: a budget of a few pairs' tests gives the same scores in several blocks."""
    pairs = [_pair(_rotation(d), np.zeros(2), 10 + d, 5, seed=d) for d in range(8)]
    query, cands, matches = pairs[0][0], [p[1] for p in pairs], [p[2] for p in pairs]
    whole = affine_scores(query, cands, matches)
    monkeypatch.setattr(scoring, "MOTION_CHUNK_ELEMENTS", scoring.MOTION_HYPOTHESES * 40)
    np.testing.assert_array_equal(affine_scores(query, cands, matches), whole)


def test_the_cascade_prescores_through_the_batched_form(monkeypatch):
    pairs = [_pair(_rotation(d), np.zeros(2), n, 4, seed=n) for d, n in ((0, 20), (10, 6), (5, 14), (0, 3))]
    query, cands, matches = pairs[0][0], [p[1] for p in pairs], [p[2] for p in pairs]
    calls = []
    monkeypatch.setitem(
        scoring.BATCHED_SCORERS, affine_score, lambda q, c, m: calls.append(len(c)) or affine_scores(q, c, m)
    )
    values = score_candidates(affine_score, query, cands, matches)
    assert calls == [len(cands)]  # one call for the whole shortlist
    np.testing.assert_allclose(values, [affine_score(query, c, m).value for c, m in zip(cands, matches)])
    # a scorer without a batched form is called pair by pair, with the same result shape
    assert score_candidates(ransac_score, query, cands, matches).shape == (len(cands),)


def test_cascade_with_the_affine_prescorer_verifies_its_best(monkeypatch):
    """End to end on real mutual matches: the affine pre-pass picks the candidates RANSAC then verifies."""
    g = torch.Generator().manual_seed(0)
    query = _grid_set()
    q_desc = torch.nn.functional.normalize(torch.randn(len(query), 32, generator=g), dim=1)
    query = PatchSet(q_desc, query.centres, query.positions, query.grid, STEP)
    cands = []
    for shared in (5, 40, 12, 60):  # patches of the query each candidate repeats in place (an identity map)
        d = torch.nn.functional.normalize(torch.randn(len(query), 32, generator=g), dim=1)
        d[:shared] = q_desc[:shared]
        cands.append(PatchSet(d, query.centres, query.positions, query.grid, STEP))
    verified = []

    def spy(q, c, m):
        verified.append(next(i for i, x in enumerate(cands) if x is c))
        return ransac_score(q, c, m)

    found = cascade_scores([query], [[c] for c in cands], spy, (1.0,), verify=2, prescorer=affine_score)
    assert sorted(verified) == [1, 3]
    np.testing.assert_array_equal(found.chosen, [False, True, False, True])
    # every repeated patch is an inlier of the identity (chance mutual matches between neighbouring cells may add some)
    assert found.scores[0, 3] >= 60 / len(query) and found.scores[0, 1] >= 40 / len(query)


def test_registered_with_ransacs_score_kind_and_accepted_as_prescorers():
    assert SCORERS.get("similarity") is similarity_score and SCORERS.get("affine") is affine_score
    assert patch_score_kind("affine") == patch_score_kind("similarity") == patch_score_kind("ransac")
    assert RerankConfig("t", prescorer="affine", verify=10).prescorer == "affine"
    with pytest.raises(ConfigError, match="unknown pre-scorer"):
        RerankConfig("t", prescorer="afine", verify=10)


def test_performance_prescores_with_the_affine_fit_and_verifies_with_ransac():
    from vprkit.presets import RERANK_VERIFY, get_rerank_config

    cfg = get_rerank_config("performance")
    assert (cfg.prescorer, cfg.scorer, cfg.verify, cfg.same_place) == ("affine", "ransac", RERANK_VERIFY, "auto")
    assert get_rerank_config("performance-reference").prescorer is None
