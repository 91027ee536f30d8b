"""Trainable heads over (cached) backbone features: GeM, NetVLAD from k-means, MixVPR, spatial layout, + a linear projection.

:func:`build_head` returns a :class:`~vprkit.aggregation.projection.TrainedHead` — the same module
the ``trained`` aggregator rebuilds from a checkpoint, so the trained state dict loads unchanged
at inference. Dimensions derive from the features: the backbone's dim and, for MixVPR and the layout head, its grid.
NetVLAD is initialised from k-means on a sample of the training features (centres and α).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..aggregation.projection import TrainedHead
from ..errors import ConfigError

HEADS = ("gem", "netvlad", "mixvpr", "layout", "mean")
# Heads whose layer sizes depend on the feature grid (filled in from the features they train on).
GRID_HEADS = ("mixvpr", "layout")
DEFAULT_NETVLAD_K = 64
KMEANS_SAMPLE = 50_000


def head_options(name: str, options: Mapping[str, Any] | None, grid: tuple[int, int]) -> dict[str, Any]:
    """The inner head's options with what derives from the features filled in (MixVPR's grid, NetVLAD's K)."""
    opts = {k: v for k, v in dict(options or {}).items() if k != "trainable"}
    if name in GRID_HEADS:
        opts.setdefault("height", int(grid[0]))
        opts.setdefault("width", int(grid[1]))
        if (opts["height"], opts["width"]) != tuple(grid):
            raise ConfigError(f"{name} height×width {opts['height']}×{opts['width']} differs from the features' grid {grid}")
    if name == "netvlad":
        opts.setdefault("k", DEFAULT_NETVLAD_K)
    return opts


def build_head(name: str, backbone_dim: int, grid: tuple[int, int], options: Mapping[str, Any] | None = None,
               projection: int | None = None, sample: np.ndarray | None = None, seed: int = 0) -> TrainedHead:
    """A trainable head. ``sample``: local descriptors NetVLAD's k-means initialisation needs."""
    opts = head_options(name, options, grid)
    head = TrainedHead(backbone_dim, head=name, head_options=opts, projection=None, trainable=True)
    if not head.head.is_fitted:
        if sample is None:
            raise ConfigError(f"head {name!r} must be fitted first (k-means): give a descriptor sample")
        head.fit(sample, seed=seed)
        head.requires_grad_(True)
    if projection is not None:
        from ..aggregation.projection import Projection

        head.add_projection(Projection(head.dim, int(projection)))
        head.requires_grad_(True)
    return head
