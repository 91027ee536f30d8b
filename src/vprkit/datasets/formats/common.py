"""Small helpers shared by the format modules: CSV reading, natural sort, image-folder checks."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Sequence

from ...errors import DatasetError
from ...images import list_images

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> list:
    """Sort key with numbers compared as numbers (``2.png`` before ``10.png``), like ``natsort``."""
    return [int(t) if t.isdigit() else t.lower() for t in _DIGITS.split(name)]


def images_natural(folder: Path, role: str) -> list[str]:
    """Image keys under ``folder`` in natural order (the order AnyLoc's loaders align poses with)."""
    if not folder.is_dir():
        raise DatasetError(f"{role} folder {folder} does not exist")
    keys = sorted(list_images(folder), key=natural_key)
    if not keys:
        raise DatasetError(f"no images found in {folder} ({role})")
    return keys


def read_csv(path: Path, required: Sequence[str] = (), what: str = "CSV file") -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a comma-separated file; checks the ``required`` columns are present."""
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"cannot read {what} {path}: {e}") from e
    if not rows:
        raise DatasetError(f"{what} {path} is empty")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; the header has {', '.join(h or '(index)' for h in header)}"
        )
    for i, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise DatasetError(f"{path}, line {i}: {len(r)} fields but the header has {len(header)}")
    return header, rows[1:]


def column(header: list[str], rows: list[list[str]], name: str) -> list[str]:
    i = header.index(name)
    return [r[i].strip() for r in rows]


def floats(values: Sequence[str], path: Path, name: str) -> list[float]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(float(v))
        except ValueError:
            raise DatasetError(f"{path}: column {name} row {i + 1} is {v!r}, not a number") from None
    return out


def truthy(values: Sequence[str]) -> list[bool]:
    """``True``/``False`` (also 1/0, yes/no) strings as booleans."""
    return [v.strip().lower() in ("true", "1", "yes", "t", "y") for v in values]


def require_files(root: Path, names: Sequence[str], role: str, source: Path) -> None:
    """Every listed image must exist under ``root``; one error names the first missing ones."""
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" … ({len(missing)} in total)" if len(missing) > 5 else "")
        raise DatasetError(f"{source}: {role} image(s) not found under {root}: {shown}")
