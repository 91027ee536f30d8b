"""Shared fixtures: the real datasets beside the repo, and tiny generated images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("VPRKIT_DATA", REPO.parent / "shared" / "datasets")).resolve()


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    assert SHARED_DATASETS.is_dir(), f"the shared datasets are expected at {SHARED_DATASETS} (set VPRKIT_DATA)"
    return SHARED_DATASETS


def make_images(folder: Path, n: int, size=(48, 64), seed: int = 0, ext: str = "png") -> list[str]:
    """``n`` random-texture images (distinct per index) in ``folder``; returns their names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        base = rng.integers(0, 255, size=(size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size[1], size[0]), Image.BILINEAR)
        name = f"img{i:03d}.{ext}"
        img.save(folder / name)
        names.append(name)
    return names


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    make_images(tmp_path / "images", 12)
    return tmp_path / "images"
