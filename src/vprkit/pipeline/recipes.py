"""Training: a recipe's run (:mod:`vprkit.training`), and a PCA layer appended to a trained checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)


def train(
    recipe, resume: bool = True, progress: bool = True, log: Callable[[str], None] = logger.info
) -> dict[str, Any]:
    """Train what a recipe (TOML/YAML path or dict) describes; the summary's ``checkpoint`` (RUN/best.ckpt) is a preset."""
    from ..training.recipe import (
        run_recipe,
    )  # lazy: the training stage loads pytorch-metric-learning and SciPy (+0.5 s)

    return run_recipe(recipe, resume=resume, progress=progress, log=log)


def add_pca(
    checkpoint, images, dim: int, whiten: bool = False, sample: int = 2000, out=None, progress: bool = True
) -> Path:
    """Append a PCA (``whiten``: whitened) layer fitted on ≤ ``sample`` of ``images`` to a checkpoint; returns the new .ckpt."""
    from ..training.checkpoint import add_pca as _add_pca  # lazy: see train

    return _add_pca(checkpoint, images, dim, whiten=whiten, sample=sample, out=out, progress=progress)
