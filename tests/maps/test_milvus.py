"""The Milvus index backend (Milvus Lite, embedded) against the FAISS Flat reference on the same data."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
from PIL import Image

from vprkit import options as opts
from vprkit import pipeline
from vprkit.datasets import load_dataset
from vprkit.errors import ConfigError
from vprkit.images import FolderImages
from vprkit.maps import MapStore, open_map_data
from vprkit.maps import milvus as mv
from vprkit.maps.index import FaissIndex
from vprkit.pipeline.live import LiveMap
from vprkit.presets import resolve

from helpers import assert_loopback_only, listening_sockets

DIM = 64
N = 300
QUERIES = 25
K = 10
SLICE_EVERY = 16  # Corridor slice: 7 references and 7 queries
LOCALIZE_K = 5


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _lite(tmp_path, name: str = "t") -> dict:
    return mv.resolve_options({"uri": str(tmp_path / f"{name}.db"), "collection": name}, None)


def _same_ranking(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)


def test_milvus_lite_returns_the_same_top_k_as_faiss_flat(tmp_path):
    rng = np.random.default_rng(0)
    x, q = _unit(rng, N), _unit(rng, QUERIES)
    index = mv.MilvusIndex.build(x, _lite(tmp_path))
    try:
        assert index.ntotal == N and index.factory == "milvus:FLAT"
        _same_ranking(index.search(q, K), FaissIndex.build(x).search(q, K))
        rows, scores = index.search(q, N + 5)  # k above the map's size: every row, like FAISS
        assert rows.shape == (QUERIES, N) and np.all(np.diff(scores, axis=1) <= 1e-6)
    finally:
        index.close()


def test_milvus_lite_listens_on_loopback_only(tmp_path):
    """Milvus Lite serves the .db file through a gRPC server in this process: a TCP port, bound to 127.0.0.1 only."""
    before = set(listening_sockets())
    index = mv.MilvusIndex.build(_unit(np.random.default_rng(2), 20), _lite(tmp_path))
    try:
        opened = set(listening_sockets()) - before
        assert opened, "Milvus Lite opened no TCP listener (a unix socket, or none): update this test"
        assert_loopback_only(opened)
    finally:
        index.close()


def test_add_and_remove_renumber_rows_as_faiss_does(tmp_path):
    rng = np.random.default_rng(1)
    x, more, q = _unit(rng, N), _unit(rng, 40), _unit(rng, QUERIES)
    drop = [0, 7, 150, N + 3]
    index = mv.MilvusIndex.build(x, _lite(tmp_path))
    ref = FaissIndex.build(x)
    try:
        for ix in (index, ref):
            ix.add(more)
            ix.remove(drop)
        assert index.ntotal == ref.ntotal == N + 40 - len(drop)
        _same_ranking(index.search(q, K), ref.search(q, K))
        with pytest.raises(Exception, match="cannot remove rows"):
            index.remove([index.ntotal])
    finally:
        index.close()


def _write_store(map_dir, vectors: np.ndarray) -> list[str]:
    keys = [f"img{i:04d}.jpg" for i in range(len(vectors))]
    store = MapStore(map_dir)
    poses = np.stack([np.arange(len(keys), dtype=np.float64), -np.arange(len(keys), dtype=np.float64)], 1)
    store.write_shard(keys, vectors, poses)
    store.consolidate()
    return keys


def test_a_saved_collection_reopens_with_its_rows_and_a_stale_one_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    x, q = _unit(rng, 120), _unit(rng, QUERIES)
    keys = _write_store(tmp_path, x)
    config = resolve(None, index_backend="milvus")
    built = mv.MilvusIndex.build_for_map(x, config, tmp_path)
    built.remove([3])  # the reopened collection must recover the row order from the ids alone
    built.save_to_map(tmp_path)
    expected = built.search(q, K)
    # the entity fields carry what the store says of each row
    got = built.client.query(built.collection, filter="id < 3", output_fields=["image", "easting", "northing"])
    assert sorted((r["image"], r["easting"], r["northing"]) for r in got) == [
        (keys[i], float(i), -float(i)) for i in range(3)
    ]
    built.close()
    assert mv.MilvusIndex.load_for_map(tmp_path, config) is None  # the store still holds row 3: stale
    built = mv.MilvusIndex.build_for_map(x, config, tmp_path)
    built.save_to_map(tmp_path)
    built.close()
    reopened = mv.MilvusIndex.load_for_map(tmp_path, config)
    assert reopened is not None and reopened.ntotal == len(keys)
    _same_ranking(reopened.search(q, K), FaissIndex.build(x).search(q, K))
    reopened.remove([3])
    _same_ranking(reopened.search(q, K), expected)
    reopened.close()
    other = resolve(
        None, index_backend="milvus", index_options={"index_type": "IVF_FLAT", "index_params": {"nlist": 4}}
    )
    assert mv.MilvusIndex.load_for_map(tmp_path, other) is None  # other index settings: rebuild


def _topn(run_dir) -> list[tuple[str, str, str, float]]:
    with open(run_dir / "topn.csv", newline="", encoding="utf-8") as f:
        return [(r["query"], r["rank"], r["database"], float(r["score"])) for r in csv.DictReader(f)]


def test_after_a_build_only_the_new_rows_are_inserted(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    x, more, q = _unit(rng, 100), _unit(rng, 20), _unit(rng, QUERIES)
    _write_store(tmp_path, x)
    config = resolve(None, index_backend="milvus")
    index = mv.MilvusIndex.build_for_map(x, config, tmp_path)
    index.save_to_map(tmp_path)
    index.close()
    store = MapStore(tmp_path)
    store.write_shard([f"new{i}.jpg" for i in range(len(more))], more)
    store.consolidate()
    both = np.concatenate([x, more])

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the collection was rebuilt instead of extended")

    monkeypatch.setattr(mv.MilvusIndex, "build", classmethod(no_rebuild))
    updated = mv.MilvusIndex.update_for_map(tmp_path, both, config)
    try:
        assert updated.ntotal == len(both)
        _same_ranking(updated.search(q, K), FaissIndex.build(both).search(q, K))
        got = updated.client.query(updated.collection, filter=f"id >= {len(x)}", output_fields=["image"])
        assert sorted(r["image"] for r in got) == sorted(f"new{i}.jpg" for i in range(len(more)))
    finally:
        updated.close()


def test_localize_and_evaluate_give_the_same_results_with_either_backend(tmp_path, shared_datasets):
    ds = load_dataset(shared_datasets / "corridor").subset(every=SLICE_EVERY)
    faiss_run = pipeline.evaluate(ds, resolve(None), out=tmp_path / "faiss", progress=False)
    vocab = tmp_path / "faiss" / "map" / "vocabulary.npz"  # the same vocabulary, without a second k-means
    milvus_config = resolve(None, vocabulary=str(vocab), index_backend="milvus")
    milvus_run = pipeline.evaluate(ds, milvus_config, out=tmp_path / "milvus", progress=False)
    assert milvus_run["recall"] == faiss_run["recall"]
    a, b = _topn(tmp_path / "faiss"), _topn(tmp_path / "milvus")  # every query's ranked list
    assert [r[:3] for r in a] == [r[:3] for r in b]
    np.testing.assert_allclose([r[3] for r in a], [r[3] for r in b], atol=1e-5)
    data = open_map_data(tmp_path / "milvus" / "map")
    assert isinstance(data.index, mv.MilvusIndex) and data.index.ntotal == len(ds.database_images)
    assert (tmp_path / "milvus" / "map" / mv.STATE_FILE).exists()
    data.index.close()
    query = ds.query_images[1]
    found = pipeline.localize(tmp_path / "milvus" / "map", [ds.queries_dir / query], top_k=LOCALIZE_K)[0].matches
    expected = [r for r in a if r[0] == query][:LOCALIZE_K]
    assert [m.key for m in found] == [r[2] for r in expected]
    np.testing.assert_allclose([m.score for m in found], [r[3] for r in expected], atol=1e-5)


def test_the_live_service_adds_and_removes_places_in_a_milvus_map(tmp_path, shared_datasets):
    ref = shared_datasets / "corridor" / "ref"
    keys = sorted(p.name for p in ref.glob("*.jpg"))[::SLICE_EVERY]
    out = tmp_path / "map"
    pipeline.build_map(FolderImages(ref, keys), out, resolve(None, index_backend="milvus"), progress=False)
    live = LiveMap.open(out)
    picture = shared_datasets / "corridor" / "query" / "0000050.jpg"
    live.add_place(picture.read_bytes(), "new.jpg", None)
    top = live.localize({"q": np.asarray(Image.open(picture))}, top_k=1)[0].matches[0]
    assert top.key == "new.jpg" and top.score == pytest.approx(1.0, abs=1e-4)
    live.remove_place(keys[1])
    assert live.map.index.ntotal == len(keys)  # one added, one removed
    rows, _ = live.map.index.search(live.map.store.read_global(), 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(len(keys)))  # every row still finds itself
    live.map.index.close()
    reopened = open_map_data(out)  # the saved collection matches the store: reconnected, not rebuilt
    assert reopened.keys[-1] == "new.jpg" and reopened.index.ntotal == len(keys)
    reopened.index.close()


def _entity_fields(index: mv.MilvusIndex) -> dict[str, tuple[int, float, float]]:
    """image key → (run, easting, northing) of every entity of the collection, as Milvus holds them."""
    got = index.client.query(index.collection, filter="id >= 0", output_fields=["image", "run", "easting", "northing"])
    return {r["image"]: (int(r["run"]), float(r["easting"]), float(r["northing"])) for r in got}


def _store_fields(map_dir) -> dict[str, tuple[int, float, float]]:
    """The same, as the map store holds them (the reference)."""
    store = MapStore(map_dir)
    runs, poses = store.read_entries()["run"], store.read_poses()
    return {k: (int(r), float(e), float(n)) for k, r, (e, n) in zip(store.keys(), runs, poses)}


def _assert_fields_follow_the_store(index: mv.MilvusIndex, map_dir) -> dict[str, tuple[int, float, float]]:
    held, want = _entity_fields(index), _store_fields(map_dir)
    assert sorted(held) == sorted(want) and "" not in held  # no entity with a blank key
    for key, (run, e, n) in want.items():
        assert held[key][0] == run, key
        np.testing.assert_array_equal(held[key][1:], (e, n), err_msg=key)  # NaN where the store has none
    return held


def test_live_adds_pose_updates_and_removes_keep_the_entity_fields(tmp_path, shared_datasets):
    """Rows added live carry their key, run and pose; a live pose change and a `map set-pose` rewrite the fields."""
    ref = shared_datasets / "corridor" / "ref"
    keys = sorted(p.name for p in ref.glob("*.jpg"))[::SLICE_EVERY]
    out = tmp_path / "map"
    poses = np.stack([np.arange(len(keys), dtype=np.float64), np.zeros(len(keys))], 1)
    pipeline.build_map(FolderImages(ref, keys), out, resolve(None, index_backend="milvus"), poses=poses, progress=False)
    live = LiveMap.open(out)
    try:
        picture = shared_datasets / "corridor" / "query" / "0000050.jpg"
        live.add_place(picture.read_bytes(), "with-pose.jpg", {"easting": 12.5, "northing": -3.25})
        live.add_place(picture.read_bytes(), "no-pose.jpg", None)
        held = _assert_fields_follow_the_store(live.map.index, out)
        live_run = held["with-pose.jpg"][0]
        assert live_run >= 1 and live_run != held[keys[0]][0]  # the live images' run, not the build's
        assert held["with-pose.jpg"][1:] == (12.5, -3.25) and np.isnan(held["no-pose.jpg"][1:]).all()
        live.update_pose("no-pose.jpg", {"easting": 40.0, "northing": 2.0})
        live.update_pose(keys[2], {"easting": -7.0, "northing": 8.0})
        held = _assert_fields_follow_the_store(live.map.index, out)
        assert held["no-pose.jpg"][1:] == (40.0, 2.0) and held[keys[2]][1:] == (-7.0, 8.0)
        live.remove_place(keys[1])
        held = _assert_fields_follow_the_store(live.map.index, out)
        assert keys[1] not in held and len(held) == len(keys) + 1
        rows, _ = live.map.index.search(live.map.store.read_global(), 1)  # rows still map to the right entities
        np.testing.assert_array_equal(rows[:, 0][: len(keys) - 1], np.arange(len(keys) - 1))
    finally:
        live.map.index.close()
    pipeline.update_place_poses(out, {keys[3]: (100.0, 200.0)})  # `map set-pose`: the collection is closed
    reopened = open_map_data(out)  # reconnected (not rebuilt), and the changed pose rewritten
    try:
        assert isinstance(reopened.index, mv.MilvusIndex) and reopened.index.next_id == len(keys) + 2
        held = _assert_fields_follow_the_store(reopened.index, out)
        assert held[keys[3]][1:] == (100.0, 200.0)
    finally:
        reopened.index.close()


def test_options_are_checked_and_match_the_backend_defaults(tmp_path):
    assert opts.schema("index", "milvus").defaults() == mv.DEFAULTS
    with pytest.raises(ConfigError, match=r"option 'metric' = 'L2'.*allowed: one of 'IP', 'COSINE'"):
        resolve(None, index_backend="milvus", index_options={"metric": "L2"})
    with pytest.raises(ConfigError, match=r"unknown index 'milvos' \(did you mean 'milvus'\?\)"):
        resolve(None, index_backend="milvos")
    with pytest.raises(ConfigError, match=r"Milvus Lite indexes with .*HNSW.*not 'IVF_PQ'"):  # before any build
        resolve(None, index_backend="milvus", index_options={"index_type": "IVF_PQ"})
    with pytest.raises(ConfigError, match=r"Milvus Lite indexes with .*HNSW.*not 'IVF_PQ'"):
        mv.resolve_options({"index_type": "ivf_pq"}, tmp_path)
    assert resolve(None, index_backend="milvus", index_options={"index_type": "IVF_PQ", "uri": "http://h:19530"})


def test_without_pymilvus_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # import pymilvus → ImportError
    with pytest.raises(ConfigError, match=r"pip install vprkit\[scale\]"):
        mv.MilvusIndex.build(np.eye(2, dtype=np.float32), _lite(tmp_path))
