"""Layouts: each official checkpoint's parameter names → vprkit's, and loading them into the models.

A layout is a function ``raw contents → {"backbone.<name>": tensor, "aggregator.<name>": tensor}``,
where ``<name>`` is the parameter's name in vprkit's module (the backbone's names are torchvision's or
the official DINOv2's, so most backbone keys only lose a prefix). The family modules of
:mod:`vprkit.zoo` register them. Loading is :func:`zoo_state` (read, convert, cached for the second
part) and :func:`zoo_part` (one part, prefix removed) — what a backbone or aggregator constructor given
``zoo=NAME`` calls.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import WeightsNotFoundError
from ..registry import Registry
from .formats import read_container
from .weights import ZOO_WEIGHTS, weights_path

PARTS = ("backbone", "aggregator")
Layout = Callable[[Mapping[str, Any]], dict[str, Any]]
LAYOUTS: Registry[Layout] = Registry("zoo checkpoint layout")


def register_layout(name: str) -> Callable[[Layout], Layout]:
    return LAYOUTS.register(name)


def renamed(state: Mapping[str, Any], prefixes: Mapping[str, str]) -> dict[str, Any]:
    """``state`` with each key's first matching prefix (in order) replaced; keys matching none are refused.

    The common layout: ``renamed(sd, {"backbone.model.": "backbone.", "aggregator.": "aggregator."})``.
    """
    out, unknown = {}, []
    for key, value in state.items():
        for old, new in prefixes.items():
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightsNotFoundError(
            f"unexpected parameters {unknown[:3]} (expected keys starting with {', '.join(prefixes)})"
        )
    return out


_CACHE: dict[tuple, dict[str, Any]] = {}


def zoo_state(name: str, weights: str | os.PathLike | None = None) -> dict[str, Any]:
    """Zoo entry ``name``'s checkpoint (``weights``, or the cached / downloaded file) in vprkit's layout.

    The last one read is kept, so the aggregator reading the same file after the backbone costs nothing.
    """
    entry = ZOO_WEIGHTS.get(name)
    path = weights_path(name, weights)
    stat = path.stat()
    key = (name, str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        raw = read_container(path, entry.format)
        try:
            state = LAYOUTS.get(entry.layout)(raw)
        except WeightsNotFoundError as exc:
            raise WeightsNotFoundError(f"{path} is not a {name} checkpoint: {exc}") from None
        _CACHE.clear()
        _CACHE[key] = state
    return _CACHE[key]


def zoo_part(name: str, weights: str | os.PathLike | None, part: str) -> dict[str, Any]:
    """The ``part`` (``backbone`` or ``aggregator``) of zoo entry ``name``'s checkpoint, prefix removed."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}")
    prefix = part + "."
    return {k[len(prefix) :]: v for k, v in zoo_state(name, weights).items() if k.startswith(prefix)}


def load_part(module: Any, name: str, weights: str | os.PathLike | None, part: str) -> None:
    """Load ``part`` of zoo entry ``name`` into ``module`` (strict: every parameter, nothing else)."""
    state = zoo_part(name, weights, part)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        first = (str(exc).strip().splitlines() or ["shape mismatch"])[-1].strip()
        raise WeightsNotFoundError(f"{name} checkpoint does not fit this {part}: {first}") from None
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise WeightsNotFoundError(
            f"{name} checkpoint does not fit this {part}: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]} "
            f"(a checkpoint of another variant or size?)"
        )
