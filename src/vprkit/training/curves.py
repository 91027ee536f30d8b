"""The loss / validation-recall curve of a run as a PNG (matplotlib's object API; no global backend)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def plot_curves(history: Sequence[dict], out: str | os.PathLike, title: str = "") -> Path:
    """Mean training loss, validation Recall@1/5 and the monitored Recall@1 per epoch, two axes, written to ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h.get("loss") for h in history], "o-", color="tab:red", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:red")
    if any("R@1" in h for h in history):
        ax2 = ax.twinx()
        for n, style, label in (
            ("R@1", "s-", "validation R@1"),
            ("R@5", "^--", "validation R@5"),
            ("monitor R@1", "d:", "monitored R@1 (not used to pick)"),
        ):
            if any(n in h for h in history):
                ax2.plot(epochs, [h.get(n) for h in history], style, label=label)
        ax2.set_ylabel("validation recall")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    return out
