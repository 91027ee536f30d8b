"""Issue 26, items 7–9: a live write is all or nothing, a map on a full or read-only disk is served read-only,
and keys that the file system refuses are clean errors.

Failures are injected at each step of an add (image file, store append, index add and save, an extension's
derived files, ``map.json``); afterwards the map reopened from disk holds exactly the places it held before,
nothing is left under ``live-images/``, and the same add then succeeds.
"""

from __future__ import annotations

import errno
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vprkit.pipeline.live as live_module
import vprkit.pipeline.live_writes as writes_module
from vprkit import pipeline
from vprkit.errors import ConfigError, MapError, ReadOnlyMapError, StorageFullError
from vprkit.maps import MapStore
from vprkit.maps.extensions import MapExtension
from vprkit.pipeline.live import LiveMap, PlaceExistsError, UnknownPlaceError

ADDED = "added/new.jpg"


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _faiss_full(*args, **kwargs):
    """FAISS reports a full disk as a RuntimeError naming the OS error in its message (seen on a full tmpfs)."""
    raise RuntimeError(
        "Error in void faiss::write_index(const Index*, IOWriter*, int) at index_write.cpp:499: Error: "
        "'ret == (size * 4)' failed: write error in shard.faiss.tmp: 85971 != 92160 (No space left on device)"
    )


def _image(corridor_dir: Path, i: int = 40) -> bytes:
    return (corridor_dir / "query" / f"{i:07d}.jpg").read_bytes()


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def _counts(map_dir: Path) -> tuple:
    info = json.loads((map_dir / "map.json").read_text())
    return info["counts"]["images"], info.get("index", {}).get("ntotal"), len(info.get("runs", []))


class FailingExtension(MapExtension):
    """A map extension whose derived files cannot be written (a full disk during ``finalize``)."""

    group = "failing"

    def encode(self, batch, features):
        return [{"x": np.zeros(1, np.float32)} for _ in range(len(batch.keys))]

    def finalize(self, store, map_dir):
        _full()


@contextmanager
def _failing(monkeypatch, step: str, live: LiveMap):
    """Make one step of an add fail, as a full disk (or a mismatched index) would."""
    with monkeypatch.context() as patch:
        if step == "image":
            patch.setattr(Path, "write_bytes", lambda self, data: _full())
        elif step == "store append":
            patch.setattr(MapStore, "append", _full)
        elif step == "index add":
            index = live.map.index

            def mismatched(vectors, *args, **kwargs):
                raise MapError(f"cannot add vectors of shape {np.shape(vectors)} to a 7-d index")

            patch.setattr(index, "add", mismatched)
        elif step == "index save":
            patch.setattr(type(live.map.index), "save_to_map", _full)
        elif step == "index save (FAISS)":
            patch.setattr(type(live.map.index), "save_to_map", _faiss_full)
        elif step == "extension finalize":
            patch.setitem(live.map.extensions, "failing", FailingExtension({}, live.map.backbone, None))
        elif step == "map.json":
            patch.setattr(live_module, "write_manifest", _full)
        yield


STEPS = ["image", "store append", "index add", "index save", "index save (FAISS)", "extension finalize", "map.json"]


@pytest.mark.parametrize("step", STEPS)
def test_a_failed_add_leaves_no_trace_and_can_be_retried(map_dir, corridor_dir, monkeypatch, step):
    live = LiveMap.open(map_dir)
    keys_before, count_before = list(live.map.data.keys), len(live)
    images_before, counts_before = _files(map_dir / "live-images"), _counts(map_dir)
    with _failing(monkeypatch, step, live):
        with pytest.raises(MapError if step == "index add" else StorageFullError):
            live.add_place(_image(corridor_dir), ADDED, {"easting": 3.5, "northing": 1.0})
    assert len(live) == count_before
    with pytest.raises(UnknownPlaceError):
        live.place(ADDED)
    assert _files(map_dir / "live-images") == images_before  # no image, no folder, no temporary file
    assert _counts(map_dir) == counts_before  # no count, no run recorded
    reopened = pipeline.open_map(map_dir, read_only=True)
    assert reopened.keys == keys_before and reopened.index.ntotal == len(keys_before)
    assert live.localize({"q": np.asarray(Image.open(corridor_dir / "ref" / "0000005.jpg"))}, top_k=1)[0].matches[
        0
    ].key == ("0000005.jpg")
    place = live.add_place(_image(corridor_dir), ADDED, {"easting": 3.5, "northing": 1.0})  # the retry succeeds
    assert place["position"] == {"easting": 3.5, "northing": 1.0} and len(live) == count_before + 1
    reopened = pipeline.open_map(map_dir, read_only=True)
    assert reopened.keys == keys_before + [ADDED] and reopened.index.ntotal == len(keys_before) + 1
    assert _counts(map_dir)[0] == count_before + 1


def test_an_index_of_another_dimension_refuses_the_add_before_writing(map_dir, corridor_dir, monkeypatch):
    live = LiveMap.open(map_dir)
    with monkeypatch.context() as patch:
        patch.setattr(type(live.map.index), "d", property(lambda self: 7))
        with pytest.raises(MapError, match="7-d descriptors"):
            live.add_place(_image(corridor_dir), ADDED)
    assert not (map_dir / "live-images").exists() and not (map_dir / "live").exists()
    assert pipeline.open_map(map_dir, read_only=True).keys == live.map.data.keys


