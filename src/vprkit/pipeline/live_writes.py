"""The writes of a live map, each all or nothing: a place added, removed or moved.

:class:`~vprkit.pipeline.live.LiveMap` computes what a write needs (descriptor, extension and
re-ranking payloads) before it takes the write lock, then calls one function here, which writes
in an order where every step can be undone and undoes the steps done so far when a later one fails:

    image file → re-ranking payload shards → store append → index (memory, then its files)
    → extensions' derived files → ``map.json``

So an add that answers an error leaves nothing behind — no row, no index entry, no file under
``live-images/``, no ``map.json`` change — and the same add can simply be retried. The store is the
commit: a crash after its append serves the place (the index, derived data, is rebuilt when its
count differs from the store's). A removal commits at the store too; what follows it (index files,
``map.json``) is derived or counted from the store, so a failure there is logged, not answered as a
failed removal of a place that is gone.

File-system failures become the project's errors: a full disk :class:`StorageFullError`, a read-only
or forbidden folder :class:`ReadOnlyMapError`, a name the file system refuses :class:`ConfigError`,
a key clashing with a file or folder already under ``live-images/`` :class:`PlaceExistsError`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import numpy as np

from ..errors import ConfigError, MapDamagedError, MapError, ReadOnlyMapError, StorageFullError
from ..io import atomic_path, clean_orphans
from ..maps import ENTRY_FIELDS, POSE_DIMS, PlaceExistsError, Pose, check_key, read_manifest, write_manifest

if TYPE_CHECKING:
    from ..retrieval import QueryBatch
    from .open import Map

logger = logging.getLogger(__name__)

# Where the images of places added live are kept (the map's own copy: re-ranking and explanations read them).
LIVE_IMAGES_DIR = "live-images"
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
# A key whose file would be a child of a place's file, or a folder's name: the file system says so with these.
CLASH_ERRNOS = frozenset({errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENOTEMPTY})
KNOWN_ERRNOS = (*FULL_ERRNOS, *READ_ONLY_ERRNOS, errno.ENAMETOOLONG)  # recognised in libraries' messages too
PROBE_BYTES = b"\0"


class LiveMap(Protocol):
    """What the writes use of :class:`vprkit.pipeline.live.LiveMap` (which calls them holding its write locks)."""

    map: "Map"
    dir: Path
    _row_of: dict[str, int]

    def _live_run(self, undo: "Undo") -> int: ...

    def _record(self, change: dict[str, str], count: int) -> None: ...

    def _kept_rerankers(self) -> list[Any]: ...


def _errno_of(exc: BaseException) -> int | None:
    """The OS error behind ``exc``: an :class:`OSError`'s number, or one a library names in its message (FAISS says
    "… (No space left on device)", HDF5 "errno = 28")."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    text = str(exc)
    named = re.search(r"errno\s*=\s*(\d+)", text)
    if named:
        return int(named.group(1))
    return next((n for n in KNOWN_ERRNOS if os.strerror(n) in text), None)


def storage_error(exc: BaseException, what: str) -> MapError | ConfigError | None:
    """The user-facing error of a file-system failure while ``what`` (None: not one the user can act on)."""
    number = _errno_of(exc) if isinstance(exc, (OSError, RuntimeError)) else None
    if number is None:
        return None
    reason = os.strerror(number)
    if number in FULL_ERRNOS:
        return StorageFullError(f"{what}: no space left on the map's disk ({reason}); nothing was written")
    if number in READ_ONLY_ERRNOS:
        return ReadOnlyMapError(f"{what}: the map's folder cannot be written ({reason}); nothing was written")
    if number == errno.ENAMETOOLONG:
        return ConfigError(f"{what}: the place id is too long for the file system ({reason}); use a shorter one")
    if number in CLASH_ERRNOS:
        return PlaceExistsError(f"{what}: the id conflicts with an existing place or file ({reason}); use another")
    return None


@contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn the file-system failures a user can act on into the project's errors (see :func:`storage_error`)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        translated = storage_error(exc, what)
        if translated is None:
            raise
        raise translated from None


