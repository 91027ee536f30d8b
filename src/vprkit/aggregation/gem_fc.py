"""The CosPlace / EigenPlaces head (Berton et al., CVPR 2022 / ICCV 2023): L2 per location, GeM, linear, L2.

Written from the papers' head as their code computes it, step by step on the backbone's ``h×w×C`` map:

1. each location's ``C``-vector is L2-normalised (``F.normalize`` with its default ε = 1e-12);
2. generalised mean over the locations, ``(mean(max(x, ε_gem)^p))^(1/p)`` with ε_gem = 1e-6 and a learned
   scalar ``p`` (the clamp keeps the power of the non-negative, normalised activations defined);
3. a linear layer ``C → out_dim`` (with bias);
4. L2 normalisation of the result.

Parameter names: ``p`` (shape ``[1]``) and ``fc.weight`` / ``fc.bias``; the zoo's layout maps the official
``aggregation.1.p`` / ``aggregation.3.*`` onto them. ``zoo=NAME`` loads that checkpoint's head (``weights``
then names its file). Parameters are frozen unless ``trainable=True``; ``vprkit train`` trains it as the
``gem-fc`` head like the others.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import DenseFeatures
from ..errors import ConfigError
from ..zoo import load_part
from .base import AGGREGATORS, Aggregator

LOCATION_NORM_EPS = 1e-12  # torch.nn.functional.normalize's default, which CosPlace's L2Norm uses
GEM_CLAMP_EPS = 1e-6  # CosPlace's GeM: activations are clamped to at least this before the power
DEFAULT_P = 3.0


class GeMFC(Aggregator):
    """CosPlace / EigenPlaces head; ``out_dim`` defaults to the backbone's dim."""

    name = "gem-fc"

    def __init__(
        self,
        backbone_dim: int,
        out_dim: int | None = None,
        p: float = DEFAULT_P,
        zoo: str | None = None,
        weights: str | None = None,
        trainable: bool = False,
    ):
        super().__init__(backbone_dim)
        if p <= 0 or (out_dim is not None and out_dim < 1):
            raise ConfigError(f"gem-fc: p must be > 0 and out_dim ≥ 1, got p={p}, out_dim={out_dim}")
        self.out_dim = int(out_dim or backbone_dim)
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.fc = nn.Linear(self.backbone_dim, self.out_dim)
        self.zoo = zoo
        if zoo:
            load_part(self, zoo, weights, "aggregator")
        self.requires_grad_(bool(trainable))

    @property
    def dim(self) -> int:
        return self.out_dim

    def pooled(self, features: DenseFeatures) -> torch.Tensor:
        """Steps 1–2: the ``B×C`` GeM of the per-location L2-normalised map."""
        x = F.normalize(features.patches.float(), p=2.0, dim=-1, eps=LOCATION_NORM_EPS)
        p = self.p.to(x.device)
        return x.clamp(min=GEM_CLAMP_EPS).pow(p).mean(dim=(1, 2)).pow(1.0 / p)

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        if features.dim != self.backbone_dim:
            raise ConfigError(f"gem-fc was built for {self.backbone_dim}-d features, got {features.dim}-d")
        return F.normalize(self.fc(self.pooled(features)), p=2.0, dim=-1, eps=LOCATION_NORM_EPS)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "zoo": self.zoo}


AGGREGATORS.register("gem-fc", GeMFC)
