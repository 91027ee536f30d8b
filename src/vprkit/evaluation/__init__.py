"""Evaluation: Recall@N and precision–recall on a :class:`~vprkit.datasets.GroundTruth`, plus reports.

:mod:`.metrics` computes numbers from rankings (Q×K database indices); :mod:`.report` measures
time and memory and writes CSV/JSON/PNG results atomically; :mod:`.run` writes the files of
``eval --out`` — figures from :mod:`.plots`, prediction galleries from :mod:`.gallery` and the
self-contained HTML report from :mod:`.html`; :mod:`.compare` compares runs (table, per-query fixes and breaks).
"""

from .metrics import (
    DEFAULT_NS,
    NO_POSITIVE_POLICIES,
    first_positive_rank,
    hit_matrix,
    precision_recall,
    query_records,
    recall_at_n,
    recall_curve,
    top1_precision_recall,
)
from .report import PeakMemory, Timer, format_table, plot_pr_curve, software_versions, write_csv, write_json

__all__ = [
    "DEFAULT_NS",
    "NO_POSITIVE_POLICIES",
    "PeakMemory",
    "Timer",
    "first_positive_rank",
    "format_table",
    "hit_matrix",
    "plot_pr_curve",
    "precision_recall",
    "query_records",
    "recall_at_n",
    "recall_curve",
    "software_versions",
    "top1_precision_recall",
    "write_csv",
    "write_json",
]
