"""Shared fixtures: the real datasets beside the repo, and tiny generated images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import make_images  # noqa: F401  (re-exported for fixtures)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("VPRKIT_DATA", REPO.parent / "shared" / "datasets")).resolve()


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    assert SHARED_DATASETS.is_dir(), f"the shared datasets are expected at {SHARED_DATASETS} (set VPRKIT_DATA)"
    return SHARED_DATASETS


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    make_images(tmp_path / "images", 12)
    return tmp_path / "images"
