"""The persistent map: descriptor store (HDF5, crash-safe shards), FAISS index, and the opened map's data."""

from .index import INDEX_FILE, FaissIndex
from .mapdir import FAILURES_FILE, MAP_FILE, VOCAB_FILE, MapData, open_map_data, read_json, read_map_info
from .store import STORE_FILE, MapStore, StoreReader

__all__ = ["FaissIndex", "INDEX_FILE", "MapStore", "StoreReader", "STORE_FILE", "MAP_FILE", "VOCAB_FILE",
           "FAILURES_FILE", "MapData", "open_map_data", "read_json", "read_map_info"]
