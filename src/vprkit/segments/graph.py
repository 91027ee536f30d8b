"""Segment graph and SuperSegments.

Centroids of the segments → Delaunay triangulation (scipy.spatial) → binary adjacency ``A`` with
self-loops. SuperSegments of order ``o`` are the rows of ``bool(Aᵒ) @ M`` where ``M`` is the
segment × patch matrix: segment ``s`` grown by its neighbours up to ``o`` hops (``o = 0``: the
segments themselves).

Degenerate layouts never crash: 1 segment → ``[[1]]``; 2 segments → connected; 3+ collinear or
duplicate centroids (Qhull fails) → a chain along the principal axis; points Qhull leaves out of
the triangulation (duplicates) are connected to their nearest triangulated neighbour.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import Delaunay, QhullError


def _chain(points: np.ndarray) -> np.ndarray:
    n = len(points)
    a = np.eye(n, dtype=bool)
    centred = points - points.mean(0)
    if n > 1 and np.abs(centred).sum() > 0:
        axis = np.linalg.svd(centred, full_matrices=False)[2][0]
        order = np.argsort(centred @ axis, kind="stable")
    else:
        order = np.arange(n)
    a[order[:-1], order[1:]] = True
    a[order[1:], order[:-1]] = True
    return a


def adjacency(centroids: np.ndarray) -> np.ndarray:
    """``S×S`` bool adjacency (symmetric, with self-loops) of the Delaunay graph of ``S×2`` centroids."""
    pts = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
    n = len(pts)
    if n <= 2:
        return np.ones((n, n), dtype=bool)
    finite = np.isfinite(pts).all(1)
    if not finite.all():  # empty segments have NaN centroids: put them at the mean, they get neighbours anyway
        pts = pts.copy()
        pts[~finite] = pts[finite].mean(0) if finite.any() else 0.0
    try:
        tri = Delaunay(pts)
    except (QhullError, ValueError):
        return _chain(pts)
    a = np.eye(n, dtype=bool)
    simp = tri.simplices
    for i in range(3):
        for j in range(3):
            if i != j:
                a[simp[:, i], simp[:, j]] = True
    lonely = np.flatnonzero(a.sum(1) == 1)  # points Qhull dropped (duplicates / coplanar)
    if len(lonely):
        used = np.unique(simp)
        for p in lonely:
            d = np.linalg.norm(pts[used] - pts[p], axis=1)
            q = used[np.argmin(d)]
            a[p, q] = a[q, p] = True
    return a


def expand(a: np.ndarray, order: int) -> np.ndarray:
    """``bool(Aᵒ)``: which segments are within ``order`` hops (``order = 0`` → identity)."""
    if order < 0:
        raise ValueError(f"SuperSegment order must be ≥ 0, got {order}")
    a = np.asarray(a, dtype=bool)
    out = np.eye(len(a), dtype=bool)
    step = a.astype(np.int64)
    for _ in range(order):
        out = (out.astype(np.int64) @ step) > 0
    return out


def supersegments(seg_patch: np.ndarray, a: np.ndarray, order: int) -> np.ndarray:
    """Rows of ``bool(Aᵒ) @ M``: ``S×N`` bool patch sets of the SuperSegments centred on each segment."""
    reach = expand(a, order).astype(np.float32)
    return (reach @ np.asarray(seg_patch, dtype=np.float32)) > 0