class Undo:
    """The undo steps of a write so far, run last-first when a later step fails (each failure of an undo is logged)."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], Any]]] = []

    def push(self, what: str, step: Callable[[], Any]) -> None:
        self._steps.append((what, step))

    def rollback(self) -> None:
        for what, step in reversed(self._steps):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - the original failure is what the caller reports
                logger.error("could not undo %s (%s); the next start repairs what derives from the store", what, exc)
        self._steps.clear()


@dataclass
class PreparedPlace:
    """A place to add, with everything the models compute for it (done before the write lock)."""

    key: str
    data: bytes  # the file kept under live-images/
    vector: np.ndarray  # 1×dim global descriptor
    pose: Pose
    query: "QueryBatch"  # the image's batch and features (extension payloads for re-rankers built meanwhile)
    extras: list[dict[str, Any]] | None = None  # the map extensions' payloads (stored with the row)
    rerank_payloads: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # id(re-ranker) → payload

    @cached_property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.data).hexdigest().encode()

    @property
    def xy(self) -> np.ndarray:
        xy = self.pose.xy if self.pose.xy is not None else (np.nan, np.nan)
        return np.array([xy], np.float64).reshape(1, POSE_DIMS)


def check_place_path(root: Path, key: str) -> Path:
    """The file of ``key`` under ``root`` (``live-images/``), if the key does not clash with a file or folder there:
    a parent that is a place's file, or a folder of that name, is a :class:`PlaceExistsError`."""
    check_key(key)  # its parts fit in a file name (MAX_KEY_PART_BYTES) with the temporary name's extra bytes
    path = root / key
    parent = root
    for part in Path(key).parts[:-1]:
        parent = parent / part
        if parent.exists() and not parent.is_dir():
            raise PlaceExistsError(f"place id {key!r} conflicts with the existing place or file {part!r}")
    if path.is_dir():
        raise PlaceExistsError(f"place id {key!r} conflicts with an existing folder of places; use another id")
    return path


def write_image(path: Path, root: Path, data: bytes, undo: Undo) -> os.stat_result:
    """Write a place's image atomically; the undo removes it and the folders made for it."""
    made = [p for p in reversed(path.relative_to(root).parents) if not (root / p).exists()]
    undo.push(f"the folders of {path}", lambda: _remove_empty([root / p for p in reversed(made)]))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    undo.push(f"the image {path}", lambda: path.unlink(missing_ok=True))
    return path.stat()


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue


def clean_live_images(root: Path, older_than_s: float | None = None) -> int:
    """Remove temporary files left in ``live-images/`` (and its folders) by interrupted writes; returns how many.

    ``older_than_s`` None: every one (the caller holds the map's write lock, so no write is in progress)."""
    if not root.is_dir():
        return 0
    removed = 0
    for folder, _, _ in os.walk(root):
        removed += len(clean_orphans(folder, 0.0 if older_than_s is None else older_than_s))
    return removed


def probe_writable(folders: list[Path]) -> MapError | None:
    """Why the map cannot be written (a read-only folder, a full disk), found by writing a byte in each existing
    folder, or None."""
    for folder in folders:
        if not folder.is_dir():
            continue
        try:
            with atomic_path(folder / ".write-probe") as tmp:
                tmp.write_bytes(PROBE_BYTES)
            (folder / ".write-probe").unlink()
        except (OSError, MapError) as exc:
            found = exc if isinstance(exc, MapError) else storage_error(exc, f"writing to {folder.name or folder}")
            if found is not None:
                return found
            raise
    return None


