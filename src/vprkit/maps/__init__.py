"""The persistent map: a folder of descriptors (crash-safe store), an index, typed records and the rules of changing it.

This is the stage's public surface — what the composer, the faces and other stages use:

- the folder's records: :class:`MapManifest` (``map.json``), :class:`BuildRecord` (``build.json``),
  :class:`IndexManifest` (``index.json``), one checked reader and one atomic writer each;
- the rows: :class:`MapStore` (descriptors, keys, poses, :class:`StoredEntry` per image, extras);
- the index: :class:`FaissIndex` (or Milvus) with :func:`build_index` / :func:`update_map_index`, its options
  (:mod:`.index_options`) and footprint;
- an opened map without models: :class:`MapData` (:func:`open_map_data`);
- a build's decisions: :func:`plan_build` (:class:`BuildPlan`), poses in the map's frame (:func:`pose_rows`,
  :func:`pose_updates`), live places (:func:`check_key`, :func:`parse_pose`), runs (:func:`register_run`);
- locks: :func:`map_write_lock` (one writer per folder) and :class:`ReadWriteLock` (a served map);
- the files' binding (:mod:`.verify`: identities, fingerprints, paths kept inside the map) and a full check of
  every file (:func:`verify_map`, ``vprkit map verify``); :func:`clean_map_orphans` (temporary leftovers).
"""

from . import milvus as _milvus  # noqa: F401 - registers the "milvus" index backend (pymilvus is imported only when used)
from .audit import FileCheck, verification_report, verify_map
from .builds import CHANGE_POLICIES, DUPLICATE_POLICIES, BuildPlan, check_build_policies, plan_build
from .extensions import EXTENSIONS, EXTENSIONS_DIR, MapExtension
from .index import INDEX_FILE, FaissIndex, Index, build_index, serving_footprint, update_map_index
from .index_options import FAISS_OPTIONS, check_index_option, describe_options, faiss_options
from .lock import ReadWriteLock, map_write_lock
from .manifest import (
    BUILD_FILE,
    INDEX_MANIFEST_FILE,
    BuildRecord,
    IndexManifest,
    IndexSection,
    MapManifest,
    read_build_record,
    read_index_manifest,
    read_manifest,
    write_build_record,
    write_index_manifest,
    write_manifest,
)
from .mapdir import (
    FAILURES_FILE,
    LOCAL_CRS,
    MAP_FILE,
    VOCAB_FILE,
    MapData,
    check_build_settings,
    clean_map_orphans,
    crs_to_latlon,
    map_crs,
    next_run_id,
    open_map_data,
    read_json,
    read_map_info,
    register_run,
)
from .places import MapChangedError, PlaceExistsError, Pose, UnknownPlaceError, check_key, parse_pose
from .poses import PoseRows, PoseUpdate, pose_rows, pose_updates
from .store import ENTRY_FIELDS, LIVE_DIR, PENDING_DIR, POSE_DIMS, STORE_FILE, ExtrasReader, MapStore, StoredEntry
from .vectors import RowSource

__all__ = [
    "BUILD_FILE",
    "CHANGE_POLICIES",
    "DUPLICATE_POLICIES",
    "ENTRY_FIELDS",
    "EXTENSIONS",
    "EXTENSIONS_DIR",
    "FAILURES_FILE",
    "FAISS_OPTIONS",
    "INDEX_FILE",
    "INDEX_MANIFEST_FILE",
    "LIVE_DIR",
    "LOCAL_CRS",
    "MAP_FILE",
    "PENDING_DIR",
    "POSE_DIMS",
    "STORE_FILE",
    "VOCAB_FILE",
    "BuildPlan",
    "BuildRecord",
    "ExtrasReader",
    "FileCheck",
    "FaissIndex",
    "Index",
    "IndexManifest",
    "IndexSection",
    "MapChangedError",
    "MapData",
    "MapExtension",
    "MapManifest",
    "MapStore",
    "PlaceExistsError",
    "Pose",
    "PoseRows",
    "PoseUpdate",
    "ReadWriteLock",
    "RowSource",
    "StoredEntry",
    "UnknownPlaceError",
    "build_index",
    "check_build_policies",
    "check_build_settings",
    "check_index_option",
    "check_key",
    "clean_map_orphans",
    "crs_to_latlon",
    "describe_options",
    "faiss_options",
    "map_crs",
    "map_write_lock",
    "next_run_id",
    "open_map_data",
    "parse_pose",
    "plan_build",
    "pose_rows",
    "pose_updates",
    "read_build_record",
    "read_index_manifest",
    "read_json",
    "read_manifest",
    "read_map_info",
    "register_run",
    "serving_footprint",
    "update_map_index",
    "verification_report",
    "verify_map",
    "write_build_record",
    "write_index_manifest",
    "write_manifest",
]
