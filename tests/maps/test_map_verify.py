"""``vprkit map verify``: every file read in full against what the map recorded; a table, exit 0 or 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest

from vprkit import pipeline

from helpers import run_main as _cli
from vprkit.maps import verify_map

FRAMES = 16
PRESET = "effnet-gem"
IMAGE_SIZE = (120, 160)


@pytest.fixture
def map_copy(corridor_map, tmp_path) -> Path:
    return Path(shutil.copytree(corridor_map(PRESET, image_size=IMAGE_SIZE, count=FRAMES), tmp_path / "map"))


def test_a_good_map_verifies(map_copy, monkeypatch, capsys):
    code, out, _ = _cli(monkeypatch, capsys, "map", "verify", map_copy)
    assert code == 0 and "every file is the map's own" in out
    assert {"map.json", "store.h5", "index.faiss"} <= {line.split()[0] for line in out.splitlines()[1:-1]}
    code, out, _ = _cli(monkeypatch, capsys, "map", "verify", map_copy, "--json")
    report = json.loads(out)
    assert code == 0 and report["good"] and json.dumps(report, allow_nan=False)


def test_a_byte_changed_in_the_middle_of_a_large_file_is_found(map_copy, monkeypatch, capsys):
    path = map_copy / "index.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 + 1] ^= 0xFF  # the size stays: only the content's checksum tells
    path.write_bytes(bytes(data))
    verdicts = {c.file: c.verdict for c in verify_map(map_copy)}
    assert verdicts["index.faiss"] == "changed"
    code, out, err = _cli(monkeypatch, capsys, "map", "verify", map_copy)
    assert code == 2 and "Traceback" not in err and "DAMAGED" in out
    assert any(line.startswith("index.faiss") and line.rstrip().endswith("changed") for line in out.splitlines())


def test_an_edited_calibration_and_another_maps_store_are_named(map_copy, corridor_map, monkeypatch, capsys):
    pipeline.open_map(map_copy)  # writes calibration.json
    calibration = json.loads((map_copy / "calibration.json").read_text())
    calibration["threshold"] = 0.5
    (map_copy / "calibration.json").write_text(json.dumps(calibration))
    other = corridor_map(PRESET, image_size=IMAGE_SIZE, count=FRAMES // 2)
    shutil.copy(other / "store.h5", map_copy / "store.h5")
    verdicts = {c.file: c.verdict for c in verify_map(map_copy)}
    assert verdicts["calibration.json"] == "changed" and verdicts["store.h5"] == "another map's"
    code, out, _ = _cli(monkeypatch, capsys, "map", "verify", map_copy, "--json")
    assert code == 2 and not json.loads(out)["good"]


def test_a_descriptor_changed_inside_the_store_is_found(map_copy, monkeypatch, capsys):
    with h5py.File(map_copy / "store.h5", "r+") as f:
        f["global"][3, 7] = -f["global"][3, 7]
    verdicts = {c.file: c.verdict for c in verify_map(map_copy)}
    assert verdicts["store.h5"] == "changed"
    code, out, _ = _cli(monkeypatch, capsys, "map", "verify", map_copy)
    assert code == 2 and "changed since it was written" in out
