"""Which shortlist candidates are the global top-1's own place: its neighbours along the map's route.

Why re-ranking needs this. Patch geometry answers "do these two images show the same scene?" well,
and "which of several overlapping views of one scene is nearest to the query?" badly: a query that
is zoomed, cropped or shifted sideways overlaps *a neighbouring view* best (a 1.3× zoom of a
forward-facing corridor view is the view from a few metres further on). Measured on recordings of
whole shortlists (``benchmarks/bench_rerank.py --record``, ``performance`` patches): every one of
the 15 zoomed-Corridor queries that re-ranking broke moved the top-1 1–4 frames *forward* along the
route, and all of the plain and rotated Corridor breaks moved it by 1–4 frames; the re-ranking gains
on Nordland-600 come from the other direction — 107 of its 114 fixes jump more than 5 places away,
to a different part of the route. So the re-ranker chooses between *places*, and within the global
top-1's place the global order stands: :func:`vprkit.rerank.fusion.rank_shortlist` gives the
top-1's place (this module's mask) its fused scores in global order.

With a fixed ``same_place = N`` (an int), the place of a map row is the row with its ``radius`` = N
nearest neighbours on each side along the route: the ``2 × radius`` rows nearest by position when
every row of the map has a pose (so a second traversal of the same street counts too), else the rows
within ``radius`` of it in the map's row order — the order images were added in, which for a folder of frames is capture order.

How far a place reaches depends on how densely the route was sampled — and, along one route, on how
fast the camera moved there. ``same_place = "auto"`` therefore reads it off the map *around each
top-1*: its neighbours belong to its place outward along the route (nearest first by position when
the map has poses) for as long as each looks as alike to it as the map's most similar
:data:`PLACE_SIMILARITY_QUANTILE` share of image pairs — its near-duplicates
(:func:`place_similarity`; :class:`RouteNeighbours` with ``similarity``), at most
:data:`MAX_PLACE_RADIUS` rows each side. Measured on the benchmark maps (``effnet2-vlad-ma4``): the
95th percentile of all pairs' cosines is 0.787 on Corridor and 0.481 on Nordland-600; the places it
gives reach 2.4 rows back on average on Corridor (a slow walk filmed frame by frame) and 1.1 on
Nordland-600 (frames 40 apart; 354 of its 600 rows have no alike neighbour behind them). A fixed
radius, even one read off the map's mean similarity at each lag (:func:`place_radius`: ±2 rows on Corridor, ±1 on
Nordland-600), fits the average stretch only: rotated Corridor lost two queries to frames three and
four rows back from a top-1 in a stretch where the camera slowed (cosines 0.80–0.84 to the top-1,
above Corridor's 0.787), which the per-top-1 place keeps; and a fixed ±2 cost rotated Nordland 0.01
of the reference's recall.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# Two views of one place are as alike as the map's top 5 % of image pairs (its near-duplicates).
PLACE_SIMILARITY_QUANTILE = 0.95
# The farthest a place reaches, in rows each side (a few stretches of Corridor and Nordland-600 reach it).
MAX_PLACE_RADIUS = 10
# Maps up to this many rows are measured exactly (every pair, every window); larger ones are sampled:
# random pairs for the similarity quantile, route windows for the similarity at each lag.
PLACE_EXACT_ROWS = 2000
PLACE_SAMPLE_PAIRS = 50000
PLACE_SAMPLE_WINDOWS = 1000


def place_radius(
    read_rows: Callable[[np.ndarray], np.ndarray],
    n_rows: int,
    seed: int = 0,
    quantile: float = PLACE_SIMILARITY_QUANTILE,
    max_radius: int = MAX_PLACE_RADIUS,
) -> int:
    """How many rows on each side share a row's place: the largest ``r ≤ max_radius`` such that rows
    1, 2 … r apart have a mean cosine above the ``quantile`` of all pairs' cosines (see the module docs).

    ``read_rows(rows)`` returns the global descriptors of those map rows. A map of up to
    :data:`PLACE_EXACT_ROWS` rows is measured exactly; a larger one is sampled, never loaded whole:
    :data:`PLACE_SAMPLE_WINDOWS` windows of ``max_radius + 1`` consecutive rows and
    :data:`PLACE_SAMPLE_PAIRS` random pairs (seeded, so a map always gets the same radius).
    """
    if n_rows < 3:
        return 0
    threshold, lag_means = _similarity_profile(read_rows, n_rows, seed, quantile, max_radius)
    radius = 0
    for lag, mean in enumerate(lag_means, start=1):
        if mean <= threshold:
            break
        radius = lag
    return radius


def place_similarity(
    read_rows: Callable[[np.ndarray], np.ndarray],
    n_rows: int,
    seed: int = 0,
    quantile: float = PLACE_SIMILARITY_QUANTILE,
) -> float:
    """The cosine above which two map images count as views of one place: the ``quantile`` of all
    pairs' cosines (sampled above :data:`PLACE_EXACT_ROWS` rows, as :func:`place_radius`)."""
    if n_rows < 2:
        return 1.0
    return _similarity_profile(read_rows, n_rows, seed, quantile, 1)[0]


