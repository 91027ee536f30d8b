"""Score fusion over a query's shortlist: per-scale z-normalisation, weighted sums, global fusion.

Scores of different scales (and of the global descriptor) live on different scales; Patch-NetVLAD
z-normalises each over the shortlist before the weighted sum. A constant score row carries no
information and z-normalises to zeros, so it cannot move the ranking.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Standard deviations below this are treated as "all candidates scored the same".
FLAT_STD = 1e-9


def znorm(scores: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Z-normalise along the last axis over ``valid`` entries (others → 0)."""
    s = np.asarray(scores, np.float64)
    v = np.ones_like(s, bool) if valid is None else np.asarray(valid, bool)
    n = np.maximum(v.sum(-1, keepdims=True), 1)
    mean = np.where(v, s, 0).sum(-1, keepdims=True) / n
    var = np.where(v, (s - mean) ** 2, 0).sum(-1, keepdims=True) / n
    std = np.sqrt(var)
    z = np.where(std > FLAT_STD, (s - mean) / np.where(std > FLAT_STD, std, 1.0), 0.0)
    return np.where(v, z, 0.0)


def fuse_scales(per_scale: Sequence[np.ndarray], weights: Sequence[float], valid: np.ndarray | None = None) -> np.ndarray:
    """``Σ_s w_s · z(score_s)`` — the original's multi-scale fusion."""
    if len(per_scale) != len(weights):
        raise ValueError(f"{len(per_scale)} scales but {len(weights)} weights")
    return sum(w * znorm(s, valid) for s, w in zip(per_scale, weights))


def fuse_with_global(patch: np.ndarray, global_scores: np.ndarray, global_weight: float, valid: np.ndarray | None = None) -> np.ndarray:
    """``(1 − g)·z(patch) + g·z(global)``; ``g = 0`` ranks by patches alone, as the original does."""
    return (1.0 - global_weight) * znorm(patch, valid) + global_weight * znorm(global_scores, valid)
