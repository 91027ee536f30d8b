"""A small Corridor map built once per session with the default preset, copied for each test that writes to it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from vprkit import pipeline
from vprkit.pipeline.live import LiveMap
from vprkit.service import BackgroundServer, create_app

MAP_IMAGES = 20  # Corridor references 0…19: enough for the default preset's K=96 vocabulary, built in seconds
SPACING_M = 1.0  # synthetic easting of reference i: i metres along the corridor
API_KEY = "test-key"
MAX_UPLOAD_BYTES = 256 * 1024


def corridor_key(i: int) -> str:
    return f"{i:07d}.jpg"


@pytest.fixture(scope="session")
def corridor_dir(shared_datasets: Path) -> Path:
    return shared_datasets / "corridor"


@pytest.fixture(scope="session")
def built_map(tmp_path_factory, corridor_dir: Path) -> Path:
    """The default preset over Corridor references 0…19, with poses (i m east, 0 m north)."""
    root = tmp_path_factory.mktemp("service-map")
    poses = root / "poses.csv"
    poses.write_text(
        "image,easting,northing\n" + "".join(f"{corridor_key(i)},{i * SPACING_M},0\n" for i in range(MAP_IMAGES))
    )
    out = root / "map"
    pipeline.build_map(
        corridor_dir / "ref", out, keys=[corridor_key(i) for i in range(MAP_IMAGES)], poses=poses, progress=False
    )
    return out


@pytest.fixture
def map_dir(built_map: Path, tmp_path: Path) -> Path:
    """A private copy of the built map (tests add to and delete from it)."""
    return Path(shutil.copytree(built_map, tmp_path / "map"))


class Running:
    """A live map served on loopback, with an HTTP client (``api_key`` sent when ``authorised``)."""

    def __init__(self, map_dir: Path, api_key: str | None = API_KEY, max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.live = LiveMap.open(map_dir)
        self.server = BackgroundServer(
            create_app(self.live, api_key=api_key, max_upload_bytes=max_upload_bytes)
        ).start()
        self.client = httpx.Client(base_url=self.server.url, timeout=60.0)
        self.headers = {"X-API-Key": api_key} if api_key else {}

    def stop(self) -> None:
        self.client.close()
        self.server.stop()


@pytest.fixture
def serve() -> Iterator:
    """``serve(map_dir, **options)`` → a :class:`Running` server, stopped after the test."""
    started: list[Running] = []

    def start(map_dir: Path, **options) -> Running:
        running = Running(map_dir, **options)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
