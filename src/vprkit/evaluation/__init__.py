"""Evaluation: Recall@N and precision–recall on a :class:`~vprkit.datasets.GroundTruth`, plus reports.

:mod:`.metrics` computes numbers from rankings (Q×K database indices); :mod:`.report` measures
time and memory and writes CSV/JSON/PNG results atomically.
"""

from .metrics import (
    DEFAULT_NS,
    NO_POSITIVE_POLICIES,
    first_positive_rank,
    hit_matrix,
    precision_recall,
    query_records,
    recall_at_n,
)
from .report import PeakMemory, Timer, format_table, plot_pr_curve, write_csv, write_json

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
    "write_csv",
    "write_json",
]
