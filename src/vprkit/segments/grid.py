"""A regular grid of square patches: the simplest segmenter (an ablation and a speed baseline)."""

from __future__ import annotations

import numpy as np

from .base import SEGMENTERS, Segmenter


@SEGMENTERS.register("grid")
class GridSegmenter(Segmenter):
    """Square cells of ``cell`` pixels (the last row/column takes the remainder), or, with
    ``cells_across``, ``cell = ceil(width / cells_across)``."""

    name = "grid"

    def __init__(self, cell: int | None = None, cells_across: int = 6):
        self.cell = cell
        self.cells_across = int(cells_across)

    def segment(self, image, features=None, stride=None):
        H, W = image.shape[:2]
        cell = int(self.cell) if self.cell else max(1, -(-W // self.cells_across))
        ys, xs = np.arange(H) // cell, np.arange(W) // cell
        labels = ys[:, None] * (xs[-1] + 1) + xs[None, :]
        ids = np.unique(labels)
        return labels[None] == ids[:, None, None]

    def identity(self):
        return {"segmenter": self.name, "cell": self.cell, "cells_across": self.cells_across}
