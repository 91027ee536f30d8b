"""Comparing evaluation runs: one table over methods × datasets, and per-query fixes and breaks.

A *run* is what ``eval --out`` wrote (``summary.json`` + ``per_query.csv``) or the same data in
memory (:class:`RunRecord`). :func:`comparison_rows` makes one row per run with Recall@N, bytes
per place and time per query; :func:`query_changes` says, for two runs on the same dataset, which
queries B gets right within the top N that A does not (*fixed*) and the reverse (*broken*).
:func:`write_comparison` writes it all as Markdown, CSV, JSON and a self-contained HTML page.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from ..io import atomic_write_text
from .html import _CSS, _esc, table
from .report import write_csv, write_json
from .run import RECALL_NS

COMPARE_NS = RECALL_NS  # the same recall points as every evaluation
TABLE_MD = "comparison.md"
TABLE_CSV = "comparison.csv"
TABLE_HTML = "comparison.html"
CHANGES_CSV = "changes.csv"
COMPARISON_JSON = "comparison.json"
MAX_LISTED_CHANGES = 50


@dataclass
class RunRecord:
    """One evaluated method on one dataset, as far as comparisons need it."""

    dataset: str
    preset: str
    rerank: str | None
    recall: Mapping[str, Any]
    ms_per_query: float | None = None
    search_ms_per_query: float | None = None
    bytes_per_place: float | None = None  # global descriptor
    bytes_per_place_total: float | None = None  # global + stored re-ranking/segment data
    first_positive: dict[str, int | None] = field(default_factory=dict)  # query → 1-based rank or None
    folder: str | None = None

    @property
    def label(self) -> str:
        return self.preset + (f" + {self.rerank}" if self.rerank else "")


def _rank(value: Any) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def record_from_summary(
    summary: Mapping[str, Any],
    per_query: Sequence[Mapping[str, Any]],
    bytes_per_image: Mapping[str, float] | None = None,
    folder: str | None = None,
) -> RunRecord:
    """A :class:`RunRecord` from an evaluation summary and its per-query records (or CSV rows)."""
    timing = summary.get("timing", {})
    b = dict(bytes_per_image or summary.get("bytes_per_image") or {})
    return RunRecord(
        dataset=str(summary.get("dataset", "?")),
        preset=str(summary.get("preset", "?")),
        rerank=summary.get("rerank"),
        recall=dict(summary.get("recall", {})),
        ms_per_query=timing.get("ms_per_query"),
        search_ms_per_query=timing.get("search_ms_per_query"),
        bytes_per_place=b.get("global"),
        bytes_per_place_total=sum(b.values()) if b else None,
        first_positive={str(r["query"]): _rank(r.get("first_positive_rank")) for r in per_query},
        folder=folder,
    )


def load_run(folder: str | os.PathLike, bytes_per_image: Mapping[str, float] | None = None) -> RunRecord:
    """Read a run folder written by ``eval --out`` (``summary.json`` and ``per_query.csv``)."""
    d = Path(folder)
    try:
        summary = json.loads((d / "summary.json").read_text())
        with open(d / "per_query.csv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{d} is not an evaluation run folder (summary.json + per_query.csv): {exc}") from None
    return record_from_summary(summary, rows, bytes_per_image, str(d))


def comparison_rows(runs: Sequence[RunRecord], ns: Sequence[int] = COMPARE_NS) -> list[dict[str, Any]]:
    """One row per run: dataset, method, Recall@N, bytes per place, ms per query, query counts."""
    rows = []
    for r in runs:
        row: dict[str, Any] = {"dataset": r.dataset, "method": r.label}
        for n in ns:
            row[f"R@{n}"] = r.recall.get(f"R@{n}")
        row["bytes/place"] = None if r.bytes_per_place is None else int(round(r.bytes_per_place))
        row["bytes/place (all)"] = None if r.bytes_per_place_total is None else int(round(r.bytes_per_place_total))
        row["ms/query"] = r.ms_per_query
        row["search ms/query"] = r.search_ms_per_query
        row["queries"] = r.recall.get("n_evaluated")
        rows.append(row)
    return rows


def _hit(rank: int | None, n: int) -> bool:
    return rank is not None and rank <= n


def query_changes(a: RunRecord, b: RunRecord, n: int = 1) -> dict[str, Any]:
    """Which queries B gets right within the top ``n`` that A does not (``fixed``), and the reverse (``broken``).

    Only queries both runs evaluated are compared (``common``); each change lists the query and the
    1-based rank of its first positive in A and in B (None: not in the list). Also ``both_right``,
    ``both_wrong`` and the net gain ``len(fixed) − len(broken)`` (= B's Recall@n − A's, in queries).
    """
    if n < 1:
        raise ConfigError("n must be ≥ 1")
    common = [q for q in a.first_positive if q in b.first_positive]
    fixed, broken = [], []
    both_right = both_wrong = 0
    for q in common:
        ra, rb = a.first_positive[q], b.first_positive[q]
        ha, hb = _hit(ra, n), _hit(rb, n)
        if hb and not ha:
            fixed.append({"query": q, "rank_a": ra, "rank_b": rb})
        elif ha and not hb:
            broken.append({"query": q, "rank_a": ra, "rank_b": rb})
        elif ha:
            both_right += 1
        else:
            both_wrong += 1
    return {
        "dataset": a.dataset,
        "a": a.label,
        "b": b.label,
        "n": n,
        "common": len(common),
        "fixed": fixed,
        "broken": broken,
        "both_right": both_right,
        "both_wrong": both_wrong,
        "net": len(fixed) - len(broken),
    }


def pairwise_changes(runs: Sequence[RunRecord], baseline: str | None = None, n: int = 1) -> list[dict[str, Any]]:
    """:func:`query_changes` of every run against the baseline run of the same dataset.

    ``baseline`` is a method label (``"effnet-vlad"``, ``"effnet-vlad + speed"``); default: the first run
    of each dataset.
    """
    by_dataset: dict[str, list[RunRecord]] = {}
    for r in runs:
        by_dataset.setdefault(r.dataset, []).append(r)
    out = []
    for dataset, rs in by_dataset.items():
        base = next((r for r in rs if r.label == baseline), None) if baseline else rs[0]
        if base is None:
            raise ConfigError(
                f"baseline {baseline!r} is not among the methods run on {dataset}: {[r.label for r in rs]}"
            )
        out += [query_changes(base, r, n) for r in rs if r is not base]
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return ""
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [
        "| " + " | ".join(esc(c) for c in columns) + " |",
        "|"
        + "|".join(
            "---:"
            if any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows)
            else "---"
            for c in columns
        )
        + "|",
    ]
    lines += ["| " + " | ".join(esc(_fmt(r.get(c))) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def changes_summary_rows(changes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "dataset": c["dataset"],
            "A": c["a"],
            "B": c["b"],
            "N": c["n"],
            "fixed by B": len(c["fixed"]),
            "broken by B": len(c["broken"]),
            "net": c["net"],
            "both right": c["both_right"],
            "both wrong": c["both_wrong"],
        }
        for c in changes
    ]


def _changes_markdown(changes: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for c in changes:
        parts.append(f"### {c['dataset']}: {c['b']} vs {c['a']} (R@{c['n']})\n")
        parts.append(
            f"{len(c['fixed'])} fixed, {len(c['broken'])} broken, net {c['net']:+d} of {c['common']} queries.\n"
        )
        for kind in ("fixed", "broken"):
            items = c[kind][:MAX_LISTED_CHANGES]
            if items:
                listed = ", ".join(
                    f"`{i['query']}` ({_fmt(i['rank_a']) or '–'}→{_fmt(i['rank_b']) or '–'})" for i in items
                )
                more = f" … and {len(c[kind]) - len(items)} more" if len(c[kind]) > len(items) else ""
                parts.append(f"- **{kind}** (first positive rank A→B): {listed}{more}\n")
    return "\n".join(parts)


def render_markdown(
    runs: Sequence[RunRecord],
    changes: Sequence[Mapping[str, Any]],
    ns: Sequence[int] = COMPARE_NS,
    list_queries: bool = True,
) -> str:
    """The table, the fixes/breaks counts and (``list_queries``) the queries fixed and broken, as Markdown."""
    text = ["# vprkit comparison\n", markdown_table(comparison_rows(runs, ns)), ""]
    if changes:
        text += ["## Per-query changes against the baseline\n", markdown_table(changes_summary_rows(changes)), ""]
        if list_queries:
            text.append(_changes_markdown(changes))
    return "\n".join(text).rstrip() + "\n"


def render_html(runs: Sequence[RunRecord], changes: Sequence[Mapping[str, Any]], ns: Sequence[int] = COMPARE_NS) -> str:
    """The comparison as one self-contained HTML page (inline CSS, no scripts or external files)."""
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>vprkit comparison</title>'
        f"<style>{_CSS}</style></head><body><h1>vprkit comparison</h1>",
        '<section id="table"><h2>Recall@N, bytes per place, time per query</h2>'
        + table(comparison_rows(runs, ns))
        + "</section>",
    ]
    if changes:
        body = [table(changes_summary_rows(changes))]
        for c in changes:
            body.append(f"<h3>{_esc(c['dataset'])}: {_esc(c['b'])} vs {_esc(c['a'])} (R@{c['n']})</h3>")
            for kind in ("fixed", "broken"):
                items = c[kind][:MAX_LISTED_CHANGES]
                if items:
                    more = f" (first {len(items)} of {len(c[kind])})" if len(c[kind]) > len(items) else ""
                    body.append(f"<p><b>{kind} by B</b>{_esc(more)}</p>" + table(items, ["query", "rank_a", "rank_b"]))
        parts.append(
            '<section id="changes"><h2>Per-query changes against the baseline</h2>' + "".join(body) + "</section>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_comparison(
    out: str | os.PathLike,
    runs: Sequence[RunRecord],
    changes: Sequence[Mapping[str, Any]],
    ns: Sequence[int] = COMPARE_NS,
) -> list[Path]:
    """``comparison.{md,csv,html,json}`` and ``changes.csv`` (one row per changed query) in ``out``, atomically."""
    out = Path(out)
    rows = comparison_rows(runs, ns)
    change_rows = [
        {"dataset": c["dataset"], "a": c["a"], "b": c["b"], "n": c["n"], "change": kind, **item}
        for c in changes
        for kind in ("fixed", "broken")
        for item in c[kind]
    ]
    return [
        atomic_write_text(out / TABLE_MD, render_markdown(runs, changes, ns)),
        write_csv(rows, out / TABLE_CSV),
        atomic_write_text(out / TABLE_HTML, render_html(runs, changes, ns)),
        write_csv(change_rows, out / CHANGES_CSV, ["dataset", "a", "b", "n", "change", "query", "rank_a", "rank_b"]),
        write_json(
            {"runs": [dict(r, folder=run.folder) for r, run in zip(rows, runs)], "changes": list(changes)},
            out / COMPARISON_JSON,
        ),
    ]
