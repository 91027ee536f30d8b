"""MixVPR (Ali-bey, Chaib-draa & Giguère, WACV 2023), written from the paper; equal to the official head.

The backbone's ``h×w×C`` map is read as ``C`` rows of ``h·w`` values (one flattened spatial map
per channel). ``depth`` *feature-mixer* blocks each apply, to every row, LayerNorm →
Linear(hw → hw·r) → ReLU → Linear(hw·r → hw) and add the input back (a residual MLP over the
whole spatial extent, shared by all channels), so every output value sees the whole image.
Then a *channel projection* (Linear C → C′, along channels) and a *row projection*
(Linear hw → R, along the spatial axis) give a ``C′×R`` matrix, flattened and L2-normalised:
``dim = out_channels × out_rows``.

The layer sizes derive from the backbone: ``C`` is the backbone's dim, ``hw`` its grid at the
preset's image size (``height``, ``width`` — the trainer fills them in from the feature cache);
a map of another grid is refused with a clear message, or, with ``adapt_grid=True``,
average-pooled to the trained grid first (so the head runs at any image size; not the authors' protocol,
which resizes every image to the trained size). Parameters are frozen unless ``trainable=True``; a head
trained by vprkit is loaded through the ``trained`` aggregator (:mod:`vprkit.aggregation.projection`), a
published one with ``zoo=NAME`` (:mod:`vprkit.zoo.mixvpr`; ``weights``: its file).

The official code (amaralibey/MixVPR) computes exactly this: its ``x.flatten(2)`` of the ``C×h×w`` map
is our row-major ``h·w`` per channel, its mixer is ``x + Linear(ReLU(Linear(LayerNorm(x))))`` with a hidden
width of ``int(h·w·mlp_ratio)``, and the result is flattened channel-major (``C′`` blocks of ``R``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import DenseFeatures
from ..errors import ConfigError
from ..zoo import load_part
from .base import AGGREGATORS, Aggregator, l2n

# The paper's settings (REFERENCE.md, "Training conventions"): 4 mixers, r = 1, 4 output rows.
MIXVPR_DEPTH = 4
MIXVPR_MLP_RATIO = 1.0
MIXVPR_OUT_ROWS = 4


class FeatureMixer(nn.Module):
    """One feature-mixer block over the last axis (the flattened spatial map): ``x + MLP(LN(x))``."""

    def __init__(self, n: int, ratio: float = MIXVPR_MLP_RATIO):
        super().__init__()
        hidden = max(1, int(n * ratio))  # the official width: int(h·w·ratio), rounded down
        self.norm = nn.LayerNorm(n)
        self.fc1 = nn.Linear(n, hidden)
        self.fc2 = nn.Linear(hidden, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class MixVPR(Aggregator):
    """MixVPR head: feature mixers over flattened ``height×width`` maps, channel and row projections, L2.

    ``out_channels`` defaults to the backbone's dim; ``dim = out_channels · out_rows``.
    """

    name = "mixvpr"

    def __init__(
        self,
        backbone_dim: int,
        height: int | None = None,
        width: int | None = None,
        depth: int = MIXVPR_DEPTH,
        mlp_ratio: float = MIXVPR_MLP_RATIO,
        out_channels: int | None = None,
        out_rows: int = MIXVPR_OUT_ROWS,
        adapt_grid: bool = False,
        zoo: str | None = None,
        weights: str | os.PathLike | None = None,
        trainable: bool = False,
    ):
        super().__init__(backbone_dim)
        if height is None or width is None:
            raise ConfigError(
                "the mixvpr aggregator needs the backbone's grid: height=… and width=… (feature-map "
                "cells at the preset's image size; `vprkit train` fills them in)"
            )
        if min(height, width, depth + 1, out_rows) < 1 or mlp_ratio <= 0:
            raise ConfigError(
                f"mixvpr: invalid sizes height={height} width={width} depth={depth} out_rows={out_rows} "
                f"mlp_ratio={mlp_ratio}"
            )
        self.height, self.width = int(height), int(width)
        self.adapt_grid = bool(adapt_grid)
        n = self.height * self.width
        self.out_channels = int(out_channels or backbone_dim)
        self.out_rows = int(out_rows)
        self.mixers = nn.Sequential(*[FeatureMixer(n, mlp_ratio) for _ in range(int(depth))])
        self.channel_proj = nn.Linear(self.backbone_dim, self.out_channels)
        self.row_proj = nn.Linear(n, self.out_rows)
        self.zoo = zoo
        if zoo:
            load_part(self, zoo, weights, "aggregator")
        self.requires_grad_(bool(trainable))

    @property
    def dim(self) -> int:
        return self.out_channels * self.out_rows

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        patches = features.patches
        if features.grid != (self.height, self.width) and self.adapt_grid:
            patches = F.adaptive_avg_pool2d(patches.permute(0, 3, 1, 2).float(), (self.height, self.width)).permute(
                0, 2, 3, 1
            )
        elif features.grid != (self.height, self.width):
            raise ConfigError(
                f"this mixvpr head was built for a {self.height}×{self.width} feature grid, got "
                f"{features.grid[0]}×{features.grid[1]}: use the image size it was trained at"
            )
        x = patches.reshape(len(patches), -1, patches.shape[-1]).float().transpose(1, 2)  # B × C × hw
        x = self.mixers(x)
        x = self.channel_proj(x.transpose(1, 2))  # B × hw × C′
        x = self.row_proj(x.transpose(1, 2))  # B × C′ × R
        return l2n(x.flatten(1))

    def identity(self):
        ident = {
            **super().identity(),
            "grid": [self.height, self.width],
            "depth": len(self.mixers),
            "out_channels": self.out_channels,
            "out_rows": self.out_rows,
        }
        if self.zoo:
            ident["zoo"] = self.zoo
        return ident


AGGREGATORS.register("mixvpr", MixVPR)
