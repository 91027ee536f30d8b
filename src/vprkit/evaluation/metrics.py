"""Retrieval metrics: Recall@N, loop-closure precision–recall, and per-query records.

Conventions (see the evaluation section of the project reference):

- Recall@N is the share of queries with at least one positive among their top N results.
- Queries without any positive are counted as failures by VPR-methods-evaluation and
  Patch-NetVLAD (``no_positive="fail"``) and skipped by SegVLAD (``"skip"``). Results carry the
  policy and the counts so a reported number always says which.
- Rankings are Q×K arrays of database indices, best first; ``-1`` marks an empty slot (a map with
  fewer than K images, or a re-ranker that dropped candidates).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DatasetError
from ..datasets.ground_truth import GroundTruth

DEFAULT_NS = (1, 5, 10, 20)
NO_POSITIVE_POLICIES = ("fail", "skip")
EMPTY_SLOT = -1


def _check_ranked(ranked: np.ndarray, gt: GroundTruth) -> np.ndarray:
    r = np.asarray(ranked)
    if r.ndim == 1:
        r = r[:, None]
    if r.ndim != 2 or not np.issubdtype(r.dtype, np.integer):
        raise ConfigError(f"ranked must be a Q×K integer array of database indices, got {r.dtype} {r.shape}")
    if r.shape[0] != gt.n_queries:
        raise ConfigError(f"ranked has {r.shape[0]} queries but the ground truth has {gt.n_queries}")
    if r.size and (r.max() >= gt.n_database or r.min() < EMPTY_SLOT):
        raise ConfigError(
            f"ranked holds indices {r.min()}…{r.max()}; valid are 0…{gt.n_database - 1} and {EMPTY_SLOT} for empty"
        )
    return r.astype(np.int64, copy=False)


def hit_matrix(ranked: np.ndarray, gt: GroundTruth) -> np.ndarray:
    """Boolean Q×K: is ``ranked[q, k]`` a positive of query q. Fully vectorised.

    Each (query, database) pair is encoded as one integer ``q·N + d``; positives form a sorted
    array of such codes (CSR order is already sorted), and membership is one ``searchsorted``.
    """
    r = _check_ranked(ranked, gt)
    indptr, indices = gt.csr()
    n = np.int64(max(gt.n_database, 1))
    pos_codes = np.repeat(np.arange(gt.n_queries, dtype=np.int64), np.diff(indptr)) * n + indices
    codes = np.arange(r.shape[0], dtype=np.int64)[:, None] * n + r
    if pos_codes.size == 0:
        return np.zeros(r.shape, dtype=bool)
    at = np.minimum(np.searchsorted(pos_codes, codes), pos_codes.size - 1)
    return (pos_codes[at] == codes) & (r != EMPTY_SLOT)


def first_positive_rank(ranked: np.ndarray, gt: GroundTruth) -> np.ndarray:
    """0-based position of the first positive in each query's ranking; −1 if none is in the list."""
    hits = hit_matrix(ranked, gt)
    if hits.shape[1] == 0:
        return np.full(hits.shape[0], -1, dtype=np.int64)
    first = hits.argmax(axis=1).astype(np.int64)
    first[~hits.any(axis=1)] = -1
    return first


def recall_at_n(
    ranked: np.ndarray,
    gt: GroundTruth,
    ns: Sequence[int] = DEFAULT_NS,
    no_positive: str = "fail",
) -> dict[str, Any]:
    """Recall@N for each N in ``ns``, with the counts needed to interpret it.

    Returns ``{"R@1": …, "R@5": …, "ns": [...], "k": K, "truncated_ns": [N > K],
    "n_queries", "n_evaluated", "n_no_positive", "no_positive_policy"}``. An N larger than the
    ranking length K is computed on K (the list cannot say more) and listed in ``truncated_ns``.
    """
    if no_positive not in NO_POSITIVE_POLICIES:
        raise ConfigError(f"no_positive must be one of {NO_POSITIVE_POLICIES}, got {no_positive!r}")
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ConfigError(f"ns must be positive integers, got {ns}")
    first = first_positive_rank(ranked, gt)
    k = int(np.asarray(ranked).reshape(len(first), -1).shape[1]) if len(first) else 0
    has_positive = gt.n_positives > 0
    evaluated = has_positive if no_positive == "skip" else np.ones_like(has_positive)
    n_eval = int(evaluated.sum())
    if n_eval == 0:
        raise DatasetError(
            f"no query can be evaluated: {gt.n_queries} queries, {int((~has_positive).sum())} without positives "
            f"(policy {no_positive!r}); check the ground truth"
        )
    found = first[evaluated]
    result: dict[str, Any] = {}
    for n in ns:
        result[f"R@{n}"] = float(np.mean((found >= 0) & (found < n)))
    result.update(
        ns=ns,
        k=k,
        truncated_ns=[n for n in ns if n > k],
        n_queries=int(gt.n_queries),
        n_evaluated=n_eval,
        n_no_positive=int((~has_positive).sum()),
        no_positive_policy=no_positive,
    )
    return result


