"""Sequence matching (SeqSLAM-style): score a *run* of queries against a *run* of map places.

One image of a winter railway looks like many summer ones; ten consecutive images seldom do. Given a
similarity matrix ``S`` — queries in time order × map rows in **route order** — the score of "the
current query is at map row j" is the mean similarity along a trajectory that ends at ``(t, j)`` and
goes back ``length − 1`` queries:

- ``trajectory="line"`` (SeqSLAM, Milford & Wyeth 2012): straight lines ``j − round(v·k)`` for every
  velocity ``v`` of a range (map rows per query), the best line wins. Cheap, exact for a steady
  speed.
- ``trajectory="flexible"``: a monotone path whose advance per query is any whole number of rows
  within the velocity range, found by dynamic programming, with ``turn_penalty`` (similarity units)
  per row of change in advance between consecutive steps. It follows a camera whose speed varies
  from frame to frame (frames dropped at random), where a straight line drifts off the true path.

Options, each measured in ``benchmarks/bench_sequence.py``:

- ``contrast_window``: SeqSLAM's local contrast normalisation of each similarity row over a window
  of ``contrast_window + 1`` map rows (z-score against the local mean and sample std). Off by
  default: on raw cosine similarities of learned descriptors with a velocity search it lowers recall.
- ``hub_correction`` (on by default): subtract from each similarity the mean similarity of the
  queries seen so far (this one included) to the same map row. Some map places look like every
  query ("hubs": a featureless stretch, a frame where the train stood); their similarity is high to
  everything and trajectories ride them. Centring each map row on the running query mean removes
  that offset causally, so streams and offline evaluation compute the same thing. On Nordland-600
  with a variable speed it lifts R@1 from 0.88 to 0.91 (length 10) and at a steady speed from 0.960
  to 0.978; on Corridor length 10 is unchanged (0.991), length 5 falls from 0.991 to 0.973 (111
  queries: the running mean of a short, nearly uniform corridor is dominated by the places themselves).
- ``both_directions``: also search negative velocities (the map traversed the other way).
- ``anchor``: ``"end"`` scores the newest query of the window (causal: what a stream can do);
  ``"centre"`` scores the middle one, as SeqSLAM's original offline search does — the past and the
  future half each take their best trajectory through the cell, which pins the place from both
  sides (on Nordland with a variable speed the end-anchored search mostly misses by 1–3 rows: the
  last step is free). Evaluation and loop closure, which have every frame, use ``"centre"``.

Steps of a trajectory that fall outside the map, or before the first query, count as the query's
*mean* similarity (no evidence either way), so that short lines at the map's ends are not favoured.
Scores are "higher is better": the mean along the trajectory of the *prepared* similarity — with the
default hub correction, each cosine minus its map row's running mean over the queries (≈ 0.09 where the
raw cosine is ≈ 0.76 on Nordland), or the mean local z-score with contrast normalisation
(:data:`CONTRAST_SCORE_KIND`). They rank; what an answer reports as ``sequence_mean_cosine``
(:data:`SCORE_KIND`) is :attr:`TrajectoryEvidence.mean_cosine`, the mean *raw* cosine of the window's
frames along the winning trajectory, with the trajectory's *support* (the share of the window's frames whose
own top-1 row lies on it, :func:`trajectory_evidence`): the sequence consistency the estimate's confidence
may use (:mod:`vprkit.pipeline.sequence_frames`).

Everything is vectorised over map rows (and over queries, in chunks); Python loops run over the
sequence length and the velocities only. :class:`OnlineSequenceMatcher` keeps a ring buffer of the
last ``length`` similarity rows, so a stream pays O(length · rows · velocities) per frame.

The map's row order must be the route order. A map whose keys are frames with sortable names
(``images-00010.png`` …) satisfies it; :func:`check_route_order` checks keys (sorted) or poses (consecutive
rows close together compared with rows half the map apart).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError
from ..registry import Registry

SCORE_KIND = "sequence_mean_cosine"
# Where the scored query sits in its window: at the end (causal, streams) or in the middle (offline).
ANCHORS = ("end", "centre")
CONTRAST_SCORE_KIND = "sequence_mean_local_zscore"
# SeqSLAM's defaults (OpenSeqSLAM): contrast window R = 10 rows, sequence length ds = 10.
SEQSLAM_CONTRAST_WINDOW = 10
DEFAULT_LENGTH = 10
# Whole rows per query, 1–3: on Nordland-600 fractional velocities (0.5, 1.5 …) add lines that only
# catch noise (R@1 at length 10: 0.935 with 0.5–3 by 0.5, 0.953 with 1, 2, 3 — as with the true velocity).
DEFAULT_MIN_VELOCITY = 1.0
DEFAULT_MAX_VELOCITY = 3.0
DEFAULT_VELOCITY_STEP = 1.0
# Flexible trajectories: similarity lost per row of change in advance between consecutive steps.
# None by default: flexible paths are for speeds that change every frame, where any penalty costs
# recall (Nordland-600 with 0–2 frames dropped, L = 10, centre: 0.877 without, 0.846 with 0.02);
# 0.02 (a third of the spread of one query's similarities) helps on a steady speed (0.940 → 0.957).
DEFAULT_TURN_PENALTY = 0.0
# Hub correction: the running mean is shrunk as if HUB_PRIOR_QUERIES queries with no offset came first.
# 1 keeps the first frames meaningful (0 zeroes the first row) and costs little: Nordland-600 length 10
# 0.983 → 0.978 (steady), 0.913 → 0.906 (variable speed); Corridor length 5 0.955 → 0.973.
HUB_PRIOR_QUERIES = 1.0
# Floor of the local standard deviation in contrast normalisation (a flat window is not a signal).
MIN_LOCAL_STD = 1e-6
# Bound the Q×V×N working arrays of the offline scorer (float32 elements per chunk).
CHUNK_ELEMENTS = 1 << 24
# Route-order check on poses: consecutive rows of a route are close compared with rows half the route
# apart; in a shuffled map the two distances are alike.
ROUTE_STEP_SHARE = 0.25


# ---- settings --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SequenceSettings:
    """How queries are matched as a sequence (validated on construction).

    ``length``: queries per trajectory (1 = single image). ``anchor``: the scored query is the last of
    them (``"end"``, causal: streams) or the middle one (``"centre"``, offline: SeqSLAM's original window).
    ``min_velocity`` … ``max_velocity`` by ``velocity_step``: map rows advanced per query.
    """

    length: int = DEFAULT_LENGTH
    min_velocity: float = DEFAULT_MIN_VELOCITY
    max_velocity: float = DEFAULT_MAX_VELOCITY
    velocity_step: float = DEFAULT_VELOCITY_STEP
    both_directions: bool = False
    hub_correction: bool = True
    contrast_window: int | None = None
    trajectory: str = "line"
    turn_penalty: float = DEFAULT_TURN_PENALTY
    anchor: str = "end"

    def __post_init__(self) -> None:
        if int(self.length) != self.length or self.length < 1:
            raise ConfigError(f"sequence length must be a whole number ≥ 1, got {self.length!r}")
        if not (0 <= self.min_velocity <= self.max_velocity) or not np.isfinite(self.max_velocity):
            raise ConfigError(
                f"velocities must satisfy 0 ≤ min ≤ max (rows per query), got {self.min_velocity}…{self.max_velocity}"
            )
        if self.velocity_step <= 0:
            raise ConfigError(f"velocity_step must be > 0, got {self.velocity_step}")
        if self.contrast_window is not None and (
            int(self.contrast_window) != self.contrast_window or self.contrast_window < 2
        ):
            raise ConfigError(
                f"contrast_window must be a whole number ≥ 2 (map rows) or None, got {self.contrast_window!r}"
            )
        if self.turn_penalty < 0:
            raise ConfigError(f"turn_penalty must be ≥ 0, got {self.turn_penalty}")
        TRAJECTORIES.get(self.trajectory)  # an unknown name is a ConfigError listing the known ones
        if self.anchor not in ANCHORS:
            raise ConfigError(f"sequence anchor must be one of {', '.join(ANCHORS)}, got {self.anchor!r}")

    @property
    def velocities(self) -> np.ndarray:
        """The searched velocities (rows per query), negative ones too with ``both_directions``."""
        n = int(np.floor((self.max_velocity - self.min_velocity) / self.velocity_step + 1e-9)) + 1
        v = self.min_velocity + self.velocity_step * np.arange(n)
        return np.concatenate([v, -v[v > 0]]) if self.both_directions else v

    @property
    def score_kind(self) -> str:
        return CONTRAST_SCORE_KIND if self.contrast_window else SCORE_KIND


# ---- contrast normalisation ------------------------------------------------------------------
def contrast_normalise(similarity: np.ndarray, window: int) -> np.ndarray:
    """SeqSLAM's local contrast enhancement, on similarities (higher is better).

    Each element ``S[q, j]`` becomes ``(S[q, j] − mean) / std`` over map rows ``j − window/2 …
    j + window/2`` (clipped at the map's ends; sample std) of the same query row — OpenSeqSLAM's
    ``doContrastEnhancement`` with the difference matrix's sign flipped. Row-wise, so streams can
    apply it frame by frame. Vectorised with cumulative sums.
    """
    s = np.asarray(similarity, dtype=np.float64)
    s2 = np.atleast_2d(s)
    n_rows = s2.shape[1]
    half = int(window) // 2
    c1 = np.concatenate([np.zeros((len(s2), 1)), np.cumsum(s2, axis=1)], axis=1)
    c2 = np.concatenate([np.zeros((len(s2), 1)), np.cumsum(s2 * s2, axis=1)], axis=1)
    j = np.arange(n_rows)
    lo, hi = np.maximum(0, j - half), np.minimum(n_rows, j + half + 1)
    count = (hi - lo).astype(np.float64)
    mean = (c1[:, hi] - c1[:, lo]) / count
    var = np.maximum((c2[:, hi] - c2[:, lo]) / count - mean * mean, 0.0) * count / np.maximum(count - 1, 1)
    out = (s2 - mean) / np.maximum(np.sqrt(var), MIN_LOCAL_STD)
    return out.astype(np.float32).reshape(s.shape)


# ---- trajectory scorers ------------------------------------------------------------------------
# A scorer gets the window of similarity rows ``W`` (B×L×N: for each of B current queries, its last L
# rows, oldest first), ``neutral`` (B×L: the value of a step with no evidence) and the settings, and
# returns B×N scores: the best trajectory ending at each map row for the newest query of each window.
TrajectoryScorer = Callable[[np.ndarray, np.ndarray, SequenceSettings], np.ndarray]
TRAJECTORIES: Registry[TrajectoryScorer] = Registry("sequence trajectory")


def _shift_rows(block: np.ndarray, offset: int, fill: np.ndarray) -> np.ndarray:
    """``out[..., j] = block[..., j − offset]`` where that row exists, else ``fill`` (one value per leading index)."""
    n = block.shape[-1]
    out = np.empty_like(block)
    out[...] = fill[..., None]
    if 0 <= offset < n:
        out[..., offset:] = block[..., : n - offset]
    elif -n < offset < 0:
        out[..., : n + offset] = block[..., -offset:]
    return out


@TRAJECTORIES.register("line")
def line_scores(window: np.ndarray, neutral: np.ndarray, settings: SequenceSettings) -> np.ndarray:
    """SeqSLAM's straight lines: max over velocities v of mean_k W[:, L−1−k, j − round(v·k)]."""
    b, length, n = window.shape
    best = np.full((b, n), -np.inf, np.float32)
    for v in settings.velocities:
        acc = window[:, length - 1].astype(np.float32).copy()
        for k in range(1, length):
            acc += _shift_rows(window[:, length - 1 - k], int(np.round(v * k)), neutral[:, length - 1 - k])
        np.maximum(best, acc / length, out=best)
    return best


@TRAJECTORIES.register("flexible")
def flexible_scores(window: np.ndarray, neutral: np.ndarray, settings: SequenceSettings) -> np.ndarray:
    """Best monotone path by dynamic programming: each step advances a whole number of rows in the
    velocity range; changing the advance by Δ rows between steps costs ``turn_penalty · |Δ|``."""
    b, length, n = window.shape
    steps = _whole_steps(settings)
    penalty = (settings.turn_penalty * np.abs(steps[:, None] - steps[None, :])).astype(np.float32)  # new × previous
    # path[b, d, j]: best sum of a path over the rows so far that ends at row j, having arrived with step d.
    # Shifting commutes with the max over the previous step, so each new step maximises first, then shifts.
    path = np.repeat(window[:, :1, :].astype(np.float32), len(steps), axis=1)
    for i in range(1, length):
        off_map = neutral[:, :i].sum(axis=1)  # a path from outside the map: i steps of no evidence
        arrived = np.empty_like(path)
        shared = path.max(axis=1) if settings.turn_penalty == 0 else None
        for a, d in enumerate(steps):
            best = shared if shared is not None else (path - penalty[a][None, :, None]).max(axis=1)
            arrived[:, a] = _shift_rows(best, int(d), off_map)
        path = arrived + window[:, i][:, None, :]
    return path.max(axis=1) / length


def _whole_steps(settings: SequenceSettings) -> np.ndarray:
    lo, hi = int(np.floor(settings.min_velocity)), int(np.ceil(settings.max_velocity))
    steps = np.arange(lo, hi + 1)
    return np.concatenate([steps, -steps[steps > 0]]) if settings.both_directions else steps


# ---- offline and online matching ---------------------------------------------------------------
class RunningColumnMean:
    """Sum and count of the similarity rows seen so far: the state of the hub correction."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count = 0

    def centre(self, s: np.ndarray) -> np.ndarray:
        """Rows of ``s`` (in time order, after the rows seen) minus the running mean including each row,
        shrunk towards zero by ``n / (n + HUB_PRIOR_QUERIES)``."""
        csum = np.cumsum(s, axis=0, dtype=np.float64)
        if self.total is not None:
            if self.total.shape[0] != s.shape[1]:
                raise ConfigError(f"similarity rows changed length ({self.total.shape[0]} → {s.shape[1]} map rows)")
            csum += self.total
        count = self.count + np.arange(1, len(s) + 1, dtype=np.float64)
        self.total, self.count = csum[-1].copy(), int(count[-1])
        # mean · n/(n + prior) = sum/(n + prior): the first query is not centred on itself alone (which
        # would zero its row), the offset is trusted as queries accumulate.
        return (s - csum / (count[:, None] + HUB_PRIOR_QUERIES)).astype(np.float32)


def _prepare(
    similarity: np.ndarray, settings: SequenceSettings, running: RunningColumnMean | None = None
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(similarity, dtype=np.float32)
    if s.ndim != 2:
        raise ConfigError(f"a similarity matrix must be queries × map rows, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ConfigError("similarities must be finite")
    if settings.hub_correction and len(s):
        s = (running or RunningColumnMean()).centre(s)
    if settings.contrast_window:
        s = contrast_normalise(s, settings.contrast_window)
    return s, s.mean(axis=1)


def sequence_scores(
    similarity: np.ndarray, settings: SequenceSettings | None = None, progress: bool = False
) -> np.ndarray:
    """Sequence scores for every query of a time-ordered Q×N similarity matrix (same shape).

    ``anchor="end"``: row t uses queries ``t − length + 1 … t`` (fewer at the start: missing queries
    count as no evidence) — equal to feeding the rows one by one to :class:`OnlineSequenceMatcher`.
    ``anchor="centre"`` (offline): queries ``t − length//2 … t + length − 1 − length//2``, SeqSLAM's
    original window around the query; the past and the future half each take their best trajectory
    through (t, j), so the place is pinned from both sides.
    """
    settings = settings or SequenceSettings()
    s, neutral = _prepare(similarity, settings)
    if settings.anchor == "end":
        return _ending_at(s, neutral, settings, settings.length, progress)
    past = settings.length // 2
    future = settings.length - 1 - past
    before = _ending_at(s, neutral, settings, past + 1, progress) * np.float32(past + 1)
    # The future half is the past half of the matrix reversed in time and along the route.
    reversed_s = np.ascontiguousarray(s[::-1, ::-1])
    after = _ending_at(reversed_s, np.ascontiguousarray(neutral[::-1]), settings, future + 1, progress)[::-1, ::-1]
    return ((before + after * np.float32(future + 1) - s) / np.float32(settings.length)).astype(np.float32)


def _ending_at(
    s: np.ndarray, neutral: np.ndarray, settings: SequenceSettings, length: int, progress: bool
) -> np.ndarray:
    """Best trajectories over ``length`` queries ending at each (query, row), in chunks of queries."""
    q, n = s.shape
    lanes = max(len(settings.velocities), len(_whole_steps(settings)) if settings.trajectory == "flexible" else 1)
    chunk = max(1, CHUNK_ELEMENTS // max(1, length * n * lanes))
    scorer = TRAJECTORIES.get(settings.trajectory)
    out = np.empty((q, n), np.float32)
    starts = range(0, q, chunk)
    if progress:
        starts = tqdm(starts, desc="sequence", unit="chunk")
    # History padded with length − 1 placeholder rows before the first query; a placeholder step is
    # "no evidence" for the query whose window it falls in (that query's mean), as online.
    pad = length - 1
    padded = np.concatenate([np.zeros((pad, n), np.float32), s])
    padded_neutral = np.concatenate([np.zeros(pad, np.float32), neutral])
    for start in starts:
        stop = min(q, start + chunk)
        ends = np.arange(start, stop) + pad  # index of each current query in the padded history
        idx = ends[:, None] - np.arange(length - 1, -1, -1)[None, :]  # B×L, oldest first
        before = idx < pad
        own = neutral[ends - pad][:, None]
        window = np.where(before[:, :, None], own[:, :, None], padded[idx])
        win_neutral = np.where(before, own, padded_neutral[idx])
        out[start:stop] = scorer(window, win_neutral, settings)
    return out


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and scores of the ``k`` best map rows per query (Q×k, best first; −1 / −inf padding)."""
    s = np.atleast_2d(np.asarray(scores, dtype=np.float32))
    q, n = s.shape
    kk = min(int(k), n)
    if kk <= 0:
        return np.full((q, k), -1, np.int64), np.full((q, k), -np.inf, np.float32)
    part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (q, 1))
    vals = np.take_along_axis(s, part, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    rows, vals = np.take_along_axis(part, order, 1).astype(np.int64), np.take_along_axis(vals, order, 1)
    if kk < k:
        rows = np.concatenate([rows, np.full((q, k - kk), -1, np.int64)], 1)
        vals = np.concatenate([vals, np.full((q, k - kk), -np.inf, np.float32)], 1)
    return rows, vals


# ---- what a trajectory rests on ------------------------------------------------------------------
@dataclass(frozen=True)
class TrajectoryEvidence:
    """The evidence of the best trajectory ending at each of K ranked map rows (one entry per row).

    ``mean_cosine``: the mean *raw* global cosine of the window's frames with the trajectory's rows (steps
    on the map only) — what :data:`SCORE_KIND` reports: it reads like a single image's cosine (≈ 0.76 on
    Nordland where the hub-corrected ranking score is ≈ 0.09). ``support``: the share of the window's
    ``length`` frame slots whose own single-frame top-1 row lies within :data:`SUPPORT_TOLERANCE_ROWS` of
    the trajectory (missing frames, before the stream has ``length`` of them, do not support): 1.0 when every
    frame on its own already points along the path, ≈ 0 when the path is carried by no single frame.
    ``frames``: frames in the window. ``paths``: K×length rows of each trajectory, oldest first (−1: no frame
    or off the map).
    """

    mean_cosine: np.ndarray
    support: np.ndarray
    frames: int
    paths: np.ndarray


# A frame supports a trajectory when its own top-1 row is within one row of the trajectory's row for it:
# whole-row velocities put the true place within a row of the line, and one row is Nordland's usual tolerance.
SUPPORT_TOLERANCE_ROWS = 1
NO_ROW = -1  # a path step with no frame (before the stream's first) or off the map


def _line_paths(window: np.ndarray, neutral: np.ndarray, settings: SequenceSettings, ends: np.ndarray) -> np.ndarray:
    """The best straight line ending at each row of ``ends`` (as :func:`line_scores` chooses it): K×L, oldest first."""
    length, n = window.shape
    back = np.arange(length)  # steps back from the newest frame
    offsets = np.round(settings.velocities[:, None] * back[None, :]).astype(np.int64)  # V×L
    rows = ends[None, :, None] - offsets[:, None, :]  # V×K×L
    on_map = (rows >= 0) & (rows < n)
    frame = length - 1 - back
    values = np.where(on_map, window[frame[None, None, :], np.clip(rows, 0, n - 1)], neutral[frame][None, None, :])
    best = values.sum(axis=-1, dtype=np.float32).argmax(axis=0)  # first best velocity, as max() keeps the first
    k = np.arange(len(ends))
    return np.where(on_map[best, k], rows[best, k], NO_ROW)[:, ::-1]


def _flexible_paths(
    window: np.ndarray, neutral: np.ndarray, settings: SequenceSettings, ends: np.ndarray
) -> np.ndarray:
    """The best flexible path ending at each row of ``ends`` (:func:`flexible_scores`' programme with back-pointers)."""
    length, n = window.shape
    steps = _whole_steps(settings)
    penalty = (settings.turn_penalty * np.abs(steps[:, None] - steps[None, :])).astype(np.float32)
    path = np.repeat(window[None, 0].astype(np.float32), len(steps), axis=0)  # S×N
    came_from = np.full((length, len(steps), n), NO_ROW, np.int64)  # previous step's index, −1 = from off the map
    cols = np.arange(n)
    for i in range(1, length):
        off_map = np.asarray(neutral[:i].sum(), np.float32)
        arrived = np.empty_like(path)
        for a, d in enumerate(steps):
            candidates = path - penalty[a][:, None]
            previous = candidates.argmax(axis=0)
            arrived[a] = _shift_rows(candidates[previous, cols], int(d), off_map)
            came_from[i, a] = _shift_rows(previous, int(d), np.asarray(NO_ROW))
        path = arrived + window[i][None, :]
    out = np.full((len(ends), length), NO_ROW, np.int64)
    for k, end in enumerate(ends):
        step, row = int(path[:, end].argmax()), int(end)
        out[k, -1] = row
        for i in range(length - 1, 0, -1):
            before = int(came_from[i, step, row])
            if before < 0:
                break  # arrived from outside the map: the earlier steps are off it
            row, step = row - int(steps[step]), before
            out[k, i - 1] = row
    return out


# How to recover the path each trajectory scorer chose (a scorer registered without one has no evidence).
TRAJECTORY_PATHS: dict[str, Callable[[np.ndarray, np.ndarray, SequenceSettings, np.ndarray], np.ndarray]] = {
    "line": _line_paths,
    "flexible": _flexible_paths,
}


def best_paths(window: np.ndarray, neutral: np.ndarray, settings: SequenceSettings, ends: np.ndarray) -> np.ndarray:
    """Rows of the best trajectory ending at each of ``ends`` (K×L, oldest first, :data:`NO_ROW` off the map)
    in the L×N window of (prepared) similarity rows whose step with no evidence is worth ``neutral`` (L)."""
    finder = TRAJECTORY_PATHS.get(settings.trajectory)
    if finder is None:
        raise ConfigError(f"sequence trajectory {settings.trajectory!r} cannot say which path it chose")
    return finder(np.asarray(window, np.float32), np.asarray(neutral, np.float32), settings, np.asarray(ends, np.int64))


def trajectory_evidence(
    paths: np.ndarray, raw: np.ndarray, present: np.ndarray, own_top1: np.ndarray
) -> TrajectoryEvidence:
    """:class:`TrajectoryEvidence` of ``paths`` (K×L) from the window's raw cosine rows (L×N), which of its slots
    hold a frame (L) and each frame's own top-1 row (L)."""
    paths = np.asarray(paths, np.int64)
    length = paths.shape[1]
    on = (paths >= 0) & np.asarray(present, bool)[None, :]
    values = np.asarray(raw, np.float32)[np.arange(length)[None, :], np.clip(paths, 0, None)]
    counted = on.sum(axis=1)
    mean = np.where(counted > 0, np.where(on, values, 0.0).sum(axis=1) / np.maximum(counted, 1), np.nan)
    near = np.abs(np.asarray(own_top1, np.int64)[None, :] - paths) <= SUPPORT_TOLERANCE_ROWS
    support = (near & on).sum(axis=1) / float(length)
    return TrajectoryEvidence(mean.astype(np.float32), support.astype(np.float32), int(np.sum(present)), paths)


def _slots(
    rows: np.ndarray, neutral: np.ndarray, raw: np.ndarray, idx: np.ndarray, own: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The window of queries ``idx`` (oldest first; out of range = no frame, worth ``own``, the scored query's
    mean): prepared rows, neutral values, raw rows and which slots hold a frame."""
    present = (idx >= 0) & (idx < len(rows))
    safe = np.clip(idx, 0, len(rows) - 1)
    window = np.where(present[:, None], rows[safe], own)
    return window, np.where(present, neutral[safe], own), np.where(present[:, None], raw[safe], np.nan), present


def sequence_evidence(
    similarity: np.ndarray, settings: SequenceSettings, ranked: np.ndarray, progress: bool = False
) -> list[TrajectoryEvidence]:
    """Offline :class:`TrajectoryEvidence` of every query's ranked rows (Q×K, −1 padding), as
    :func:`sequence_scores` chose the trajectories: ``anchor="end"`` the window ending at the query,
    ``"centre"`` its past half and its future half (the future searched in reverse, as there)."""
    raw = np.asarray(similarity, np.float32)
    s, neutral = _prepare(raw, settings)
    q, n = s.shape
    top1 = raw.argmax(axis=1)
    past = settings.length - 1 if settings.anchor == "end" else settings.length // 2
    future = settings.length - 1 - past
    out = []
    queries = tqdm(range(q), desc="sequence evidence", unit="query") if progress else range(q)
    for t in queries:
        ends = np.asarray(ranked[t], np.int64)
        ends = ends[ends >= 0]
        idx = np.arange(t - past, t + 1)
        window, neu, _, _ = _slots(s, neutral, raw, idx, neutral[t])
        paths = best_paths(window, neu, settings, ends)
        if future:
            later = np.arange(t + future, t - 1, -1)  # the future half, oldest first in reversed time
            window, neu, _, _ = _slots(s, neutral, raw, later, neutral[t])
            mirrored = best_paths(window[:, ::-1], neu, settings, n - 1 - ends)[:, ::-1]
            paths = np.concatenate([paths, np.where(mirrored >= 0, n - 1 - mirrored, NO_ROW)[:, 1:]], axis=1)
        idx = np.arange(t - past, t + future + 1)
        _, _, raw_window, present = _slots(s, neutral, raw, idx, neutral[t])
        out.append(trajectory_evidence(paths, raw_window, present, top1[np.clip(idx, 0, q - 1)]))
    return out


class OnlineSequenceMatcher:
    """Sequence matching for a stream: feed one similarity row (1×N) per frame, get that frame's scores.

    Keeps the last ``length`` rows in a ring buffer, prepared (hub-corrected, contrast-normalised) and raw,
    with each frame's own top-1 row; each :meth:`push` costs O(length · N · velocities), :meth:`evidence` says
    what the trajectories of the ranked rows rest on. :attr:`ready` says whether a full sequence has been seen.
    Memory: 2 · ``length`` rows of N float32 plus the running column mean (N float64).
    """

    def __init__(self, settings: SequenceSettings | None = None):
        self.settings = settings or SequenceSettings()
        if self.settings.anchor != "end":
            raise ConfigError("a stream has no future frames: online sequence matching needs anchor='end'")
        self._scorer = TRAJECTORIES.get(self.settings.trajectory)
        self.reset()

    @property
    def ready(self) -> bool:
        return self.seen >= self.settings.length

    @property
    def rows(self) -> int | None:
        """The number of map rows the history refers to (None before the first frame)."""
        return None if not self._rows else int(self._rows[-1].shape[0])

    def reset(self) -> None:
        """Forget the history (e.g. after the camera was moved, or the map changed)."""
        length = self.settings.length
        self._rows: deque[np.ndarray] = deque(maxlen=length)
        self._raw: deque[np.ndarray] = deque(maxlen=length)
        self._top1: deque[int] = deque(maxlen=length)
        self._running = RunningColumnMean()
        self.seen = 0

    def push(self, similarity_row: np.ndarray) -> np.ndarray:
        """Add the newest frame's similarities to every map row; return its sequence scores (N,)."""
        raw = np.asarray(similarity_row, dtype=np.float32).reshape(1, -1)
        if self._rows and self._rows[-1].shape[0] != raw.shape[1]:
            raise ConfigError(f"similarity rows changed length ({self._rows[-1].shape[0]} → {raw.shape[1]} map rows)")
        row, _ = _prepare(raw, self.settings, self._running)
        self._rows.append(row[0])
        self._raw.append(raw[0])
        self._top1.append(int(raw[0].argmax()))
        self.seen += 1
        window, neutral = self._window()
        return self._scorer(window[None], neutral[None], self.settings)[0]

    def _window(self) -> tuple[np.ndarray, np.ndarray]:
        """The prepared rows oldest first, missing frames filled with the newest frame's mean (no evidence)."""
        current_mean = float(self._rows[-1].mean())
        missing = self.settings.length - len(self._rows)
        history = list(self._rows)
        window = np.stack([np.full_like(history[-1], current_mean)] * missing + history)
        neutral = np.array([current_mean] * missing + [float(r.mean()) for r in history], np.float32)
        return window, neutral

    def evidence(self, rows: np.ndarray) -> TrajectoryEvidence:
        """What the best trajectory ending at each of ``rows`` (of the last push) rests on."""
        if not self._rows:
            raise ConfigError("no frame pushed yet: nothing to explain")
        window, neutral = self._window()
        paths = best_paths(window, neutral, self.settings, np.asarray(rows, np.int64).reshape(-1))
        missing = self.settings.length - len(self._raw)
        n = self._raw[-1].shape[0]
        raw = np.concatenate([np.full((missing, n), np.nan, np.float32), np.stack(list(self._raw))])
        present = np.arange(self.settings.length) >= missing
        top1 = np.array([0] * missing + list(self._top1), np.int64)  # slots without a frame never count
        return trajectory_evidence(paths, raw, present, top1)


# ---- route order -------------------------------------------------------------------------------
def check_route_order(keys: Sequence[str] | None = None, poses: np.ndarray | None = None, what: str = "map") -> None:
    """Refuse a map whose row order is plainly not a route: keys not sorted, or poses out of order.

    Sequence matching walks map rows as if they were consecutive places. Keys of frames
    (``images-00010.png``, ``000123.jpg``) sort into route order; poses, where known, must put
    consecutive rows much closer together (median) than rows half the map apart.
    """
    if poses is not None:
        p = np.asarray(poses, dtype=np.float64)
        if p.ndim == 2 and len(p) > 3 and np.isfinite(p).all():
            step = float(np.median(np.linalg.norm(np.diff(p, axis=0), axis=1)))
            half = len(p) // 2
            apart = float(np.median(np.linalg.norm(p[half : 2 * half] - p[:half], axis=1)))
            if apart > 0 and step > ROUTE_STEP_SHARE * apart:
                raise ConfigError(
                    f"{what} rows are not in route order: consecutive rows are {step:.2f} m apart (median), "
                    f"rows half the map apart {apart:.2f} m; sequence matching needs the map built from "
                    f"one traversal, in order"
                )
            return
    if keys is not None:
        keys = list(keys)
        if keys != sorted(keys):
            first = next(i for i in range(1, len(keys)) if keys[i] < keys[i - 1])
            raise ConfigError(
                f"{what} keys are not in sorted (route) order ({keys[first - 1]!r} before {keys[first]!r}); "
                f"sequence matching needs rows in the order of the traversal"
            )
