"""ResNet-18/34/50/101/152 in torchvision's module tree, built without torchvision.

Why torchvision's exact tree: CosPlace, EigenPlaces and most VPR heads of the ResNet era train on
``torchvision.models.resnetN`` and publish its parameter names (behind an ``nn.Sequential`` prefix), so
the same names here let ImageNet files and the zoo's checkpoints load by renaming a prefix only. The
tree is torchvision's "v1.5": ``conv1, bn1, relu, maxpool, layer1..layer4``; a block is a
``BasicBlock`` (two 3×3 convolutions) or a ``Bottleneck`` (1×1, 3×3, 1×1, ×4 channels) whose stride sits
on its 3×3 convolution, with ``downsample.0`` (1×1 conv) / ``downsample.1`` (BatchNorm) on the shortcut
of the first block of a stage when the shape changes. ``avgpool`` and ``fc`` are not built: the dense
map is the output of ``cut`` (``layer3``: stride 16, ``layer4``: stride 32).

Pixels are normalised with ImageNet mean/std (what torchvision's weights and the VPR trainings used).
Any image size runs (the convolutions pad; the maps round up), as in the official evaluations, which
feed images at their native size: ``size_multiple`` is 1.

The constructed module is the trainable graph (real BatchNorm); ``optimise_for_inference`` folds every
BatchNorm into its convolution (same outputs in eval mode).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import read_checkpoint
from ..errors import ConfigError
from ..zoo import load_part
from .base import BACKBONES, Backbone, DenseFeatures, fold_batchnorm, unit_parameters
from .weights import load_strictly, resolve_weights

# depth → (block kind, blocks per stage); torchvision's resnetN constructors
RESNET_STAGES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# torchvision's IMAGENET1K_V1 files (the ones CosPlace / EigenPlaces started from)
IMAGENET_FILES = {
    18: "resnet18-f37072fd.pth",
    34: "resnet34-b627a593.pth",
    50: "resnet50-0676ba61.pth",
    101: "resnet101-63fe2227.pth",
    152: "resnet152-394f9c45.pth",
}
TORCHVISION_MODELS_URL = "https://download.pytorch.org/models/"
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
STEM_CHANNELS = 64  # torchvision's stem width; each stage doubles the width of the one before
STEM_STRIDE = 4  # conv1 (2) × maxpool (2)
CUTS = {"layer3": 3, "layer4": 4}  # stages kept


class BasicBlock(nn.Module):
    """Two 3×3 convolutions and the shortcut (torchvision's names; stride on ``conv1``)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + shortcut)

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return [("conv1", "bn1"), ("conv2", "bn2")]


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (with the stride: torchvision v1.5), 1×1 expand ×4, and the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """torchvision's ``downsample`` (1×1 conv + BatchNorm) where the block changes shape, else None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def _stage(block: type[BasicBlock] | type[Bottleneck], in_channels: int, width: int, blocks: int, stride: int):
    """One ``layerN``: the first block takes the stride (and the shortcut), the rest keep the shape."""
    layers = [block(in_channels, width, stride)]
    layers += [block(width * block.expansion, width, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _fold_block(block: nn.Module) -> None:
    """Fold a block's BatchNorms (and its shortcut's) into the convolutions before them."""
    for conv_name, bn_name in block.conv_bn_pairs():
        if isinstance(getattr(block, bn_name), nn.BatchNorm2d):
            fold_batchnorm(getattr(block, conv_name), getattr(block, bn_name))
            setattr(block, bn_name, nn.Identity())
    if block.downsample is not None and isinstance(block.downsample[1], nn.BatchNorm2d):
        fold_batchnorm(block.downsample[0], block.downsample[1])
        block.downsample[1] = nn.Identity()


RANDOM_INIT_SEED = 0  # pretrained=False networks are reproducible random networks


class ResNet(Backbone):
    """torchvision's ResNet-``depth`` up to ``cut``; ImageNet weights, a file, or a zoo checkpoint's backbone.

    ``weights`` without ``zoo``: a torchvision-layout file (``fc.*`` is ignored). ``zoo=NAME``: the
    backbone part of that zoo checkpoint (``weights`` then names its file). ``pretrained=False`` and no
    zoo: a reproducible random network (tests, timings).
    """

    def __init__(
        self,
        depth: int = 50,
        cut: str = "layer4",
        pretrained: bool = True,
        weights: str | None = None,
        zoo: str | None = None,
    ):
        super().__init__()
        if depth not in RESNET_STAGES:
            raise ConfigError(f"ResNet depth must be one of {sorted(RESNET_STAGES)}, got {depth}")
        if cut not in CUTS:
            raise ConfigError(f"resnet{depth}: cut must be one of {sorted(CUTS)}, got {cut!r}")
        kind, stage_blocks = RESNET_STAGES[depth]
        block = BLOCKS[kind]
        self.name = f"resnet{depth}"
        self.depth, self.cut = depth, cut
        # a fixed seed for the default initialisation, without touching the caller's random state: a
        # pretrained=False network is the same in every process (a map built and queried separately)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            in_channels, stride = STEM_CHANNELS, STEM_STRIDE
            for index, name in enumerate(STAGE_NAMES[: CUTS[cut]]):
                stage_stride = 1 if index == 0 else 2
                width = STEM_CHANNELS * 2**index
                setattr(self, name, _stage(block, in_channels, width, stage_blocks[index], stage_stride))
                in_channels, stride = width * block.expansion, stride * stage_stride
        self.stride, self.dim, self.size_multiple = stride, in_channels, 1
        self.weights_source: str | None = None
        self._load(pretrained, weights, zoo)
        self.to(memory_format=torch.channels_last)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, name) for name in STAGE_NAMES[: CUTS[self.cut]]]

    def _load(self, pretrained: bool, weights: str | None, zoo: str | None) -> None:
        """Fill the weights: a zoo checkpoint's backbone, else torchvision's ImageNet file (or ``weights``)."""
        if zoo:
            load_part(self, zoo, weights, "backbone")
            self.weights_source = zoo
            return
        if not pretrained:
            return
        filename = IMAGENET_FILES[self.depth]
        path = resolve_weights(self.name, filename, weights, url=TORCHVISION_MODELS_URL + filename)
        own = set(self.state_dict())
        state = {k: v for k, v in read_checkpoint(path, self.name).items() if k in own}
        load_strictly(self, state, path, self.name)
        self.weights_source = Path(path).name

    def extract(self, x: torch.Tensor) -> DenseFeatures:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        x = self.maxpool(self.relu(self.bn1(self.conv1(x.contiguous(memory_format=torch.channels_last)))))
        for stage in self.stages:
            x = stage(x)
        return DenseFeatures(x.permute(0, 2, 3, 1).contiguous(), self.stride, size)

    def _optimise_for_inference(self) -> None:
        fold_batchnorm(self.conv1, self.bn1)
        self.bn1 = nn.Identity()
        for block in self.blocks():
            _fold_block(block)
        self.to(memory_format=torch.channels_last)  # the folded weights are new tensors

    def blocks(self) -> list[nn.Module]:
        """Every residual block, input to output (``layer1.0`` … the last block of ``cut``)."""
        return [block for stage in self.stages for block in stage]

    def _trainable_units(self) -> list[list[nn.Parameter]]:
        """The stem (conv1 + bn1), then each residual block, input to output."""
        return [unit_parameters(self.conv1, self.bn1)] + [unit_parameters(b) for b in self.blocks()]

    def _split(self, last_blocks: int) -> tuple["ResNetPrefix", "ResNetSuffix"]:
        """The stem and the blocks before the last ``last_blocks`` residual blocks, and those blocks (shared modules)."""
        blocks = self.blocks()
        if last_blocks >= len(blocks):
            raise ConfigError(
                f"{self.name} up to {self.cut} has {len(blocks)} residual blocks; cannot split off the last "
                f"{last_blocks} (the prefix keeps the stem and one block at least)"
            )
        keep = len(blocks) - last_blocks
        return ResNetPrefix(self, keep), ResNetSuffix(self, keep)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "cut": self.cut, "weights": self.weights_source}


def _block_stride(block: nn.Module) -> int:
    return 1 if block.downsample is None else int(block.downsample[0].stride[0])


def _block_channels(block: nn.Module) -> int:
    return int((block.conv3 if isinstance(block, Bottleneck) else block.conv2).out_channels)


class ResNetPrefix(Backbone):
    """The stem and the first ``keep`` residual blocks of a :class:`ResNet`, sharing its modules.

    What :meth:`~vprkit.backbones.base.Backbone.split` caches when only the last blocks train: a fixed
    function of the image, identified as the ResNet truncated after ``keep`` blocks (so a feature cache of
    it is keyed correctly). Its BatchNorms are never folded: the modules belong to the full network too.
    """

    def __init__(self, net: ResNet, keep: int):
        super().__init__()
        self.name, self.cut, self.keep = net.name, net.cut, keep
        self.weights_source = net.weights_source
        self.size_multiple = net.size_multiple
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.kept = nn.ModuleList(net.blocks()[:keep])
        self.stride = STEM_STRIDE
        for block in self.kept:
            self.stride *= _block_stride(block)
        self.dim = _block_channels(self.kept[-1])
        self.train(net.training)

    def extract(self, x: torch.Tensor) -> DenseFeatures:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        x = self.maxpool(self.relu(self.bn1(self.conv1(x.contiguous(memory_format=torch.channels_last)))))
        for block in self.kept:
            x = block(x)
        return DenseFeatures(x.permute(0, 2, 3, 1).contiguous(), self.stride, size)

    def _optimise_for_inference(self) -> None:
        """Nothing to rewrite in place: the modules belong to the full backbone too."""

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "cut": self.cut, "blocks": self.keep, "weights": self.weights_source}


class ResNetSuffix(nn.Module):
    """Residual blocks ``keep`` onwards of a :class:`ResNet` (shared modules): prefix features → its output."""

    def __init__(self, net: ResNet, keep: int):
        super().__init__()
        self.name = net.name
        self.blocks = nn.ModuleList(net.blocks()[keep:])
        self.stride, self.dim = net.stride, net.dim
        self.train(net.training)

    def forward(self, feats: DenseFeatures) -> DenseFeatures:
        p = next(self.parameters())
        x = feats.patches.to(device=p.device, dtype=p.dtype).permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x = block(x)
        return DenseFeatures(x.permute(0, 2, 3, 1).contiguous(), self.stride, feats.image_size, feats.global_token)


for _depth in RESNET_STAGES:
    # a partial keeps the constructor's signature (the schema tests compare it with options.py)
    BACKBONES.register(f"resnet{_depth}", partial(ResNet, _depth))
