"""One evaluation run: collect each query's ranked database images, then measure and write the results.

The composer builds the map and localises the queries; this stage owns what happens to the
rankings — mapping map rows back to the dataset's database order, Recall@N under the chosen
no-positive policy, the per-query records, and the files of ``eval --out``:

- ``summary.json``: the composer's summary (settings, timings, counts, recall, environment) plus
  software versions, the ground-truth rule, the Recall@N curve and the precision–recall summary;
- ``per_query.csv`` (one row per query) and ``topn.csv`` (query, rank, database image, score, correct);
- ``recall_curve.png`` (N = 1 … K) and ``pr_curve.png`` (top-1 acceptance by score, where scores exist);
- ``predictions/`` with ``save_predictions=N``: worst and best queries beside their top N (see :mod:`.gallery`);
- ``report.html``: all of it in one self-contained file (see :mod:`.html`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..datasets import format_rule
from ..datasets.ground_truth import GroundTruth
from ..io import atomic_write_text
from .gallery import DEFAULT_BEST, DEFAULT_WORST, build_galleries, gallery_order, write_galleries
from .html import render_report
from .metrics import first_positive_rank, hit_matrix, query_records, recall_at_n, recall_curve, top1_precision_recall
from .plots import pr_curve_png, recall_curve_png, save_png
from .report import software_versions, write_csv, write_json

RECALL_NS = (1, 5, 10, 20)
SUMMARY_FILE = "summary.json"
PER_QUERY_FILE = "per_query.csv"
TOPN_FILE = "topn.csv"
RECALL_CURVE_FILE = "recall_curve.png"
PR_CURVE_FILE = "pr_curve.png"
REPORT_FILE = "report.html"
TOPN_COLUMNS = ["query", "rank", "database", "score", "correct"]
PER_QUERY_COLUMNS = ["query", "correct", "first_positive_rank", "top1", "score", "n_positives"]


class Rankings:
    """Top-``k`` database indices and scores per query, filled batch by batch in any order.

    ``map_keys`` are the map's rows (as keys); ``database_keys`` the dataset's database order, which
    ground truth refers to. Queries never filled (unreadable) keep index −1: they count as failures.
    """

    def __init__(self, query_keys: Sequence[str], database_keys: Sequence[str], map_keys: Sequence[str], k: int):
        self.query_keys = list(query_keys)
        self.database_keys = list(database_keys)
        db_index = {key: i for i, key in enumerate(self.database_keys)}
        self.row_to_db = np.array([db_index[key] for key in map_keys] + [-1])  # the last entry maps row −1
        self.query_index = {key: i for i, key in enumerate(self.query_keys)}
        self.k = k
        self.ranked = np.full((len(self.query_keys), k), -1, np.int64)
        self.scores = np.full((len(self.query_keys), k), -np.inf, np.float32)
        self.failed: dict[str, str] = {}

    def add(self, keys: Sequence[str], rows: np.ndarray, scores: np.ndarray) -> None:
        idx = [self.query_index[key] for key in keys]
        self.ranked[idx] = self.row_to_db[rows]
        self.scores[idx] = scores

    def fail(self, key: str, message: str) -> None:
        self.failed[key] = message

    def recall(
        self, ground_truth: GroundTruth, ns: Sequence[int] = RECALL_NS, no_positive: str = "fail"
    ) -> dict[str, Any]:
        return recall_at_n(self.ranked, ground_truth, ns=ns, no_positive=no_positive)

    def records(self, ground_truth: GroundTruth) -> list[dict[str, Any]]:
        return query_records(self.query_keys, self.database_keys, self.ranked, self.scores, ground_truth)

    def topn_records(self, ground_truth: GroundTruth | None, n: int | None = None) -> list[dict[str, Any]]:
        """One row per (query, rank ≤ n): ``query, rank`` (1-based), ``database`` key, ``score``, ``correct``.

        Empty slots (fewer results than n, unreadable queries) are left out.
        """
        n = self.k if n is None else max(0, min(int(n), self.k))
        hits = hit_matrix(self.ranked, ground_truth) if ground_truth is not None else None
        rows = []
        for q, key in enumerate(self.query_keys):
            for r in range(n):
                d = int(self.ranked[q, r])
                if d < 0:
                    continue
                rows.append(
                    {
                        "query": key,
                        "rank": r + 1,
                        "database": self.database_keys[d],
                        "score": float(self.scores[q, r]),
                        "correct": None if hits is None else bool(hits[q, r]),
                    }
                )
        return rows


def ground_truth_rule(dataset: Any, ground_truth: GroundTruth) -> Any:
    """How positives were decided: the dataset's ``ground_truth_rule``, else the ground truth's ``rule``,
    else its ``source`` description (a dict rule as the datasets stage records it, or a phrase)."""
    for rule in (getattr(dataset, "ground_truth_rule", None), getattr(ground_truth, "rule", None)):
        if callable(rule):
            rule = rule()
        if rule:
            return dict(rule) if isinstance(rule, Mapping) else rule
    return ground_truth.source or "unknown"


def _rule_text(rule: Any) -> str:
    if isinstance(rule, Mapping):
        try:
            return format_rule(dict(rule))
        except Exception:  # a rule the datasets stage cannot phrase: show it as data
            return ", ".join(f"{k}: {v}" for k, v in rule.items())
    return str(rule)


def describe_run(
    summary: dict[str, Any],
    rankings: Rankings,
    ground_truth: GroundTruth,
    dataset: Any = None,
    save_predictions: int = 0,
) -> dict[str, Any]:
    """What ``write_run`` adds to the composer's summary: software versions, the ground-truth rule and
    counts, the Recall@N curve (N = 1 … K) and the precision–recall summary of the top-1 matches."""
    policy = summary.get("recall", {}).get("no_positive_policy", "fail")
    curve = recall_curve(rankings.ranked, ground_truth, policy)
    rule = ground_truth_rule(dataset, ground_truth)
    pr = top1_precision_recall(rankings.ranked, rankings.scores, ground_truth, policy)
    extra: dict[str, Any] = {
        "software": software_versions(),
        "ground_truth": {**ground_truth.summary(), "rule": rule, "rule_text": _rule_text(rule)},
        "recall_curve": [round(float(v), 6) for v in curve],
        "precision_recall": None
        if pr is None
        else {
            "average_precision": pr["average_precision"],
            "recall_at_100_precision": pr["recall_at_100_precision"],
            "n_queries_scored": pr["n_queries"],
            "n_relevant": pr["n_relevant"],
            "acceptance": "top-1 accepted when its score passes a threshold",
        },
        "save_predictions": int(save_predictions),
    }
    if dataset is not None:
        extra["dataset_folders"] = {"database": str(dataset.database_dir), "queries": str(dataset.queries_dir)}
    return extra


def _display_order(rankings: Rankings, ground_truth: GroundTruth, policy: str) -> list[int]:
    """All queries, worst first (as the galleries order them), then those the policy leaves out."""
    first = first_positive_rank(rankings.ranked, ground_truth)
    evaluated = ground_truth.n_positives > 0 if policy == "skip" else None
    n = len(first)
    worst, best = gallery_order(first, rankings.scores[:, 0] if rankings.k else np.zeros(n), n, n, evaluated)
    seen = set(worst) | set(best)
    return worst + best[::-1] + [i for i in range(n) if i not in seen]


def write_run(
    out: str | os.PathLike,
    summary: dict[str, Any],
    rankings: Rankings,
    ground_truth: GroundTruth,
    *,
    dataset: Any = None,
    save_predictions: int = 0,
    report: bool = True,
    log: Any = None,
) -> list[Path]:
    """Write the files of ``eval --out`` (see the module docstring) into ``out``; returns their paths.

    ``summary`` is completed in place with :func:`describe_run`'s fields and the list of files.
    ``dataset`` (a :class:`~vprkit.datasets.Dataset`) gives the image folders the galleries draw from
    and the ground-truth rule; ``save_predictions=N`` draws the worst and best queries with their top N
    (capped at the ranking length). ``report=False`` skips the PNG figures and the HTML report.
    """
    out = Path(out)
    summary.update(describe_run(summary, rankings, ground_truth, dataset, save_predictions))
    policy = summary.get("recall", {}).get("no_positive_policy", "fail")
    records = rankings.records(ground_truth)
    written = [
        write_csv(records, out / PER_QUERY_FILE),
        write_csv(rankings.topn_records(ground_truth), out / TOPN_FILE, TOPN_COLUMNS),
    ]
    if report:
        label = f"{summary.get('dataset', '')} · {summary.get('preset', '')}" + (
            f" + {summary['rerank']}" if summary.get("rerank") else ""
        )
        recall_png = recall_curve_png(summary["recall_curve"], title=f"Recall@N — {label}")
        written.append(save_png(recall_png, out / RECALL_CURVE_FILE))
        pr_png = None
        pr = top1_precision_recall(rankings.ranked, rankings.scores, ground_truth, policy)
        if pr is not None:
            pr_png = pr_curve_png(pr, title=f"Precision–recall — {label}")
            written.append(save_png(pr_png, out / PR_CURVE_FILE))
        entries = []
        if save_predictions > 0:
            n = min(int(save_predictions), rankings.k)
            if n < save_predictions and log is not None:
                log(f"galleries show the top {n} (the ranking length), not {save_predictions}")
            evaluated = ground_truth.n_positives > 0 if policy == "skip" else None
            entries = build_galleries(
                rankings.query_keys,
                rankings.database_keys,
                rankings.ranked,
                rankings.scores,
                first_positive_rank(rankings.ranked, ground_truth),
                hit_matrix(rankings.ranked, ground_truth),
                getattr(dataset, "queries_dir", None),
                getattr(dataset, "database_dir", None),
                n,
                DEFAULT_WORST,
                DEFAULT_BEST,
                evaluated,
                positives=ground_truth.positives,
            )
            written += write_galleries(out, entries)
        order = _display_order(rankings, ground_truth, policy)
        files = [p.relative_to(out).as_posix() for p in written if p.parent == out]
        files += (["predictions/"] if entries else []) + [REPORT_FILE, SUMMARY_FILE]
        summary["files"] = files
        page = render_report(
            summary, recall_png, pr_png, entries, [records[i] for i in order], PER_QUERY_COLUMNS, files
        )
        written.append(atomic_write_text(out / REPORT_FILE, page))
    else:
        summary["files"] = [p.relative_to(out).as_posix() for p in written] + [SUMMARY_FILE]
    written.append(write_json(summary, out / SUMMARY_FILE))
    return written
