"""Shared helpers for the benchmarks: where the data is, the standard protocols, output."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("VPRKIT_DATA", REPO.parent / "shared" / "datasets")).resolve()
os.environ.setdefault("VPRKIT_DATA", str(DATA))

# The protocols of ../shared/datasets/README.md's baselines.
NORDLAND_600 = "nordland-64x32:600"  # winter queries vs summer references, every 4th file, exact frame
NORDLAND_SIZE = (112, 224)  # (height, width), the README baseline's 224×112
THREADS = 2


def setup() -> None:
    torch.set_num_threads(THREADS)
    RESULTS.mkdir(parents=True, exist_ok=True)


def report(name: str, rows: list[dict], columns: list[str], extra: dict | None = None) -> Path:
    """Print an aligned table and write ``benchmarks/results/<name>.json``."""
    from vprkit.evaluation.report import format_table, write_json

    print(format_table(rows, columns))
    path = write_json({"rows": rows, **(extra or {})}, RESULTS / f"{name}.json")
    print(f"\nwrote {path}", file=sys.stderr)
    return path
