"""Which device models run on, and in which dtype.

``resolve_device("auto")`` picks CUDA when available, then Apple MPS, then the CPU; explicit names
(``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) are checked, so a configuration asking for a GPU
that is not there fails with a :class:`~vprkit.errors.ConfigError` rather than deep inside torch.
Validating a device name without torch (a configuration) is :func:`vprkit.config.check_device`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .errors import ConfigError

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_PATTERN = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    try:
        return bool(mps is not None and mps.is_available())
    except Exception:  # noqa: BLE001 - an odd build without a working MPS probe has no MPS
        return False


def resolve_device(name: "str | torch.device | None" = "auto") -> "torch.device":
    """``"auto"`` (or ``None``) → CUDA if available, else MPS, else CPU; explicit names are validated.

    Raises :class:`ConfigError` for a malformed name (``"gpu"``, ``"cuda:x"``) or a device this
    machine does not have (``"cuda"`` without CUDA, ``"cuda:3"`` with two GPUs, ``"mps"`` off macOS).
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = "auto" if name is None else str(name).strip().lower()
    m = _PATTERN.fullmatch(text)
    if m is None or (m.group(2) is not None and m.group(1) in ("auto", "cpu")):
        raise ConfigError(f"unknown device {name!r}; use one of {', '.join(DEVICE_NAMES)}")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here (use device='cpu' or 'auto')")
        if index is not None:
            count = torch.cuda.device_count()
            if int(index) >= count:
                raise ConfigError(
                    f"device {name!r} asked for, but this machine has {count} CUDA device(s) (0..{count - 1})"
                )
            return torch.device("cuda", int(index))
        return torch.device("cuda")
    # mps
    if index is not None and int(index) != 0:
        raise ConfigError(f"device {name!r}: there is only one MPS device (use 'mps')")
    if not _mps_available():
        raise ConfigError(
            f"device {name!r} asked for, but Apple MPS is not available here (use device='cpu' or 'auto')"
        )
    return torch.device("mps")


def autocast_dtype(device: "str | torch.device") -> "torch.dtype | None":
    """The reduced precision worth autocasting to on ``device``, or ``None`` to stay in float32.

    CUDA: bfloat16 where supported (no overflow), else float16; MPS: float16; CPU and others:
    ``None`` (CPU autocast is slower than float32 without AMX / AVX512-BF16, and changes results).
    """
    kind = torch.device(device).type
    if kind == "cuda":
        try:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        except Exception:  # noqa: BLE001
            return torch.float16
    if kind == "mps":
        return torch.float16
    return None


def module_device(module: "torch.nn.Module") -> "torch.device":
    """Device of a module's first parameter or buffer (CPU for a module without tensors)."""
    for t in _tensors(module):
        return t.device
    return torch.device("cpu")


def module_dtype(module: "torch.nn.Module") -> "torch.dtype":
    """Floating dtype of a module's first floating parameter or buffer (float32 without any)."""
    for t in _tensors(module):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _tensors(module: Any):
    yield from module.parameters()
    yield from module.buffers()


def to_module(pixels: "torch.Tensor", module: "torch.nn.Module") -> "torch.Tensor":
    """``pixels`` on the module's device, in its floating dtype (no copy when they already are)."""
    return pixels.to(device=module_device(module), dtype=module_dtype(module))


__all__ = ["DEVICE_NAMES", "autocast_dtype", "module_device", "module_dtype", "resolve_device", "to_module"]
