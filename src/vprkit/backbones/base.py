"""The backbone contract: pixels in, a dense feature map out.

A backbone is a ``torch.nn.Module`` whose forward takes ``B×3×H×W`` float pixels in [0, 1]
(normalisation is the backbone's own business, so callers cannot get it wrong) and returns
:class:`DenseFeatures`. Its ``identity()`` is what vocabularies and maps record so that descriptors
from different models, layers or facets are never mixed.

Backbones are plain modules: their forward works under autograd, and whether to track gradients
is the caller's choice (the extraction loop wraps calls in ``torch.inference_mode()``). Two modes:

* trainable (what the constructors give): every parameter requires grad, BatchNorm layers are
  real BatchNorm; :meth:`Backbone.set_trainable` freezes all but the last N blocks;
* inference-optimised (:meth:`Backbone.optimise_for_inference`, which :func:`build_backbone` applies
  unless ``trainable=True``): eval mode, frozen, and family-specific rewrites such as folding
  BatchNorm into the convolutions. Same outputs as the trainable graph in eval mode; one-way.

Placement: the input pixels are moved to the backbone's device and floating dtype (:attr:`Backbone.device`,
:attr:`Backbone.dtype`), so ``backbone.to("cuda")`` or ``backbone.double()`` is all a caller does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..device import module_device, module_dtype
from ..errors import ConfigError
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
    """Base class. Subclasses set ``stride``, ``dim``, ``size_multiple`` and implement ``extract``.

    Optional hooks: ``_optimise_for_inference`` (graph rewrites valid in eval mode only) and
    ``_trainable_units`` (the parameters of each block, input to output, for ``set_trainable``).
    """

    name: str = "backbone"
    stride: int = 1
    dim: int = 0
    size_multiple: int = 1
    has_global_token: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    inference_optimised: bool = False

    @property
    def device(self) -> torch.device:
        """Device of the backbone's parameters (CPU for a parameter-free backbone)."""
        return module_device(self)

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the backbone's parameters; input pixels are converted to it."""
        return module_dtype(self)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def extract(self, normalised: torch.Tensor) -> DenseFeatures:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> DenseFeatures:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"{self.name} expects B×3×H×W pixels, got shape {tuple(pixels.shape)}")
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        return self.extract(self.normalise(pixels))

    def identity(self) -> dict[str, Any]:
        """Everything that changes the meaning of a descriptor: checked when mixing map parts."""
        return {"backbone": self.name, "dim": self.dim, "stride": self.stride}

    # -- inference / training modes ------------------------------------------------------------

    def optimise_for_inference(self) -> "Backbone":
        """Eval mode, no parameter requires grad, and the family's inference-only rewrites (once).

        The outputs equal the trainable graph's in eval mode (up to float rounding). One-way: an
        optimised backbone refuses :meth:`set_trainable`; build a fresh one to train. Returns ``self``.
        """
        self.eval()
        self.requires_grad_(False)
        if not self.inference_optimised:
            self._optimise_for_inference()
            self.inference_optimised = True
        return self

    def _optimise_for_inference(self) -> None:
        """Subclass hook: rewrite the graph for eval-mode inference (e.g. fold BatchNorm)."""

    def _trainable_units(self) -> list[list[nn.Parameter]]:
        """The parameters of each trainable block, from the input to the output (default: one block)."""
        return [list(self.parameters())]

    @property
    def num_trainable_blocks(self) -> int:
        """How many blocks :meth:`set_trainable` counts (``last_blocks`` ranges over 0..this)."""
        return len(self._trainable_units())

    def set_trainable(self, last_blocks: int | None = None) -> "Backbone":
        """Unfreeze the last ``last_blocks`` blocks and freeze the rest (``None``: the whole backbone).

        Blocks are the family's natural units (MBConv blocks, transformer blocks, VGG conv layers, …;
        see ``num_trainable_blocks``). Parameters that the forward never uses stay frozen. Only
        ``requires_grad`` changes: call ``.train()`` too for batch-statistics BatchNorm and dropout.
        Returns ``self``.
        """
        if self.inference_optimised:
            raise ConfigError(
                f"{self.name} was optimised for inference (BatchNorm folded, parameters frozen); "
                f"build it with build_backbone(..., trainable=True) to train it"
            )
        units = self._trainable_units()
        if last_blocks is None:
            last_blocks = len(units)
        if not 0 <= int(last_blocks) <= len(units):
            raise ConfigError(
                f"{self.name} has {len(units)} trainable blocks; last_blocks={last_blocks} is out of range"
            )
        self.requires_grad_(False)
        for unit in units[len(units) - int(last_blocks) :]:
            for p in unit:
                p.requires_grad_(True)
        return self

    def split(self, last_blocks: int) -> tuple["Backbone", nn.Module]:
        """``(prefix, suffix)`` with ``suffix(prefix(pixels)) == self(pixels)``: the last ``last_blocks`` blocks apart.

        Why: when only the last N blocks train (and the images are not augmented), everything before
        them is a fixed function of the image — its output can be computed once and cached, and
        training then runs the N blocks on the cache instead of the whole backbone on re-read images.

        ``prefix`` is a :class:`Backbone` (pixels → the dense map entering the last N blocks; its
        ``identity()`` is that of the backbone truncated there, so a feature cache of it is
        keyed correctly); ``suffix`` maps that :class:`DenseFeatures` to this backbone's output
        and has ``stride`` and ``dim``. Both *share* this backbone's modules (no copies): training
        the suffix trains this backbone, whose weights are what a checkpoint saves. Blocks count as
        in :meth:`set_trainable` (``1 ≤ last_blocks``; the family decides how many can be split off).
        The mode (train / eval) and ``requires_grad`` are left as they are.
        """
        if self.inference_optimised:
            raise ConfigError(f"{self.name} was optimised for inference; build it with trainable=True to split it")
        if int(last_blocks) < 1:
            raise ConfigError(f"split needs last_blocks ≥ 1, got {last_blocks}")
        return self._split(int(last_blocks))

    def _split(self, last_blocks: int) -> tuple["Backbone", nn.Module]:
        """Subclass hook for :meth:`split` (families without it cannot train from a cached prefix)."""
        raise ConfigError(
            f"{self.name} cannot be split into a cached prefix and trainable blocks; "
            "train its unfrozen blocks on re-read images instead"
        )


def unit_parameters(*parts: nn.Module | nn.Parameter | None) -> list[nn.Parameter]:
    """The parameters of modules and bare parameters, in order, without duplicates (``None`` skipped)."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for part in parts:
        if part is None:
            continue
        params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into ``conv`` in place: ``bn(conv(x)) == conv'(x)``.

    Inference-only speed-up (the batch statistics of training mode cannot be folded); the caller
    replaces ``bn`` by ``nn.Identity``. The folded tensors are ordinary parameters that keep the
    ``requires_grad`` of the convolution's weight.
    """
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        weight = conv.weight * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(weight, requires_grad=grad)
    conv.bias = nn.Parameter(bias, requires_grad=grad)


BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")


def build_backbone(name: str, trainable: bool = False, **options: Any) -> Backbone:
    """Instantiate a registered backbone in eval mode (``options`` are the factory's keyword arguments).

    By default the backbone is optimised for inference (:meth:`Backbone.optimise_for_inference`:
    frozen, BatchNorm folded). ``trainable=True`` keeps the trainable graph with every parameter
    requiring grad; freeze parts with :meth:`Backbone.set_trainable` and call ``.train()`` to train.
    """
    model = BACKBONES.get(name)(**options)
    if trainable:
        return model.eval()
    return model.optimise_for_inference()
