"""Figures of an evaluation as PNG bytes: the Recall@N curve and precision–recall curves.

Everything uses matplotlib's object-oriented API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``),
never pyplot's global state or ``matplotlib.use``, so plotting is safe in servers, threads and
tests. Functions return PNG bytes, which the run writer saves to files (atomically) and the HTML
report embeds as they are.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..io import atomic_write_bytes

PLOT_DPI = 120
PLOT_SIZE_INCHES = (5.0, 4.0)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def new_figure(size: tuple[float, float] = PLOT_SIZE_INCHES):
    """A matplotlib ``Figure`` attached to its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig, dpi: int = PLOT_DPI) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(data: bytes, path: str | os.PathLike) -> Path:
    """Write PNG bytes to ``path`` atomically."""
    return atomic_write_bytes(path, data)


def recall_curve_png(
    curves: Mapping[str, Sequence[float]] | Sequence[float],
    title: str = "Recall@N",
    marks: Sequence[int] = (1, 5, 10, 20),
) -> bytes:
    """Recall@N against N = 1 … K for one curve (a sequence) or several (``{label: curve}``).

    ``marks`` are the N whose values are annotated on the first curve.
    """
    if not isinstance(curves, Mapping):
        curves = {"": curves}
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    k_max = 1
    for i, (label, curve) in enumerate(curves.items()):
        y = np.asarray(curve, dtype=float)
        x = np.arange(1, len(y) + 1)
        k_max = max(k_max, len(y))
        ax.plot(x, y, marker="o", markersize=3, label=label or None)
        if i == 0:
            for n in marks:
                if 1 <= n <= len(y):
                    ax.annotate(
                        f"{y[n - 1]:.3f}",
                        (n, y[n - 1]),
                        textcoords="offset points",
                        xytext=(0, -12),
                        ha="center",
                        fontsize=8,
                    )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, k_max + 0.5)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("N (number of retrieved images)")
    ax.set_ylabel("Recall@N")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(curves):
        ax.legend(loc="lower right")
    fig.tight_layout()
    return figure_png(fig)


def pr_curve_png(curves: Mapping[str, Mapping[str, Any]] | Mapping[str, Any], title: str = "Precision–recall") -> bytes:
    """One or several precision–recall curves (results of ``precision_recall``) as PNG bytes."""
    if "precision" in curves and "recall" in curves:
        curves = {"": curves}  # type: ignore[dict-item]
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, res in curves.items():
        ap = res.get("average_precision")
        name = (
            f"{label} (AP {ap:.3f})"
            if label and ap is not None
            else (f"AP {ap:.3f}" if ap is not None else (label or None))
        )
        recall = np.r_[0.0, np.asarray(res["recall"], dtype=float)]
        precision = np.r_[1.0, np.asarray(res["precision"], dtype=float)]
        ax.step(recall, precision, where="post", label=name)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    return figure_png(fig)
