"""VGG16 conv5 — the backbone of NetVLAD and Patch-NetVLAD.

NetVLAD cuts torchvision's ``vgg16().features`` before its last ReLU and max-pool, so the dense map
is conv5_3's *pre-activation* output: 512 channels at stride 16. The layers here are numbered exactly
as in torchvision (``features.N``), so both weight layouts load without renaming tricks:

* torchvision's ImageNet file ``vgg16-397923af.pth`` (keys ``features.N.weight``), found in the
  torch.hub cache, vprkit's cache, or downloaded on machines that can;
* a NetVLAD / Patch-NetVLAD checkpoint (read by :mod:`vprkit.checkpoints`), whose encoder replaces
  the ImageNet weights (its NetVLAD layer and WPCA go to the aggregator and the re-ranker).

Pixels are normalised with ImageNet mean/std, as both PyTorch trainings did (and CosPlace / EigenPlaces,
whose VGG16 is cut at the same place: ``features.children()[:-2]``). ``input_norm="matconvnet"`` feeds
the network as MATLAB NetVLAD (and hloc's port of its ``.mat`` files) does: pixels in 0–255 minus the
MatConvNet average colour, no division by a standard deviation.

``zoo=NAME`` loads the backbone part of a zoo checkpoint (:mod:`vprkit.zoo`; ``weights`` then names that
file) instead of the ImageNet file or a NetVLAD checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..checkpoints import encoder_state, read_state_dict
from ..errors import ConfigError, WeightsNotFoundError
from ..zoo import load_part
from .base import BACKBONES, Backbone, DenseFeatures, unit_parameters
from .weights import resolve_weights

# torchvision's VGG16 configuration: channels per 3×3 conv, "M" for a 2×2 max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# NetVLAD drops the final ReLU and max-pool: the map is conv5_3 before its activation.
NETVLAD_CUT = 2
IMAGENET_FILE = "vgg16-397923af.pth"
IMAGENET_URL = f"https://download.pytorch.org/models/{IMAGENET_FILE}"
PIXEL_RANGE = 255.0
# MatConvNet's average colour (0–255 RGB) that MATLAB NetVLAD subtracts; no std division there.
MATCONVNET_MEAN = (123.68, 116.779, 103.939)
INPUT_NORMS = ("imagenet", "matconvnet")


def vgg16_features(in_channels: int = 3) -> nn.Sequential:
    """torchvision's ``vgg16().features`` (same module indices), built without torchvision."""
    layers: list[nn.Module] = []
    for spec in VGG16_LAYOUT:
        if spec == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(spec), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = int(spec)
    return nn.Sequential(*layers)


class VGG16Conv5(Backbone):
    """VGG16 up to conv5_3 (before ReLU), stride 16, 512 channels: NetVLAD's encoder.

    ``weights`` is a torchvision ImageNet file or a NetVLAD / Patch-NetVLAD checkpoint (detected
    from its keys); without it the ImageNet file is looked up in the caches and downloaded where
    possible. ``pretrained=False`` gives random weights (tests, speed measurements).
    """

    name = "vgg16-conv5"
    size_multiple = 16

    def __init__(
        self,
        weights: str | None = None,
        pretrained: bool = True,
        zoo: str | None = None,
        input_norm: str = "imagenet",
    ):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ConfigError(f"vgg16-conv5: input_norm must be one of {INPUT_NORMS}, got {input_norm!r}")
        self.input_norm = input_norm
        full = vgg16_features()
        self.features = full[: len(full) - NETVLAD_CUT]
        self.stride = 2 ** sum(isinstance(m, nn.MaxPool2d) for m in self.features)
        self.dim = int([m for m in self.features if isinstance(m, nn.Conv2d)][-1].out_channels)
        self.weights_source: str | None = None
        if zoo:
            load_part(self, zoo, weights, "backbone")
            self.weights_source = zoo
        elif pretrained:
            path = resolve_weights(
                "vgg16-conv5",
                IMAGENET_FILE,
                weights,
                url=IMAGENET_URL,
                hint="Or pass a NetVLAD / Patch-NetVLAD checkpoint as weights=PATH.",
            )
            self.load_encoder(encoder_state(read_state_dict(path), str(path)), str(path))
        self.to(memory_format=torch.channels_last)

    def load_encoder(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load conv weights keyed ``"N.weight"`` (torchvision indices); every conv must be present."""
        own = self.features.state_dict()
        wanted = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(wanted), key=lambda s: int(s.split(".")[0]))
        if missing:
            raise WeightsNotFoundError(
                f"{source}: VGG16 encoder weights lack {missing[:4]}{'…' if len(missing) > 4 else ''}"
            )
        for k, v in wanted.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise WeightsNotFoundError(f"{source}: {k} is {tuple(v.shape)}, VGG16 needs {tuple(own[k].shape)}")
        self.features.load_state_dict(wanted)
        self.weights_source = Path(source).name

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet mean/std, or MatConvNet's ``pixels·255 − mean`` (``input_norm``)."""
        if self.input_norm == "imagenet":
            return super().normalise(pixels)
        mean = torch.tensor(MATCONVNET_MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
        return pixels * PIXEL_RANGE - mean

    def extract(self, x: torch.Tensor) -> DenseFeatures:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % self.size_multiple or w % self.size_multiple:
            raise ConfigError(f"vgg16-conv5 needs image sides that are multiples of {self.size_multiple}, got {w}×{h}")
        y = self.features(x.contiguous(memory_format=torch.channels_last))
        return DenseFeatures(y.permute(0, 2, 3, 1).contiguous(), self.stride, (h, w))

    def _trainable_units(self) -> list[list[nn.Parameter]]:
        """Each of the 13 convolutions (NetVLAD trains conv5, i.e. ``set_trainable(last_blocks=3)``)."""
        return [unit_parameters(m) for m in self.features if isinstance(m, nn.Conv2d)]

    def identity(self) -> dict[str, Any]:
        own = {**super().identity(), "weights": self.weights_source}
        if self.input_norm != "imagenet":  # recorded only when not the default, so existing maps keep theirs
            own["input_norm"] = self.input_norm
        return own


BACKBONES.register("vgg16-conv5", VGG16Conv5)
