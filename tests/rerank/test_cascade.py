"""The re-ranking cascade on constructed examples: which candidates get the spatial check (RANSAC),
what the others score, and that the batched matcher it relies on finds the same pairs as the original."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vprkit.config import RerankConfig
from vprkit.errors import ConfigError
from vprkit.numerics import zscore
from vprkit.rerank.cascade import cascade_scores, fill_unverified, fine_candidates, prescore, select_for_verification
from vprkit.rerank.matching import mutual_nn_grouped, mutual_nn_stacked
from vprkit.rerank.reranker import PatchReranker
from vprkit.rerank.scoring import PatchSet, SpatialScore

DIM = 64
GRID = (3, 10)  # rows, cols: 30 patches
N_PATCHES = GRID[0] * GRID[1]
# patches each constructed candidate shares with the query, in global order: the 3rd and 5th share most
SHARED = (2, 4, 25, 0, 18, 6)


def _unit(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t, dim=1)


def _patch_set(descriptors: torch.Tensor) -> PatchSet:
    ys, xs = np.meshgrid(np.arange(GRID[0]), np.arange(GRID[1]), indexing="ij")
    pos = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
    return PatchSet(descriptors, (pos + 1) * 16.0, pos, GRID, 16.0)


def _query_and_candidates(seed: int = 0) -> tuple[PatchSet, list[PatchSet]]:
    """A query and candidates sharing ``SHARED[k]`` of its patches (the rest random, seeded)."""
    g = torch.Generator().manual_seed(seed)
    q = _unit(torch.randn(N_PATCHES, DIM, generator=g))
    cands = []
    for k, shared in enumerate(SHARED):
        filler = _unit(torch.randn(N_PATCHES - shared, DIM, generator=g))
        cands.append(_patch_set(torch.cat([q[:shared], filler])))
    return _patch_set(q), cands


class SpyScorer:
    """A spatial scorer that records which candidates it was asked about and scores by match count."""

    def __init__(self, candidates: list[PatchSet]):
        self.ids = {id(c): i for i, c in enumerate(candidates)}
        self.seen: list[int] = []

    def __call__(self, query, candidate, matches) -> SpatialScore:
        self.seen.append(self.ids[id(candidate)])
        return SpatialScore(len(matches) / len(query), np.ones(len(matches), bool))


def test_prescore_weights_z_normalised_match_counts_per_scale():
    counts = np.array([[10, 20, 30], [5, 5, 5], [1, 0, 2]])
    weights = (0.45, 0.15, 0.40)
    expected = 0.45 * zscore(counts[0]) + 0.40 * zscore(counts[2])  # a flat scale adds nothing
    np.testing.assert_allclose(prescore(counts, weights), expected)
    # candidate 1 has fewer matches than 0 at size 2 but trails it by less than 0 trails it at size 8
    assert list(np.argsort(-prescore(counts, weights))) == [2, 1, 0]
    with pytest.raises(ValueError, match="scale weights"):
        prescore(counts, weights[:2])


def test_selection_keeps_the_best_prescores_and_breaks_ties_by_global_order():
    pre = np.array([0.1, 0.9, -1.0, 0.9, 0.5, 0.9])
    np.testing.assert_array_equal(select_for_verification(pre, 2), [False, True, False, True, False, False])
    np.testing.assert_array_equal(select_for_verification(pre, 4), [False, True, False, True, True, True])
    assert select_for_verification(pre, None).all() and select_for_verification(pre, 99).all()
    with pytest.raises(ValueError, match="verify"):
        select_for_verification(pre, 0)


def test_unverified_candidates_score_as_the_weakest_verified_at_each_scale():
    scores = np.array([[0.5, 0.0, 0.2, 0.9], [3.0, 0.0, 1.0, 2.0]])
    chosen = np.array([True, False, True, True])
    np.testing.assert_allclose(fill_unverified(scores, chosen), [[0.5, 0.2, 0.2, 0.9], [3.0, 1.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="verified"):
        fill_unverified(scores, np.zeros(4, bool))


def test_cascade_verifies_the_candidates_with_most_mutual_matches_only():
    query, cands = _query_and_candidates()
    counts = [len(m) for m in mutual_nn_grouped(query.descriptors, [c.descriptors for c in cands])]
    assert all(n >= s for n, s in zip(counts, SHARED))  # the shared patches are mutual matches
    spy = SpyScorer(cands)
    scores, chosen, match_counts = cascade_scores([query], [[c] for c in cands], spy, (1.0,), verify=2)
    np.testing.assert_array_equal(match_counts[0], counts)  # what the choice was made by, for recordings
    assert sorted(set(spy.seen)) == [2, 4]  # the two candidates sharing 25 and 18 patches, not the global top-2
    np.testing.assert_array_equal(chosen, [False, False, True, False, True, False])
    verified = {2: counts[2] / N_PATCHES, 4: counts[4] / N_PATCHES}
    np.testing.assert_allclose(
        scores[0],
        [min(verified.values())] * 2 + [verified[2], min(verified.values()), verified[4], min(verified.values())],
    )
    # verifying all is the original: every candidate scored, each by its own matches
    spy_all = SpyScorer(cands)
    all_scores, all_chosen, _ = cascade_scores([query], [[c] for c in cands], spy_all, (1.0,), verify=None)
    assert all_chosen.all() and sorted(spy_all.seen) == list(range(len(cands)))
    np.testing.assert_allclose(all_scores[0], np.array(counts) / N_PATCHES)


def test_the_reranker_runs_the_cascade_when_verify_is_set_and_the_original_otherwise():
    query, cands = _query_and_candidates(seed=1)
    stub_ext = SimpleNamespace(describe_batch=lambda batch, feats: [[query]])
    stub_candidates = SimpleNamespace(stored=True, close=lambda: None)

    def run(verify):
        settings = RerankConfig("t", scales=((5, 1),), weights=(1.0,), shortlist=len(cands), verify=verify)
        rr = PatchReranker(settings, stub_ext, stub_candidates)
        rr.candidate_sets = lambda rows: {r: [cands[r]] for r in rows}
        rr.scorer = spy = SpyScorer(cands)
        rows, _ = rr.rerank(
            SimpleNamespace(batch=None, features=None),
            np.arange(len(cands))[None],
            np.linspace(0.9, 0.8, len(cands))[None],
        )
        return rows[0], spy.seen

    rows, seen = run(verify=2)
    assert sorted(seen) == [2, 4] and rows[0] == 2  # the most shared patches wins
    rows_all, seen_all = run(verify=None)
    assert sorted(seen_all) == list(range(len(cands))) and rows_all[0] == 2


@pytest.mark.parametrize("max_bytes,sim_bytes", [(1, 10**9), (10**9, 1), (10**9, 2 * 12 * 10 * 4), (10**9, 10**9)])
def test_stacked_matching_finds_the_same_pairs_as_one_by_one(max_bytes, sim_bytes):
    """Whatever the blocks (one candidate, two, all; bounded by descriptors or by similarities)."""
    g = torch.Generator().manual_seed(2)
    q = _unit(torch.randn(12, 8, generator=g))
    cands = [_unit(torch.randn(n, 8, generator=g)) for n in (10, 7, 10, 0, 10, 3)]
    stacked_all = mutual_nn_stacked(q, cands, max_bytes=max_bytes, sim_bytes=sim_bytes)
    for c, single, stacked in zip(cands, mutual_nn_grouped(q, cands), stacked_all):
        assert stacked.query.tolist() == single.query.tolist()
        assert stacked.candidate.tolist() == single.candidate.tolist()
        np.testing.assert_allclose(stacked.similarity, single.similarity, rtol=1e-6)
        assert len(single) > 0 or len(c) == 0
    assert all(len(m) == 0 for m in mutual_nn_stacked(q[:0], cands))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_verify_must_be_a_positive_count(bad):
    with pytest.raises(ConfigError, match="verify"):
        RerankConfig("t", verify=bad)
    assert RerankConfig("t", verify=None).verify is None and RerankConfig("t", verify=7).verify == 7


class FixedScorer:
    """A spatial scorer with a fixed score per candidate (by identity), recording which it scored."""

    def __init__(self, candidates: list[PatchSet], values):
        self.value = {id(c): v for c, v in zip(candidates, values)}
        self.ids = {id(c): i for i, c in enumerate(candidates)}
        self.seen: list[int] = []

    def __call__(self, query, candidate, matches) -> SpatialScore:
        self.seen.append(self.ids[id(candidate)])
        return SpatialScore(self.value[id(candidate)], np.ones(len(matches), bool))


def test_a_prescorer_picks_by_its_own_scores_and_the_rest_keep_them():
    query, cands = _query_and_candidates(seed=3)
    # the fast pass prefers candidates 0 and 5 (not those with the most mutual matches, 2 and 4)
    fast = FixedScorer(cands, [0.30, 0.05, 0.10, 0.02, 0.12, 0.25])
    exact = FixedScorer(cands, [0.40, 0.99, 0.99, 0.99, 0.99, 0.20])
    found = cascade_scores([query], [[c] for c in cands], exact, (1.0,), verify=2, prescorer=fast)
    assert sorted(fast.seen) == list(range(len(cands)))  # the fast scorer sees every candidate
    assert sorted(exact.seen) == [0, 5]  # the exact one only the two it ranks best
    np.testing.assert_array_equal(found.chosen, [True, False, False, False, False, True])
    np.testing.assert_allclose(found.scores[0], [0.40, 0.05, 0.10, 0.02, 0.12, 0.20])
    assert found.match_counts.shape == (1, len(cands))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prescorer": "usac"}, "set verify"),
        ({"prescorer": "nope", "verify": 5}, "unknown pre-scorer"),
        ({"prescorer": "ransac", "scorer": "ransac", "verify": 5}, "both"),
    ],
)
def test_config_validates_the_prescorer(changes, message):
    with pytest.raises(ConfigError, match=message):
        RerankConfig("t", **changes)


def _two_scale_shortlist(seed: int = 5):
    """A query at two scales — coarse (12 patches) first, fine (30 patches) second — and six candidates."""
    g = torch.Generator().manual_seed(seed)
    coarse_grid = (3, 4)

    def coarse_set(d):
        ys, xs = np.meshgrid(np.arange(coarse_grid[0]), np.arange(coarse_grid[1]), indexing="ij")
        pos = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
        return PatchSet(d, (pos + 1) * 32.0, pos, coarse_grid, 32.0)

    query = [
        coarse_set(_unit(torch.randn(12, DIM, generator=g))),
        _patch_set(_unit(torch.randn(N_PATCHES, DIM, generator=g))),
    ]
    cands = [
        [
            coarse_set(torch.cat([query[0].descriptors[:6], _unit(torch.randn(6, DIM, generator=g))])),
            _patch_set(torch.cat([query[1].descriptors[:10], _unit(torch.randn(N_PATCHES - 10, DIM, generator=g))])),
        ]
        for _ in range(6)
    ]
    return query, cands


def test_the_finest_scale_is_matched_only_for_the_candidates_the_coarser_scales_rank_best():
    query, cands = _two_scale_shortlist()
    coarse_fast = [0.10, 0.50, 0.30, 0.05, 0.40, 0.20]  # the coarse first pass ranks 1, 4, 2 best
    fine_fast = [0.90, 0.20, 0.60, 0.90, 0.10, 0.90]  # 0, 3 and 5 would shine at the fine scale: never asked
    fast = FixedScorer([c[0] for c in cands] + [c[1] for c in cands], coarse_fast + fine_fast)
    exact = FixedScorer([c[0] for c in cands] + [c[1] for c in cands], [0.7] * 12)
    found = cascade_scores(
        query, cands, exact, (0.5, 0.5), verify=2, prescorer=fast, fine_budget=3 * N_PATCHES * N_PATCHES
    )  # room for 3 fine-scale candidates
    coarse_seen, fine_seen = sorted(i for i in fast.seen if i < 6), sorted(i - 6 for i in fast.seen if i >= 6)
    assert coarse_seen == list(range(6)) and fine_seen == [1, 2, 4]
    np.testing.assert_allclose(found.scores[1, [0, 3, 5]], 0.10)  # the fine scale's lowest first-pass score
    np.testing.assert_array_equal(found.match_counts[1, [0, 3, 5]], 0)
    assert (found.match_counts[1, [1, 2, 4]] >= 10).all() and (found.match_counts[0] >= 6).all()
    assert found.chosen.sum() == 2 and not found.chosen[[0, 3, 5]].any()
    assert sorted(i % 6 for i in exact.seen) == sorted(2 * np.flatnonzero(found.chosen).tolist())


def test_a_budget_covering_the_shortlist_changes_nothing():
    query, cands = _two_scale_shortlist()
    values = [0.1, 0.5, 0.3, 0.05, 0.4, 0.2, 0.9, 0.2, 0.6, 0.9, 0.1, 0.9]

    def run(fine):
        fast = FixedScorer([c[0] for c in cands] + [c[1] for c in cands], values)
        exact = FixedScorer([c[0] for c in cands] + [c[1] for c in cands], [0.7] * 12)
        return cascade_scores(
            query,
            cands,
            exact,
            (0.5, 0.5),
            verify=2,
            prescorer=fast,
            fine_budget=None if fine is None else fine * N_PATCHES * N_PATCHES,
        )

    full, covered = run(None), run(6)
    np.testing.assert_array_equal(full.scores, covered.scores)
    np.testing.assert_array_equal(full.chosen, covered.chosen)
    np.testing.assert_array_equal(full.match_counts, covered.match_counts)


def test_the_budget_buys_whole_candidates_and_never_fewer_than_verify():
    query, cands = _two_scale_shortlist()
    fine = [c[1] for c in cands]  # 30 patches each, against the query's 30: 900 similarities a candidate
    assert fine_candidates(query[1], fine, 4 * 900) == 4
    assert fine_candidates(query[1], fine, 4 * 900 - 1) == 3  # a candidate is matched whole or not at all
    assert fine_candidates(query[1], fine, 10**9) == len(fine)  # never more than there are
    assert fine_candidates(query[1], fine, 1, verify=2) == 2  # the verified are matched at every scale
    assert fine_candidates(query[1], fine, 1) == 1 and fine_candidates(query[1], [], 10**9) == 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"fine_budget": 30, "scales": ((2, 1), (5, 1)), "weights": (0.5, 0.5)}, "set prescorer"),
        ({"fine_budget": 30, "prescorer": "affine", "verify": 8}, "at least two patch scales"),
        (
            {"fine_budget": 0, "prescorer": "affine", "verify": 8, "scales": ((2, 1), (5, 1)), "weights": (0.5, 0.5)},
            "≥ 1",
        ),
        (
            {
                "fine_budget": True,
                "prescorer": "affine",
                "verify": 8,
                "scales": ((2, 1), (5, 1)),
                "weights": (0.5, 0.5),
            },
            "≥ 1",
        ),
    ],
)
def test_config_validates_the_fine_budget(changes, message):
    with pytest.raises(ConfigError, match=message):
        RerankConfig("t", **{"scorer": "ransac", **changes})
