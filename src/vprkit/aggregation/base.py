"""The aggregator contract: :class:`DenseFeatures` in, one L2-normalised descriptor per image out."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..backbones.base import DenseFeatures
from ..registry import Registry


class Aggregator:
    """Base class. ``dim`` derives from the backbone (and vocabulary); ``__call__`` returns ``B×dim``.

    Aggregators that learn from data (VLAD's vocabulary, PCA) set ``needs_vocabulary`` and are
    given it at construction; the pipeline builds or loads it first.
    """

    name: str = "aggregator"
    needs_vocabulary: bool = False

    def __init__(self, backbone_dim: int):
        self.backbone_dim = backbone_dim

    @classmethod
    def wants_vocabulary(cls, options: dict[str, Any]) -> bool:
        """Whether these options need the map's vocabulary (a trained checkpoint may replace it)."""
        return cls.needs_vocabulary

    @property
    def dim(self) -> int:
        return self.backbone_dim

    def __call__(self, features: DenseFeatures) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        return {"aggregator": self.name, "dim": self.dim}


AGGREGATORS: Registry[Callable[..., Aggregator]] = Registry("aggregator")


def l2n(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2-normalise along ``dim``; all-zero vectors stay zero (no NaN)."""
    return F.normalize(x, p=2, dim=dim, eps=1e-12)
