"""Reading weight files: ``torch.load`` with one clear error, and NetVLAD / Patch-NetVLAD checkpoints.

A ground module (it imports no stage package) because a NetVLAD checkpoint serves three stages at
once: its VGG16 encoder goes to the backbone (:mod:`vprkit.backbones.vgg16`), its NetVLAD layer and
WPCA to the global aggregator (:mod:`vprkit.aggregation.netvlad`) and to the re-ranker's patches
(:mod:`vprkit.rerank.extension`), and the presets look into it to tell a NetVLAD checkpoint from
ImageNet encoder weights (:func:`vprkit.presets.with_weights`).

Checkpoint layout (``{"state_dict": {"encoder.N.weight", "pool.conv.weight", "pool.centroids",
"WPCA.0.weight", …}}``): encoder layers are numbered as in torchvision's ``vgg16().features``, so
the encoder part reads exactly like torchvision's ImageNet file (``features.N.weight``).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .errors import WeightsNotFoundError

ENCODER_PREFIXES = ("features.", "encoder.")
WRAPPER_PREFIXES = ("module.",)  # DataParallel


def read_checkpoint(path: str | os.PathLike, model: str) -> Any:
    """``torch.load`` of a weights file (tensors only), with one clear error for unreadable files.

    Zip-format files are memory-mapped, so a large checkpoint opened by several parts (backbone,
    aggregator, patches) is not read into RAM each time; legacy files are read the ordinary way.
    """
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) checkpoints cannot be memory-mapped
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise WeightsNotFoundError(f"{model} weights {path} not found") from exc
    except Exception as exc:  # pickle / zip errors: not a torch checkpoint
        if isinstance(exc, pickle.UnpicklingError):
            reason = "it holds Python objects, not only tensors; vprkit never runs code from a weights file"
        else:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsNotFoundError(f"{path} is not a readable {model} weights file ({reason})") from None


def _unwrap_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes such as DataParallel's ``module.``."""
    out = {}
    for key, value in state.items():
        for p in WRAPPER_PREFIXES:
            key = key[len(p) :] if key.startswith(p) else key
        out[key] = value
    return out


def state_dict_of(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat state dict inside a loaded checkpoint (unwraps ``state_dict`` / ``model`` and ``module.``)."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise WeightsNotFoundError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return _unwrap_keys(obj)


def read_state_dict(path: str | os.PathLike, model: str = "VGG16 / NetVLAD") -> dict[str, torch.Tensor]:
    """A checkpoint's flat state dict (see :func:`state_dict_of`); ``model`` names it in errors."""
    return state_dict_of(read_checkpoint(path, model), path)


def encoder_state(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The VGG16 conv layers' tensors of either layout, keyed as torchvision's ``vgg16().features`` (``"N.weight"``)."""
    for prefix in ENCODER_PREFIXES:
        found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    raise WeightsNotFoundError(
        f"{source} has no VGG16 encoder weights (expected keys starting with {' or '.join(ENCODER_PREFIXES)}); "
        f"its first keys are {sorted(state)[:5]}"
    )


@dataclass
class NetVLADCheckpoint:
    """The parts of a NetVLAD / Patch-NetVLAD checkpoint vprkit uses (torch tensors).

    ``assign_weight`` is ``K×D`` (the 1×1 conv squeezed), ``wpca_weight`` ``P×(K·D)``; biases and
    WPCA are ``None`` when the checkpoint has none.
    """

    encoder_state: dict[str, torch.Tensor]
    centroids: torch.Tensor
    assign_weight: torch.Tensor
    assign_bias: torch.Tensor | None
    wpca_weight: torch.Tensor | None
    wpca_bias: torch.Tensor | None

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])


def read_netvlad_checkpoint(path: str | os.PathLike) -> NetVLADCheckpoint:
    """Read a NetVLAD / Patch-NetVLAD checkpoint, checking shapes agree with each other."""
    state = read_state_dict(path)
    if "pool.centroids" not in state or "pool.conv.weight" not in state:
        raise WeightsNotFoundError(
            f"{path} is not a NetVLAD checkpoint: it lacks pool.centroids / pool.conv.weight "
            f"(an ImageNet VGG16 file goes to the backbone's weights= option instead)"
        )
    centroids = state["pool.centroids"].float()
    k, d = centroids.shape
    assign = state["pool.conv.weight"].float().reshape(state["pool.conv.weight"].shape[0], -1)
    if tuple(assign.shape) != (k, d):
        raise WeightsNotFoundError(f"{path}: pool.conv.weight is {tuple(assign.shape)}, centroids are {k}×{d}")
    bias = state.get("pool.conv.bias")
    wpca_w = state.get("WPCA.0.weight")
    wpca_b = state.get("WPCA.0.bias")
    if wpca_w is not None:
        wpca_w = wpca_w.float().reshape(wpca_w.shape[0], -1)
        if wpca_w.shape[1] != k * d:
            raise WeightsNotFoundError(f"{path}: WPCA expects {wpca_w.shape[1]}-d input, NetVLAD gives {k * d}-d")
    return NetVLADCheckpoint(
        encoder_state=encoder_state(state, str(path)),
        centroids=centroids,
        assign_weight=assign,
        assign_bias=None if bias is None else bias.float(),
        wpca_weight=wpca_w,
        wpca_bias=None if wpca_b is None else wpca_b.float(),
    )


def is_netvlad_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a NetVLAD layer (not only encoder weights)."""
    state = read_state_dict(path)
    return "pool.centroids" in state and "pool.conv.weight" in state
