"""Loop-closure evaluation: each frame's best earlier match, scored against ground truth.

A loop closure is a frame recognised as a place visited *earlier* in the same traversal. Every frame
``i`` proposes one candidate: the earlier frame ``j < i − exclude_recent`` of highest score (the
``exclude_recent`` frames just before it are the same place seen a moment ago, not a loop).
Accepting candidates whose score passes a threshold and sweeping the threshold gives the
precision–recall curve, where

- precision = correct accepted / accepted, and
- recall = correct accepted / frames that *have* a true loop (an earlier frame outside the window
  within ``radius`` metres, or marked in a binary matrix),

with its area (average precision) and the recall at 100 % precision — the operating point a SLAM
back end needs, as one wrong loop can wreck a map. :func:`vprkit.evaluation.metrics.precision_recall`
does the sweep; this module builds the loop-closure inputs and writes the candidates CSV and plot.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.spatial import cKDTree

from ..errors import ConfigError, DatasetError
from ..io import atomic_write_text
from .metrics import precision_recall
from .plots import pr_curve_png, save_png

DEFAULT_LOOP_RADIUS_M = 10.0
CANDIDATE_COLUMNS = ["frame", "index", "match", "match_index", "score", "correct"]
NO_MATCH = -1


def earlier_mask(n: int, exclude_recent: int) -> np.ndarray:
    """n×n boolean: may frame ``i`` close a loop with frame ``j`` (``j < i − exclude_recent``)."""
    if exclude_recent < 0:
        raise ConfigError(f"exclude_recent must be ≥ 0 frames, got {exclude_recent}")
    i = np.arange(n)
    return i[None, :] < (i[:, None] - int(exclude_recent))


def truth_from_positions(
    positions: np.ndarray, radius: float = DEFAULT_LOOP_RADIUS_M, exclude_recent: int = 0
) -> np.ndarray:
    """n×n boolean: earlier frames outside the window within ``radius`` metres (KD-tree, sparse)."""
    p = np.asarray(positions, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise DatasetError(f"loop ground truth needs N×2 positions, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise DatasetError(f"{int((~np.isfinite(p).all(1)).sum())} frame(s) have no position; every frame needs one")
    if radius <= 0:
        raise ConfigError(f"radius must be > 0 metres, got {radius}")
    n = len(p)
    truth = np.zeros((n, n), bool)
    pairs = cKDTree(p).query_pairs(float(radius), output_type="ndarray")
    if len(pairs):
        truth[pairs[:, 0], pairs[:, 1]] = True
        truth[pairs[:, 1], pairs[:, 0]] = True
    return truth & earlier_mask(n, exclude_recent)


def read_truth_matrix(path: str | os.PathLike, n: int, exclude_recent: int = 0) -> np.ndarray:
    """A binary n×n loop matrix from ``.npy`` (no pickles) or ``.csv`` (0/1, comma-separated, no header).

    Entry (i, j) true means frames i and j are the same place; it is made symmetric and restricted to
    earlier frames outside the window.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: ground-truth matrix not found")
    try:
        if path.suffix.lower() == ".npy":
            m = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".csv":
            m = np.loadtxt(path, delimiter=",", ndmin=2)
        else:
            raise DatasetError(f"{path}: a loop ground-truth matrix must be .npy or .csv")
    except ValueError as exc:
        raise DatasetError(f"{path}: not a numeric matrix ({exc})") from None
    if m.shape != (n, n):
        raise DatasetError(
            f"{path}: ground-truth matrix is {m.shape[0]}×{m.shape[1] if m.ndim > 1 else 1}, "
            f"the sequence has {n} frames"
        )
    b = np.asarray(m) != 0
    return (b | b.T) & earlier_mask(n, exclude_recent)


def without_recent(similarity: np.ndarray, exclude_recent: int) -> np.ndarray:
    """Frames × frames similarities with every pair that may not close a loop (later frames, the
    window) set to the mean of the allowed pairs — "no evidence" — so that sequence scoring over it
    never rides the trivially high similarity of a frame to its own recent past."""
    s = np.asarray(similarity, dtype=np.float32)
    allowed = earlier_mask(len(s), exclude_recent)
    fill = float(s[allowed].mean()) if allowed.any() else 0.0
    return np.where(allowed, s, np.float32(fill))


