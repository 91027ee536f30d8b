"""The global gap (which shortlist candidates re-ranking may reorder), on constructed score cases:
a confident global top-1 is kept against a stand-out patch score far below it; among close global
candidates the patch evidence decides; ``global_gap=None`` is the original (patches may overturn anything)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vprkit.config import RerankConfig
from vprkit.errors import ConfigError
from vprkit.numerics import zscore
from vprkit.rerank.fusion import STATISTICS_MIN_CANDIDATES, within_global_gap
from helpers import FixedPatchScores

SHORTLIST = 20


def _scores(top: float, second: float) -> np.ndarray:
    """A shortlist: a top-1, a runner-up, and a tail spread evenly below both."""
    return np.r_[top, second, np.linspace(0.50, 0.40, SHORTLIST - 2)]


def _rerank(gap: float | None, global_scores: np.ndarray, patch: dict[int, float]):
    settings = RerankConfig("t", scales=((5, 1),), weights=(1.0,), shortlist=SHORTLIST, global_gap=gap)
    rr = FixedPatchScores(settings, patch)
    rows = np.arange(SHORTLIST)[None]
    out_rows, out_scores = rr.rerank(SimpleNamespace(batch=None, features=None), rows, global_scores[None])
    return out_rows[0], out_scores[0], rr


def test_mask_keeps_the_top1_and_candidates_within_the_gap_in_z_units():
    g = _scores(0.95, 0.60)
    z = zscore(g)
    for gap in (0.5, 1.0, 2.0, 4.0):
        np.testing.assert_array_equal(within_global_gap(g, gap), z >= z[0] - gap)
    assert within_global_gap(g, 1.0).sum() == 1  # the top-1 stands out by > 1 σ
    assert within_global_gap(g, None).all()
    assert within_global_gap(np.full(SHORTLIST, 0.7), 1.0).all()  # flat: nothing stands out


def test_a_confident_global_top1_is_kept_against_a_standout_patch_score_below_it():
    g = _scores(0.95, 0.60)  # the global top-1 stands out; candidate 5 is far below it
    patch = {r: 0.1 for r in range(SHORTLIST)} | {5: 0.9}
    rows, scores, rr = _rerank(1.0, g, patch)
    assert rows[0] == 0 and list(rows) == list(range(SHORTLIST))  # the global order, untouched
    assert (np.diff(scores) < 0).all()
    assert rr.matched == []  # nothing was worth matching
    original, _, _ = _rerank(None, g, patch)
    assert original[0] == 5  # the original fusion lets the patch score overturn it


def test_among_close_global_candidates_the_patches_decide():
    g = _scores(0.80, 0.79)  # top two indistinguishable globally
    patch = {r: 0.1 for r in range(SHORTLIST)} | {1: 0.9}
    rows, scores, rr = _rerank(1.0, g, patch)
    assert rows[0] == 1 and rows[1] == 0
    # the close ones, and the global top few whose patch scores measure the chance spread
    assert sorted(rr.matched[0]) == list(range(STATISTICS_MIN_CANDIDATES))
    assert list(rows[2:]) == list(range(2, SHORTLIST)) and (np.diff(scores) < 0).all()


def test_the_fusion_among_kept_candidates_is_the_z_sum_with_the_global_spread():
    g = np.r_[0.80, 0.79, 0.785, 0.78, np.linspace(0.3, 0.2, SHORTLIST - 4)]
    patch = {0: 0.2, 1: 0.5, 2: 0.4, 3: 0.9} | {r: 0.0 for r in range(4, SHORTLIST)}
    rows, scores, _ = _rerank(1.0, g, patch)
    kept = np.arange(4)
    matched = np.arange(max(len(kept), STATISTICS_MIN_CANDIDATES))
    # the patch scores z-normalised over the matched; the global ones keep the whole shortlist's
    # spread (no significance margin by default)
    fused = 0.5 * zscore(np.array([patch[r] for r in matched]))[kept] + 0.5 * zscore(g)[kept]
    assert list(rows[:4]) == list(kept[np.argsort(-fused)])
    np.testing.assert_allclose(scores[:4], np.sort(fused)[::-1])


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), True, "1"])
def test_a_bad_gap_is_one_clear_error(bad):
    with pytest.raises(ConfigError, match="global_gap"):
        RerankConfig("t", global_gap=bad)
