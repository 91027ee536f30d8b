"""The aggregator contract: :class:`DenseFeatures` in, one L2-normalised descriptor per image out.

Every aggregator is a :class:`torch.nn.Module`:

- ``forward(features: DenseFeatures) -> Tensor[B, dim]`` (call it as ``aggregator(features)``):
  L2-normalised global descriptors on the features' device. It never changes the grad mode: the
  caller chooses (``torch.inference_mode()`` for maps and queries; plain autograd for training).
  It is differentiable with respect to the features wherever the maths is (GeM, mean, NetVLAD; hard
  VLAD through its residuals, not through the arg-max assignment).
- ``dim`` (output dimension), ``identity()`` (what a map records about it), the ``AGGREGATORS``
  registry and factories ``factory(backbone_dim, **options)`` (``vocabulary=`` for those whose
  ``wants_vocabulary(options)`` is true).
- Learning from a sample: ``learns_from_sample`` says whether ``fit`` does anything;
  ``fit(descriptors, **options) -> None`` takes an ``N×D`` sample of local descriptors (numpy or
  torch) and learns the aggregator's state from it (VLAD: the k-means vocabulary; NetVLAD: centres
  and α; GeM, mean, CLS: nothing). ``is_fitted`` says whether ``forward`` can run.
- State: the standard ``state_dict()`` / ``load_state_dict()``. Learned tensors are parameters
  (GeM's ``p``, NetVLAD's layer) or buffers (VLAD's centres), so ``.to(device)`` moves them and the
  state dict carries them; non-tensor state (a vocabulary's metadata) travels as the module's extra
  state, a JSON string, so ``torch.save(agg.state_dict(), f)`` reloads with
  ``torch.load(f, weights_only=True)``.
- Parameters are frozen (``requires_grad=False``) unless the factory is given ``trainable=True``
  (or the caller uses ``requires_grad_(True)``), so inference code that turns outputs into numpy
  arrays keeps working without a grad context.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import DenseFeatures
from ..registry import Registry

from ..numerics import NORM_FLOOR, l2_normalise


class Aggregator(nn.Module):
    """Base class. ``dim`` derives from the backbone (and vocabulary); ``forward`` returns ``B×dim``.

    Aggregators that learn from data (VLAD's vocabulary) set ``needs_vocabulary`` and are given it at
    construction; the pipeline builds or loads it first. ``learns_from_sample`` aggregators can also
    learn it themselves with :meth:`fit`.
    """

    name: str = "aggregator"
    needs_vocabulary: bool = False
    learns_from_sample: bool = False

    def __init__(self, backbone_dim: int):
        super().__init__()
        self.backbone_dim = int(backbone_dim)

    @classmethod
    def wants_vocabulary(cls, options: dict[str, Any]) -> bool:
        """Whether these options need the map's vocabulary (a trained checkpoint may replace it)."""
        return cls.needs_vocabulary

    @property
    def dim(self) -> int:
        return self.backbone_dim

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`forward` can run (state learned, given or loaded)."""
        return True

    def fit(self, descriptors: np.ndarray | torch.Tensor, **options: Any) -> None:
        """Learn the aggregator's state from an ``N×D`` sample of local descriptors (no-op here)."""
        return None

    def forward(self, features: DenseFeatures) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        return {"aggregator": self.name, "dim": self.dim}


AGGREGATORS: Registry[Callable[..., Aggregator]] = Registry("aggregator")


def l2n(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2-normalise along ``dim``; all-zero vectors stay zero (no NaN). Norm floor: :data:`vprkit.numerics.NORM_FLOOR`."""
    return F.normalize(x, p=2, dim=dim, eps=NORM_FLOOR)


def l2n_np(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """numpy :func:`l2n` (a new array; floating dtypes kept)."""
    return l2_normalise(np.asarray(x), axis=axis)


def as_descriptor_array(descriptors: np.ndarray | torch.Tensor) -> np.ndarray:
    """An ``N×D`` float32 numpy copy of a sample given as numpy or torch (any device)."""
    if isinstance(descriptors, torch.Tensor):
        descriptors = descriptors.detach().to("cpu", torch.float32).numpy()
    return np.array(descriptors, dtype=np.float32, copy=True)
