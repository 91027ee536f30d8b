"""The Ray map build against the single-process build it distributes (a local Ray instance started here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vprkit import pipeline
from vprkit.errors import ConfigError
from vprkit.images import FolderImages
from vprkit.maps import MAP_FILE, MapStore, read_json
from vprkit.pipeline.distributed import build_map_ray, start_local_ray
from vprkit.presets import resolve

from helpers import assert_loopback_only, listening_sockets

IMAGES = 16
SHARD = 8  # images per shard: the interrupted build stops after the first of two
RAY_CPUS = 2
POSES = np.stack([np.arange(IMAGES, dtype=np.float64), np.zeros(IMAGES)], 1)  # metres along the corridor
CLI_IMAGES = 8
RERANK = "speed"  # Patch-NetVLAD speed: one patch size, float16 patches
SMALL_SIZE = (120, 160)  # a tiny image size keeps the re-ranking build short
RERANK_IMAGES = 8  # patch descriptors cost about a second per image here: half the fixture
RERANK_QUERIES = (1, 6)  # map images localised against both maps
RERANK_TOP_K = 5
SEGVLAD_PRESET = "segvlad-slic"  # SLIC superpixels: no segmentation model to load
PATCH_ATOL = 2e-2  # float16 patches of float32 features equal to 1e-5: a rounding step at most


class Stop(Exception):
    """What the test hook raises after the first shard (as Ctrl-C or a lost driver would)."""


@pytest.fixture(scope="module")
def ray_local():
    import ray

    start_local_ray(RAY_CPUS)  # as `map build --ray` starts one: loopback only
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


def _assert_same_map(a: Path, b: Path, images: int = IMAGES) -> None:
    sa, sb = MapStore(a), MapStore(b)
    ka, kb = sa.keys(), sb.keys()
    assert ka == kb and len(set(kb)) == len(kb) == images
    np.testing.assert_allclose(sb.read_global(), sa.read_global(), atol=1e-5)
    np.testing.assert_array_equal(sb.read_poses(), sa.read_poses())
    assert read_json(a / MAP_FILE)["vocabulary"] == read_json(b / MAP_FILE)["vocabulary"]  # same seed and sample


def test_the_local_instance_listens_on_loopback_only(ray_local):
    """GCS, raylet, runtime-env agent, a worker and this driver (all in this process's tree): loopback only."""

    @ray_local.remote
    def one() -> int:
        return 1

    assert ray_local.get(one.remote()) == 1  # a worker runs, with its own server
    listeners = assert_loopback_only(listening_sockets())
    assert {"gcs_server", "raylet"} <= {s.process for s in listeners}, listeners


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
    assert info["last_build"]["distributed"] == {
        **info["last_build"]["distributed"],
        "images": IMAGES - SHARD,
        "resumed_from_shards": SHARD,
    }


def test_bad_settings_are_refused_before_any_work(ray_local, corridor, tmp_path):
    with pytest.raises(ConfigError, match=r"leave no CPU for reading images.*--replicas 1"):
        build_map_ray(corridor, tmp_path / "map", replicas=RAY_CPUS, progress=False)
    with pytest.raises(ConfigError, match=r"on_change must be one of"):
        build_map_ray(corridor, tmp_path / "map", on_change="keep", progress=False)
    assert not (tmp_path / "map").exists()


def test_a_ray_build_with_re_ranking_patches_equals_the_single_process_build(ray_local, corridor, tmp_path):
    """--rerank speed on Ray: the same patch state and per-image patches, so re-ranked localisation is the same."""
    config = resolve(None, rerank=RERANK, image_size=SMALL_SIZE)
    images = FolderImages(corridor.root, corridor.keys[:RERANK_IMAGES])
    single, ray_map = tmp_path / "single" / "map", tmp_path / "ray" / "map"  # one name: the vocabulary records it
    pipeline.build_map(images, single, config, poses=POSES[:RERANK_IMAGES], progress=False)
    info = build_map_ray(images, ray_map, config, replicas=1, poses=POSES[:RERANK_IMAGES], progress=False)
    _assert_same_map(single, ray_map, RERANK_IMAGES)
    assert info["extensions"] == ["patches"] and info["last_build"]["distributed"]["images"] == RERANK_IMAGES
    state_a = np.load(single / "extensions" / "patches.npz")
    state_b = np.load(ray_map / "extensions" / "patches.npz")
    assert sorted(state_a.files) == sorted(state_b.files) and "pca_components" in state_a.files
    for name in state_a.files:  # fitted on the driver by the single-process build's own steps: identical
        np.testing.assert_array_equal(state_b[name], state_a[name], err_msg=name)
    with MapStore(single).open_extras() as ra, MapStore(ray_map).open_extras() as rb:
        for row in range(RERANK_IMAGES):
            pa, pb = ra.extras("patches", row), rb.extras("patches", row)
            assert sorted(pa) == sorted(pb) and len(pa) > 1, row
            for name in pa:
                assert pa[name].dtype == pb[name].dtype and pa[name].shape == pb[name].shape, (row, name)
                np.testing.assert_allclose(pb[name].astype(np.float32), pa[name].astype(np.float32), atol=PATCH_ATOL)
    reranker = pipeline.get_reranker(pipeline.open_map(ray_map, read_only=True), RERANK, log=lambda _: None)
    assert reranker.stored  # re-ranking reads the Ray-written patches, computing none
    reranker.close()
    queries = [corridor.path(corridor.keys[i]) for i in RERANK_QUERIES]
    got_a = pipeline.localize(single, queries, top_k=RERANK_TOP_K, rerank=RERANK)
    got_b = pipeline.localize(ray_map, queries, top_k=RERANK_TOP_K, rerank=RERANK)
    for a, b in zip(got_a, got_b):
        assert a.matches[0].score_kind == b.matches[0].score_kind != "cosine"  # re-ranked, from the stored patches
        assert [m.key for m in a.matches] == [m.key for m in b.matches]
        np.testing.assert_allclose([m.score for m in b.matches], [m.score for m in a.matches], atol=1e-3)


def test_a_ray_build_with_segvlad_segments_equals_the_single_process_build(ray_local, corridor, tmp_path):
    """A SegVLAD preset on Ray: the same segment PCA, SuperSegments and segment index, so the same ranking."""
    config = resolve(SEGVLAD_PRESET, image_size=SMALL_SIZE)
    single, ray_map = tmp_path / "single" / "map", tmp_path / "ray" / "map"  # one name: the vocabulary records it
    pipeline.build_map(corridor, single, config, poses=POSES, progress=False)
    info = build_map_ray(corridor, ray_map, config, replicas=1, poses=POSES, progress=False)
    _assert_same_map(single, ray_map)
    assert info["extensions"] == ["segments"]
    state_a = np.load(single / "extensions" / "segments.npz")
    state_b = np.load(ray_map / "extensions" / "segments.npz")
    assert sorted(state_a.files) == sorted(state_b.files)
    for name in state_a.files:
        np.testing.assert_array_equal(state_b[name], state_a[name], err_msg=name)
    with MapStore(single).open_extras() as ra, MapStore(ray_map).open_extras() as rb:
        for row in range(IMAGES):
            pa, pb = ra.extras("segments", row), rb.extras("segments", row)
            assert sorted(pa) == sorted(pb), row
            for name in set(pa) - {"desc_f16"}:  # segments, SuperSegments and their grid: identical
                np.testing.assert_array_equal(pb[name], pa[name], err_msg=f"row {row} {name}")
            np.testing.assert_allclose(
                pb["desc_f16"].astype(np.uint16).view(np.float16).astype(np.float32),
                pa["desc_f16"].astype(np.uint16).view(np.float16).astype(np.float32),
                atol=PATCH_ATOL,
            )
    rows_a, rows_b = np.load(single / "segments.npz"), np.load(ray_map / "segments.npz")  # the finishing build's index
    for name in ("image", "local", "n_images"):
        np.testing.assert_array_equal(rows_b[name], rows_a[name], err_msg=name)
    queries = [corridor.path(corridor.keys[i]) for i in RERANK_QUERIES]
    got_a = pipeline.localize(single, queries, top_k=RERANK_TOP_K)
    got_b = pipeline.localize(ray_map, queries, top_k=RERANK_TOP_K)
    for a, b in zip(got_a, got_b):
        assert [m.key for m in a.matches] == [m.key for m in b.matches]
        np.testing.assert_allclose([m.score for m in b.matches], [m.score for m in a.matches], atol=1e-3)


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
    r = run_cli(
        [
            "map",
            "build",
            images,
            "--out",
            out,
            "--ray",
            "--replicas",
            "1",
            "--index-backend",
            "milvus",
            "--index-option",
            "index_type=HNSW",
            "--index-option",
            'index_params={"M": 8, "efConstruction": 64}',
            "--quiet",
        ]
    )
    assert r.exit_code == 0 and f"{CLI_IMAGES} images ({CLI_IMAGES} new" in r.output, r.output
    assert "1 unreadable" in r.output and "broken.jpg" in read_json(out / "failures.json")
    data = open_map_data(out)
    assert isinstance(data.index, MilvusIndex) and data.index.factory == "milvus:HNSW"
    data.index.close()
    top = pipeline.localize(out, [images / corridor.keys[2]], top_k=1)[0].matches[0]
    assert top.key == corridor.keys[2] and top.score == pytest.approx(1.0, abs=1e-4)