def test_read_only_folders_refuse_writes_cleanly(map_dir, corridor_dir, monkeypatch):
    """Only ``live-images/`` or only ``live/`` unwritable: a ReadOnlyMapError (409), nothing written (was a 500)."""
    live = LiveMap.open(map_dir)
    before = list(live.map.data.keys)
    real = writes_module.atomic_path

    def refusing(path, *args, **kwargs):
        if "live-images" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(writes_module, "atomic_path", refusing)
        with pytest.raises(ReadOnlyMapError):
            live.add_place(_image(corridor_dir), ADDED)
    with monkeypatch.context() as patch:
        patch.setattr(
            MapStore, "append", lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission"))
        )
        with pytest.raises(ReadOnlyMapError):
            live.add_place(_image(corridor_dir), ADDED)
    assert _files(map_dir / "live-images") == set()
    assert pipeline.open_map(map_dir, read_only=True).keys == before == live.map.data.keys


@pytest.mark.parametrize(("why", "error"), [(errno.EROFS, ReadOnlyMapError), (errno.ENOSPC, StorageFullError)])
def test_a_map_on_a_read_only_or_full_disk_is_served_read_only(map_dir, corridor_dir, monkeypatch, caplog, why, error):
    def refusing(path, *args, **kwargs):
        raise OSError(why, "refused", str(path))

    monkeypatch.setattr(writes_module, "atomic_path", refusing)
    with caplog.at_level("WARNING"):
        live = LiveMap.open(map_dir)
    assert sum("read-only" in r.getMessage() for r in caplog.records) == 1
    frame = np.asarray(Image.open(corridor_dir / "ref" / "0000005.jpg"))
    assert live.localize({"q": frame}, top_k=1)[0].matches[0].key == "0000005.jpg"
    for write in (
        lambda: live.add_place(_image(corridor_dir), ADDED),
        lambda: live.remove_place("0000001.jpg"),
        lambda: live.update_pose("0000001.jpg", {"heading": 10}),
    ):
        with pytest.raises(error):
            write()
    assert len(live) == 20 and pipeline.open_map(map_dir, read_only=True).keys == live.map.data.keys


def test_a_full_disk_while_opening_for_writing_serves_read_only(map_dir, corridor_dir, monkeypatch):
    """The writable open itself fails (an index or calibration to save on a full disk): no traceback, read-only."""
    real = live_module.open_map

    def opening(map_dir, read_only=False, device=None):
        if not read_only:
            _full()
        return real(map_dir, read_only=read_only, device=device)

    monkeypatch.setattr(live_module, "open_map", opening)
    live = LiveMap.open(map_dir)
    assert isinstance(live.refuse_writes, StorageFullError)
    with pytest.raises(StorageFullError):
        live.add_place(_image(corridor_dir), ADDED)


def test_keys_the_file_system_refuses_are_clean_errors(map_dir, corridor_dir):
    live = LiveMap.open(map_dir)
    live.add_place(_image(corridor_dir, 41), "file.jpg")
    live.add_place(_image(corridor_dir, 42), "folder/inside.jpg")
    before = _files(map_dir / "live-images")
    with pytest.raises(PlaceExistsError, match="conflicts with"):
        live.add_place(_image(corridor_dir), "file.jpg/child.jpg")  # a parent that is a place's file
    with pytest.raises(PlaceExistsError, match="conflicts with"):
        live.add_place(_image(corridor_dir), "folder")  # a folder of live-images
    with pytest.raises(ConfigError):
        live.add_place(_image(corridor_dir), "图" * 81 + ".jpg")  # 247 bytes: with its temporary name, too long
    with pytest.raises(ConfigError):
        live.add_place(_image(corridor_dir), "图" * 90 + ".jpg")
    assert _files(map_dir / "live-images") == before and len(live) == 22
    assert pipeline.open_map(map_dir, read_only=True).keys == live.map.data.keys


def test_name_too_long_at_write_time_is_a_config_error(map_dir, corridor_dir, monkeypatch):
    """Whatever the key check allows, a file system refusing the name is a 422-class error, never a 500."""
    live = LiveMap.open(map_dir)
    monkeypatch.setattr(
        Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(OSError(errno.ENAMETOOLONG, "File name too long"))
    )
    with pytest.raises(ConfigError, match="too long"):
        live.add_place(_image(corridor_dir), "short.jpg")
    assert len(live) == 20 and not (map_dir / "live-images" / "short.jpg").exists()


def test_start_up_cleans_temporaries_and_recounts(map_dir, corridor_dir):
    live = LiveMap.open(map_dir)
    live.add_place(_image(corridor_dir), ADDED)
    leftovers = [
        map_dir / "live-images" / ".x.jpg.abcd1234.tmp",
        map_dir / "live-images" / "added" / ".y.jpg.zz99yy88.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    info = json.loads((map_dir / "map.json").read_text())
    info["counts"]["images"] = 20  # as a kill between the store's append and map.json's write leaves it
    (map_dir / "map.json").write_text(json.dumps(info))
    LiveMap.open(map_dir)
    assert not any(p.exists() for p in leftovers) and (map_dir / "live-images" / ADDED).is_file()
    assert _counts(map_dir)[0] == 21


def test_a_failed_removal_changes_nothing(map_dir, monkeypatch):
    live = LiveMap.open(map_dir)
    monkeypatch.setattr(MapStore, "remove", _full)
    with pytest.raises(StorageFullError):
        live.remove_place("0000003.jpg")
    assert live.place("0000003.jpg")["row"] == 3 and len(live) == 20
    monkeypatch.undo()
    live.remove_place("0000003.jpg")
    assert pipeline.open_map(map_dir, read_only=True).keys == [k for k in live.map.data.keys]
    assert len(live) == 19 and _counts(map_dir)[0] == 19