def precision_recall(
    scores_top1: np.ndarray,
    correct_top1: np.ndarray,
    n_relevant: int | None = None,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """Loop-closure precision–recall: accept a query's top-1 match when its score passes a threshold.

    Sweeping the threshold over every distinct score gives, at each step, precision =
    correct accepted / accepted and recall = correct accepted / ``n_relevant``. ``n_relevant``
    defaults to the number of queries (every query has a true match in the map, the usual VPR
    assumption; pass the number of queries with a positive otherwise), so the last point's recall
    equals Recall@1.

    Returns ``precision``, ``recall``, ``thresholds`` (arrays, strictest threshold first),
    ``average_precision`` (the step-wise area under the curve), and
    ``recall_at_100_precision`` (largest recall with no false match accepted).
    """
    s = np.asarray(scores_top1, dtype=np.float64).ravel()
    c = np.asarray(correct_top1, dtype=bool).ravel()
    if s.shape != c.shape:
        raise ConfigError(f"scores ({s.size}) and correct flags ({c.size}) differ in length")
    if not np.all(np.isfinite(s)):
        raise ConfigError("top-1 scores must be finite")
    total = len(s) if n_relevant is None else int(n_relevant)
    if total <= 0:
        raise ConfigError("precision–recall needs at least one query (n_relevant > 0)")
    key = -s if higher_is_better else s
    order = np.argsort(key, kind="stable")
    s_sorted, c_sorted = s[order], c[order]
    tp = np.cumsum(c_sorted)
    fp = np.cumsum(~c_sorted)
    # Tied scores are accepted together: keep only the last index of each run of equal scores.
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), len(s_sorted) - 1] if len(s_sorted) else np.zeros(0, int)
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / total
    thresholds = s_sorted[last]
    prev_recall = np.r_[0.0, recall[:-1]]
    average_precision = float(np.sum((recall - prev_recall) * precision))
    perfect = precision >= 1.0
    r100 = float(recall[perfect].max()) if perfect.any() and tp[last][perfect].max() > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "thresholds": thresholds,
        "average_precision": average_precision,
        "recall_at_100_precision": r100,
        "n_queries": int(len(s)),
        "n_relevant": total,
    }


def query_records(
    query_keys: Sequence[str],
    db_keys: Sequence[str],
    ranked: np.ndarray,
    scores: np.ndarray | None,
    gt: GroundTruth | None,
) -> list[dict[str, Any]]:
    """One row per query for CSV reports: what was retrieved and whether it was right.

    Keys: ``query``, ``top1`` (database key, "" if the list is empty), ``score`` (of the top-1,
    NaN if unknown), ``correct`` (top-1 is a positive; None without ground truth),
    ``first_positive_rank`` (1-based rank of the first positive, None if not in the list or no
    ground truth) and ``n_positives`` (None without ground truth).
    """
    r = np.asarray(ranked)
    if r.ndim == 1:
        r = r[:, None]
    if len(query_keys) != r.shape[0]:
        raise ConfigError(f"{len(query_keys)} query keys but {r.shape[0]} rankings")
    top1 = r[:, 0] if r.shape[1] else np.full(r.shape[0], EMPTY_SLOT)
    sc = (
        np.full(r.shape[0], np.nan)
        if scores is None
        else np.asarray(scores, dtype=np.float64).reshape(r.shape[0], -1)[:, 0]
    )
    if gt is not None:
        first = first_positive_rank(r, gt)
        n_pos = gt.n_positives
    records = []
    for i, qk in enumerate(query_keys):
        t = int(top1[i])
        rec: dict[str, Any] = {
            "query": qk,
            "top1": db_keys[t] if t != EMPTY_SLOT else "",
            "score": float(sc[i]),
            "correct": None,
            "first_positive_rank": None,
            "n_positives": None,
        }
        if gt is not None:
            rec["correct"] = bool(first[i] == 0)
            rec["first_positive_rank"] = int(first[i]) + 1 if first[i] >= 0 else None
            rec["n_positives"] = int(n_pos[i])
        records.append(rec)
    return records


def recall_curve(ranked: np.ndarray, gt: GroundTruth, no_positive: str = "fail") -> np.ndarray:
    """Recall@N for every N = 1 … K (the ranking length), as a float array of length K.

    The same counting as :func:`recall_at_n` (``no_positive`` policy included): ``curve[n - 1]``
    equals ``recall_at_n(ranked, gt, [n])[f"R@{n}"]``.
    """
    if no_positive not in NO_POSITIVE_POLICIES:
        raise ConfigError(f"no_positive must be one of {NO_POSITIVE_POLICIES}, got {no_positive!r}")
    first = first_positive_rank(ranked, gt)
    k = int(np.asarray(ranked).reshape(len(first), -1).shape[1]) if len(first) else 0
    evaluated = gt.n_positives > 0 if no_positive == "skip" else np.ones(len(first), bool)
    if not evaluated.any():
        raise DatasetError("no query can be evaluated; check the ground truth")
    found = first[evaluated]
    counts = np.bincount(found[found >= 0], minlength=k)[:k]
    return np.cumsum(counts) / float(evaluated.sum())


def top1_precision_recall(
    ranked: np.ndarray, scores: np.ndarray, gt: GroundTruth, no_positive: str = "fail"
) -> dict[str, Any] | None:
    """:func:`precision_recall` of the top-1 matches of a run, or None where it does not apply.

    Queries without a finite top-1 score (unreadable, empty list) are never accepted but still count
    in the denominator, as do queries without positives under ``no_positive="fail"``; with
    ``"skip"`` those are left out. The last point's recall therefore equals Recall@1. Returns None
    when no query has a finite top-1 score.
    """
    r = np.asarray(ranked)
    r = r[:, None] if r.ndim == 1 else r
    s = np.asarray(scores, dtype=np.float64).reshape(r.shape[0], -1)
    if r.shape[1] == 0 or s.shape[1] == 0:
        return None
    correct = first_positive_rank(r, gt) == 0
    evaluated = gt.n_positives > 0 if no_positive == "skip" else np.ones(r.shape[0], bool)
    top = s[:, 0]
    usable = evaluated & np.isfinite(top) & (r[:, 0] != EMPTY_SLOT)
    if not usable.any():
        return None
    return precision_recall(top[usable], correct[usable], n_relevant=int(evaluated.sum()))
