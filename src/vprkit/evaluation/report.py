"""Measuring and writing evaluation results: timing, memory, CSV/JSON files, tables and plots.

Files are written atomically (:mod:`vprkit.io`: temporary file in the same folder, then a rename) so that an
interrupted run never leaves a truncated report that a later comparison would read as valid.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import resource
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import psutil

from ..io import atomic_write_bytes, atomic_write_text
from .plots import PLOT_DPI, PLOT_SIZE_INCHES, pr_curve_png  # noqa: F401  (the constants kept importable from here)

BYTES_PER_MB = 1024 * 1024
# ru_maxrss is in kilobytes on Linux and in bytes on macOS.
RU_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024
DEFAULT_FLOAT_FORMAT = "{:.3f}"


class Timer:
    """Wall-clock seconds of a ``with`` block (``time.perf_counter``: monotonic, high resolution).

    ``seconds`` is readable inside the block (elapsed so far) and fixed after it.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._end: float | None = None

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        self._end = None
        return self

    def __exit__(self, *exc: object) -> None:
        self._end = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self._start is None:
            return 0.0
        return (self._end if self._end is not None else time.perf_counter()) - self._start


def _current_rss_bytes() -> int:
    try:
        return int(psutil.Process().memory_info().rss)
    except Exception:  # restricted (some containers): report 0 rather than fail a run
        return 0


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * RU_MAXRSS_UNIT


class PeakMemory:
    """Resident memory around a ``with`` block.

    - ``peak_mb``: peak RSS from ``getrusage().ru_maxrss``. This is the peak over the *whole
      process lifetime*, not the block: if an earlier step used more, the block's own peak is
      hidden. ``peak_increased`` tells whether the block raised it.
    - ``start_mb`` / ``end_mb`` / ``delta_mb``: current RSS (psutil) before and after, which shows
      what the block kept allocated.
    """

    def __init__(self) -> None:
        self.start_bytes = 0
        self.end_bytes = 0
        self.peak_before_bytes = 0
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        self.start_bytes = _current_rss_bytes()
        self.peak_before_bytes = _peak_rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end_bytes = _current_rss_bytes()
        self.peak_bytes = _peak_rss_bytes()

    @property
    def peak_mb(self) -> float:
        return (self.peak_bytes or _peak_rss_bytes()) / BYTES_PER_MB

    @property
    def peak_increased(self) -> bool:
        return self.peak_bytes > self.peak_before_bytes

    @property
    def start_mb(self) -> float:
        return self.start_bytes / BYTES_PER_MB

    @property
    def end_mb(self) -> float:
        return self.end_bytes / BYTES_PER_MB

    @property
    def delta_mb(self) -> float:
        return (self.end_bytes - self.start_bytes) / BYTES_PER_MB

    def to_dict(self) -> dict[str, float]:
        return {"peak_rss_mb": self.peak_mb, "start_rss_mb": self.start_mb, "end_rss_mb": self.end_mb}


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays, paths and sets → JSON types; NaN/inf → None (strict JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``summary`` as indented strict JSON, atomically. Returns the path."""
    return atomic_write_text(path, json.dumps(_jsonable(summary), indent=2, ensure_ascii=False) + "\n")


def write_csv(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike, columns: Sequence[str] | None = None
) -> Path:
    """Write rows as CSV, atomically. Columns: ``columns`` or every key in order of first appearance.

    None and NaN become empty cells.
    """
    if columns is None:
        seen: dict[str, None] = {}
        for rec in records:
            seen.update(dict.fromkeys(rec))
        columns = list(seen)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for rec in records:
        row = []
        for c in columns:
            v = _jsonable(rec.get(c))
            row.append("" if v is None else v)
        writer.writerow(row)
    return atomic_write_text(path, buf.getvalue())


def _cell(value: Any, float_format: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "nan" if not math.isfinite(value) else float_format.format(value)
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    float_format: str = DEFAULT_FLOAT_FORMAT,
) -> str:
    """Aligned plain-text table for terminals and logs (numbers right-aligned, text left-aligned)."""
    if columns is None:
        seen: dict[str, None] = {}
        for r in rows:
            seen.update(dict.fromkeys(r))
        columns = list(seen)
    cells = [[_cell(r.get(c), float_format) for c in columns] for r in rows]
    widths = [max([len(str(c))] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [
        all(
            isinstance(r.get(c), (int, float, np.number)) and not isinstance(r.get(c), bool)
            for r in rows
            if r.get(c) is not None
        )
        for c in columns
    ]

    def line(values: Iterable[str], header: bool = False) -> str:
        parts = [v.rjust(w) if (num and not header) else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line([str(c) for c in columns], header=True), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)


def plot_pr_curve(
    curves: Mapping[str, Mapping[str, Any]] | Mapping[str, Any],
    path: str | os.PathLike,
    title: str = "Precision–recall",
) -> Path:
    """Plot one or several precision–recall curves (results of ``precision_recall``) to a PNG.

    ``curves`` is either one result dict or ``{label: result}``. Uses the Agg canvas directly
    (:mod:`.plots`), so it never touches pyplot's global backend (safe in servers and tests without a display).
    """
    return atomic_write_bytes(path, pr_curve_png(curves, title))


# Distribution names to ask importlib.metadata for (the import name may differ: faiss ← faiss-cpu).
_SOFTWARE = {
    "vprkit": ("vprkit",),
    "numpy": ("numpy",),
    "torch": ("torch",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
    "h5py": ("h5py",),
    "matplotlib": ("matplotlib",),
    "pillow": ("pillow", "Pillow"),
}


def software_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages that decide results (None where a package is missing).

    Read from installed package metadata, falling back to an imported module's ``__version__``;
    nothing heavy is imported.
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name, dists in _SOFTWARE.items():
        version = None
        for dist in dists:
            try:
                version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        if version is None:
            mod = sys.modules.get(name)
            version = getattr(mod, "__version__", None) if mod is not None else None
        out[name] = version
    out["platform"] = platform.platform(terse=True)
    return out
