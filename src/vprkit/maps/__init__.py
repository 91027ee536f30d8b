"""The persistent map: descriptor store (HDF5, crash-safe shards) and FAISS index."""

from .index import INDEX_FILE, FaissIndex
from .store import STORE_FILE, MapStore, StoreReader

__all__ = ["FaissIndex", "INDEX_FILE", "MapStore", "StoreReader", "STORE_FILE"]
