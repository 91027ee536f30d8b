"""A map's files are bound together (issue 26, item 2): a damaged, swapped or foreign file never answers.

Each test damages one file of a real Corridor map as the issue's probes did and checks that localising a
map image returns that image (the derived file was rebuilt, with a warning) or that opening the map is
refused with one line (``MapDamagedError``; the CLI exits 2 without a traceback).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from vprkit import pipeline

from helpers import run_main as _cli, assert_one_line_error as _one_line_error
from vprkit.errors import MapDamagedError
from vprkit.images import FolderImages
from vprkit.maps import FaissIndex, MapStore, open_map_data, read_index_manifest, read_manifest
from vprkit.maps.verify import MAP_ID_ATTR
from vprkit.presets import resolve

FRAMES = 16  # Corridor frames per test map: a real map in a few seconds
IMAGE_SIZE = (120, 160)  # (height, width): Corridor's own size
PRESET = "effnet-gem"  # no vocabulary: fast
OTHER_PRESET = "effnet-vlad"  # another descriptor dimension
COMPRESSED = "PCA8,Flat"  # an approximate index, so the map keeps a full-precision descriptors copy
PROBE = 5  # the map image localised in each test
SERVE_BOUND_S = 300  # a refused start is seconds; the bound only stops a service that started by mistake


def _build(root: Path, folder: str, out: Path, preset: str = PRESET, index: str | None = None) -> Path:
    images = root / "corridor" / folder
    keys = sorted(p.name for p in images.glob("*.jpg"))[:FRAMES]
    config = resolve(preset, image_size=IMAGE_SIZE)
    if index is not None:
        config = config.replace(index=index, index_options={"rescore": FRAMES})
    pipeline.build_map(FolderImages(images, keys), out, config, progress=False, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def maps(tmp_path_factory, shared_datasets) -> dict[str, Path]:
    """Four maps of 16 rows: ``own`` (flat index), ``compressed`` (with a descriptors copy), ``other`` (the same
    settings over other images: a map whose files have the same shapes) and ``preset`` (another preset)."""
    root = tmp_path_factory.mktemp("binding")
    return {
        "own": _build(shared_datasets, "ref", root / "own"),
        "compressed": _build(shared_datasets, "ref", root / "compressed", index=COMPRESSED),
        "other": _build(shared_datasets, "query", root / "other"),
        "preset": _build(shared_datasets, "ref", root / "preset", preset=OTHER_PRESET),
    }


@pytest.fixture
def copy_of(maps, tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(maps[name], tmp_path / name, ignore=shutil.ignore_patterns(".lock")))

    return copy


def _probe(map_dir: Path, shared_datasets: Path):
    """Localise map image PROBE of Corridor's reference frames; returns (key, row, top match, its score, confidence)."""
    key = sorted(p.name for p in (shared_datasets / "corridor" / "ref").glob("*.jpg"))[PROBE]
    opened = pipeline.open_map(map_dir, read_only=True)
    result = pipeline.localize(opened, [str(shared_datasets / "corridor" / "ref" / key)])[0]
    return key, result.matches[0].key, result.matches[0].score, result.estimate.confidence


def _answers_itself(map_dir: Path, shared_datasets: Path) -> None:
    key, top, score, confidence = _probe(map_dir, shared_datasets)
    assert top == key and score == pytest.approx(1.0, abs=1e-3), (top, score)
    assert confidence is not None and np.isfinite(confidence) and confidence > 0.5


# ---- derived files: rebuilt from the store with a warning ---------------------------------------------
def test_an_overwritten_descriptors_copy_is_rebuilt(copy_of, shared_datasets, caplog):
    d = copy_of("compressed")
    path = d / "descriptors.npy"
    data = bytearray(path.read_bytes())
    data[256:] = np.random.default_rng(0).integers(0, 255, len(data) - 256, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))  # same size, same header: other numbers
    with caplog.at_level(logging.WARNING):
        _answers_itself(d, shared_datasets)
    assert "descriptors.npy" in caplog.text and "rebuilding" in caplog.text


