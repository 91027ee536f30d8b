"""A spatial-layout head: every cell of the feature map projected (with its neighbours), kept in place.

Why: on a camera that always looks the same way along a fixed path (a train, a tram), *where* a
structure appears in the frame is as informative as *what* it is — flattening the untrained
``h×w×C`` map already beats orderless pooling on Nordland. Orderless heads (GeM, VLAD) throw that
away; this head keeps it and learns what to keep of each cell:

    y = L2( vec( exp(π) ⊙ Conv_k×k(x) ) )

``Conv_k×k`` maps the ``C`` backbone channels of each cell and its ``k×k`` neighbourhood to
``out_channels`` (a learned, season-invariant projection that also tolerates a shift of the frame
by up to ``k // 2`` cells); ``π`` is a learned ``h×w`` log-weight per cell (how much each part of the
frame counts: sky and the train's own hood count little). ``dim = h · w · out_channels``.

It starts as a truncated identity (the centre tap is ``I[out, C]``, ``π = 0``), i.e. as the
flattened untrained map, so training can only move away from a known-good start. The grid comes
from the features it is trained on (``height``, ``width``); another grid is refused, or average-pooled
to the trained one with ``adapt_grid=True``. Parameters are frozen unless ``trainable=True``; a trained
head is loaded through the ``trained`` aggregator (:mod:`vprkit.aggregation.projection`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import DenseFeatures
from ..errors import ConfigError
from ..options import Option, Schema, register_schema
from .base import AGGREGATORS, Aggregator, l2n

# A 3×3 neighbourhood: each output cell sees the cells around it (±1 cell of shift tolerance).
LAYOUT_KERNEL = 3


class SpatialLayout(Aggregator):
    """Layout-keeping head: ``k×k`` convolution ``C → out_channels``, learned per-cell weights, flattened, L2."""

    name = "layout"

    def __init__(
        self,
        backbone_dim: int,
        height: int | None = None,
        width: int | None = None,
        out_channels: int | None = None,
        kernel: int = LAYOUT_KERNEL,
        adapt_grid: bool = False,
        trainable: bool = False,
    ):
        super().__init__(backbone_dim)
        if height is None or width is None:
            raise ConfigError(
                "layout: give the feature grid (height, width); the trainer fills it in from its features"
            )
        if int(kernel) < 1 or int(kernel) % 2 == 0:
            raise ConfigError(f"layout: kernel must be a positive odd number, got {kernel}")
        self.height, self.width, self.kernel = int(height), int(width), int(kernel)
        self.adapt_grid = bool(adapt_grid)
        self.out_channels = int(out_channels or backbone_dim)
        self.conv = nn.Conv2d(self.backbone_dim, self.out_channels, self.kernel, padding=self.kernel // 2)
        self.log_weight = nn.Parameter(torch.zeros(self.height, self.width))
        with torch.no_grad():  # start as the flattened map (truncated identity at the centre tap)
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            c = self.kernel // 2
            self.conv.weight[:, :, c, c] = torch.eye(self.out_channels, self.backbone_dim)
        self.requires_grad_(bool(trainable))

    @property
    def dim(self) -> int:
        return self.height * self.width * self.out_channels

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        x = features.patches.permute(0, 3, 1, 2).to(self.conv.weight.dtype)  # B × C × h × w (float16 caches too)
        if features.grid != (self.height, self.width):
            if not self.adapt_grid:
                raise ConfigError(
                    f"this layout head was built for a {self.height}×{self.width} feature grid, got "
                    f"{features.grid[0]}×{features.grid[1]}: use the image size it was trained at"
                )
            x = F.adaptive_avg_pool2d(x, (self.height, self.width))
        x = self.conv(x) * torch.exp(self.log_weight)[None, None]
        return l2n(x.flatten(1))

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "grid": [self.height, self.width],
            "kernel": self.kernel,
            "out_channels": self.out_channels,
        }


AGGREGATORS.register("layout", SpatialLayout)
register_schema(
    Schema(
        "aggregator",
        "layout",
        (
            Option(
                "height", "int", None, "feature-map rows at the preset's image size (required)", low=1, nullable=True
            ),
            Option(
                "width", "int", None, "feature-map columns at the preset's image size (required)", low=1, nullable=True
            ),
            Option(
                "out_channels",
                "int",
                None,
                "channels kept per cell (default: the backbone's dim); dim = h·w·out_channels",
                low=1,
                nullable=True,
            ),
            Option("kernel", "int", LAYOUT_KERNEL, "neighbourhood each cell's projection sees (odd)", low=1),
            Option("adapt_grid", "bool", False, "average-pool another grid to height×width instead of refusing it"),
            Option("trainable", "bool", False, "learn the head when training"),
        ),
        doc="spatial-layout head: every cell projected and kept in place (trainable)",
    )
)
