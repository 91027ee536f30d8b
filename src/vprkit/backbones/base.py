"""The backbone contract: pixels in, a dense feature map out.

A backbone is a ``torch.nn.Module`` whose forward takes ``B×3×H×W`` float pixels in [0, 1]
(normalisation is the backbone's own business, so callers cannot get it wrong) and returns
:class:`DenseFeatures`. Its ``identity()`` is what vocabularies and maps record so that descriptors
from different models, layers or facets are never mixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DenseFeatures:
    """A batch of dense features.

    ``patches`` is ``B×h×w×D`` (channels last, so a cell's descriptor is contiguous); cell (i, j)
    covers input pixels around ``((j + 0.5)·stride, (i + 0.5)·stride)``. ``global_token`` is the
    CLS token for ViTs (``B×D``) and ``None`` for CNNs.
    """

    patches: torch.Tensor
    stride: int
    image_size: tuple[int, int]
    global_token: torch.Tensor | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.patches.shape[1]), int(self.patches.shape[2])

    @property
    def dim(self) -> int:
        return int(self.patches.shape[-1])

    def __len__(self) -> int:
        return int(self.patches.shape[0])

    def select(self, i: int) -> "DenseFeatures":
        """The features of one image of the batch, still with a batch axis of 1."""
        g = None if self.global_token is None else self.global_token[i : i + 1]
        return DenseFeatures(self.patches[i : i + 1], self.stride, self.image_size, g)

    def flat(self) -> torch.Tensor:
        """``B×(h·w)×D`` view of the patches."""
        b, h, w, d = self.patches.shape
        return self.patches.reshape(b, h * w, d)

    def cell_centers(self) -> torch.Tensor:
        """``(h·w)×2`` pixel (x, y) centres of the cells in the backbone's input image."""
        h, w = self.grid
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return torch.stack([(xs.flatten() + 0.5) * self.stride, (ys.flatten() + 0.5) * self.stride], 1).float()


class Backbone(nn.Module):
    """Base class. Subclasses set ``stride``, ``dim``, ``size_multiple`` and implement ``extract``."""

    name: str = "backbone"
    stride: int = 1
    dim: int = 0
    size_multiple: int = 1
    has_global_token: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def extract(self, normalised: torch.Tensor) -> DenseFeatures:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> DenseFeatures:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"{self.name} expects B×3×H×W pixels, got shape {tuple(pixels.shape)}")
        return self.extract(self.normalise(pixels))

    def identity(self) -> dict[str, Any]:
        """Everything that changes the meaning of a descriptor: checked when mixing map parts."""
        return {"backbone": self.name, "dim": self.dim, "stride": self.stride}


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into ``conv`` in place: ``bn(conv(x)) == conv'(x)``.

    Inference-only speed-up; the caller replaces ``bn`` by ``nn.Identity``.
    """
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)


BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")


def build_backbone(name: str, **options: Any) -> Backbone:
    """Instantiate a registered backbone in eval mode (``options`` are the factory's keyword arguments)."""
    model = BACKBONES.get(name)(**options)
    return model.eval()