@pytest.mark.parametrize("keep", [0, 300], ids=["empty", "truncated"])
def test_an_empty_or_truncated_descriptors_copy_is_rebuilt(copy_of, shared_datasets, caplog, keep):
    d = copy_of("compressed")
    path = d / "descriptors.npy"
    path.write_bytes(path.read_bytes()[:keep])
    with caplog.at_level(logging.WARNING):
        _answers_itself(d, shared_datasets)
    assert "descriptors.npy" in caplog.text


def test_an_index_file_of_another_map_is_rebuilt(copy_of, maps, shared_datasets, caplog):
    d = copy_of("own")
    shutil.copy(maps["other"] / "index.faiss", d / "index.faiss")  # same rows, same dimension, other vectors
    with caplog.at_level(logging.WARNING):
        _answers_itself(d, shared_datasets)
    assert "index.faiss" in caplog.text and "rebuilding" in caplog.text


def test_an_index_and_its_manifest_of_another_map_are_rebuilt(copy_of, maps, shared_datasets, caplog):
    d = copy_of("own")
    for name in ("index.faiss", "index.json"):
        shutil.copy(maps["other"] / name, d / name)
    with caplog.at_level(logging.WARNING):
        _answers_itself(d, shared_datasets)
    assert "another map" in caplog.text


def test_an_index_file_linked_from_outside_the_map_is_never_read(copy_of, maps, shared_datasets, caplog):
    d = copy_of("own")
    (d / "index.faiss").unlink()
    (d / "index.faiss").symlink_to(maps["other"] / "index.faiss")  # a valid index of the same shape, elsewhere
    with caplog.at_level(logging.WARNING):
        _answers_itself(d, shared_datasets)
    assert "outside the map folder" in caplog.text


def test_an_edited_calibration_is_refitted(copy_of, shared_datasets, caplog):
    d = copy_of("own")
    pipeline.open_map(d)  # a writable open fits and saves calibration.json
    path = d / "calibration.json"
    calibration = json.loads(path.read_text())
    calibration["impostor"] = [float("nan")] * len(calibration["impostor"])
    path.write_text(json.dumps(calibration))
    with caplog.at_level(logging.WARNING):
        _answers_itself(d, shared_datasets)
    assert "calibration" in caplog.text


def test_a_plausible_hand_edit_of_the_calibration_is_refitted(copy_of, shared_datasets, caplog):
    d = copy_of("own")
    pipeline.open_map(d)
    path = d / "calibration.json"
    calibration = json.loads(path.read_text())
    calibration["impostor"] = [0.9999] * len(calibration["impostor"])  # finite, in range: every match an impostor
    path.write_text(json.dumps(calibration))
    with caplog.at_level(logging.WARNING):
        _answers_itself(d, shared_datasets)
    assert "checksum" in caplog.text


# ---- primary data: refused with one line --------------------------------------------------------------
def test_a_store_of_another_map_is_refused(copy_of, maps, monkeypatch, capsys, shared_datasets):
    d = copy_of("own")
    shutil.copy(maps["other"] / "store.h5", d / "store.h5")
    with pytest.raises(MapDamagedError, match="store.h5 belongs to another map"):
        open_map_data(d)
    query = shared_datasets / "corridor" / "ref" / "0000000.jpg"
    _one_line_error(*_cli(monkeypatch, capsys, "localize", d, query)[::2], "belongs to another map")


