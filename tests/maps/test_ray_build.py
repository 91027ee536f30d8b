"""The Ray map build against the single-process build it distributes (a local Ray instance started here)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from vprkit import pipeline
from vprkit.errors import ConfigError
from vprkit.images import FolderImages
from vprkit.maps import MAP_FILE, MapStore, read_json
from vprkit.pipeline.distributed import build_map_ray
from vprkit.presets import resolve

IMAGES = 16
SHARD = 8  # images per shard: the interrupted build stops after the first of two
RAY_CPUS = 2
POSES = np.stack([np.arange(IMAGES, dtype=np.float64), np.zeros(IMAGES)], 1)  # metres along the corridor
CLI_IMAGES = 8


class Stop(Exception):
    """What the test hook raises after the first shard (as Ctrl-C or a lost driver would)."""


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corridor(shared_datasets) -> FolderImages:
    root = shared_datasets / "corridor" / "ref"
    return FolderImages(root, sorted(p.name for p in root.glob("*.jpg"))[:IMAGES])


@pytest.fixture(scope="module")
def single(corridor, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "map"
    pipeline.build_map(corridor, out, poses=POSES, progress=False)
    return out


def _assert_same_map(a: Path, b: Path) -> None:
    sa, sb = MapStore(a), MapStore(b)
    ka, kb = sa.keys(), sb.keys()
    assert ka == kb and len(set(kb)) == len(kb) == IMAGES
    np.testing.assert_allclose(sb.read_global(), sa.read_global(), atol=1e-5)
    np.testing.assert_array_equal(sb.read_poses(), sa.read_poses())
    assert read_json(a / MAP_FILE)["vocabulary"] == read_json(b / MAP_FILE)["vocabulary"]  # same seed and sample


def test_a_ray_build_equals_the_single_process_build(ray_local, corridor, single, tmp_path):
    info = build_map_ray(corridor, tmp_path / "map", address="local", replicas=1, poses=POSES, progress=False)
    _assert_same_map(single, tmp_path / "map")
    assert info["counts"]["images"] == IMAGES and info["last_build"]["poses_updated"] == 0  # the shards held them
    assert info["last_build"]["new_images"] == IMAGES and info["last_build"]["distributed"]["images"] == IMAGES


def test_an_interrupted_ray_build_continues_where_it_stopped(ray_local, corridor, single, tmp_path):
    def stop(shards: int) -> None:
        raise Stop(f"interrupted after shard {shards}")

    out = tmp_path / "map"
    with pytest.raises(Stop):
        build_map_ray(corridor, out, replicas=1, shard_images=SHARD, poses=POSES, progress=False, _after_shard=stop)
    assert len(MapStore(out).keys(include_pending=True)) == SHARD and not (out / MAP_FILE).exists()
    info = build_map_ray(corridor, out, replicas=1, shard_images=SHARD, poses=POSES, progress=False)
    _assert_same_map(single, out)
    assert info["last_build"]["distributed"] == {**info["last_build"]["distributed"], "images": IMAGES - SHARD,
                                                 "resumed_from_shards": SHARD}


def test_bad_settings_are_refused_before_any_work(ray_local, corridor, tmp_path):
    with pytest.raises(ConfigError, match=r"leave no CPU for reading images.*--replicas 1"):
        build_map_ray(corridor, tmp_path / "map", replicas=RAY_CPUS, progress=False)
    with pytest.raises(ConfigError, match=r"on_change must be one of"):
        build_map_ray(corridor, tmp_path / "map", on_change="keep", progress=False)
    with pytest.raises(ConfigError, match=r"does not encode map extensions \(patches\)"):
        build_map_ray(corridor, tmp_path / "map", resolve(None, rerank="speed"), progress=False)
    assert not (tmp_path / "map").exists()


def test_the_cli_builds_on_ray_into_a_milvus_index(ray_local, corridor, tmp_path):
    from helpers import run_cli

    from vprkit.maps import open_map_data
    from vprkit.maps.milvus import MilvusIndex

    images = tmp_path / "images"
    images.mkdir()
    for key in corridor.keys[:CLI_IMAGES]:  # links, not copies, of the shared images
        (images / key).symlink_to(corridor.path(key))
    (images / "broken.jpg").write_bytes(b"not a picture")  # skipped by the Ray pass, reported by the build
    out = tmp_path / "map"
    r = run_cli(["map", "build", images, "--out", out, "--ray", "--replicas", "1", "--index-backend", "milvus",
                 "--index-option", "index_type=HNSW", "--index-option", 'index_params={"M": 8, "efConstruction": 64}',
                 "--quiet"])
    assert r.exit_code == 0 and f"{CLI_IMAGES} images ({CLI_IMAGES} new" in r.output, r.output
    assert "1 unreadable" in r.output and "broken.jpg" in read_json(out / "failures.json")
    data = open_map_data(out)
    assert isinstance(data.index, MilvusIndex) and data.index.factory == "milvus:HNSW"
    data.index.close()
    top = pipeline.localize(out, [images / corridor.keys[2]], top_k=1)[0].matches[0]
    assert top.key == corridor.keys[2] and top.score == pytest.approx(1.0, abs=1e-4)
