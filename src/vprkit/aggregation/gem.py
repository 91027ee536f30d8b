"""Pooling aggregators with no learned state: GeM, mean and the backbone's global (CLS) token."""

from __future__ import annotations

import torch

from ..backbones.base import DenseFeatures
from ..errors import ConfigError
from .base import AGGREGATORS, Aggregator, l2n


def gem_pool(patches: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """Sign-preserving generalised mean over the patch axis (AnyLoc's variant).

    ``patches`` is ``B×N×D``. ``m = mean(sign(x)·|x|^p)``, result ``sign(m)·|m|^(1/p)``. For
    non-negative features this is the classic GeM; for signed ViT/linear-bottleneck features it
    does not produce NaNs. ``p = 1`` is the mean; large ``p`` tends to max-pooling of magnitudes.
    """
    if p <= 0:
        raise ConfigError(f"GeM power p must be positive, got {p}")
    x = patches.double()
    m = (x.sign() * x.abs().pow(p)).mean(dim=1)
    return (m.sign() * m.abs().pow(1.0 / p)).to(patches.dtype)


class GeM(Aggregator):
    name = "gem"

    def __init__(self, backbone_dim: int, p: float = 3.0):
        super().__init__(backbone_dim)
        if p <= 0:
            raise ConfigError(f"GeM power p must be positive, got {p}")
        self.p = float(p)

    def __call__(self, features: DenseFeatures) -> torch.Tensor:
        return l2n(gem_pool(features.flat(), self.p))

    def identity(self):
        return {**super().identity(), "p": self.p}


class Mean(Aggregator):
    name = "mean"

    def __call__(self, features: DenseFeatures) -> torch.Tensor:
        return l2n(features.flat().mean(dim=1))


class GlobalToken(Aggregator):
    """The backbone's own global token (DINOv2's CLS), L2-normalised."""

    name = "cls"

    def __call__(self, features: DenseFeatures) -> torch.Tensor:
        if features.global_token is None:
            raise ConfigError("the 'cls' aggregator needs a backbone with a global token (e.g. DINOv2); this backbone has none")
        return l2n(features.global_token)


AGGREGATORS.register("gem", GeM)
AGGREGATORS.register("mean", Mean)
AGGREGATORS.register("cls", GlobalToken)
