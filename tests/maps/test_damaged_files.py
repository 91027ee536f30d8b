"""Damaged map files give one MapError (or, for the derived index, a rebuild) — findings of scripts/fuzz_inputs.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vprkit.errors import MapError
from vprkit.maps import FaissIndex, MapStore, open_map_data
from vprkit.presets import resolve


@pytest.fixture
def small_map(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((8, 16)).astype(np.float32)
    store = MapStore(tmp_path)
    store.write_shard([f"img{i}.jpg" for i in range(8)], vectors, rng.random((8, 2)))
    store.consolidate()
    FaissIndex.build(vectors).save(tmp_path / "index.faiss")
    (tmp_path / "map.json").write_text(json.dumps({"config": resolve("effnet-gem").to_dict(), "images_root": None}))
    return tmp_path


def test_the_template_opens(small_map):
    m = open_map_data(small_map)
    assert len(m) == 8 and m.store.read_global().shape == (8, 16)


def test_map_json_that_is_not_utf8(small_map):
    (small_map / "map.json").write_bytes(b'{"config": "\x94"}')
    with pytest.raises(MapError, match="map.json is unreadable"):
        open_map_data(small_map)


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_truncated_store(small_map, cut):
    data = (small_map / "store.h5").read_bytes()
    (small_map / "store.h5").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(MapError, match="not a readable map store"):
        open_map_data(small_map)


def test_store_whose_rows_disagree(small_map):
    import h5py

    with h5py.File(small_map / "store.h5", "r+") as f:
        del f["poses"]
        f.create_dataset("poses", data=np.zeros((3, 2)))
    with pytest.raises(MapError, match="poses.*has shape"):
        open_map_data(small_map)


def test_an_index_asking_for_an_absurd_allocation_is_rebuilt(small_map, caplog):
    data = bytearray((small_map / "index.faiss").read_bytes())
    data[8:16] = (2**62).to_bytes(8, "little")  # ntotal of the flat index header
    (small_map / "index.faiss").write_bytes(bytes(data))
    m = open_map_data(small_map)
    assert m.index.ntotal == 8 and "not a readable FAISS index" in caplog.text
