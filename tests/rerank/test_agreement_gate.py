"""``min_agreement``: the patches may reorder a shortlist only when they found the query at all.

A perfect alignment — every query patch matched and in agreement — scores what
:func:`~vprkit.rerank.scoring.perfect_score` says for every scorer, so a score over it (the agreement)
reads alike for inlier ratios and for rapid scores, which grow with the patch grid. When the best
matched candidate's agreement is below a preset's ``min_agreement`` the patches are chance and the
global order stands; above it they rank as before, however z-normalisation spreads them.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vprkit.config import RerankConfig
from vprkit.errors import ConfigError
from vprkit.presets import RERANK_STORAGE_MIN_AGREEMENT, get_rerank_config
from vprkit.rerank.fusion import best_agreement, rank_shortlist, within_global_gap
from vprkit.rerank.matching import Matches
from vprkit.rerank.scoring import PERFECT_SCORES, SCORERS, perfect_score
from helpers import FixedPatchScores, grid_patch_set as grid_set

SHORTLIST = 12


@pytest.mark.parametrize("scorer", sorted(SCORERS.names()))
@pytest.mark.parametrize("grid", [(3, 10), (11, 16)])
def test_every_scorer_gives_a_perfect_alignment_its_perfect_score(scorer, grid):
    q = grid_set(*grid)
    n = len(q)
    identity = Matches(np.arange(n), np.arange(n), np.ones(n))
    assert SCORERS.get(scorer)(q, q, identity).value == pytest.approx(perfect_score(scorer, q))
    # half the query's patches matched in agreement, the rest unmatched: half a perfect alignment
    # (rapid scoring's mean displacement is that of the matched half, so it is exact there too)
    half = Matches(np.arange(n // 2), np.arange(n // 2), np.ones(n // 2))
    assert SCORERS.get(scorer)(q, q, half).value / perfect_score(scorer, q) == pytest.approx((n // 2) / n)


def test_rapid_scorings_perfect_score_grows_with_the_grid_and_inlier_ratios_do_not():
    assert perfect_score("rapid", grid_set(3, 10)) == 9**2 + 2**2
    assert perfect_score("rapid", grid_set(11, 16)) == 15**2 + 10**2
    assert perfect_score("ransac", grid_set(3, 10)) == perfect_score("ransac", grid_set(11, 16)) == 1.0
    assert set(PERFECT_SCORES.names()) == set(SCORERS.names())


def test_best_agreement_reads_each_scale_against_its_own_perfect_score():
    per_scale = np.array(
        [
            [10.0, 40.0, 20.0],  # rapid-like, perfect 80
            [0.50, 0.10, 0.25],
        ]
    )  # inlier ratios, perfect 1
    perfect = [80.0, 1.0]
    # candidate agreements: 0.25·0.125 + 0.75·0.5 = 0.40625; 0.25·0.5 + 0.75·0.1 = 0.2; 0.25·0.25 + 0.75·0.25
    assert best_agreement(per_scale, perfect, (0.25, 0.75)) == pytest.approx(0.40625)
    assert best_agreement(per_scale, perfect, (1.0, 0.0)) == pytest.approx(0.5)
    assert best_agreement(np.zeros((2, 0)), perfect, (0.5, 0.5)) == 0.0
    with pytest.raises(ValueError, match="one perfect score and one weight per scale"):
        best_agreement(per_scale, [80.0], (0.5, 0.5))


def _global() -> np.ndarray:
    return np.r_[0.80, 0.79, 0.78, np.linspace(0.60, 0.50, SHORTLIST - 3)]


def _patches(scale: float) -> np.ndarray:
    """Chance-like patch scores with candidate 2 well ahead; ``scale`` sets how much they agree."""
    p = np.r_[0.3, 0.2, 1.0, np.linspace(0.25, 0.1, SHORTLIST - 3)]
    return scale * p


@pytest.mark.parametrize("scale, expect_top", [(0.05, 0), (0.5, 2)])
def test_the_patches_reorder_only_when_their_best_candidate_agrees_enough(scale, expect_top):
    g = _global()
    keep = within_global_gap(g, None)
    patch = _patches(scale)[None]
    fused_free = rank_shortlist(patch, g, keep, (1.0,), 0.5)
    # z-normalisation makes the two scales alike: without the check, candidate 2 wins either way
    assert np.argmax(fused_free) == 2
    fused = rank_shortlist(patch, g, keep, (1.0,), 0.5, perfect=[1.0], min_agreement=0.1)
    order = np.argsort(-fused, kind="stable")
    assert order[0] == expect_top
    if expect_top == 0:
        assert list(order) == list(range(SHORTLIST))  # the global order stands, all of it
    else:
        np.testing.assert_array_equal(fused, fused_free)  # above the check: the fusion is unchanged


def test_min_agreement_needs_the_perfect_scores():
    g = _global()
    with pytest.raises(ValueError, match="perfect"):
        rank_shortlist(_patches(1.0)[None], g, within_global_gap(g, None), (1.0,), 0.5, min_agreement=0.1)


def test_the_reranker_keeps_the_global_order_when_its_patches_found_nothing():
    settings = RerankConfig("t", scales=((5, 1),), weights=(1.0,), shortlist=SHORTLIST, min_agreement=0.1)
    rows = np.arange(SHORTLIST)[None]
    g = _global()[None]
    query = SimpleNamespace(batch=None, features=None)
    # rapid-like scores on a grid whose perfect score is 85: the leader aligns 1/17 of it, then half
    weak = FixedPatchScores(settings, dict(enumerate(_patches(5.0))), perfect=85.0)
    strong = FixedPatchScores(settings, dict(enumerate(_patches(42.5))), perfect=85.0)
    assert list(weak.rerank(query, rows, g)[0][0]) == list(range(SHORTLIST))
    assert strong.rerank(query, rows, g)[0][0][0] == 2


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, True, "0.1"])
def test_min_agreement_outside_0_1_is_a_clear_config_error(bad):
    with pytest.raises(ConfigError, match="min_agreement must be a share of a perfect alignment"):
        RerankConfig("t", min_agreement=bad)


def test_storage_checks_agreement_and_the_original_ranking_does_not():
    storage = get_rerank_config("storage")
    assert storage.min_agreement == RERANK_STORAGE_MIN_AGREEMENT and 0 < storage.min_agreement < 1
    assert get_rerank_config("storage-patch-only").min_agreement is None
    assert get_rerank_config("performance-reference").min_agreement is None
    # a fusion setting, not a storage one: the map's patches are the same with or without it
    assert storage.extension_options() == storage.replace(min_agreement=None).extension_options()
    assert RerankConfig.from_dict(storage.to_dict()) == storage
