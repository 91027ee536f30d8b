"""Bag-of-Queries (Ali-bey, Chaib-draa & Giguère, CVPR 2024): learned queries probe the local features.

Written from the paper and the authors' published equations (MIT); the official checkpoints load
through :mod:`vprkit.zoo.boq`. With ``P = proj_channels`` and ``x`` the backbone's ``h×w×C`` map:

1. a 3×3 convolution (padding 1) projects ``C → P`` (it also mixes neighbouring cells, which is why the
   method needs no positional encoding), the ``h·w`` cells become a sequence, LayerNorm;
2. ``num_layers`` BoQ blocks in cascade. Block ``i`` refines the sequence with one post-norm transformer
   encoder layer (self-attention, then a ReLU MLP of width ``4P``; each ``x = LN(x + f(x))``) and
   aggregates it with its own ``num_queries`` learned queries: the queries first attend to each other
   (``q = LN(q + SelfAttn(q))`` — the same for every image, it stabilises training), then read the
   refined sequence by cross-attention, ``o_i = LN(CrossAttn(q, x, x))`` (no residual: the output is
   what the queries gathered). The next block reads the refined ``x``;
3. the blocks' outputs are stacked (``L·Q`` query rows of width ``P``) and a linear layer over the query
   axis reduces them to ``row_dim`` rows; flattened channel-major (``P`` blocks of ``row_dim``) and
   L2-normalised: ``dim = P × row_dim``.

Attention heads: ``P // 64`` (at least one), as the authors use. Any feature grid is accepted (the
convolution and attention do not depend on it). Parameters are frozen unless ``trainable=True``.
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

# The published models' settings (hubconf ``get_trained_boq``): 64 queries, 2 blocks, 32 rows.
BOQ_NUM_QUERIES = 64
BOQ_NUM_LAYERS = 2
BOQ_ROW_DIM = 32
BOQ_PROJ_CHANNELS = 512
HEAD_WIDTH = 64  # channels per attention head (the authors' ``nheads = in_dim // 64``)
MLP_RATIO = 4  # the encoder layer's feed-forward width, as a multiple of P
PROJ_KERNEL = 3


def attention_heads(channels: int) -> int:
    """The number of attention heads over ``channels``-wide tokens (``channels // 64``, at least one)."""
    heads = max(1, channels // HEAD_WIDTH)
    if channels % heads:
        raise ConfigError(
            f"boq: proj_channels={channels} gives {heads} attention heads of {HEAD_WIDTH} channels, but "
            f"{channels} is not a multiple of {heads}; choose a multiple of {heads}"
        )
    return heads


class EncoderLayer(nn.Module):
    """A post-norm transformer encoder layer: ``x = LN1(x + SelfAttn(x))``, ``x = LN2(x + W2·relu(W1·x))``.

    Parameter names are PyTorch's ``TransformerEncoderLayer``'s, the layer the authors train with.
    """

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.linear1 = nn.Linear(channels, MLP_RATIO * channels)
        self.linear2 = nn.Linear(MLP_RATIO * channels, channels)
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.self_attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class BoQBlock(nn.Module):
    """One BoQ block: refine the sequence (encoder layer), then let learned queries aggregate it."""

    def __init__(self, channels: int, num_queries: int, heads: int):
        super().__init__()
        self.encoder = EncoderLayer(channels, heads)
        self.queries = nn.Parameter(torch.randn(1, num_queries, channels))
        self.self_attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm_q = nn.LayerNorm(channels)
        self.cross_attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm_out = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``B×N×P`` sequence → (the refined sequence, the ``B×Q×P`` aggregated queries)."""
        x = self.encoder(x)
        q = self.queries
        q = self.norm_q(q + self.self_attn(q, q, q, need_weights=False)[0])  # image-independent
        q = q.expand(len(x), -1, -1)
        out = self.norm_out(self.cross_attn(q, x, x, need_weights=False)[0])
        return x, out


class BoQ(Aggregator):
    """Bag-of-Queries head: 3×3 projection, LayerNorm, ``num_layers`` BoQ blocks, linear over queries, L2.

    ``zoo=NAME`` loads the ``aggregator`` part of that zoo checkpoint (``weights``: its file).
    """

    name = "boq"

    def __init__(
        self,
        backbone_dim: int,
        proj_channels: int = BOQ_PROJ_CHANNELS,
        num_queries: int = BOQ_NUM_QUERIES,
        num_layers: int = BOQ_NUM_LAYERS,
        row_dim: int = BOQ_ROW_DIM,
        zoo: str | None = None,
        weights: str | os.PathLike | None = None,
        trainable: bool = False,
    ):
        super().__init__(backbone_dim)
        if min(proj_channels, num_queries, num_layers, row_dim) < 1:
            raise ConfigError(
                f"boq: sizes must be ≥ 1, got proj_channels={proj_channels} num_queries={num_queries} "
                f"num_layers={num_layers} row_dim={row_dim}"
            )
        self.proj_channels, self.num_queries = int(proj_channels), int(num_queries)
        self.row_dim = int(row_dim)
        heads = attention_heads(self.proj_channels)
        self.proj_c = nn.Conv2d(self.backbone_dim, self.proj_channels, PROJ_KERNEL, padding=PROJ_KERNEL // 2)
        self.norm_input = nn.LayerNorm(self.proj_channels)
        self.boqs = nn.ModuleList(BoQBlock(self.proj_channels, self.num_queries, heads) for _ in range(int(num_layers)))
        self.fc = nn.Linear(int(num_layers) * self.num_queries, self.row_dim)
        self.zoo = zoo
        if zoo:
            load_part(self, zoo, weights, "aggregator")
        self.requires_grad_(bool(trainable))

    @property
    def dim(self) -> int:
        return self.proj_channels * self.row_dim

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        maps = features.patches.permute(0, 3, 1, 2).to(self.proj_c.weight.dtype)  # B × C × h × w
        x = self.norm_input(self.proj_c(maps).flatten(2).transpose(1, 2))  # B × hw × P
        outs = []
        for block in self.boqs:
            x, out = block(x)
            outs.append(out)
        queries = torch.cat(outs, dim=1)  # B × (L·Q) × P
        rows = self.fc(queries.transpose(1, 2))  # B × P × row_dim
        return l2n(rows.flatten(1))

    def identity(self):
        ident = {
            **super().identity(),
            "proj_channels": self.proj_channels,
            "num_queries": self.num_queries,
            "num_layers": len(self.boqs),
            "row_dim": self.row_dim,
        }
        if self.zoo:
            ident["zoo"] = self.zoo
        return ident


AGGREGATORS.register("boq", BoQ)
