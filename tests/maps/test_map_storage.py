"""Writing a map's files when the disk says no (issue 26, items 7 and 8): a full disk is a StorageFullError and a
read-only folder a ReadOnlyMapError, with nothing half-written; an append can be undone exactly; a failed fold
does not fail an append that is already durable; leftovers of killed writers are cleaned at a writable open."""

from __future__ import annotations

import errno
import json
import logging
import os
import time

import numpy as np
import pytest

from vprkit import io as vio
from vprkit.errors import ReadOnlyMapError, StorageFullError
from vprkit.maps import FaissIndex, MapStore, open_map_data
from vprkit.maps import index as index_module
from vprkit.maps import store as store_module
from vprkit.presets import resolve

ROWS, DIM = 8, 16
OLD = 2 * vio.ORPHAN_AGE_S  # seconds: a temporary file this old is a leftover


@pytest.fixture
def small_map(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    (tmp_path / "map.json").write_text(json.dumps({"config": resolve("effnet-gem").to_dict(), "images_root": None}))
    store = MapStore(tmp_path)
    store.write_shard([f"img{i}.jpg" for i in range(ROWS)], vectors, rng.random((ROWS, 2)))
    store.consolidate()
    FaissIndex.build(vectors).save_to_map(tmp_path)
    return tmp_path


def _temporaries(folder):
    return [p for p in folder.rglob("*") if vio.is_orphan_name(p.name)]


def _disk_says(number):
    def fail(*args, **kwargs):
        raise OSError(number, os.strerror(number))

    return fail


@pytest.mark.parametrize(
    ("number", "error"),
    [(errno.ENOSPC, StorageFullError), (errno.EDQUOT, StorageFullError), (errno.EROFS, ReadOnlyMapError)],
)
def test_an_atomic_write_that_fails_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, number, error):
    target = tmp_path / "file.json"
    vio.atomic_write_json(target, {"old": True})
    monkeypatch.setattr(vio, "_fsync", _disk_says(number))
    with pytest.raises(error, match="nothing of it was kept"):
        vio.atomic_write_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True} and not _temporaries(tmp_path)


def test_hdf5_and_faiss_naming_the_os_error_in_their_message_are_understood():
    hdf5 = OSError("Can't write data (file write failed: time = x, errno = 28, error message = 'No space left')")
    assert isinstance(vio.storage_error(hdf5, "store.h5"), StorageFullError)
    faiss_error = RuntimeError(f"Error: 'ret == (n)' failed: write error in x.tmp: 0 != 1 ({os.strerror(errno.EROFS)})")
    assert isinstance(vio.storage_error(faiss_error, "index.faiss"), ReadOnlyMapError)
    assert vio.storage_error(OSError("some other failure"), "store.h5") is None


def test_a_full_disk_during_an_append_leaves_no_append_file(small_map, monkeypatch):
    store = MapStore(small_map)
    monkeypatch.setattr(store_module, "_write_rows", _disk_says(errno.ENOSPC))
    with pytest.raises(StorageFullError):
        store.append(["new.jpg"], np.ones((1, DIM), np.float32))
    assert store.keys() == [f"img{i}.jpg" for i in range(ROWS)]
    assert not list((small_map / "live").glob("append-*")) and not _temporaries(small_map)


def test_a_full_disk_while_saving_the_index_keeps_the_old_index(small_map, monkeypatch):
    before = (small_map / "index.json").read_text()
    index = open_map_data(small_map).index
    index.add(np.ones((1, DIM), np.float32))
    monkeypatch.setattr(index_module.faiss, "write_index", _disk_says(errno.ENOSPC))
    with pytest.raises(StorageFullError):
        index.save_to_map(small_map)
    assert (small_map / "index.json").read_text() == before and not _temporaries(small_map)
    assert open_map_data(small_map).index.ntotal == ROWS


def test_an_append_returns_its_file_and_can_be_undone_exactly(small_map):
    store = MapStore(small_map)
    first = store.append(["a.jpg"], np.ones((1, DIM), np.float32))
    assert first.exists() and store.keys()[-1] == "a.jpg"
    second = store.append(["b.jpg"], np.ones((1, DIM), np.float32))
    assert not store.discard_append(first)  # no longer the last append: not deleted
    assert store.discard_append(second) and not second.exists()
    assert store.keys()[-1] == "a.jpg" and len(store) == ROWS + 1
    store.consolidate()
    assert not store.discard_append(first)  # folded into store.h5: remove the key instead


def test_a_failed_fold_does_not_fail_a_durable_append(small_map, monkeypatch, caplog):
    store = MapStore(small_map)
    monkeypatch.setattr(store_module, "LIVE_FOLD_FILES", 1)
    monkeypatch.setattr(store, "_fold", _disk_says(errno.ENOSPC))
    with caplog.at_level(logging.WARNING):
        written = store.append(["new.jpg"], np.ones((1, DIM), np.float32))
    assert written.exists() and store.keys()[-1] == "new.jpg" and "fold" in caplog.text


def test_a_writable_open_cleans_leftovers_of_killed_writers(small_map):
    leftovers = [
        small_map / ".store.h5.abcd1234.tmp",
        small_map / "live" / ".append-000000001.h5.abcd1234.tmp",
        small_map / "index-shards" / ".shard-0000.g2.faiss.abcd1234.tmp",
        small_map / "extensions" / "patches-0123" / ".state.npz.abcd1234.tmp",
    ]
    old = time.time() - OLD
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
        os.utime(p, (old, old))
    open_map_data(small_map, read_only=True)
    assert all(p.exists() for p in leftovers)  # a reader writes nothing
    open_map_data(small_map, read_only=False)
    assert not any(p.exists() for p in leftovers)


def test_leftovers_below_a_folder_are_found(tmp_path):
    nested = tmp_path / "a" / "b" / ".x.jpg.abcd1234.tmp"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(b"")
    os.utime(nested, (time.time() - OLD,) * 2)
    assert vio.clean_orphans_tree(tmp_path) == [nested] and not nested.exists()
