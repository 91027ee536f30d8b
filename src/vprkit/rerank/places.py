"""Which shortlist candidates are the global top-1's own place: its neighbours along the map's route.

Why re-ranking needs this. Patch geometry answers "do these two images show the same scene?" well,
and "which of several overlapping views of one scene is nearest to the query?" badly: a query that
is zoomed, cropped or shifted sideways overlaps *a neighbouring view* best (a 1.3× zoom of a
forward-facing corridor view is the view from a few metres further on). Measured on recordings of
whole shortlists (``benchmarks/bench_rerank.py --record``, ``performance`` patches): every one of
the 15 zoomed-Corridor queries that re-ranking broke moved the top-1 1–4 frames *forward* along the
route, and all of the plain and rotated Corridor breaks moved it by 1–2 frames; the re-ranking gains
on Nordland-600 come from the other direction — 107 of its 114 fixes jump more than 5 places away,
to a different part of the route. So the re-ranker chooses between *places*, and within the global
top-1's place the global order stands: :func:`vprkit.rerank.fusion.rank_shortlist` gives the
top-1's place (this module's mask) its fused scores in global order.

The place of a map row is the row with its ``radius`` nearest neighbours on each side along the
route: the ``2 × radius`` rows nearest by position when every row of the map has a pose (so a
second traversal of the same street counts too), else the rows within ``radius`` of it in the
map's row order — the order images were added in, which for a folder of frames is capture order.

How far a place reaches depends on how densely the route was sampled, so :func:`place_radius`
reads it off the map: a place spans the consecutive rows that are, on average, as alike as the
map's most similar :data:`PLACE_SIMILARITY_QUANTILE` share of image pairs (its near-duplicates).
Measured on the benchmark maps (``effnet2-vlad-ma4``, all pairs): Corridor, a slow walk filmed frame
by frame, has mean cosines 0.861, 0.806, 0.771 at 1–3 rows apart against a 95th percentile of 0.787
over all pairs — a place of ±2 rows; Nordland-600, frames 40 apart, 0.498, 0.471 at 1–2 rows apart
against 0.481 — ±1 row. A map whose neighbouring rows are no more alike than that has radius 0:
every row is its own place and re-ranking is the original's. (The rule is only as general as two
maps can show; a fixed radius fitted one of them only: ±1 left Corridor at −0.018 against global,
±2 cost rotated Nordland 0.01 of the reference's recall.)
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# A place spans the consecutive rows as alike, on average, as the map's top 5 % of image pairs.
PLACE_SIMILARITY_QUANTILE = 0.95
# The widest place measured, in rows each side (Corridor's is 3).
MAX_PLACE_RADIUS = 10
# Maps up to this many rows are measured exactly (every pair, every window); larger ones are sampled:
# random pairs for the similarity quantile, route windows for the similarity at each lag.
PLACE_EXACT_ROWS = 2000
PLACE_SAMPLE_PAIRS = 50000
PLACE_SAMPLE_WINDOWS = 1000


def place_radius(read_rows: Callable[[np.ndarray], np.ndarray], n_rows: int, seed: int = 0,
                 quantile: float = PLACE_SIMILARITY_QUANTILE, max_radius: int = MAX_PLACE_RADIUS) -> int:
    """How many rows on each side share a row's place: the largest ``r ≤ max_radius`` such that rows
    1, 2 … r apart have a mean cosine above the ``quantile`` of all pairs' cosines (see the module docs).

    ``read_rows(rows)`` returns the global descriptors of those map rows. A map of up to
    :data:`PLACE_EXACT_ROWS` rows is measured exactly; a larger one is sampled, never loaded whole:
    :data:`PLACE_SAMPLE_WINDOWS` windows of ``max_radius + 1`` consecutive rows and
    :data:`PLACE_SAMPLE_PAIRS` random pairs (seeded, so a map always gets the same radius).
    """
    if n_rows < 3:
        return 0
    span = min(max_radius, n_rows - 1)
    if n_rows <= PLACE_EXACT_ROWS:
        desc = _unit(read_rows(np.arange(n_rows)))
        sims = desc @ desc.T
        threshold = float(np.quantile(sims[np.triu_indices(n_rows, 1)], quantile))
        lag_means = [float(np.diagonal(sims, lag).mean()) for lag in range(1, span + 1)]
    else:
        rng = np.random.default_rng(seed)
        starts = np.sort(rng.choice(n_rows - span, size=min(PLACE_SAMPLE_WINDOWS, n_rows - span), replace=False))
        windows = starts[:, None] + np.arange(span + 1)[None, :]
        pairs = rng.integers(0, n_rows, size=(PLACE_SAMPLE_PAIRS, 2))
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        rows = np.unique(np.concatenate([windows.ravel(), pairs.ravel()]))
        desc = _unit(read_rows(rows))
        w = desc[np.searchsorted(rows, windows)]  # windows × (span+1) × dim
        a, b = desc[np.searchsorted(rows, pairs[:, 0])], desc[np.searchsorted(rows, pairs[:, 1])]
        threshold = float(np.quantile(np.einsum("nd,nd->n", a, b), quantile))
        lag_means = [float(np.einsum("nd,nd->n", w[:, 0], w[:, lag]).mean()) for lag in range(1, span + 1)]
    radius = 0
    for lag, mean in enumerate(lag_means, start=1):
        if mean <= threshold:
            break
        radius = lag
    return radius


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)


class RouteNeighbours:
    """The rows of a map that share a row's place (see the module docs).

    ``n_rows``: the map's size; ``poses``: its ``N × 2`` positions in metres (NaN where unknown; any
    NaN falls back to row order for the whole map, as a partial pose set cannot say which rows are
    adjacent); ``radius``: neighbours on each side (0: every row is its own place).
    """

    def __init__(self, n_rows: int, radius: int, poses: np.ndarray | None = None):
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise ValueError(f"a place's radius must be a number of neighbouring rows ≥ 0, got {radius!r}")
        self.n_rows, self.radius = int(n_rows), int(radius)
        poses = None if poses is None else np.asarray(poses, np.float64).reshape(-1, 2)
        if poses is not None and (len(poses) != self.n_rows or not np.isfinite(poses).all()):
            poses = None
        self.poses = poses

    @property
    def by_position(self) -> bool:
        return self.poses is not None

    def place_of(self, row: int) -> np.ndarray:
        """The sorted rows of ``row``'s place, ``row`` included."""
        row = int(row)
        if not 0 <= row < self.n_rows:
            raise IndexError(f"row {row} is outside the map's {self.n_rows} rows")
        if self.poses is None:
            return np.arange(max(0, row - self.radius), min(self.n_rows, row + self.radius + 1))
        d = np.linalg.norm(self.poses - self.poses[row], axis=1)
        d[row] = -1.0  # the row itself first, even among rows at the same position
        k = min(self.n_rows, 2 * self.radius + 1)
        return np.sort(np.argpartition(d, k - 1)[:k])

    def mask(self, shortlist_rows: np.ndarray) -> np.ndarray:
        """Which entries of a shortlist (map rows in global order) are its first entry's place."""
        rows = np.asarray(shortlist_rows)
        return np.isin(rows, self.place_of(int(rows[0])))
