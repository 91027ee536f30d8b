"""The map directory as data: its files, its recorded settings, and opening it for reading.

``MAP_DIR/map.json`` (settings, counts, vocabulary checksum; read and written as the typed
:class:`~vprkit.maps.manifest.MapManifest`), ``vocabulary.npz``, ``store.h5`` (descriptors, keys,
poses, per-image extras), ``index.faiss`` and ``failures.json``. Opening a map
here loads no model: :class:`MapData` is what retrieval, re-ranking and extensions read — the
index, the store, keys, poses and where the images are — and the composer adds the models.

A map opened ``read_only`` writes nothing: a missing or stale index is rebuilt in memory instead of
on disk, so any number of processes can open one map at once (HDF5 files are opened without
file locking for reading; writers only ever replace files by renaming complete ones).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..aggregation.vlad import Vocabulary
from ..config import Config
from ..datasets.pose_values import usable_pose_columns
from ..datasets.poses import LOCAL_CRS, utm_to_latlon
from ..errors import ImageReadError, MapError, VocabularyMismatchError
from ..images import ImageSource, MappedFiles
from ..io import ORPHAN_AGE_S, clean_orphans
from .extensions import EXTENSIONS_DIR
from .index import INDEX_FILE, SHARD_DIR, FaissIndex, Index, build_index, load_index
from .manifest import (
    BUILD_FILE,
    MAP_FILE,
    VOCAB_FILE,
    MapManifest,
    RunRecord,
    read_build_record,
    read_json,
    read_manifest,
    read_map_info,
    write_manifest,
)
from .store import LIVE_DIR, PENDING_DIR, MapStore

logger = logging.getLogger(__name__)

FAILURES_FILE = "failures.json"
# Names other modules import from here (the records themselves live in vprkit.maps.manifest).
__all__ = [
    "BUILD_FILE",
    "FAILURES_FILE",
    "INDEX_FILE",
    "LOCAL_CRS",
    "MAP_FILE",
    "VOCAB_FILE",
    "FaissIndex",
    "MapData",
    "MapManifest",
    "changed_entries",
    "check_build_settings",
    "clean_map_orphans",
    "crs_to_latlon",
    "map_crs",
    "next_run_id",
    "open_map_data",
    "read_json",
    "read_map_info",
    "register_run",
    "settings_differences",
]


def settings_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Where two settings trees differ, as ``path: old → new`` lines (nested dicts compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += settings_differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [f"{path or 'settings'}: {old!r} → {new!r}"]


def check_build_settings(map_dir: Path, config: Config) -> None:
    """Refuse to add to a map (complete or interrupted) whose recorded settings differ from ``config``'s.

    The message names every setting that differs. Runtime settings (memory budget, device, batch size …)
    may differ: they do not change what is stored.
    """
    d = Path(map_dir)
    if (d / MAP_FILE).exists():
        recorded, path, state = read_manifest(d), d / MAP_FILE, "holds a map"
    else:
        recorded, path, state = read_build_record(d), d / BUILD_FILE, "holds an interrupted build"
    if recorded is None:
        return
    diffs = settings_differences(recorded.settings(path).map_settings(), config.map_settings())
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise MapError(
            f"{map_dir} {state} with other settings ({shown}); use the same settings to add images, or another --out"
        )


@dataclass
class MapData:
    """An opened map without its models: settings, vocabulary, store, index, keys and poses."""

    dir: Path
    info: dict[str, Any]
    config: Config
    vocabulary: Any  # aggregation.vlad.Vocabulary | None (kept untyped: maps sit beside aggregation)
    store: MapStore
    index: Index
    keys: list[str]
    poses: np.ndarray
    read_only: bool = True
    headings: np.ndarray | None = None  # (N,) degrees, NaN unknown (filled from the store when not given)
    timestamps: np.ndarray | None = None  # (N,) seconds since the Unix epoch, NaN unknown

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.headings is None:
            self.headings = np.full(n, np.nan)
        if self.timestamps is None:
            self.timestamps = np.full(n, np.nan)

    @property
    def crs(self) -> dict[str, Any]:
        """The frame of :attr:`poses` (``map.json`` → ``crs``): ``{"kind": "utm", "zone", "hemisphere", "epsg"}``
        or ``{"kind": "local", "unit": "m"}`` (maps from before the CRS was recorded read as local metres)."""
        return map_crs(self.info)

    def latlon(self, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """WGS84 (lat, lon) degrees of ``rows`` (all rows by default), len×2, NaN where the pose is unknown.

        A :class:`MapError` when the map's poses are not in a UTM frame (local metres have no lat/lon).
        """
        xy = self.poses if rows is None else self.poses[np.asarray(rows, np.int64)]
        return crs_to_latlon(self.crs, xy)

    def position_latlon(self, xy: Sequence[float] | np.ndarray | None) -> tuple[float, float] | None:
        """WGS84 (lat, lon) of one position (easting, northing) in the map's frame — an estimate, not a row —
        or None when the position is unknown or the map's frame is local metres (no lat/lon to give)."""
        if xy is None or self.crs.get("kind") != "utm":
            return None
        lat, lon = crs_to_latlon(self.crs, np.asarray(xy, np.float64).reshape(1, 2))[0]
        return None if not (np.isfinite(lat) and np.isfinite(lon)) else (float(lat), float(lon))

    @property
    def images_root(self) -> Path | None:
        """The folder the map's images were read from (None for a map built from decoded frames)."""
        root = self.info.get("images_root")
        return None if root is None else Path(root)

    @property
    def images(self) -> MappedFiles:
        """The map's own images (for re-ranking on the fly and explanations), each in the folder of the run that added it."""
        records = {r.get("run"): r for r in self.info.get("runs", [])}
        if (
            self.dir is not None and (self.dir / MAP_FILE).exists()
        ):  # runs registered since it was opened (live additions)
            try:
                records.update({r.run: r.to_dict() for r in read_manifest(self.dir).runs if r.run not in records})
            except MapError:
                pass  # the opened record still serves
        runs = self.store.read_entries()["run"]
        paths = {}
        for key, run in zip(self.keys, runs):
            record = records.get(int(run), {})
            root = record.get("images_root") or (self.info.get("images_root") if int(run) < 0 else None)
            if root is not None:
                prefix = record.get("key_prefix") or ""  # a duplicate name kept as a new place: "runN/<name>"
                paths[key] = Path(root) / (key[len(prefix) :] if prefix and key.startswith(prefix) else key)
        if not paths:
            raise MapError(f"{self.dir} was built from decoded frames: its images are not on disk")
        return MappedFiles(paths)

    def __len__(self) -> int:
        return len(self.keys)


