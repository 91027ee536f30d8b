"""Adds and deletes write only what changed (issue 26, item 8): a live add to a one-file index writes a small tail
shard instead of rewriting ``index.faiss``; a delete rewrites only the shard holding the row; the tail is folded
back once it grows; search results are those of one index over the same rows; builds still leave one file."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from vprkit.maps import FaissIndex, MapStore, open_map_data, update_map_index
from vprkit.maps import index as index_module
from vprkit.presets import resolve

ROWS, ADDED, DIM, QUERIES, K = 400, 40, 32, 50, 10
FACTORIES = ["Flat", "IVF4,PQ8x4", "PCA16,IVF4,Flat", "SQ8"]


def _unit(rng, n):
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _map(tmp_path, factory, vectors):
    config = resolve("effnet-gem").replace(index=factory, index_options={"nprobe": 2})
    (tmp_path / "map.json").write_text(json.dumps({"config": config.to_dict(), "images_root": None}))
    store = MapStore(tmp_path)
    store.write_shard([f"img{i}.jpg" for i in range(len(vectors))], vectors)
    store.consolidate()
    return config, update_map_index(tmp_path, vectors, config)


def _file_identity(path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


@pytest.mark.parametrize("factory", FACTORIES)
def test_a_live_add_writes_a_tail_shard_and_answers_as_one_index(tmp_path, factory):
    rng = np.random.default_rng(0)
    vectors, queries = _unit(rng, ROWS + ADDED), _unit(rng, QUERIES)
    config, _ = _map(tmp_path, factory, vectors[:ROWS])
    before = _file_identity(tmp_path / "index.faiss")
    index = open_map_data(tmp_path).index
    index.add(vectors[ROWS:])
    index.save_to_map(tmp_path)
    assert _file_identity(tmp_path / "index.faiss") == before  # the big file is not rewritten
    files = [s["file"] for s in json.loads((tmp_path / "index.json").read_text())["shards"]]
    assert files[0] == "index.faiss" and len(files) == 2
    reopened = index_module.FaissIndex.load_for_map(tmp_path, config)
    trained = faiss.clone_index(reopened.index)  # the same trained structure, emptied
    trained.reset()
    whole = FaissIndex(None, factory, reopened.options, shards=[], trained=trained)
    whole.add(vectors)
    for got in (index, reopened):
        rows, scores = got.search(queries, K)
        want_rows, want_scores = whole.search(queries, K)
        assert np.array_equal(rows, want_rows) and np.allclose(scores, want_scores, atol=1e-6)


def test_a_delete_rewrites_only_the_shard_holding_the_row(tmp_path):
    rng = np.random.default_rng(1)
    vectors = _unit(rng, ROWS + ADDED)
    _map(tmp_path, "Flat", vectors[:ROWS])
    index = open_map_data(tmp_path).index
    index.add(vectors[ROWS:])
    index.save_to_map(tmp_path)
    before = _file_identity(tmp_path / "index.faiss")
    index.remove([ROWS + 3])  # a row of the tail
    index.save_to_map(tmp_path)
    assert _file_identity(tmp_path / "index.faiss") == before and index.ntotal == ROWS + ADDED - 1
    rows, _ = index.search(vectors[ROWS + 4 : ROWS + 5], 1)
    assert rows[0, 0] == ROWS + 3  # later rows moved down


def test_the_tail_is_folded_back_once_it_grows(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    vectors = _unit(rng, ROWS + ADDED)
    config, _ = _map(tmp_path, "Flat", vectors[:ROWS])
    monkeypatch.setattr(index_module, "TAIL_FOLD_MIN_ROWS", ADDED // 2)
    monkeypatch.setattr(index_module, "TAIL_FOLD_FRACTION", 0.0)
    index = open_map_data(tmp_path).index
    index.add(vectors[ROWS:])
    index.save_to_map(tmp_path)
    manifest = json.loads((tmp_path / "index.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["index.faiss"] and manifest["ntotal"] == ROWS + ADDED
    assert not list((tmp_path / "index-shards").glob("*.faiss"))
    rows, _ = FaissIndex.load_for_map(tmp_path, config).search(vectors, 1)
    assert np.array_equal(rows[:, 0], np.arange(ROWS + ADDED))


def test_a_build_that_adds_rows_leaves_one_index_file(tmp_path):
    rng = np.random.default_rng(3)
    vectors = _unit(rng, ROWS + ADDED)
    config, _ = _map(tmp_path, "IVF4,PQ8x4", vectors[:ROWS])
    update_map_index(tmp_path, vectors, config)  # a later `map build` adding images to a compressed map
    manifest = json.loads((tmp_path / "index.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["index.faiss"] and manifest["ntotal"] == ROWS + ADDED
