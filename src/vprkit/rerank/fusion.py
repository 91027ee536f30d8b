"""Score fusion over a query's shortlist: per-scale z-normalisation, weighted sums, global fusion,
and which candidates are worth re-ranking at all.

Scores of different scales (and of the global descriptor) live on different scales; Patch-NetVLAD
z-normalises each over the shortlist before the weighted sum. A constant score row carries no
information and z-normalises to zeros, so it cannot move the ranking.

**Why re-ranking can lose, and the global gap.** A z-normalised fusion treats every shortlist
candidate alike: a candidate the global descriptor rates far below its top-1 still wins whenever
its patch score stands out by a little more. Where patch geometry is weak — fisheye corridors,
lateral motion, rotated or zoomed views whose patches no longer line up — the patch score of a
wrong neighbour stands out by chance often enough to overturn a confident global top-1.
:func:`within_global_gap` therefore keeps, for re-ranking, only the candidates whose global
similarity lies within ``gap`` standard deviations (z-units over the shortlist) of the global
top-1: a top-1 that stands out from the shortlist by more than ``gap`` is kept as it is (the
global descriptor is sure), and when the top few are close — where the global descriptor cannot
tell them apart, and where patches help (Nordland's seasons) — the patches decide among them. As
the kept candidates are the only ones matched, it also cuts the re-ranking time.

**Did the patches find the query at all?** z-normalisation also hides how *much* the patches agree:
a shortlist whose best candidate aligns a tenth of the query's patches z-normalises like one whose
best aligns half. Where the patches' matches fail — a quarter-turned query against upright
references, whose coarse patch descriptors no longer match — every candidate's score is chance, and
a chance leader still overturns a right global top-1. :func:`best_agreement` measures the best
matched candidate's score as a fraction of a perfect alignment (every query patch matched and in
agreement, :func:`vprkit.rerank.scoring.perfect_score`); below a preset's ``min_agreement`` the
patches have found nothing and the global order stands.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Sequence

import numpy as np

from ..numerics import zscore

SQRT2 = float(np.sqrt(2.0))
# The guarded fusion (presets with a global gap): candidates always matched, when anything is
# re-ranked, to measure the spread of patch scores (see rank_shortlist) ...
STATISTICS_MIN_CANDIDATES = 10
# ... and the family-wise chance that the patches overturn a right global top-1 by chance (overturn_margin),
# for callers that ask for the significance test. Not on by default: measured on Nordland-600 (speed,
# bench_rerank --replay) it removed the whole seasonal gain (0.525 → 0.413 at α = 0.05; global 0.412).
OVERTURN_ALPHA = 0.05
# The default presets' test level: None = no significance test (statistics over the matched only).
DEFAULT_OVERTURN_ALPHA: float | None = None


def fuse_scales(
    per_scale: Sequence[np.ndarray], weights: Sequence[float], valid: np.ndarray | None = None
) -> np.ndarray:
    """``Σ_s w_s · z(score_s)`` — the original's multi-scale fusion."""
    if len(per_scale) != len(weights):
        raise ValueError(f"{len(per_scale)} scales but {len(weights)} weights")
    return sum(w * zscore(s, valid) for s, w in zip(per_scale, weights))


def fuse_with_global(
    patch: np.ndarray, global_scores: np.ndarray, global_weight: float, valid: np.ndarray | None = None
) -> np.ndarray:
    """``(1 − g)·z(patch) + g·z(global)``; ``g = 0`` ranks by patches alone, as the original does."""
    return (1.0 - global_weight) * zscore(patch, valid) + global_weight * zscore(global_scores, valid)


def within_global_gap(global_scores: np.ndarray, gap: float | None) -> np.ndarray:
    """Which shortlist candidates to re-rank: those within ``gap`` standard deviations of the best.

    ``global_scores`` are one query's shortlist similarities (higher is better, any order); the
    mask keeps every candidate whose z-score over the shortlist is at least ``max z − gap``, so
    the global top-1 is always kept. ``gap=None`` keeps them all (the original re-ranks the whole
    shortlist). A shortlist with equal scores keeps everything (no candidate stands out).
    """
    g = np.asarray(global_scores, np.float64)
    if gap is None:
        return np.ones(g.shape, bool)
    z = zscore(g)
    return z >= z.max() - float(gap)


