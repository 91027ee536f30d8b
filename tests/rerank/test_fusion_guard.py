"""The guarded fusion on constructed shortlists: patch scores normalised over enough matched candidates
to measure chance, and a significance test before the patches overturn the global top-1.

The case that made re-ranking lose: two candidates within the global gap whose patch scores differ by
chance. Z-normalised over those two alone they are ±1 apart whatever the difference, so the runner-up
won; over the matched candidates (the kept plus the global top few), a difference the size of the
chance spread must not overturn the top-1, and a patch score that stands far out of it must.
"""

from __future__ import annotations

from types import SimpleNamespace
from statistics import NormalDist

import numpy as np
import pytest

from vprkit.config import RerankConfig
from vprkit.numerics import zscore
from vprkit.rerank.fusion import (
    DEFAULT_OVERTURN_ALPHA,
    OVERTURN_ALPHA,
    STATISTICS_MIN_CANDIDATES,
    guard_options,
    matched_candidates,
    overturn_margin,
    rank_shortlist,
    within_global_gap,
)
from helpers import FixedPatchScores

SHORTLIST = 30
GAP = 1.0
WEIGHTS = (1.0,)
GLOBAL_WEIGHT = 0.5
# patch scores of the wrong candidates: a spread of chance values (seeded), about 0.30 ± 0.05
CHANCE_MEAN, CHANCE_SPREAD = 0.30, 0.05


def _shortlist() -> np.ndarray:
    """Global scores: a top-1 and a runner-up close to it (both within the gap), the rest far below."""
    return np.r_[0.80, 0.795, np.linspace(0.50, 0.40, SHORTLIST - 2)]


def _chance_patches(seed: int = 0) -> np.ndarray:
    return CHANCE_MEAN + CHANCE_SPREAD * np.random.default_rng(seed).standard_normal(SHORTLIST)


def _rank(patch: np.ndarray, guarded: bool) -> np.ndarray:
    """Shortlist order under the guarded fusion (``guarded``) or the former one (z over the kept only)."""
    g = _shortlist()
    keep = within_global_gap(g, GAP)
    assert keep.sum() == 2  # the case under test: two candidates the global score cannot tell apart
    if guarded:
        matched = matched_candidates(g, keep, STATISTICS_MIN_CANDIDATES)
        fused = rank_shortlist(patch[matched][None], g, keep, WEIGHTS, GLOBAL_WEIGHT, matched, OVERTURN_ALPHA)
    else:
        fused = rank_shortlist(patch[keep][None], g, keep, WEIGHTS, GLOBAL_WEIGHT)
    return np.argsort(-fused, kind="stable")


def test_a_chance_lead_of_the_runner_up_no_longer_overturns_the_top1():
    patch = _chance_patches()
    patch[0], patch[1] = CHANCE_MEAN, CHANCE_MEAN + CHANCE_SPREAD  # the runner-up one chance spread ahead
    assert _rank(patch, guarded=False)[0] == 1  # the former fusion: ±1 among two, the runner-up wins
    assert _rank(patch, guarded=True)[0] == 0


def test_a_patch_score_far_out_of_the_chance_spread_overturns_the_top1():
    patch = _chance_patches()
    patch[0], patch[1] = CHANCE_MEAN, CHANCE_MEAN + 10 * CHANCE_SPREAD  # ten spreads ahead: not chance
    order = _rank(patch, guarded=True)
    assert order[0] == 1 and order[1] == 0
    assert list(order[2:]) == list(range(2, SHORTLIST))  # the rest keep their global order


def test_the_margin_is_the_bonferroni_z_test_of_a_difference_of_two_unit_variables():
    assert overturn_margin(0, 0.05) == 0.0
    assert overturn_margin(1, 0.05) == pytest.approx(np.sqrt(2) * NormalDist().inv_cdf(0.95))
    margins = [overturn_margin(n, 0.05) for n in (1, 2, 5, 20, 100)]
    assert np.all(np.diff(margins) > 0)  # more challengers: a larger lead needed
    assert overturn_margin(5, 0.01) > overturn_margin(5, 0.05)
    with pytest.raises(ValueError, match="alpha"):
        overturn_margin(3, 0.0)


def test_the_top1_overturns_exactly_when_the_lead_exceeds_deficit_plus_margin():
    """Two kept candidates with equal global scores; the runner-up's patch z-lead over the top-1 is
    set just below and just above the margin (in patch-score standard deviations over the matched)."""
    g = np.r_[0.8, 0.8, np.linspace(0.5, 0.4, SHORTLIST - 2)]
    keep = within_global_gap(g, GAP)
    matched = matched_candidates(g, keep, SHORTLIST)
    margin = overturn_margin(int(keep.sum()) - 1, OVERTURN_ALPHA)
    base = _chance_patches()
    for lead, overturned in ((margin - 0.05, False), (margin + 0.05, True)):
        patch = base.copy()
        patch[1] = patch[0]
        # solve for the runner-up's raw score that gives z(runner-up) − z(top-1) = lead over the matched
        for _ in range(50):  # fixed point: the spread depends on the runner-up's own score
            z = zscore(patch[matched])
            patch[1] += (lead - (z[1] - z[0])) * patch[matched].std()
        fused = rank_shortlist(patch[matched][None], g, keep, WEIGHTS, GLOBAL_WEIGHT, matched, OVERTURN_ALPHA)
        assert (int(np.argmax(fused)) == 1) is overturned, lead


def test_statistics_candidates_are_matched_only_when_something_can_move():
    g = _shortlist()
    keep = within_global_gap(g, GAP)
    matched = matched_candidates(g, keep, 10)
    assert matched[:10].all() and not matched[10:].any() and (matched | ~keep).all()
    alone = np.zeros(SHORTLIST, bool)
    alone[0] = True
    np.testing.assert_array_equal(matched_candidates(g, alone, 10), alone)  # a lone top-1: nothing matched
    with pytest.raises(ValueError, match="matched"):
        rank_shortlist(np.zeros((1, 1)), g, keep, WEIGHTS, GLOBAL_WEIGHT, alone)


def test_presets_with_a_gap_are_guarded_and_the_original_is_not():
    assert guard_options(2.5) == {"minimum": STATISTICS_MIN_CANDIDATES, "alpha": DEFAULT_OVERTURN_ALPHA}
    assert guard_options(None) == {"minimum": 0, "alpha": None}


@pytest.mark.parametrize("lead, winner", [(1, 0), (10, 1)])
def test_the_reranker_matches_the_statistics_candidates_and_applies_the_test(lead, winner):
    patch = _chance_patches()
    patch[0], patch[1] = CHANCE_MEAN, CHANCE_MEAN + lead * CHANCE_SPREAD
    settings = RerankConfig("t", scales=((5, 1),), weights=WEIGHTS, shortlist=SHORTLIST, global_gap=GAP)
    rr = FixedPatchScores(settings, dict(enumerate(patch)))
    rr.guard = {**rr.guard, "alpha": OVERTURN_ALPHA}  # the test on (off by default, see fusion.DEFAULT_OVERTURN_ALPHA)
    rows, scores = rr.rerank(SimpleNamespace(batch=None, features=None), np.arange(SHORTLIST)[None], _shortlist()[None])
    assert rows[0, 0] == winner
    assert sorted(rr.matched[0]) == list(range(STATISTICS_MIN_CANDIDATES))
    assert list(rows[0, 2:]) == list(range(2, SHORTLIST)) and (np.diff(scores[0]) < 0).all()
