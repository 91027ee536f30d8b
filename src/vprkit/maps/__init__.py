"""The persistent map: descriptor store (HDF5, crash-safe shards), FAISS index, the map folder's typed records
(map.json, build.json, index.json) and the opened map's data."""

from .index import INDEX_FILE, FaissIndex
from . import milvus as _milvus  # noqa: F401,E402 - registers the "milvus" index backend (pymilvus is imported only when used)
from .manifest import (BUILD_FILE, INDEX_MANIFEST_FILE, BuildRecord, IndexManifest, MapManifest, read_build_record,
                       read_index_manifest, read_manifest, write_build_record, write_index_manifest, write_manifest)
from .mapdir import (FAILURES_FILE, MAP_FILE, VOCAB_FILE, MapData, crs_to_latlon, map_crs, open_map_data, read_json,
                     read_map_info, register_run)
from .store import LIVE_DIR, STORE_FILE, ExtrasReader, MapStore

__all__ = ["FaissIndex", "INDEX_FILE", "MapStore", "ExtrasReader", "STORE_FILE", "MAP_FILE", "VOCAB_FILE",
           "FAILURES_FILE", "MapData", "open_map_data", "read_json", "read_map_info", "register_run", "map_crs",
           "crs_to_latlon", "LIVE_DIR", "BUILD_FILE", "INDEX_MANIFEST_FILE", "MapManifest", "BuildRecord",
           "IndexManifest", "read_manifest", "write_manifest", "read_build_record", "write_build_record",
           "read_index_manifest", "write_index_manifest"]
