"""What the CLI prints as JSON (``--json``, ``--jsonl``): always valid JSON, never ``NaN`` or ``Infinity``.

Python's ``json`` writes non-finite floats as ``NaN``/``Infinity`` by default, which no strict parser (a
browser, ``jq``, Go, Rust, Java) accepts. Here they are refused (``allow_nan=False``): the library's data
models already say "unknown" with ``None`` (an estimate without a position, a pose without a timestamp,
``map info``'s extent of a map without poses), so a non-finite number reaching this point is a bug at its
source, reported as such with the path of the value (``estimate.spread_m``) rather than printed as
invalid JSON. Paths, numpy scalars and arrays and date-times are written as their plain JSON forms.
"""

from __future__ import annotations

import json
import math
import os
from datetime import date, datetime
from typing import Any, Iterator

import click
import numpy as np


def _plain(value: Any) -> Any:
    """The JSON form of the few non-JSON types the library's records hold; anything else is a bug (TypeError)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def non_finite_paths(data: Any, path: str = "") -> Iterator[str]:
    """Where ``data`` holds NaN or ±inf, as paths like ``matches[3].score`` (for the error message)."""
    if isinstance(data, (float, np.floating)):
        if not math.isfinite(float(data)):
            yield path or "(value)"
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from non_finite_paths(value, f"{path}.{key}" if path else str(key))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            yield from non_finite_paths(value, f"{path}[{i}]")
    elif isinstance(data, np.ndarray) and data.dtype.kind in "fc":
        bad = np.flatnonzero(~np.isfinite(data.reshape(-1)))
        if bad.size:
            yield f"{path}[{int(bad[0])}]"


def to_json(data: Any, indent: int | None = None) -> str:
    """``data`` as strict JSON text; a non-finite number is a ``ValueError`` naming where it is."""
    try:
        return json.dumps(data, indent=indent, allow_nan=False, default=_plain)
    except ValueError as exc:
        where = ", ".join(list(non_finite_paths(data))[:5]) or "?"
        raise ValueError(f"not valid JSON: a non-finite number at {where} ({exc})") from None


def echo_json(data: Any, indent: int | None = 2) -> str:
    """Print ``data`` as strict JSON (one line with ``indent=None``, for JSON lines); returns the text printed."""
    text = to_json(data, indent=indent)
    click.echo(text)
    return text
