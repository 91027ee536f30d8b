"""Shared fixtures: the real datasets beside the repo, tiny generated images, Corridor maps built once per
session, and a small configuration that builds in seconds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from vprkit import pipeline
from vprkit.config import VocabularyConfig
from vprkit.images import FolderImages, ImageSpec
from vprkit.presets import resolve

from helpers import make_images  # noqa: F401  (re-exported for fixtures)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("VPRKIT_DATA", REPO.parent / "shared" / "datasets")).resolve()


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    assert SHARED_DATASETS.is_dir(), f"the shared datasets are expected at {SHARED_DATASETS} (set VPRKIT_DATA)"
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def corridor_map(tmp_path_factory, shared_datasets: Path) -> Callable[..., Path]:
    """``corridor_map(preset=None, image_size=None, every=1, count=None)`` → a map of Corridor's reference
    frames (sorted names; every ``every``-th, the first ``count`` of those), built once per session for each
    set of arguments; ``preset`` None is the default preset, ``image_size`` (height, width) overrides its size.

    Shared by every test asking for the same settings: a test that changes the map (adds, removes, a
    writable open that saves a calibration) works on a copy (``shutil.copytree``).
    """
    built: dict[tuple, Path] = {}

    def build(
        preset: str | None = None, image_size: tuple[int, int] | None = None, every: int = 1, count: int | None = None
    ) -> Path:
        settings = (preset, image_size, every, count)
        if settings not in built:
            ref = shared_datasets / "corridor" / "ref"
            keys = sorted(p.name for p in ref.glob("*.jpg"))[::every][:count]
            out = tmp_path_factory.mktemp("corridor-map") / "map"
            pipeline.build_map(
                FolderImages(ref, keys), out, resolve(preset, image_size=image_size), progress=False, log=lambda _: None
            )
            built[settings] = out
        return built[settings]

    return build


@pytest.fixture(scope="session")
def small_config():
    """effnet-vlad at 64×64 with 8 VLAD clusters and batches of 4: a real map of a dozen images in seconds."""
    return resolve("effnet-vlad").replace(
        image=ImageSpec((64, 64), "fixed"), vocabulary=VocabularyConfig(k=8), batch_size=4
    )


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    make_images(tmp_path / "images", 12)
    return tmp_path / "images"
