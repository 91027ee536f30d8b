"""A self-contained HTML report of one evaluation run (one file: inline CSS, figures as base64 PNG, no scripts).

Sections, each a ``<section id=…>`` so tools and tests can find them: ``results`` (Recall@N table,
counts, precision–recall summary), ``recall-curve``, ``pr-curve``, ``galleries`` (worst, then
best queries), ``per-query`` (worst first, capped), ``ground-truth``, ``timing``, ``settings``
(the resolved configuration), ``environment`` (variables that change results) and ``software``.
Nothing refers to another file or the network, so the report can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import json
import math
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

SECTION_IDS = (
    "results",
    "recall-curve",
    "pr-curve",
    "galleries",
    "per-query",
    "ground-truth",
    "timing",
    "settings",
    "environment",
    "software",
)
MAX_PER_QUERY_ROWS = 500
MAX_HTML_GALLERY = {"worst": 10, "best": 5}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:24px auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.wrong td:first-child{border-left:4px solid #d73027}tr.right td:first-child{border-left:4px solid #1a9850}
.figs{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0}figcaption{font-size:.85em;color:#555}
img{max-width:100%;height:auto;border:1px solid #eee}.muted{color:#666;font-size:.9em}
.big{font-size:1.3em;font-weight:600}code{background:#f5f5f5;padding:0 3px}
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else (f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}")
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(str(v) for v in value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, row_class: Sequence[str] | None = None
) -> str:
    """An HTML table (escaped) from dict rows; numbers right-aligned."""
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            seen.update(dict.fromkeys(r))
        columns = list(seen)
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{_esc(row_class[i])}"' if row_class and row_class[i] else ""
        cells = "".join(
            f'<td class="num">{_esc(_fmt(r.get(c)))}</td>' if _is_num(r.get(c)) else f"<td>{_esc(_fmt(r.get(c)))}</td>"
            for c in columns
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def flatten(d: Mapping[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """Nested settings → ``[{"setting": "image.size", "value": …}, …]``."""
    rows: list[dict[str, Any]] = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            rows.extend(flatten(v, name + "."))
        else:
            rows.append({"setting": name, "value": v if not isinstance(v, Mapping) else "{}"})
    return rows


def key_value(d: Mapping[str, Any], key: str = "name", value: str = "value") -> str:
    return table([{key: k, value: v} for k, v in d.items()], [key, value])


def figure(png: bytes, alt: str, caption: str = "", width: int | None = None) -> str:
    w = f' width="{int(width)}"' if width else ""
    cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{data_uri(png)}" alt="{_esc(alt)}"{w}>{cap}</figure>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_esc(title)}</h2>\n{body}\n</section>'


def render_report(
    summary: Mapping[str, Any],
    recall_png: bytes | None,
    pr_png: bytes | None,
    galleries: Iterable[Any] = (),
    per_query: Sequence[Mapping[str, Any]] = (),
    per_query_columns: Sequence[str] | None = None,
    files: Sequence[str] | None = None,
) -> str:
    """The report as one HTML string. ``galleries``: :class:`~.gallery.GalleryEntry` objects (worst, best);
    ``per_query``: rows already in display order (worst first); ``files``: what else the run wrote."""
    parts = _head(summary)
    parts.append(_results_section(summary))
    parts += _curve_sections(recall_png, pr_png)
    parts.append(_galleries_section(list(galleries)))
    parts.append(_per_query_section(per_query, per_query_columns))
    parts += _run_sections(summary)
    if files:
        parts.append(f'<p class="muted">files of this run: {_esc(", ".join(files))}</p>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _head(summary: Mapping[str, Any]) -> list[str]:
    """The document head, the title and the generation line (the report's first parts)."""
    title = f"vprkit evaluation — {summary.get('dataset', '?')} · {summary.get('preset', '?')}"
    if summary.get("rerank"):
        title += f" + rerank {summary['rerank']}"
    return [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="muted">generated {datetime.now(timezone.utc).isoformat(timespec="seconds")} by vprkit '
        f"{_esc(summary.get('software', {}).get('vprkit', ''))}</p>",
    ]


def _results_section(summary: Mapping[str, Any]) -> str:
    """``results``: Recall@N in large type and as a table, the counts and the precision–recall summary."""
    rec = summary.get("recall", {})
    ns = rec.get("ns") or sorted(int(k[2:]) for k in rec if k.startswith("R@"))
    recall_row = {f"R@{n}": rec.get(f"R@{n}") for n in ns}
    counts = summary.get("counts", {})
    pr = summary.get("precision_recall") or {}
    body = [
        '<p class="big">' + " &nbsp; ".join(f"R@{n} {_esc(_fmt(rec.get(f'R@{n}')))}" for n in ns) + "</p>",
        table([recall_row], [f"R@{n}" for n in ns]),
    ]
    info = {
        "queries": counts.get("queries"),
        "database images": counts.get("database"),
        "queries evaluated": rec.get("n_evaluated"),
        "queries without positive": rec.get("n_no_positive"),
        "no-positive policy": rec.get("no_positive_policy"),
        "unreadable queries": counts.get("queries_unreadable"),
        "ranking length K": rec.get("k"),
    }
    if pr:
        info["precision–recall average precision (top-1)"] = pr.get("average_precision")
        info["recall at 100 % precision"] = pr.get("recall_at_100_precision")
    body.append(key_value(info, "what", "value"))
    if rec.get("truncated_ns"):
        body.append(f'<p class="muted">N larger than the ranking length: {_esc(rec["truncated_ns"])}</p>')
    return _section("results", "Results", "\n".join(body))


def _curve_sections(recall_png: bytes | None, pr_png: bytes | None) -> list[str]:
    """``recall-curve`` and ``pr-curve``: the figures, or why there is none."""
    return [
        _section(
            "recall-curve",
            "Recall@N curve",
            figure(recall_png, "Recall@N curve", "Recall@N for N = 1 … K") if recall_png else "<p>not available</p>",
        ),
        _section(
            "pr-curve",
            "Precision–recall (top-1 acceptance by score)",
            figure(
                pr_png,
                "precision–recall curve",
                "accept a query's top-1 when its score passes a threshold; sweep the threshold",
            )
            if pr_png
            else "<p>not applicable to this run (no finite top-1 scores)</p>",
        ),
    ]


def _galleries_section(entries: Sequence[Any]) -> str:
    """``galleries``: the worst, then the best queries (capped by :data:`MAX_HTML_GALLERY`), or how to draw them."""
    if not entries:
        return _section(
            "galleries", "Prediction galleries", "<p>not drawn (run with <code>--save-predictions N</code>)</p>"
        )
    gbody = [
        '<p class="muted">each row: the query (blue frame), then its top predictions — '
        "green frame = correct, red = wrong; after a gap, purple: a true match the query should have found. "
        "Worst queries first.</p>"
    ]
    for kind, heading in (("worst", "Worst queries"), ("best", "Best queries")):
        chosen = [e for e in entries if e.kind == kind][: MAX_HTML_GALLERY[kind]]
        total = sum(e.kind == kind for e in entries)
        if not chosen:
            continue
        more = f" (first {len(chosen)} of {total}; all in predictions/)" if total > len(chosen) else ""
        gbody.append(f'<h3 id="gallery-{kind}">{_esc(heading)}{_esc(more)}</h3>')
        gbody += [
            f'<div class="gallery-row" data-kind="{kind}" data-query="{_esc(e.query)}">'
            + figure(e.png, f"{kind} {e.position}: {e.query}")
            + "</div>"
            for e in chosen
        ]
    return _section("galleries", "Prediction galleries", "\n".join(gbody))


def _per_query_section(per_query: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> str:
    """``per-query``: the first :data:`MAX_PER_QUERY_ROWS` rows (worst first), right and wrong ones marked."""
    shown = list(per_query)[:MAX_PER_QUERY_ROWS]
    classes = ["right" if r.get("correct") else ("wrong" if r.get("correct") is False else "") for r in shown]
    note = (
        f'<p class="muted">{len(shown)} of {len(per_query)} queries, worst first; all in per_query.csv '
        f"and top-N in topn.csv</p>"
    )
    return _section("per-query", "Per-query results", note + table(shown, columns, classes))


def _run_sections(summary: Mapping[str, Any]) -> list[str]:
    """``ground-truth``, ``timing``, ``settings``, ``environment`` and ``software``: how the run was made."""
    gt = summary.get("ground_truth", {})
    timing = dict(summary.get("timing", {}))
    if "peak_rss_mb" in summary:
        timing["peak_rss_mb"] = summary["peak_rss_mb"]
    settings = {
        "dataset": summary.get("dataset"),
        "preset": summary.get("preset"),
        "rerank": summary.get("rerank"),
        "save_predictions": summary.get("save_predictions"),
    }
    env = summary.get("environment") or {}
    return [
        _section("ground-truth", "Ground truth", key_value(gt, "what", "value") if gt else "<p>unknown</p>"),
        _section("timing", "Timing and memory", key_value(timing, "measure", "value")),
        _section(
            "settings",
            "Settings",
            key_value(settings, "setting", "value")
            + table(flatten(summary.get("config", {}), "config."), ["setting", "value"]),
        ),
        _section(
            "environment",
            "Environment variables that change results",
            key_value(env, "variable", "value") if env else "<p>none set</p>",
        ),
        _section("software", "Software", key_value(summary.get("software", {}), "package", "version")),
    ]