def test_an_append_file_repeating_keys_is_refused(copy_of):
    d = copy_of("own")
    store = MapStore(d)
    keys, rows = store.keys()[:2], store.read_global(np.array([0, 1]))
    (d / "live").mkdir()
    with h5py.File(d / "live" / "append-000000001.h5", "w") as f:  # an append log replayed by hand
        f["keys"] = np.array([k.encode() for k in keys])
        f["global"] = rows
        f["poses"] = np.full((2, 2), np.nan)
    with pytest.raises(MapDamagedError) as caught:
        open_map_data(d)
    assert (
        keys[0] in str(caught.value) and "append-000000001.h5" in str(caught.value) and "store.h5" in str(caught.value)
    )


def test_files_of_another_preset_are_refused_with_one_line(copy_of, maps, monkeypatch, capsys, shared_datasets):
    d = copy_of("own")
    for name in ("store.h5", "index.faiss", "index.json"):
        shutil.copy(maps["preset"] / name, d / name)
    with h5py.File(d / "store.h5", "r+") as f:  # as from a map written before identities: the dimension tells
        del f.attrs[MAP_ID_ATTR]
    with pytest.raises(MapDamagedError, match="another preset"):
        open_map_data(d)
    query = shared_datasets / "corridor" / "ref" / "0000000.jpg"
    _one_line_error(*_cli(monkeypatch, capsys, "localize", d, query)[::2], "another preset")


def test_queries_of_another_dimension_are_a_one_line_error():
    index = FaissIndex.build(np.eye(4, 8, dtype=np.float32))
    with pytest.raises(MapDamagedError, match="another preset"):
        index.search(np.ones((1, 16), np.float32), 1)


# ---- identities ---------------------------------------------------------------------------------------
def test_a_build_binds_every_file_to_one_map_id(maps):
    d = maps["compressed"]
    map_id = read_manifest(d).map_id
    index = read_index_manifest(d)
    assert map_id and index.map_id == map_id and json.loads((d / "build.json").read_text())["map_id"] == map_id
    with h5py.File(d / "store.h5", "r") as f:
        assert f.attrs[MAP_ID_ATTR] == map_id
    for record in [*index.shards, index.descriptors, index.trained]:
        assert record.size == (d / record.file).stat().st_size and record.fingerprint and record.sha256


def test_a_map_from_before_identities_opens_and_gets_one_at_its_next_write(copy_of):
    d = copy_of("own")
    info = json.loads((d / "map.json").read_text())
    del info["map_id"]
    (d / "map.json").write_text(json.dumps(info))
    (d / "build.json").unlink()
    with h5py.File(d / "store.h5", "r+") as f:
        del f.attrs[MAP_ID_ATTR]
    index = json.loads((d / "index.json").read_text())
    for shard in index["shards"]:
        shard.pop("size"), shard.pop("fingerprint"), shard.pop("sha256")
    del index["map_id"]
    (d / "index.json").write_text(json.dumps(index))
    assert len(open_map_data(d)) == FRAMES  # accepted as before
    store = MapStore(d)
    written = store.append(["new.jpg"], store.read_global(np.array([0])))
    map_id = read_manifest(d).map_id
    assert map_id
    with h5py.File(written, "r") as f:
        assert f.attrs[MAP_ID_ATTR] == map_id


def test_an_append_file_edited_after_it_was_written_is_refused(copy_of):
    d = copy_of("own")
    store = MapStore(d)
    written = store.append(["new.jpg"], store.read_global(np.array([0])))
    with h5py.File(written, "r+") as f:  # one descriptor value changed behind the map's back
        f["global"][0, 0] = f["global"][0, 0] + 1
    with pytest.raises(MapDamagedError, match="changed since it was written"):
        open_map_data(d)


@pytest.mark.parametrize("source", ["other", "preset"])
def test_the_service_refuses_to_start_on_files_that_do_not_belong(copy_of, maps, source):
    d = copy_of("own")
    shutil.copy(maps[source] / "store.h5", d / "store.h5")
    run = subprocess.run(
        [str(Path(sys.executable).parent / "vprkit"), "serve", str(d), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=SERVE_BOUND_S,
        check=False,
    )
    _one_line_error(run.returncode, run.stderr, "store.h5")