def _similarity_profile(
    read_rows: Callable[[np.ndarray], np.ndarray], n_rows: int, seed: int, quantile: float, max_radius: int
) -> tuple[float, list[float]]:
    """The similarity ``quantile`` over all pairs, and the mean cosine of rows 1 … ``max_radius`` apart."""
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
    return threshold, lag_means


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)


class RouteNeighbours:
    """The rows of a map that share a row's place (see the module docs).

    ``n_rows``: the map's size; ``poses``: its ``N × 2`` positions in metres (NaN where unknown; any
    NaN falls back to row order for the whole map, as a partial pose set cannot say which rows are
    adjacent); ``radius``: neighbours on each side (0: every row is its own place).
    """

    def __init__(
        self,
        n_rows: int,
        radius: int,
        poses: np.ndarray | None = None,
        *,
        read_rows: Callable[[np.ndarray], np.ndarray] | None = None,
        similarity: float | None = None,
    ):
        if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
            raise ValueError(f"a place's radius must be a number of neighbouring rows ≥ 0, got {radius!r}")
        if (read_rows is None) != (similarity is None):
            raise ValueError("a place by similarity needs both read_rows (the map's descriptors) and similarity")
        self.n_rows, self.radius = int(n_rows), int(radius)
        poses = None if poses is None else np.asarray(poses, np.float64).reshape(-1, 2)
        if poses is not None and (len(poses) != self.n_rows or not np.isfinite(poses).all()):
            poses = None
        self.poses = poses
        self.read_rows, self.similarity = read_rows, similarity

    @property
    def by_position(self) -> bool:
        return self.poses is not None

    def place_of(self, row: int) -> np.ndarray:
        """The sorted rows of ``row``'s place, ``row`` included."""
        row = int(row)
        if not 0 <= row < self.n_rows:
            raise IndexError(f"row {row} is outside the map's {self.n_rows} rows")
        if self.poses is None:
            near = np.arange(max(0, row - self.radius), min(self.n_rows, row + self.radius + 1))
        else:
            d = np.linalg.norm(self.poses - self.poses[row], axis=1)
            d[row] = -1.0  # the row itself first, even among rows at the same position
            k = min(self.n_rows, 2 * self.radius + 1)
            near = np.argpartition(d, k - 1)[:k]
            near = near[np.argsort(d[near], kind="stable")]  # nearest first
        if self.similarity is None:
            return np.sort(near)
        return self._alike(row, near)

    def _alike(self, row: int, near: np.ndarray) -> np.ndarray:
        """Of ``near`` (the row's neighbours within the radius), those reached from the row without
        passing a neighbour less alike than :attr:`similarity`: outward along the route on each side,
        or nearest first by position."""
        rows = np.sort(np.asarray(near))
        desc = _unit(self.read_rows(rows))
        sims = dict(zip(rows.tolist(), (desc @ desc[np.searchsorted(rows, row)]).tolist()))
        if self.poses is None:
            keep = [row]
            for direction in (-1, 1):
                r = row + direction
                while r in sims and sims[r] > self.similarity:
                    keep.append(r)
                    r += direction
            return np.sort(np.array(keep))
        keep = []
        for r in np.asarray(near).tolist():  # nearest first, the row itself first of all
            if r != row and sims[r] <= self.similarity:
                break
            keep.append(r)
        return np.sort(np.array(keep))

    def mask(self, shortlist_rows: np.ndarray) -> np.ndarray:
        """Which entries of a shortlist (map rows in global order) are its first entry's place."""
        rows = np.asarray(shortlist_rows)
        return np.isin(rows, self.place_of(int(rows[0])))
