"""Score fusion over a query's shortlist: per-scale z-normalisation, weighted sums, global fusion.

Scores of different scales (and of the global descriptor) live on different scales; Patch-NetVLAD
z-normalises each over the shortlist before the weighted sum. A constant score row carries no
information and z-normalises to zeros, so it cannot move the ranking.
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
