"""Shared fixtures for the SegVLAD tests, and the ``sam`` marker.

``test_sam_integration.py`` is marked ``sam``: it needs segment-anything + torchvision and runs in
the SAM venv (``pytest -m sam tests/segments/test_sam_integration.py``); the main suite runs with
``-m "not sam"``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

DATASETS = Path(os.environ.get("VPRKIT_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"))


def pytest_configure(config):
    config.addinivalue_line("markers", "sam: needs segment-anything and torchvision (run in the SAM venv)")


@pytest.fixture
def brick_layout():
    """7 segments in two rows of offset bricks on a 64×120 image (stride 8 → 8×15 patch grid).

    Top row: T0 [0,40) T1 [40,80) T2 [80,120) (rows 0–31); bottom row: B0 [0,20) B1 [20,60)
    B2 [60,100) B3 [100,120) (rows 32–63). Order of segments: T0 T1 T2 B0 B1 B2 B3.
    Centroids zig-zag B0 T0 B1 T1 B2 T2 B3, so the Delaunay graph is that zig-zag plus the
    same-row neighbours.
    """
    masks = np.zeros((7, 64, 120), bool)
    for i, (a, b) in enumerate([(0, 40), (40, 80), (80, 120)]):
        masks[i, :32, a:b] = True
    for i, (a, b) in enumerate([(0, 20), (20, 60), (60, 100), (100, 120)]):
        masks[3 + i, 32:, a:b] = True
    return masks
