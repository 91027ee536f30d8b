"""Pooling aggregators: GeM (learnable power p), mean and the backbone's global (CLS) token; nothing to fit."""

from __future__ import annotations

import torch
from torch import nn

from ..backbones.base import DenseFeatures
from ..errors import ConfigError
from .base import AGGREGATORS, Aggregator, l2n


GEM_EPS = 1e-6  # the classic GeM clamp (Radenović et al.)


def gem_pool(patches: torch.Tensor, p: float | torch.Tensor = 3.0, signed: bool = False) -> torch.Tensor:
    """Generalised mean over the patch axis of ``B×N×D`` features.

    Classic GeM (``signed=False``) clamps features at a small positive ε: ``mean(max(x, ε)^p)^(1/p)``.
    That is what CNN retrieval uses, and on EfficientNet-Lite it is far better than the signed variant
    (README, effnet-gem) because negative activations carry little place information.
    AnyLoc's sign-preserving variant (``signed=True``) for ViT facets, whose values are signed:
    ``m = mean(sign(x)·|x|^p)``, result ``sign(m)·|m|^(1/p)``. ``p = 1`` is the mean.
    ``p`` may be a (learnable, 0-d) tensor; gradients then flow to it. Computed in float64.
    """
    if not isinstance(p, torch.Tensor) and p <= 0:
        raise ConfigError(f"GeM power p must be positive, got {p}")
    x = patches.double()
    if isinstance(p, torch.Tensor):
        p = p.to(device=x.device, dtype=x.dtype)
    if not signed:
        return x.clamp(min=GEM_EPS).pow(p).mean(dim=1).pow(1.0 / p).to(patches.dtype)
    m = (x.sign() * x.abs().pow(p)).mean(dim=1)
    return (m.sign() * m.abs().pow(1.0 / p)).to(patches.dtype)


class GeM(Aggregator):
    """GeM pooling with a learnable power ``p`` (an ``nn.Parameter``, frozen unless ``trainable=True``).

    ``signed=False`` is the classic clamped GeM, ``signed=True`` AnyLoc's sign-preserving variant
    (see :func:`gem_pool`). Nothing to fit: :meth:`fit` is a no-op.
    """

    name = "gem"

    def __init__(self, backbone_dim: int, p: float = 3.0, signed: bool = False, trainable: bool = False):
        super().__init__(backbone_dim)
        if p <= 0:
            raise ConfigError(f"GeM power p must be positive, got {p}")
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=bool(trainable))
        self.signed = bool(signed)

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        return l2n(gem_pool(features.flat(), self.p, self.signed))

    def identity(self):
        return {**super().identity(), "p": round(float(self.p.detach()), 6), "signed": self.signed}


class Mean(Aggregator):
    name = "mean"

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        return l2n(features.flat().mean(dim=1))


class GlobalToken(Aggregator):
    """The backbone's own global token (DINOv2's CLS), L2-normalised."""

    name = "cls"

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        if features.global_token is None:
            raise ConfigError(
                "the 'cls' aggregator needs a backbone with a global token (e.g. DINOv2); this backbone has none"
            )
        return l2n(features.global_token)


AGGREGATORS.register("gem", GeM)
AGGREGATORS.register("mean", Mean)
AGGREGATORS.register("cls", GlobalToken)
