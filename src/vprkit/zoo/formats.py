"""Reading the containers the zoo's checkpoints come in — tensors only, never code.

- ``torch``: a ``torch.save`` file, read by :func:`vprkit.checkpoints.read_state_dict` (``weights_only``,
  memory-mapped; unwrapped from ``state_dict`` / ``model`` and DataParallel's ``module.``);
- ``safetensors``: a ``.safetensors`` file (the ``safetensors`` package);
- ``lightning``: a PyTorch Lightning ``.ckpt`` *without installing Lightning*: its pickle also holds
  hyper-parameters, callbacks and loop states made of Lightning's (and the project's) classes. Those
  classes are replaced by inert stand-ins (:func:`_stand_ins`) and the file is read by torch's
  weights-only unpickler, which builds tensors and containers and calls nothing else; only its
  ``state_dict`` is returned;
- ``mat``: a MATLAB ``.mat`` file (SciPy), returned as SciPy's structs for the layout to read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import WeightsNotFoundError


def read_torch(path: Path) -> dict[str, Any]:
    from ..checkpoints import read_state_dict  # torch: resolving a preset imports no library

    return read_state_dict(path, "torch checkpoint")


def read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise WeightsNotFoundError(f"{path} is not a readable safetensors file ({_first_line(exc)})") from None


class _StandIn:
    """An inert object for a class of Lightning (or of the training project) found in a checkpoint."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stand_ins(names: list[str]) -> list[tuple[type, str]]:
    """One inert class per fully qualified name that torch's weights-only unpickler refuses."""
    out = []
    for qualified in names:
        module, _, name = qualified.rpartition(".")
        cls = type(name or "StandIn", (_StandIn,), {"__module__": module or "standin"})
        out.append((cls, qualified))
    return out


def read_lightning(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint's ``state_dict``, read with stand-ins for every non-tensor class in its pickle."""
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

    try:
        unsafe = get_unsafe_globals_in_checkpoint(str(path))
        with safe_globals(_stand_ins(unsafe)):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsNotFoundError(f"{path} is not a readable Lightning checkpoint ({_first_line(exc)})") from None
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise WeightsNotFoundError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'")
    from ..checkpoints import state_dict_of

    return state_dict_of(obj, path)


def read_mat(path: Path) -> dict[str, Any]:
    """A MATLAB file's variables as SciPy structs (``struct_as_record=False, squeeze_me=True``)."""
    from scipy.io import loadmat

    try:
        return loadmat(str(path), struct_as_record=False, squeeze_me=True)
    except Exception as exc:
        raise WeightsNotFoundError(f"{path} is not a readable MATLAB .mat file ({_first_line(exc)})") from None


READERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "torch": read_torch,
    "safetensors": read_safetensors,
    "lightning": read_lightning,
    "mat": read_mat,
}


def read_container(path: str | os.PathLike, fmt: str) -> dict[str, Any]:
    """The raw contents of a checkpoint in container format ``fmt`` (one of :data:`READERS`)."""
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFoundError(f"{p} does not exist")
    return READERS[fmt](p)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
