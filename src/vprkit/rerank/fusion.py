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
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..numerics import zscore

# The former name of :func:`vprkit.numerics.zscore` (z-scores over ``valid`` entries, others → 0).
znorm = zscore


def fuse_scales(per_scale: Sequence[np.ndarray], weights: Sequence[float], valid: np.ndarray | None = None) -> np.ndarray:
    """``Σ_s w_s · z(score_s)`` — the original's multi-scale fusion."""
    if len(per_scale) != len(weights):
        raise ValueError(f"{len(per_scale)} scales but {len(weights)} weights")
    return sum(w * zscore(s, valid) for s, w in zip(per_scale, weights))


def fuse_with_global(patch: np.ndarray, global_scores: np.ndarray, global_weight: float, valid: np.ndarray | None = None) -> np.ndarray:
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