def overturn_margin(challengers: int, alpha: float) -> float:
    """How far (in standard deviations of the patch score) a challenger must out-score the global
    top-1 for the patches to overturn it, with ``challengers`` candidates trying at once.

    Under the null hypothesis that the patch scores of the challenger and of the top-1 differ only by
    chance — two independent draws from the shortlist's patch-score distribution, unit variance once
    z-normalised — their difference is N(0, 2). Testing every challenger at level ``alpha / n``
    (Bonferroni, so that *any* of the ``n`` overturns by chance with probability ≤ ``alpha``) needs
    a difference of ``√2 · Φ⁻¹(1 − alpha / n)``: at α = 0.05, 2.3 σ for one challenger, 3.6 σ for
    ten, 4.0 σ for twenty — growing slowly with ``n``. Zero challengers: nothing to test (0).
    """
    if challengers < 1:
        return 0.0
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return SQRT2 * NormalDist().inv_cdf(1.0 - alpha / challengers)


def matched_candidates(global_scores: np.ndarray, keep: np.ndarray, minimum: int) -> np.ndarray:
    """Which shortlist candidates to match: the kept ones, and — when at least two are kept, so that
    something may be reordered — the global top ``minimum`` as well, whose patch scores estimate the
    spread of chance patch scores (see :func:`rank_shortlist`). ``global_scores`` in global order."""
    keep = np.asarray(keep, bool)
    if keep.sum() < 2 or minimum <= 0:
        return keep.copy()
    top = np.zeros(len(keep), bool)
    top[np.argsort(-np.asarray(global_scores, np.float64), kind="stable")[:minimum]] = True
    return keep | top


def guard_options(global_gap: float | None) -> dict:
    """``rank_shortlist``'s guard for a preset: with a global gap (the trust-guarded presets) patch
    statistics over at least :data:`STATISTICS_MIN_CANDIDATES` and the significance test at
    :data:`DEFAULT_OVERTURN_ALPHA` (off: see :data:`OVERTURN_ALPHA`); without (the original Patch-NetVLAD fusion, kept for fidelity) neither."""
    if global_gap is None:
        return {"minimum": 0, "alpha": None}
    return {"minimum": STATISTICS_MIN_CANDIDATES, "alpha": DEFAULT_OVERTURN_ALPHA}


def best_agreement(per_scale: np.ndarray, perfect: Sequence[float], weights: Sequence[float]) -> float:
    """The best candidate's agreement: ``max_c Σ_s w_s · score[s, c] / perfect[s] / Σ_s w_s``, in [0, 1].

    ``per_scale``: ``scales × candidates`` spatial scores; ``perfect``: each scale's perfect score for this
    query (:func:`vprkit.rerank.scoring.perfect_score`), so that scales and scorers of different ranges
    (inlier ratios, rapid scores that grow with the patch grid) are read on one scale: the share of a
    perfect alignment. No candidates: 0.
    """
    per_scale = np.asarray(per_scale, np.float64)
    perfect = np.asarray(perfect, np.float64)
    w = np.asarray(weights, np.float64)
    if per_scale.ndim != 2 or per_scale.shape[0] != len(perfect) or len(w) != len(perfect):
        raise ValueError(
            f"scores of shape {per_scale.shape} need one perfect score and one weight per scale, "
            f"got {len(perfect)} and {len(w)}"
        )
    if per_scale.shape[1] == 0 or w.sum() <= 0:
        return 0.0
    share = per_scale / np.where(perfect > 0, perfect, np.inf)[:, None]
    return float((w @ share).max() / w.sum())


def global_order_within(fused: np.ndarray, place: np.ndarray) -> np.ndarray:
    """``fused`` with the entries of ``place`` (a mask over the shortlist, in global order) given their
    own scores sorted descending, in global order: the group keeps its scores (so it competes with
    other places as before) while the global order decides within it."""
    fused = np.array(fused, np.float64)
    members = np.flatnonzero(np.asarray(place, bool))
    fused[members] = np.sort(fused[members])[::-1]
    return fused