def open_map_data(map_dir: str | os.PathLike, read_only: bool = True) -> MapData:
    """Open ``map_dir``'s data; with ``read_only=False`` a missing or stale index is rebuilt and saved.

    The store must belong to the map (its identity, its descriptors' dimension, no key twice): otherwise a
    :class:`MapDamagedError` refuses the map. Derived files that do not belong (the index, its shards, the
    descriptors copy: size, fingerprint, identity or dimension) are rebuilt from the store with a warning.
    A writable open also removes temporary files left by killed writers (:func:`clean_map_orphans`).
    """
    d = Path(map_dir)
    manifest = read_manifest(d)
    info, config = manifest.to_dict(), manifest.settings(d / MAP_FILE)
    vocabulary = Vocabulary.load(d / VOCAB_FILE) if (d / VOCAB_FILE).exists() else None
    recorded = manifest.vocabulary
    if vocabulary is not None and recorded is not None and vocabulary.checksum != recorded.checksum:
        raise VocabularyMismatchError(f"{d / VOCAB_FILE} changed since the map was built; rebuild the map")
    if not read_only:
        clean_map_orphans(d)
    store = MapStore(d, config.store_dtype).pin()  # this map's rows stay as opened, whatever a writer does later
    keys = store.keys()
    store.check_belongs(manifest.map_id, manifest.descriptor_dim, check_keys=len(set(keys)) != len(keys))
    index = _belonging_index(d, config, store, len(keys))
    if index is None:  # missing, damaged, foreign or stale: rebuild from the store
        index = build_index(store.read_global(), config, d)
        if not read_only:
            index.save_to_map(d)
    # values an older vprkit (or a hand edit) stored out of range are unknown here: an easting of 1e160 would
    # overflow every spread and mean computed from it (one warning names `vprkit map set-pose`)
    poses, headings, stamps = usable_pose_columns(
        store.read_poses(), store.read_headings(), store.read_timestamps(), map_crs(info), str(d)
    )
    return MapData(d, info, config, vocabulary, store, index, keys, poses, read_only, headings, stamps)