# ---- the writes ------------------------------------------------------------------------------------
def commit_add(live: "LiveMap", place: PreparedPlace) -> None:
    """Add ``place`` (the caller holds the write locks): every step written, or none (see the module docs)."""
    key, data = place.key, live.map.data
    if key in live._row_of:
        raise PlaceExistsError(f"place {key!r} is already in the map; delete it or use another id")
    root = live.dir / LIVE_IMAGES_DIR
    with storage_errors(f"adding place {key!r}"):
        path = check_place_path(root, key)
    dim = getattr(data.index, "d", None)
    if dim is not None and place.vector.shape[1] != dim:
        raise MapDamagedError(
            f"the map's index holds {dim}-d descriptors, its model gives {place.vector.shape[1]}-d: the index does "
            f"not belong to the map (rebuild it); nothing was added"
        )
    undo = Undo()
    try:
        with storage_errors(f"adding place {key!r}"):
            run = live._live_run(undo)
            stat = write_image(path, root, place.data, undo)
            shards = _save_rerank_payloads(live, place, undo)
            entries = {
                "content_sha256": np.array([place.sha256]),
                "file_size": np.array([len(place.data)]),
                "file_mtime": np.array([stat.st_mtime]),
                "run": np.array([run]),
            }
            entries = {k: np.asarray(v, ENTRY_FIELDS[k][0]) for k, v in entries.items()}
            finalized: list[bool] = []  # extensions' derived files follow the store back if they were rewritten
            undo.push("the extensions' derived files", lambda: finalized and _finalize(live))
            _append_row(live, place, entries, undo)
            _index_row(live, place, entries, undo)
            finalized.append(True)
            _finalize(live)
            live._record({"added": key}, len(data.keys) + 1)
    except BaseException:
        undo.rollback()
        raise
    _remember(live, place)
    for reranker, shard in shards.items():
        payload = place.rerank_payloads[id(reranker)]
        reranker.candidates.row_added(key, place.sha256, payload, shard)
    for reranker in live._kept_rerankers():
        reranker.rows_changed(data.poses)


def _finalize(live: "LiveMap") -> None:
    """Let the map's extensions rewrite what they derive from the store (e.g. SegVLAD's segment index)."""
    for ext in live.map.extensions.values():
        ext.finalize(live.map.store, live.dir)


def _save_rerank_payloads(live: "LiveMap", place: PreparedPlace, undo: Undo) -> dict[Any, Path | None]:
    """Save the place's payload for every re-ranker kept with a prepared (saved) state, as one new shard each."""
    shards: dict[Any, Path | None] = {}
    for reranker in live._kept_rerankers():
        candidates = reranker.candidates
        if getattr(candidates, "stored", True):
            continue  # patches stored in the map: the extension's payload in the row serves it
        if id(reranker) not in place.rerank_payloads:  # built after the place was described: encode it now
            place.rerank_payloads[id(reranker)] = candidates.encode_place(place.query.batch, place.query.features)
        payload = place.rerank_payloads[id(reranker)]
        shard = candidates.save_place(place.key, place.sha256, payload)
        if shard is not None:
            undo.push(f"the re-ranking shard {shard}", lambda s=shard: s.unlink(missing_ok=True))
        shards[reranker] = shard
    return shards


def _append_row(live: "LiveMap", place: PreparedPlace, entries: dict[str, np.ndarray], undo: Undo) -> None:
    """The row in the store (the commit); the undo discards its append file (or removes the key if it was folded)."""
    store = live.map.store
    headings = None if place.pose.heading is None else np.array([place.pose.heading])
    stamps = None if place.pose.timestamp is None else np.array([place.pose.timestamp])
    written = store.append([place.key], place.vector, place.xy, headings, stamps, entries, place.extras)

    def discard() -> None:
        discard_append = getattr(store, "discard_append", None)
        if written is None or discard_append is None or not discard_append(written):
            store.remove([place.key])

    undo.push(f"the store row of {place.key!r}", discard)


def _index_row(live: "LiveMap", place: PreparedPlace, entries: dict[str, np.ndarray], undo: Undo) -> None:
    """The row in the index, in memory then on disk; the undo takes it out of memory and, if its files were saved,
    saves them again (an index save swaps its manifest last, so a failed one left the previous files in place; if the
    second save fails too, the files hold a row more than the store and the next open rebuilds them)."""
    index = live.map.index
    row = int(index.ntotal)
    saved: list[bool] = []
    # the row's key, run and pose too: an index that keeps them beside the vector (Milvus) stores them
    index.add(place.vector, [place.key], entries["run"], place.xy)

    def take_out() -> None:
        index.remove([row])
        if saved:
            index.save_to_map(live.dir)

    undo.push(f"the index row of {place.key!r}", take_out)
    index.save_to_map(live.dir)
    saved.append(True)