def rank_shortlist(
    per_scale: np.ndarray | None,
    head_scores: np.ndarray,
    keep: np.ndarray,
    weights: Sequence[float],
    global_weight: float,
    matched: np.ndarray | None = None,
    alpha: float | None = None,
    same_place: np.ndarray | None = None,
    perfect: Sequence[float] | None = None,
    min_agreement: float | None = None,
) -> np.ndarray:
    """Final scores of one query's shortlist (higher is better; sort descending, stably, for the order).

    ``head_scores``: the shortlist's global similarities in global order; ``keep``: which of them may
    be reordered (:func:`within_global_gap`); ``matched`` (default ``keep``, must contain it): which
    were matched, ``per_scale`` being their ``scales × matched`` spatial scores (``None`` when fewer
    than two were kept: nothing to reorder). The kept candidates are fused; the others follow below
    them in global order.

    Fusion: ``(1 − g)·z(patch) + g·z(global)``, the patch score z-normalised over the *matched*
    candidates and the global one over the whole shortlist. Normalising over the kept candidates
    alone is what made re-ranking lose: with two kept, their patch z-scores are ±1 whatever the
    difference, so a challenger one inlier ahead overturns the top-1; over the matched set (the kept
    plus the global top ``minimum``) the unit is the spread of patch scores over candidates that
    are mostly wrong — chance.

    ``alpha``: the global top-1 is overturned only when the patches say so significantly — it gets a
    head start of ``(1 − g) · overturn_margin(kept − 1, alpha)`` (:func:`overturn_margin`), i.e. a
    challenger must out-score it by the global deficit plus that margin in patch standard deviations.
    ``None``: no test (the original fusion).

    ``same_place``: a mask over the shortlist of the global top-1's place (its route neighbours,
    :mod:`vprkit.rerank.places`); among its kept members the global order stands
    (:func:`global_order_within`), so the patches choose between places and not between
    neighbouring views of one. ``None``: off (the original).

    ``min_agreement`` (with ``perfect``, each scale's perfect score for this query): when the best matched
    candidate's agreement (:func:`best_agreement`) falls below it, the patches found nothing and nothing
    is reordered — the shortlist keeps its global order. ``None``: off (the original). One pure function, so that the live
    re-ranker and a replay of recorded scores (``benchmarks/bench_rerank.py --replay``) rank alike.
    """
    head_scores = np.asarray(head_scores, np.float64)
    keep = np.asarray(keep, bool)
    matched = keep if matched is None else np.asarray(matched, bool)
    if (keep & ~matched).any():
        raise ValueError("every kept candidate must be matched")
    picked = np.flatnonzero(keep)
    if per_scale is not None and min_agreement is not None:
        if perfect is None:
            raise ValueError("min_agreement needs each scale's perfect score (perfect)")
        if best_agreement(per_scale, perfect, weights) < min_agreement:
            per_scale = None  # the patches found nothing: the global order stands
    if per_scale is None or len(picked) < 2:
        fused_kept = np.zeros(len(picked))
    else:
        patch = np.zeros(len(head_scores))
        patch[matched] = zscore(fuse_scales(list(per_scale), weights))
        # the global score keeps its own spread over the whole shortlist as the unit, so that two
        # candidates it can barely tell apart do not become ±1 apart among the few kept
        fused_kept = (1.0 - global_weight) * patch[picked] + global_weight * zscore(head_scores)[picked]
        if alpha is not None:
            top = int(np.argmax(np.where(keep, head_scores, -np.inf)))
            fused_kept[np.searchsorted(picked, top)] += (1.0 - global_weight) * overturn_margin(len(picked) - 1, alpha)
    rest = np.flatnonzero(~keep)  # in global order
    fused = np.empty(len(head_scores))
    fused[picked] = fused_kept
    fused[rest] = (fused_kept.min() if len(picked) else 0.0) - 1.0 - np.arange(len(rest))
    if same_place is not None:
        place = np.asarray(same_place, bool)
        if place.shape != keep.shape or not place[0]:
            raise ValueError("same_place must be a mask over the shortlist that holds the global top-1")
        fused = global_order_within(fused, place & keep)
    return fused