def _belonging_index(d: Path, config: Config, store: MapStore, rows: int) -> Index | None:
    """The saved index when it is this store's (rows and dimension), else None (with a warning when it exists)."""
    index = load_index(d, config)  # derived data: None when missing, damaged or another map's
    if index is None:
        return None
    dim, index_dim = store.dim(), getattr(index, "d", None)
    if index.ntotal != rows or (dim is not None and index_dim is not None and index_dim != dim):
        logger.warning(
            "the index of %s holds %d rows of %s-d, the store %d of %s-d; rebuilding it from the store",
            d,
            index.ntotal,
            index_dim,
            rows,
            dim,
        )
        return None
    return index


def clean_map_orphans(map_dir: str | os.PathLike, older_than_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Remove temporary files left by killed writers in the map's folders (the folder itself, the append log,
    pending shards, index shards, extension folders). The live service's image folder is its own
    (``io.clean_orphans_tree``). Returns what was removed; a folder that cannot be written is left as it is."""
    d = Path(map_dir)
    folders = [d, d / LIVE_DIR, d / PENDING_DIR, d / SHARD_DIR, d / EXTENSIONS_DIR]
    if (d / EXTENSIONS_DIR).is_dir():
        folders += sorted(p for p in (d / EXTENSIONS_DIR).iterdir() if p.is_dir() and not p.is_symlink())
    removed: list[Path] = []
    for folder in folders:
        try:
            removed += clean_orphans(folder, older_than_s)
        except OSError as exc:  # a read-only folder: its leftovers stay (harmless; they are never read)
            logger.debug("could not clean %s (%s)", folder, exc)
    return removed


def changed_entries(
    source: ImageSource,
    keys: Sequence[str],
    stored: Mapping[str, tuple[str, int, float, int]],
    runs: Sequence[Mapping[str, Any]],
    root: str | None,
    log: Callable[[str], None],
) -> list[str]:
    """Keys whose image differs from the stored entry's content.

    An image from the same folder with the same size and time as recorded is taken as unchanged
    (as make and rsync do); otherwise its bytes are hashed and compared. Entries of maps written
    before content was recorded cannot be checked: they are counted in the log.
    """
    root_of_run = {r.get("run"): r.get("images_root") for r in runs}
    changed, unknown = [], 0
    for key in keys:
        sha, size, mtime, run = stored[key]
        if not sha:
            unknown += 1
            continue
        stat = source.stat(key)
        if stat is not None and root is not None and root_of_run.get(run) == root and stat == (size, mtime):
            continue
        try:
            if source.fingerprint(key).sha256 != sha:
                changed.append(key)
        except ImageReadError:
            continue  # unreadable now: the build reports it when it reads the image
    if unknown:
        log(
            f"{unknown} image(s) of the map were stored without a content record (an older vprkit); not checked for changes"
        )
    return changed


# ---- runs and the coordinate frame ----------------------------------------------------------------
def map_crs(info: Mapping[str, Any]) -> dict[str, Any]:
    """The CRS recorded in a ``map.json`` (local metres when none is)."""
    crs = info.get("crs")
    return dict(crs) if isinstance(crs, dict) and crs.get("kind") else dict(LOCAL_CRS)


def crs_to_latlon(crs: Mapping[str, Any], xy: np.ndarray) -> np.ndarray:
    """(lat, lon) degrees of easting/northing ``xy`` (n×2) in ``crs``; a :class:`MapError` unless it is UTM."""
    if crs.get("kind") != "utm":
        raise MapError(f"the map's poses are in a local frame ({crs}); they have no latitude/longitude")
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    out = np.full(xy.shape, np.nan)
    known = np.isfinite(xy).all(axis=1)
    if known.any():
        lat, lon = utm_to_latlon(xy[known], int(crs["zone"]), crs.get("hemisphere", "N") == "N")
        out[known] = np.stack([lat, lon], axis=1)
    return out


def next_run_id(runs: Sequence[Mapping[str, Any]]) -> int:
    """The id of the next run: one more than the largest recorded (ids are never reused)."""
    return 1 + max((int(r.get("run", -1)) for r in runs), default=-1)


def register_run(map_dir: str | os.PathLike, images_root: str | None, note: str) -> int:
    """Record a new run (a source of images, e.g. the live service's ``MAP_DIR/live-images``) in ``map.json``.

    The record is appended atomically; returns its id, to store in the rows' ``run`` entry so
    :attr:`MapData.images` finds their files. The caller holds the map's write lock.
    """
    d = Path(map_dir)
    manifest = read_manifest(d)
    run = RunRecord(
        run=next_run_id([r.to_dict() for r in manifest.runs]),
        images_root=None if images_root is None else str(images_root),
        note=str(note),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    manifest.runs.append(run)
    write_manifest(d, manifest)
    return run.run