def _remember(live: "LiveMap", place: PreparedPlace) -> None:
    """The in-memory view of the row appended at the end (the store appends there too)."""
    data = live.map.data
    data.keys.append(place.key)
    data.poses = np.vstack([data.poses.reshape(-1, POSE_DIMS), place.xy])
    pose = place.pose
    data.headings = np.append(data.headings, np.nan if pose.heading is None else pose.heading)
    data.timestamps = np.append(data.timestamps, np.nan if pose.timestamp is None else pose.timestamp)
    live._row_of[place.key] = len(data.keys) - 1


def commit_remove(live: "LiveMap", key: str) -> None:
    """Remove ``key`` (the caller holds the write locks). The store's removal commits; what derives from it after
    is repaired from the store if it fails (logged), and the place's image goes last (a crash leaves a stray file,
    never a lost place)."""
    with storage_errors(f"removing place {key!r}"):
        rows = np.asarray(live.map.store.remove([key]), np.int64)
    data = live.map.data
    keep = np.ones(len(data.keys), bool)
    keep[rows] = False
    data.keys = [k for k, kept in zip(data.keys, keep) if kept]
    data.poses = data.poses[keep]
    data.headings, data.timestamps = data.headings[keep], data.timestamps[keep]
    live._row_of = {k: i for i, k in enumerate(data.keys)}
    for reranker in live._kept_rerankers():
        reranker.rows_changed(data.poses, rows)
    if len(rows):
        data.index.remove(rows)
    try:
        with storage_errors(f"recording the removal of {key!r}"):
            data.index.save_to_map(live.dir)
            _finalize(live)
            live._record({"removed": key}, len(data.keys))
    except (MapError, OSError, RuntimeError) as exc:  # RuntimeError: FAISS's failed writes
        logger.warning("place %r is removed, but %s; the index and counts are repaired from the store", key, exc)
    try:
        (live.dir / LIVE_IMAGES_DIR / key).unlink(missing_ok=True)
    except OSError as exc:  # the place is gone; its file stays as a stray (not served, not counted)
        logger.warning("place %r is removed, but its image could not be deleted (%s)", key, exc)


def commit_pose(live: "LiveMap", key: str, row: int, pose: Pose) -> None:
    """Set the pose of ``key`` (the caller holds the write locks); the old one is put back if recording fails."""
    data, store = live.map.data, live.map.store
    old = (data.poses[row].copy(), float(data.headings[row]), float(data.timestamps[row]))
    xy = None if pose.xy is None else np.asarray(pose.xy, np.float64)
    with storage_errors(f"setting the pose of {key!r}"):
        store.set_pose(key, xy, heading=pose.heading, timestamp=pose.timestamp)
        try:
            live._record({"pose": key}, len(data.keys))
        except BaseException:
            store.set_pose(key, old[0], heading=old[1], timestamp=old[2])
            raise
    if xy is not None:
        data.poses[row] = xy
        # an index that keeps poses beside the vectors (Milvus) follows the store
        data.index.set_poses([row], xy.reshape(1, POSE_DIMS))
        for reranker in live._kept_rerankers():
            reranker.rows_changed(data.poses)
    if pose.heading is not None:
        data.headings[row] = pose.heading
    if pose.timestamp is not None:
        data.timestamps[row] = pose.timestamp


def unregister_run(map_dir: Path, run: int) -> None:
    """Take a run record out of ``map.json`` again (the add that registered it failed)."""
    manifest = read_manifest(map_dir)
    manifest.runs = [r for r in manifest.runs if r.run != run]
    write_manifest(map_dir, manifest)
