import h5py
import numpy as np
import pytest

from vprkit.errors import MapError
from vprkit.maps import FaissIndex, MapStore


def test_shards_consolidate_without_duplicates(tmp_path):
    s = MapStore(tmp_path, "float16")
    s.write_shard(["a", "b"], np.eye(2, 3), np.array([[1.0, 2.0], [3.0, 4.0]]))
    s.write_shard(["c"], np.ones((1, 3)), extras=[{"patches": {"x": np.arange(4.0)}}])
    assert s.keys(include_pending=True) == ["a", "b", "c"] and len(s) == 0
    assert s.consolidate() == 3
    assert s.keys() == ["a", "b", "c"] and not s.shards()
    g = s.read_global()
    assert g.dtype == np.float32 and g.shape == (3, 3) and np.allclose(g[2], 1)
    assert np.allclose(s.read_poses()[:2], [[1, 2], [3, 4]]) and np.isnan(s.read_poses()[2]).all()
    with s.open_extras() as r:
        assert np.allclose(r.extras("patches", 2)["x"], np.arange(4))
        with pytest.raises(MapError, match="no 'patches' data"):
            r.extras("patches", 0)
    # a shard left behind by a crash after the rename (keys already in the store) adds nothing twice
    s.write_shard(["c", "d"], np.zeros((2, 3)))
    assert s.consolidate() == 4 and s.keys() == ["a", "b", "c", "d"]
    assert np.allclose(s.read_global([3, 0]), [[0, 0, 0], [1, 0, 0]])


def test_failed_shard_write_leaves_nothing(tmp_path, monkeypatch):
    s = MapStore(tmp_path)
    s.write_shard(["a"], np.ones((1, 2)))
    s.consolidate()
    before = (tmp_path / "store.h5").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(OSError):
        s.write_shard(["b"], np.ones((1, 2)))
    monkeypatch.undo()
    assert s.shards() == [] and not list((tmp_path / "pending").glob("*.tmp"))
    assert (tmp_path / "store.h5").read_bytes() == before


def test_dimension_mismatch_is_refused(tmp_path):
    s = MapStore(tmp_path)
    s.write_shard(["a"], np.ones((1, 2)))
    s.write_shard(["b"], np.ones((1, 3)))
    with pytest.raises(MapError, match="3-d"):
        s.consolidate()
    assert not (tmp_path / "store.h5").exists()


def test_bad_dtype():
    with pytest.raises(MapError):
        MapStore(".", "int8")


def test_faiss_index_scores_are_cosines(tmp_path):
    x = np.eye(4, dtype=np.float32)
    idx = FaissIndex.build(x)
    rows, scores = idx.search(np.array([[0.6, 0.8, 0, 0]], np.float32), 2)
    assert rows.tolist() == [[1, 0]] and np.allclose(scores, [[0.8, 0.6]])
    idx.save(tmp_path / "i.faiss")
    assert FaissIndex.load(tmp_path / "i.faiss").ntotal == 4


def test_store_files_follow_the_umask_and_consolidation_cleans_orphans(tmp_path):
    import os
    import stat
    import time

    s = MapStore(tmp_path)
    old = os.umask(0o022)
    try:
        s.write_shard(["a"], np.ones((1, 2)))
        orphan = tmp_path / ".store.h5.abcdefgh.tmp"  # left by a build killed mid-consolidation
        orphan.write_bytes(b"partial")
        os.utime(orphan, (time.time() - 86400,) * 2)
        s.consolidate()
        FaissIndex.build(np.eye(2, dtype=np.float32)).save(tmp_path / "index.faiss")
    finally:
        os.umask(old)
    assert not orphan.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "pending", "store.h5"]
    for name in ("store.h5", "index.faiss"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_live_appends_are_folded_into_the_store_once_there_are_many(tmp_path, monkeypatch):
    import vprkit.maps.store as store_module

    monkeypatch.setattr(store_module, "LIVE_FOLD_FILES", 3)
    s = MapStore(tmp_path)
    s.write_shard(["a"], np.ones((1, 2)))
    s.consolidate()
    for i in range(5):
        s.append([f"live{i}"], np.full((1, 2), i), np.array([[i, i]]), np.array([i * 10.0]))
    live = sorted(p.name for p in (tmp_path / "live").iterdir())
    assert len(live) < 3  # folded when the third arrived; numbering continues, never reused
    assert s.keys() == ["a"] + [f"live{i}" for i in range(5)] and np.allclose(
        s.read_headings()[1:], [0, 10, 20, 30, 40]
    )
    with h5py.File(tmp_path / "store.h5") as f:
        assert int(f.attrs["live_absorbed"]) == 3
    assert all(int(name[len("append-") : -len(".h5")]) > 3 for name in live)


def test_append_files_already_folded_are_ignored_after_a_crash(tmp_path):
    import shutil

    s = MapStore(tmp_path)
    s.write_shard(["a"], np.ones((1, 2)))
    s.consolidate()
    s.append(["b"], np.ones((1, 2)))
    kept = tmp_path / "kept.h5"
    shutil.copy(next((tmp_path / "live").iterdir()), kept)
    s.consolidate()
    shutil.copy(kept, tmp_path / "live" / "append-000000001.h5")  # as if the fold died before deleting it
    assert MapStore(tmp_path).keys() == ["a", "b"] and len(MapStore(tmp_path)) == 2
    s.append(["c"], np.ones((1, 2)))
    assert MapStore(tmp_path).keys() == ["a", "b", "c"]


@pytest.mark.parametrize("column, value", [("poses", 1234.5), ("global", 0.625)])
def test_a_bit_flipped_on_disk_is_a_one_line_damage_error_not_a_wrong_value(tmp_path, column, value):
    """Every stored dataset carries HDF5's Fletcher-32 checksum per chunk: a flip in a pose or a descriptor is
    refused when read (found by the map-files fuzz campaign: a flipped pose answered in silence)."""
    from vprkit.errors import MapDamagedError

    s = MapStore(tmp_path)
    vectors = np.full((4, 8), 0.125, np.float32)
    poses = np.zeros((4, 2))
    (vectors if column == "global" else poses)[2, 1] = value
    s.write_shard(["a", "b", "c", "d"], vectors, poses)
    s.consolidate()
    raw = bytearray((tmp_path / "store.h5").read_bytes())
    at = raw.find(np.array([value], vectors.dtype if column == "global" else np.float64).tobytes())
    assert at > 0
    raw[at] ^= 0x01
    (tmp_path / "store.h5").write_bytes(bytes(raw))
    read = MapStore(tmp_path).read_global if column == "global" else MapStore(tmp_path).read_poses
    with pytest.raises(MapDamagedError, match="not a readable map store") as info:
        read()
    assert "\n" not in str(info.value)