@dataclass
class LoopCandidates:
    """Each frame's best earlier match (``match`` = −1 where no frame lies outside the window)."""

    match: np.ndarray  # (n,) int64
    score: np.ndarray  # (n,) float32, −inf without a match
    score_kind: str = "cosine"

    @property
    def has_match(self) -> np.ndarray:
        return self.match >= 0


def best_earlier_matches(scores: np.ndarray, exclude_recent: int, score_kind: str = "cosine") -> LoopCandidates:
    """Per frame, the earlier frame (outside the window) of highest score; scores are n×n, higher is better."""
    s = np.asarray(scores, dtype=np.float32)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ConfigError(f"loop scores must be a square frames × frames matrix, got {s.shape}")
    allowed = earlier_mask(len(s), exclude_recent)
    masked = np.where(allowed, s, -np.inf)
    match = masked.argmax(axis=1).astype(np.int64)
    best = masked[np.arange(len(s)), match]
    match[~allowed.any(axis=1)] = NO_MATCH
    return LoopCandidates(match, np.where(match >= 0, best, -np.inf).astype(np.float32), score_kind)


def loop_precision_recall(candidates: LoopCandidates, truth: np.ndarray) -> dict[str, Any]:
    """Precision–recall of the candidates against an n×n truth (already restricted to allowed pairs).

    Returns :func:`~vprkit.evaluation.metrics.precision_recall`'s keys (``precision``, ``recall``,
    ``thresholds``, ``average_precision``, ``recall_at_100_precision``) plus ``correct`` (per frame),
    ``n_frames`` and ``n_with_loop``.
    """
    t = np.asarray(truth, dtype=bool)
    n = len(candidates.match)
    if t.shape != (n, n):
        raise ConfigError(f"truth is {t.shape}, candidates are for {n} frames")
    has = candidates.has_match & np.isfinite(candidates.score)
    correct = np.zeros(n, bool)
    correct[has] = t[np.flatnonzero(has), candidates.match[has]]
    n_with_loop = int(t.any(axis=1).sum())
    result: dict[str, Any] = {"correct": correct, "n_frames": n, "n_with_loop": n_with_loop}
    if n_with_loop == 0:
        raise DatasetError("the ground truth has no loop (no frame revisits an earlier place outside the window)")
    if not has.any():
        return {
            **result,
            "precision": np.zeros(0),
            "recall": np.zeros(0),
            "thresholds": np.zeros(0),
            "average_precision": 0.0,
            "recall_at_100_precision": 0.0,
        }
    pr = precision_recall(candidates.score[has], correct[has], n_relevant=n_with_loop)
    return {**pr, **result}


def write_candidates_csv(
    path: str | os.PathLike, keys: Sequence[str], candidates: LoopCandidates, correct: np.ndarray | None = None
) -> Path:
    """``loops.csv``: one row per frame with a candidate, best score first (atomic)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CANDIDATE_COLUMNS)
    idx = np.flatnonzero(candidates.has_match)
    for i in idx[np.argsort(-candidates.score[idx], kind="stable")]:
        j = int(candidates.match[i])
        ok = "" if correct is None else int(bool(correct[i]))
        w.writerow([keys[i], int(i), keys[j], j, f"{float(candidates.score[i]):.6f}", ok])
    return atomic_write_text(path, buf.getvalue())


def write_pr_plot(path: str | os.PathLike, pr: dict[str, Any], title: str = "Loop closure") -> Path:
    """The precision–recall curve as a PNG (the evaluation report's style)."""
    return save_png(pr_curve_png({"loops": pr}, title=title), path)


def summary_dict(pr: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a precision–recall result (no per-frame arrays)."""
    return {
        "average_precision": round(float(pr["average_precision"]), 6),
        "recall_at_100_precision": round(float(pr["recall_at_100_precision"]), 6),
        "n_frames": int(pr["n_frames"]),
        "n_with_loop": int(pr["n_with_loop"]),
        "n_correct_top1": int(np.asarray(pr["correct"]).sum()),
        "curve": {
            "precision": np.round(np.asarray(pr["precision"], float), 6).tolist(),
            "recall": np.round(np.asarray(pr["recall"], float), 6).tolist(),
            "thresholds": np.round(np.asarray(pr["thresholds"], float), 6).tolist(),
        },
    }
