"""The on-disk map store: global descriptors, keys, poses and per-image extras in HDF5.

Crash safety comes from never modifying a complete file in place: every change writes a whole new
file under a temporary name, flushes it to disk and renames it into place, so each file is either
whole or absent.

- A build appends *shards* (``pending/shard-NNNNNN.h5``). Readers do not see them until
  :meth:`MapStore.consolidate` merges ``store.h5`` and the shards into a new ``store.h5``, so an
  interrupted build resumes from the last shard and readers never see half a build. Keys already
  present are skipped, so a crash between the rename and the deletion duplicates nothing when the
  build is run again; when a key occurs twice the *last* occurrence wins (a shard re-encoding a
  changed image replaces its old row).
- A live map (the HTTP service) adds places with :meth:`MapStore.append`: each call writes one
  small *append file* (``live/append-NNNNNNNNN.h5``, numbered in order, never reused). Unlike
  shards, append files are part of the map as soon as they exist: every read (keys, descriptors,
  poses, entries, extras) takes ``store.h5`` and then the append files in order, so appended rows
  come last. ``consolidate()`` folds them into ``store.h5``, which records the highest append
  number it holds (attribute ``live_absorbed``): append files at or below it are ignored by readers
  and deleted, so a crash between the rename and the deletions duplicates nothing.
- :meth:`MapStore.remove`, :meth:`MapStore.set_pose` and :meth:`MapStore.update_poses` rewrite the
  one file holding the rows (or, when rows of several files are removed, fold everything into a
  new ``store.h5``): one rename, so they are atomic. Later rows move down, so row ``i`` is always
  ``keys()[i]``.

Writers hold the map's write lock (:func:`vprkit.maps.lock.map_write_lock`); readers take none. A
reader that must not see later changes — an opened map keeps keys, poses and an index in memory
and reads extras by row — calls :meth:`MapStore.pin`: the store then keeps the files of that moment
open and reads only them (a replaced or deleted file stays readable through its open handle), until
its own writes move it on. An unpinned store reads whatever is current at each call.

Layout of ``store.h5`` (and of shards and append files): ``/global`` N×dim (float16 or float32),
``/keys`` N UTF-8 strings (paths relative to the image folder), ``/poses`` N×2 metres (NaN when
unknown; the frame is the map's CRS in ``map.json``), ``/headings`` N degrees and ``/timestamps``
N seconds since the Unix epoch (NaN when unknown; stores written before they existed read as NaN)
and ``/extras/<group>/<row>/<array>`` for payloads such as re-ranking patches or SuperSegments.
Each row also records what it describes (:data:`ENTRY_FIELDS`): the SHA-256 of the image's bytes
(or decoded pixels), the file's size and modification time, and the build run it came from —
so a re-build can tell a changed picture from an unchanged one (maps written before these fields
existed read as unknown: empty hash, size −1, NaN time, run −1).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from bisect import bisect_right
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

import h5py
import numpy as np

from ..errors import MapDamagedError, MapError
from ..io import atomic_path, clean_orphans, storage_error
from .manifest import ensure_map_identity
from .verify import MAP_ID_ATTR

logger = logging.getLogger(__name__)

STORE_FILE = "store.h5"
PENDING_DIR = "pending"
# Append files of a live map: part of the map as soon as they exist (see the module docstring).
LIVE_DIR = "live"
LIVE_PREFIX = "append-"
LIVE_SUFFIX = ".h5"
LIVE_DIGITS = 9
# ``store.h5`` attribute: the highest append-file number folded into it.
ABSORBED_ATTR = "live_absorbed"
# Store file attribute: the SHA-256 of its descriptors and keys when written (see _ContentDigest).
CONTENT_ATTR = "content_sha256"
# An append folds the append files into ``store.h5`` once there are this many: each read opens every
# append file, so their number is bounded; folding rewrites the store (its cost grows with the map).
LIVE_FOLD_FILES = 128
# A reader lists ``store.h5`` and the append files, then opens them; a writer may fold and delete append
# files in between. The listing is retried this many times before giving up.
SNAPSHOT_ATTEMPTS = 5
# Rows copied per step when a store is rewritten (bounds memory for large maps).
COPY_CHUNK_ROWS = 4096


class StoredEntry(NamedTuple):
    """What the store records of one image: its content, its file, and the build run that added it."""

    sha256: str  # content SHA-256 (hex); empty for rows of maps built before content was recorded
    size: int  # file size in bytes
    mtime: float  # file modification time (seconds since the epoch)
    run: int  # the run (map.json → runs) the row came from; -1 for rows from before runs were recorded


def _create(parent: h5py.Group, name: str, data: np.ndarray | None = None, **options) -> h5py.Dataset:
    """``parent.create_dataset`` with HDF5's Fletcher-32 checksum on every chunk: a bit flipped on disk later is a
    read error (one :class:`MapDamagedError` line, through :func:`_damage_is_map_error`), never a wrong pose or
    descriptor answered in silence. The filter needs chunked storage, so empty and scalar datasets go without."""
    shape = options.get("shape", None if data is None else np.shape(data))
    if shape and all(int(side) > 0 for side in shape):
        options.setdefault("fletcher32", True)
    return parent.create_dataset(name, data=data, **options)


# Bytes per chunk of ``/global``: a row read verifies its whole chunk's checksum (and reads it whole), so chunks
# stay small enough that reading one shortlisted row costs a fraction of a millisecond (11520-d float16: 11 rows).
GLOBAL_CHUNK_BYTES = 256 * 1024
GLOBAL_CHUNK_MAX_ROWS = 1024


def _global_chunks(rows: int, dim: int, dtype: np.dtype) -> tuple[int, int] | None:
    """Chunk shape of ``/global`` for ``rows`` × ``dim`` descriptors of ``dtype`` (None: empty, not chunked)."""
    if not rows or not dim:
        return None
    per_chunk = GLOBAL_CHUNK_BYTES // max(1, dim * np.dtype(dtype).itemsize)
    return max(1, min(rows, GLOBAL_CHUNK_MAX_ROWS, per_chunk)), dim


def _key_array(keys: list[str]) -> np.ndarray:
    """Keys as fixed-length UTF-8 bytes: read without HDF5's variable-length heap (faster, and a damaged
    heap cannot make the reader loop). Stores written with variable-length strings still read."""
    encoded = [k.encode("utf-8") for k in keys]
    return np.array(encoded, dtype=f"S{max(1, max((len(e) for e in encoded), default=1))}")


def _decode_keys(raw: np.ndarray) -> list[str]:
    return [k.decode() if isinstance(k, bytes) else k for k in raw]


POSE_DIMS = 2
DTYPES = {"float16": np.float16, "float32": np.float32}
# Per-row scalar columns beside the pose; stores written before they existed read as NaN.
ROW_COLUMNS = ("headings", "timestamps")

Extras = Mapping[str, Mapping[str, np.ndarray]]  # group → array name → array, for one image
SHA256_HEX = 64
# Per-row record of what a descriptor describes; the value is what an old map (or an unknown field) reads as.
ENTRY_FIELDS: dict[str, tuple[np.dtype, object]] = {
    "content_sha256": (np.dtype(f"S{SHA256_HEX}"), b""),
    "file_size": (np.dtype(np.int64), -1),
    "file_mtime": (np.dtype(np.float64), np.nan),
    "run": (np.dtype(np.int32), -1),
}


def unknown_entries(n: int) -> dict[str, np.ndarray]:
    """Entry records of ``n`` rows whose origin is unknown (maps from before entries were recorded)."""
    return {name: np.full(n, fill, dtype) for name, (dtype, fill) in ENTRY_FIELDS.items()}


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk, so a file renamed into place survives a power cut."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


@contextmanager
def _atomic_h5(path: Path, map_id: str | None = None):
    """An h5py File on a temporary name in ``path``'s folder, closed, flushed and renamed over ``path`` on success.

    ``map_id``: the map the file belongs to, recorded as its :data:`MAP_ID_ATTR` attribute."""
    with atomic_path(path) as tmp:
        f = h5py.File(tmp, "w")
        try:
            if map_id is not None:
                f.attrs[MAP_ID_ATTR] = map_id
            yield f
        finally:
            f.close()
    _fsync_dir(path.parent)


def file_map_id(f: h5py.File) -> str | None:
    """The map a store file says it belongs to (None: written before identities)."""
    value = f.attrs.get(MAP_ID_ATTR)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value) if value is not None else None


@contextmanager
def _edited_copy(path: Path, map_id: str | None = None):
    """A copy of ``path`` opened for editing, renamed over ``path`` on success (readers keep the old file).

    ``map_id``: stamped on a file from before identities (the map's next write gives it one)."""
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            if map_id is not None and MAP_ID_ATTR not in f.attrs:
                f.attrs[MAP_ID_ATTR] = map_id  # a map from before identities gets its id at its next write
            yield f
    _fsync_dir(path.parent)


_DAMAGE = (KeyError, OSError, RuntimeError, TypeError, ValueError)  # HDF5's errors on a damaged file


def _open_checked(path: Path) -> h5py.File:
    """``path`` opened read-only with its layout checked; a damaged or foreign file is one :class:`MapError` line."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise MapDamagedError(f"{path} is not a readable map store ({exc}); rebuild the map") from None
    try:
        _check_layout(f, path)
    except _DAMAGE as exc:
        f.close()
        raise MapDamagedError(f"{path} is not a readable map store ({exc}); rebuild the map") from None
    return f


@contextmanager
def _damage_is_map_error(path: Path):
    """HDF5's errors on a damaged file, raised inside the block, become one :class:`MapError` line naming ``path``."""
    try:
        yield
    except _DAMAGE as exc:
        raise MapDamagedError(f"{path} is not a readable map store ({exc}); rebuild the map") from None


@contextmanager
def _open_for_reading(path: Path):
    """``path`` opened read-only and its layout checked; a damaged or foreign file is one :class:`MapError` line."""
    f = _open_checked(path)
    try:
        with _damage_is_map_error(path):
            yield f
    finally:
        f.close()


def _check_layout(f: h5py.File, path: Path) -> None:
    """The store's datasets exist, agree on the row count and fit in the file.

    A damaged header can claim billions of rows; reading them would allocate (or loop) before
    failing. Every stored byte is in the file uncompressed, so a dataset claiming more than the
    file's size is damage.
    """
    size = max(1, path.stat().st_size)
    for name in ("keys", "global", "poses"):
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise ValueError(f"no /{name} dataset")
    n = f["keys"].shape[0] if f["keys"].ndim == 1 else -1
    datasets = (
        [f["keys"], f["global"], f["poses"]]
        + [f[c] for c in ROW_COLUMNS if c in f]
        + [f[f"entries/{k}"] for k in ENTRY_FIELDS if f"entries/{k}" in f]
    )
    for ds in datasets:
        if ds.ndim < 1 or ds.shape[0] != n:
            raise ValueError(f"/{ds.name.lstrip('/')} has shape {ds.shape}, the store {n} rows")
        itemsize = 1 if h5py.check_string_dtype(ds.dtype) else ds.dtype.itemsize  # a string takes at least a byte
        if ds.size * itemsize > size:
            raise ValueError(f"/{ds.name.lstrip('/')} claims {ds.shape} {ds.dtype} but the file holds {size:,} bytes")
    if f["global"].ndim != 2 or f["poses"].ndim != 2 or f["poses"].shape[1] != POSE_DIMS:
        raise ValueError(f"/global {f['global'].shape} and /poses {f['poses'].shape} do not have the store's layout")


def _column(f: h5py.File, name: str, n: int) -> np.ndarray:
    """A per-row float column (``headings``/``timestamps``) of an open store file; NaN when it predates the column."""
    return f[name][()].astype(np.float64) if name in f else np.full(n, np.nan)


def _entries_of(f: h5py.File, n: int) -> dict[str, np.ndarray]:
    out = unknown_entries(n)
    for name in ENTRY_FIELDS:
        if f"entries/{name}" in f:
            out[name] = f[f"entries/{name}"][()]
    return out


def _checked_entries(entries: Mapping[str, np.ndarray] | None, n: int) -> dict[str, np.ndarray]:
    records = unknown_entries(n)
    for name, values in (entries or {}).items():
        if name not in ENTRY_FIELDS:
            raise MapError(f"unknown entry field {name!r}; known: {sorted(ENTRY_FIELDS)}")
        values = np.asarray(values, ENTRY_FIELDS[name][0])
        if values.shape != (n,):
            raise MapError(f"entry field {name!r} has shape {values.shape}, expected ({n},)")
        records[name] = values
    return records


def _checked_column(values: np.ndarray | None, n: int, what: str) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan)
    values = np.asarray(values, np.float64).reshape(-1)
    if values.shape != (n,):
        raise MapError(f"{what} has {values.shape[0]} values for {n} rows")
    return values


def _write_rows(
    f: h5py.File,
    keys: list[str],
    vectors: np.ndarray,
    poses: np.ndarray,
    dtype,
    headings: np.ndarray | None = None,
    timestamps: np.ndarray | None = None,
) -> None:
    n = len(keys)
    _create(f, "keys", data=_key_array(keys))
    stored = vectors.astype(dtype)
    _create(f, "global", data=stored, chunks=_global_chunks(n, vectors.shape[1], stored.dtype))
    digest = _ContentDigest()
    digest.add_rows(stored)
    f.attrs[CONTENT_ATTR] = digest.hexdigest(keys)
    _create(f, "poses", data=poses.astype(np.float64))
    _create(f, "headings", data=_checked_column(headings, n, "headings"))
    _create(f, "timestamps", data=_checked_column(timestamps, n, "timestamps"))


class _ContentDigest:
    """SHA-256 of a store file's descriptors (as stored, row order) and keys: recorded as :data:`CONTENT_ATTR`
    when the file is written, so a bit flipped or a row edited later is found (poses may change; they are not in it)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(b"vprkit-store-content-1\n")

    def add_rows(self, rows: np.ndarray) -> None:
        self._hash.update(np.ascontiguousarray(rows).astype(np.asarray(rows).dtype.newbyteorder("<")).tobytes())

    def hexdigest(self, keys: Sequence[str]) -> str:
        h = self._hash.copy()
        h.update("\n".join(keys).encode("utf-8"))
        return h.hexdigest()


def content_digest(f: h5py.File) -> str:
    """The :class:`_ContentDigest` of an open store file, read in bounded chunks (a full read of its descriptors)."""
    digest = _ContentDigest()
    n = int(f["keys"].shape[0])
    for start in range(0, n, COPY_CHUNK_ROWS):
        digest.add_rows(f["global"][start : start + COPY_CHUNK_ROWS])
    return digest.hexdigest(_decode_keys(f["keys"][()]))


def check_content(f: h5py.File, path: Path) -> bool | None:
    """Whether the file's rows are those it recorded when written (None: written before content was recorded);
    a :class:`MapDamagedError` when they differ."""
    recorded = f.attrs.get(CONTENT_ATTR)
    if recorded is None:
        return None
    recorded = recorded.decode() if isinstance(recorded, bytes) else str(recorded)
    if content_digest(f) != recorded:
        raise MapDamagedError(
            f"{path} changed since it was written (its descriptors or keys differ from their checksum); "
            f"restore it or rebuild the map"
        )
    return True


def _identity(paths: Sequence[Path]) -> tuple:
    """What tells one set of store files from another: each file's name, inode and modification time."""
    out = []
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            return ()
        out.append((p.name, st.st_ino, st.st_mtime_ns))
    return tuple(out)


class _Snapshot:
    """The store's files at one moment (``store.h5`` then the append files), open for reading.

    Shared by a pinned store and the readers it hands out (from several threads, e.g. a service's readers);
    the files close when the last user releases it.
    """

    def __init__(self, paths: list[Path], files: list[h5py.File], seqs: list[int], absorbed: int):
        self.paths, self.files, self.seqs, self.absorbed = paths, files, seqs, absorbed
        self.identity = _identity(paths)
        self.counts = [int(f["keys"].shape[0]) for f in files]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int64)
        self.users = 1
        self._lock = threading.Lock()

    @property
    def n(self) -> int:
        return int(self.offsets[-1])

    def dim(self) -> int | None:
        """The descriptor dimension (None for an empty store)."""
        dims = [f["global"].shape[1] for f, c in zip(self.files, self.counts) if c]
        return dims[0] if dims else (self.files[0]["global"].shape[1] if self.files else None)

    def locate(self, row: int) -> tuple[int, int]:
        """(file number, row within it) of a store row."""
        if not 0 <= row < self.n:
            raise MapError(f"row {row} is outside the map's {self.n} rows")
        i = bisect_right(self.offsets.tolist(), row) - 1
        return i, row - int(self.offsets[i])

    def acquire(self) -> "_Snapshot":
        with self._lock:
            if self.users <= 0:
                raise MapError("the map store was closed")
            self.users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            last = self.users == 0
        if last:
            for f in self.files:
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - closing an already closed HDF5 id
                    pass


class MapStore:
    """Reads, appends to and edits a map's descriptor store. ``dtype`` is ``float16`` or ``float32``."""

    def __init__(self, map_dir: str | os.PathLike, dtype: str = "float32"):
        self.dir = Path(map_dir)
        if dtype not in DTYPES:
            raise MapError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.path = self.dir / STORE_FILE
        self.pending = self.dir / PENDING_DIR
        self.live = self.dir / LIVE_DIR
        self._pinned: _Snapshot | None = None

    def __getstate__(self) -> dict:
        """Pickled (e.g. to a worker process) without the pinned files: open handles do not travel; the copy
        reads the current files (pin it again there if it must not see later changes)."""
        return {**self.__dict__, "_pinned": None}

    # ---- snapshots ------------------------------------------------------------------------
    def _live_files(self) -> list[tuple[int, Path]]:
        """(number, path) of the append files on disk, in order (absorbed ones included)."""
        if not self.live.is_dir():
            return []
        out = []
        for p in self.live.glob(f"{LIVE_PREFIX}*{LIVE_SUFFIX}"):
            digits = p.name[len(LIVE_PREFIX) : -len(LIVE_SUFFIX)]
            if digits.isdigit():
                out.append((int(digits), p))
        return sorted(out)

    def _open_snapshot(self) -> _Snapshot:
        """The current files, opened. A file folded and deleted by a writer meanwhile makes it look again."""
        for _ in range(SNAPSHOT_ATTEMPTS):
            paths: list[Path] = []
            files: list[h5py.File] = []
            seqs: list[int] = []
            absorbed = 0
            trying = self.path
            try:
                if self.path.exists():
                    base = _open_checked(self.path)
                    paths.append(self.path), files.append(base), seqs.append(0)
                    absorbed = int(base.attrs.get(ABSORBED_ATTR, 0))
                for seq, p in self._live_files():
                    if seq > absorbed:
                        trying = p
                        f = _open_checked(p)
                        paths.append(p), files.append(f), seqs.append(seq)
                return _Snapshot(paths, files, seqs, absorbed)
            except MapError:
                for f in files:
                    f.close()
                if trying.exists():
                    raise  # damage, not a file folded and deleted under us
        raise MapError(f"{self.dir}: the store kept changing while it was being opened; try again")

    def _current(self) -> _Snapshot:
        """The pinned snapshot (one more user), or the current files opened for the caller alone."""
        pinned = self._pinned
        if pinned is not None:
            try:
                return pinned.acquire()
            except MapError:  # re-pinned by a writer meanwhile
                if self._pinned is not None and self._pinned is not pinned:
                    return self._current()
                raise
        return self._open_snapshot()

    @contextmanager
    def _reading(self) -> Iterator[_Snapshot]:
        """The pinned snapshot, or the current files opened for this one read."""
        snap = self._current()
        try:
            with _damage_is_map_error(self.dir / STORE_FILE):
                yield snap
        finally:
            snap.release()

    def pin(self) -> "MapStore":
        """Read only the files of this moment from now on (until this store's own writes), whatever other writers do."""
        old, self._pinned = self._pinned, self._open_snapshot()
        if old is not None:  # readers still using it keep it open until they finish
            old.release()
        return self

    def is_current(self) -> bool:
        """Whether the pinned files are still the map's (always True unpinned): False once another writer —
        another process, a ``map build`` — changed the store, so a holder of in-memory keys should reopen the map."""
        if self._pinned is None:
            return True
        absorbed = 0
        if self.path.exists():
            try:
                with h5py.File(self.path, "r") as f:
                    absorbed = int(f.attrs.get(ABSORBED_ATTR, 0))
            except OSError:
                return False
        paths = ([self.path] if self.path.exists() else []) + [p for q, p in self._live_files() if q > absorbed]
        return _identity(paths) == self._pinned.identity

    def check_belongs(self, map_id: str | None, descriptor_dim: int | None = None, check_keys: bool = True) -> None:
        """Refuse (one :class:`MapDamagedError` line) store files that are not this map's.

        A file whose recorded identity differs from ``map_id`` (copied from another map), descriptors of
        another dimension than ``descriptor_dim`` (another preset's files), and (``check_keys``) a key held
        twice (an append log replayed or copied: every such place would be answered twice). Files from
        before identities carry none and are accepted. Reads attributes, shapes and keys only.
        """
        with self._reading() as snap:
            seen: dict[str, Path] = {}
            for path, f in zip(snap.paths, snap.files):
                owner = file_map_id(f)
                if map_id is not None and owner is not None and owner != map_id:
                    raise MapDamagedError(
                        f"{path} belongs to another map (map id {owner}, this map's {map_id}); "
                        f"restore this map's own file or rebuild the map"
                    )
                if path != self.path:  # an append file: one add's rows, cheap to check in full
                    check_content(f, path)
                dim = f["global"].shape[1] if f["global"].ndim == 2 else None
                if descriptor_dim is not None and dim is not None and len(f["keys"]) and dim != descriptor_dim:
                    raise MapDamagedError(
                        f"{path} holds {dim}-d descriptors, the map's settings make {descriptor_dim}-d "
                        f"(a file of another preset); restore this map's own file or rebuild the map"
                    )
                for key in _decode_keys(f["keys"][()]) if check_keys else ():
                    if key in seen:
                        where = "twice in it" if seen[key] == path else f"also in {seen[key]}"
                        raise MapDamagedError(
                            f"{path} holds key {key!r} {where}: the store files overlap (a copied or replayed "
                            f"append file?); remove the file that does not belong"
                        )
                    seen[key] = path

    def close(self) -> None:
        """Release a pinned snapshot's files (reads then see the current files again)."""
        if self._pinned is not None:
            self._pinned.release()
            self._pinned = None

    def _after_write(self) -> None:
        if self._pinned is not None:
            self.pin()

    # ---- writing -------------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(self.pending.glob("shard-*.h5")) if self.pending.is_dir() else []

    def write_shard(
        self,
        keys: list[str],
        vectors: np.ndarray,
        poses: np.ndarray | None = None,
        extras: list[Extras] | None = None,
        entries: Mapping[str, np.ndarray] | None = None,
        headings: np.ndarray | None = None,
        timestamps: np.ndarray | None = None,
    ) -> Path:
        """Append one batch of images as an atomic shard (rows ``keys``, descriptors ``vectors``).

        ``entries`` are the rows' :data:`ENTRY_FIELDS` (content hash, file size and time, run);
        ``headings`` (degrees) and ``timestamps`` (epoch seconds) default to NaN.
        """
        if len(keys) != len(vectors):
            raise MapError(f"{len(keys)} keys but {len(vectors)} descriptors")
        self.pending.mkdir(parents=True, exist_ok=True)
        existing = self.shards()
        index = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.pending / f"shard-{index:06d}.h5"
        poses = np.full((len(keys), POSE_DIMS), np.nan) if poses is None else np.asarray(poses, np.float64)
        records = _checked_entries(entries, len(keys))
        with _atomic_h5(path) as f:
            _write_rows(f, list(keys), np.asarray(vectors), poses, self.dtype, headings, timestamps)
            for name, values in records.items():
                _create(f, f"entries/{name}", data=values)
            for row, extra in enumerate(extras or []):
                _write_extra(f, row, extra, self.dtype)
        return path

    def append(
        self,
        keys: Sequence[str],
        vectors: np.ndarray,
        poses: np.ndarray | None = None,
        headings: np.ndarray | None = None,
        timestamps: np.ndarray | None = None,
        entries: Mapping[str, np.ndarray] | None = None,
        extras: list[Extras] | None = None,
    ) -> Path | None:
        """Add rows at the end of the map, durably: on return they are on disk and every read includes them.

        Returns the append file written (None when ``keys`` is empty): :meth:`discard_append` undoes exactly
        this append, for a caller whose later step (the index, the images) failed.

        ``vectors`` n×dim (the store's dimension), ``poses`` n×2 metres in the map's CRS (NaN
        unknown), ``headings`` degrees and ``timestamps`` epoch seconds (None: unknown),
        ``entries`` the rows' :data:`ENTRY_FIELDS`, ``extras`` one payload per row (or None). A key
        already in the map (or twice in ``keys``) is a :class:`MapError` and nothing is written.
        The caller holds the map's write lock.
        """
        keys = [str(k) for k in keys]
        n = len(keys)
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != n:
            raise MapError(f"{n} keys need {n}×dim descriptors, got {vectors.shape}")
        poses = (
            np.full((n, POSE_DIMS), np.nan) if poses is None else np.asarray(poses, np.float64).reshape(-1, POSE_DIMS)
        )
        if poses.shape != (n, POSE_DIMS):
            raise MapError(f"{n} keys need {n}×{POSE_DIMS} poses, got {poses.shape}")
        if extras is not None and len(extras) != n:
            raise MapError(f"{n} keys but {len(extras)} extras payloads")
        headings = _checked_column(headings, n, "headings")
        timestamps = _checked_column(timestamps, n, "timestamps")
        records = _checked_entries(entries, n)
        if len(set(keys)) != n:
            twice = sorted({k for k in keys if keys.count(k) > 1})
            raise MapError(f"keys given twice: {', '.join(twice[:5])}")
        if not n:
            return None
        snap = self._open_snapshot()  # the current map, whatever this store has pinned
        try:
            present = set()
            for f in snap.files:
                present.update(_decode_keys(f["keys"][()]))
            dim = snap.dim()
            live_seq = max([snap.absorbed, *(s for s, _ in self._live_files())])
        finally:
            snap.release()
        clash = [k for k in keys if k in present]
        if clash:
            raise MapError(
                f"{len(clash)} key(s) already in the map ({', '.join(repr(k) for k in clash[:5])}); "
                f"remove them first or choose other names"
            )
        if dim is not None and snap.n and vectors.shape[1] != dim:
            raise MapError(f"descriptors are {vectors.shape[1]}-d, the map's {dim}-d")
        map_id = ensure_map_identity(self.dir)
        try:
            self.live.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise (storage_error(exc, self.live) or exc) from None
        clean_orphans(self.live)
        path = self.live / f"{LIVE_PREFIX}{live_seq + 1:0{LIVE_DIGITS}d}{LIVE_SUFFIX}"
        with _atomic_h5(path, map_id) as f:
            _write_rows(f, keys, vectors, poses, self.dtype, headings, timestamps)
            for name, values in records.items():
                _create(f, f"entries/{name}", data=values)
            for row, extra in enumerate(extras or []):
                _write_extra(f, row, extra, self.dtype)
        if len(snap.files) + 1 - (1 if self.path.exists() else 0) >= LIVE_FOLD_FILES:
            try:
                self._fold(include_pending=False)
            except (MapError, OSError) as exc:  # the rows are durable in their append file: fold next time
                logger.warning(
                    "could not fold the append files into %s (%s); they are folded at a later add", self.path, exc
                )
        self._after_write()
        return path

    def discard_append(self, path: str | os.PathLike) -> bool:
        """Undo the append that wrote ``path`` (:meth:`append`'s return), if it is still the last unfolded append file.

        For a caller making an add all-or-nothing: when a step after the append fails, the rows go again.
        Returns whether the file was deleted (False: already folded into ``store.h5`` or followed by later
        appends — then remove the keys with :meth:`remove`). The caller holds the map's write lock.
        """
        path = Path(path)
        unfolded = self._unabsorbed()
        if not unfolded or unfolded[-1].name != path.name or path.parent.resolve() != self.live.resolve():
            return False
        path.unlink()
        _fsync_dir(self.live)
        self._after_write()
        return True

    def consolidate(self) -> int:
        """Merge ``store.h5``, the append files and pending shards into a new ``store.h5`` atomically; returns row count."""
        if not self.shards() and not self._unabsorbed():
            self._delete_absorbed()
            return len(self)
        return self._fold(include_pending=True)

    def current_files(self) -> list[Path]:
        """The files that make the map's rows now: ``store.h5`` (when it exists) and the unfolded append files."""
        return ([self.path] if self.path.exists() else []) + self._unabsorbed()

    def _unabsorbed(self) -> list[Path]:
        absorbed = 0
        if self.path.exists():
            with _open_for_reading(self.path) as f:
                absorbed = int(f.attrs.get(ABSORBED_ATTR, 0))
        return [p for s, p in self._live_files() if s > absorbed]

    def _delete_absorbed(self) -> None:
        """Delete append files already folded into ``store.h5`` (left by a crash after the fold's rename)."""
        if not self.path.exists():
            return
        with _open_for_reading(self.path) as f:
            absorbed = int(f.attrs.get(ABSORBED_ATTR, 0))
        for seq, p in self._live_files():
            if seq <= absorbed:
                p.unlink(missing_ok=True)

    def _fold(self, include_pending: bool, drop: frozenset[int] = frozenset()) -> int:
        """Rewrite the map (plus pending shards) into one new ``store.h5`` without rows ``drop``; returns its rows."""
        shards = self.shards() if include_pending else []
        for folder in (self.dir, self.pending, self.live):  # temporary files of killed writers
            clean_orphans(folder)
        snap = self._open_snapshot()
        try:
            live_seq = max([snap.absorbed, *(s for s, _ in self._live_files())])
            sources: list[tuple[Path, h5py.File, int]] = [
                (p, f, int(o)) for p, f, o in zip(snap.paths, snap.files, snap.offsets)
            ]
            opened = []
            try:
                for s in shards:
                    opened.append(_open_checked(s))
                    sources.append((s, opened[-1], -1))
                total = _rewrite(self.path, sources, self.dtype, drop, live_seq, ensure_map_identity(self.dir))
            finally:
                for f in opened:
                    f.close()
        finally:
            snap.release()
        for s in shards:
            s.unlink()
        self._delete_absorbed()
        _fsync_dir(self.dir)
        self._after_write()
        return total

    def remove(self, keys: Sequence[str]) -> np.ndarray:
        """Delete the rows of ``keys`` atomically and durably; returns the removed rows (ascending).

        Later rows move down (row ``i`` is always ``keys()[i]``), as :meth:`Index.remove` renumbers.
        An unknown key is a :class:`MapError` and nothing changes. The caller holds the map's write lock.
        """
        wanted = list(dict.fromkeys(str(k) for k in keys))
        if not wanted:
            return np.zeros(0, np.int64)
        if self.shards():
            raise MapError(
                f"{self.dir} holds an interrupted build ({PENDING_DIR}/); finish it (re-run the same "
                f"`vprkit map build`) before removing places"
            )
        snap = self._open_snapshot()
        try:
            row_of: dict[str, int] = {}
            for f, off in zip(snap.files, snap.offsets):
                for i, k in enumerate(_decode_keys(f["keys"][()])):
                    row_of[k] = int(off) + i
            unknown = [k for k in wanted if k not in row_of]
            if unknown:
                raise MapError(f"{len(unknown)} key(s) not in the map: {', '.join(repr(k) for k in unknown[:5])}")
            rows = np.array(sorted(row_of[k] for k in wanted), np.int64)
            holders = {snap.locate(int(r))[0] for r in rows}
            single = len(holders) == 1
            if single:
                i = holders.pop()
                path, f, off = snap.paths[i], snap.files[i], int(snap.offsets[i])
                local = frozenset(int(r) - off for r in rows)
                absorbed = int(f.attrs.get(ABSORBED_ATTR, 0)) if path == self.path else 0
                _rewrite(path, [(path, f, 0)], self.dtype, local, absorbed, ensure_map_identity(self.dir))
        finally:
            snap.release()
        if single:
            self._after_write()
        else:
            self._fold(include_pending=False, drop=frozenset(int(r) for r in rows))
        return rows

    def set_pose(
        self, key: str, xy: tuple[float, float] | None, heading: float | None = None, timestamp: float | None = None
    ) -> int:
        """Set one row's pose, atomically and durably; returns its row.

        ``xy`` (easting, northing) metres in the map's CRS, ``heading`` degrees, ``timestamp`` epoch
        seconds. ``None`` leaves a value as it is; NaN makes it unknown. An unknown key is a
        :class:`MapError`. The caller holds the map's write lock.
        """
        if xy is not None and np.asarray(xy, np.float64).shape != (POSE_DIMS,):
            raise MapError(f"a pose is (easting, northing), got {xy!r}")
        snap = self._open_snapshot()
        try:
            found = None
            for i, (f, off) in enumerate(zip(snap.files, snap.offsets)):
                names = _decode_keys(f["keys"][()])
                if key in names:
                    found = (i, names.index(key), int(off))
            if found is None:
                raise MapError(f"key {key!r} is not in the map")
            i, local, off = found
            path = snap.paths[i]
        finally:
            snap.release()
        with _edited_copy(path, ensure_map_identity(self.dir)) as f:
            n = int(f["keys"].shape[0])
            if xy is not None:
                f["poses"][local] = np.asarray(xy, np.float64)
            for name, value in (("headings", heading), ("timestamps", timestamp)):
                if value is None:
                    continue
                if name not in f:
                    _create(f, name, data=np.full(n, np.nan))
                f[name][local] = float(value)
        self._after_write()
        return off + local

    def update_poses(
        self,
        keys: Sequence[str],
        xy: np.ndarray,
        skip: Iterable[str] = (),
        headings: np.ndarray | None = None,
        timestamps: np.ndarray | None = None,
    ) -> int:
        """Set the poses (and headings/timestamps, when given) of the stored rows among ``keys``, except ``skip``.

        ``xy`` (and the optional columns) are aligned with ``keys``. Returns how many rows changed.
        Each store file holding a changed row is replaced atomically.
        """
        row_of = {k: i for i, k in enumerate(keys)}
        skip = set(skip)
        stored = self.keys()
        current = self.read_poses()
        pick = np.array([row_of.get(k, -1) if k not in skip else -1 for k in stored], np.int64)
        has = pick >= 0
        new = current.copy()
        new[has] = np.asarray(xy, np.float64)[pick[has]]
        cols = {}
        for name, given, read in (
            ("headings", headings, self.read_headings),
            ("timestamps", timestamps, self.read_timestamps),
        ):
            if given is None:
                continue
            now = read()
            col = now.copy()
            col[has] = np.asarray(given, np.float64)[pick[has]]
            cols[name] = (now, col)
        differs = ~_same(new, current).all(axis=1)
        for now, col in cols.values():
            differs |= ~_same(col, now)
        if differs.any():
            self._replace_columns(new, {k: v[1] for k, v in cols.items()}, differs)
        return int(differs.sum())

    def replace_poses(self, poses: np.ndarray) -> None:
        """Replace every row's pose (N×2 metres, NaN unknown), atomically per store file."""
        poses = np.asarray(poses, np.float64)
        n = len(self)
        self._require()
        if poses.shape != (n, POSE_DIMS):
            raise MapError(f"poses must be {n}×{POSE_DIMS} for this map, got {poses.shape}")
        self._replace_columns(poses, {}, np.ones(n, bool))

    def _replace_columns(self, poses: np.ndarray, columns: Mapping[str, np.ndarray], changed: np.ndarray) -> None:
        """Write ``poses`` and ``columns`` (full-length) into each store file that holds a ``changed`` row."""
        snap = self._open_snapshot()
        try:
            parts = [(p, int(o), int(c)) for p, o, c in zip(snap.paths, snap.offsets, snap.counts)]
        finally:
            snap.release()
        for path, off, count in parts:
            if not changed[off : off + count].any():
                continue
            with _edited_copy(path, ensure_map_identity(self.dir)) as f:
                f["poses"][...] = poses[off : off + count]
                for name, values in columns.items():
                    if name in f:
                        f[name][...] = values[off : off + count]
                    else:
                        _create(f, name, data=values[off : off + count])
        self._after_write()

    # ---- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        if not self.path.exists() and not self._live_files() and self._pinned is None:
            return 0
        with self._reading() as snap:
            return snap.n

    def dim(self) -> int | None:
        """The descriptors' dimension (None for a map without a store yet)."""
        if self._pinned is None and not self.path.exists() and not self._live_files():
            return None
        with self._reading() as snap:
            return snap.dim()

    def keys(self, include_pending: bool = False) -> list[str]:
        """Keys in row order (``include_pending``: plus those of shards not yet consolidated)."""
        out: list[str] = []
        if self.path.exists() or self._live_files() or self._pinned is not None:
            with self._reading() as snap:
                for f in snap.files:
                    out.extend(_decode_keys(f["keys"][()]))
        for p in self.shards() if include_pending else []:
            with _open_for_reading(p) as f:
                out.extend(_decode_keys(f["keys"][()]))
        return out

    def read_global(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Global descriptors as float32 (all rows, or ``rows``)."""
        self._require()
        with self._reading() as snap:
            dim = snap.dim() or 0
            if rows is None:
                parts = [f["global"][()].astype(np.float32) for f, c in zip(snap.files, snap.counts) if c]
                return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
            rows = np.asarray(rows, np.int64).reshape(-1)
            if rows.size and (rows.min() < 0 or rows.max() >= snap.n):
                raise MapError(f"rows outside the map's {snap.n} rows")
            uniq, inverse = np.unique(rows, return_inverse=True)
            out = np.empty((uniq.size, dim), np.float32)
            for f, lo, hi in zip(snap.files, snap.offsets[:-1], snap.offsets[1:]):
                sel = (uniq >= lo) & (uniq < hi)
                if sel.any():
                    out[sel] = f["global"][uniq[sel] - lo].astype(np.float32)
            return out[inverse]

    def _concat(self, read) -> np.ndarray:
        self._require()
        with self._reading() as snap:
            return np.concatenate([read(f, c) for f, c in zip(snap.files, snap.counts)])

    def read_poses(self) -> np.ndarray:
        """Each row's (easting, northing) in metres, N×2, NaN where unknown."""
        if self.path.exists() or self._live_files() or self._pinned is not None:
            return self._concat(lambda f, c: f["poses"][()].astype(np.float64).reshape(c, POSE_DIMS))
        self._require()
        return np.zeros((0, POSE_DIMS))

    def read_headings(self) -> np.ndarray:
        """Each row's heading in degrees (N,), NaN where unknown (and for stores written before headings were kept)."""
        return self._concat(lambda f, c: _column(f, "headings", c))

    def read_timestamps(self) -> np.ndarray:
        """Each row's time in seconds since the Unix epoch (N,), NaN where unknown."""
        return self._concat(lambda f, c: _column(f, "timestamps", c))

    def read_entries(self) -> dict[str, np.ndarray]:
        """Each row's :data:`ENTRY_FIELDS` (unknown values for maps written before they were recorded)."""
        self._require()
        with self._reading() as snap:
            parts = [_entries_of(f, c) for f, c in zip(snap.files, snap.counts)]
        return {
            name: np.concatenate([p[name] for p in parts]) if parts else unknown_entries(0)[name]
            for name in ENTRY_FIELDS
        }

    def entry_table(self, include_pending: bool = True) -> dict[str, "StoredEntry"]:
        """key → :class:`StoredEntry` (content SHA-256 hex, file size, file time, run) of every stored row (and pending shard rows).

        When a key occurs twice the last occurrence wins, as in :meth:`consolidate`.
        """
        table: dict[str, StoredEntry] = {}

        def add(f: h5py.File) -> None:
            keys = _decode_keys(f["keys"][()])
            cols = _entries_of(f, len(keys))
            for i, key in enumerate(keys):
                table[key] = StoredEntry(
                    cols["content_sha256"][i].decode(),
                    int(cols["file_size"][i]),
                    float(cols["file_mtime"][i]),
                    int(cols["run"][i]),
                )

        if self.path.exists() or self._live_files():
            snap = self._open_snapshot()
            try:
                for f in snap.files:
                    add(f)
            finally:
                snap.release()
        for p in self.shards() if include_pending else []:
            with _open_for_reading(p) as f:
                add(f)
        return table

    def open_extras(self) -> "ExtrasReader":
        """A reader that keeps the files open, for reading many per-image extras (of this store's snapshot)."""
        self._require()
        return ExtrasReader._over(self._current())

    def _require(self) -> None:
        if self._pinned is None and not self.path.exists() and not self._live_files():
            raise MapError(f"{self.dir} has no {STORE_FILE}: build the map first (vprkit map build)")

    def extra_bytes(self) -> dict[str, float]:
        """Average bytes per image of each extras group (for ``vprkit map info``)."""
        if not self.path.exists():
            return {}
        out: dict[str, float] = {}
        with self._reading() as snap:
            n = max(1, snap.n)
            dims = [f["global"] for f in snap.files if f["global"].ndim == 2]
            out["global"] = dims[0].dtype.itemsize * dims[0].shape[1] if dims else 0
            totals: dict[str, int] = {}
            for f in snap.files:
                if "extras" not in f:
                    continue
                for group in f["extras"]:
                    total = 0

                    def visit(_, obj):
                        nonlocal total
                        if isinstance(obj, h5py.Dataset):
                            total += obj.size * obj.dtype.itemsize

                    f["extras"][group].visititems(visit)
                    totals[group] = totals.get(group, 0) + total
            out.update({g: t / n for g, t in totals.items()})
        return out


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise equality where NaN equals NaN (an unknown value that stays unknown is unchanged)."""
    return (a == b) | (np.isnan(a) & np.isnan(b))


def _rewrite(
    dest: Path,
    sources: list[tuple[Path, h5py.File, int]],
    dtype,
    drop: frozenset[int],
    absorbed: int,
    map_id: str | None = None,
) -> int:
    """Write the rows of ``sources`` (open files; ``offset`` −1 for shards) into a new ``dest`` atomically.

    Rows ``drop`` (numbered by the sources' offsets; shards are never dropped) are left out; when a
    key occurs twice the last occurrence wins. ``absorbed`` is recorded as the highest append file
    held. Copies at most :data:`COPY_CHUNK_ROWS` rows at a time. Returns the row count.
    """
    listed = [(src, f, off, _decode_keys(f["keys"][()])) for src, f, off in sources]
    last = {k: (si, i) for si, (_, _, _, keys) in enumerate(listed) for i, k in enumerate(keys)}
    plans, total, dim = [], 0, None
    for si, (src, f, off, keys) in enumerate(listed):
        take = [i for i, k in enumerate(keys) if last[k] == (si, i) and (off < 0 or off + i not in drop)]
        if keys:
            d = f["global"].shape[1]
            if dim is not None and d != dim:
                raise MapError(f"{src} holds {d}-d descriptors, the map {dim}-d; remove it and rebuild")
            dim = d
        plans.append((f, np.asarray(take, np.int64), keys))
        total += len(take)
    if dim is None:
        dims = [f["global"].shape[1] for _, f, _ in sources if f["global"].ndim == 2]
        dim = dims[0] if dims else 0
    with _atomic_h5(dest, map_id) as out:
        out.attrs[ABSORBED_ATTR] = int(absorbed)
        gds = _create(
            out,
            "global",
            shape=(total, dim),
            dtype=dtype,
            chunks=_global_chunks(total, dim, np.dtype(dtype)),
        )
        pds = _create(out, "poses", shape=(total, POSE_DIMS), dtype=np.float64)
        cds = {name: _create(out, name, shape=(total,), dtype=np.float64, fillvalue=np.nan) for name in ROW_COLUMNS}
        eds = {
            name: _create(out, f"entries/{name}", shape=(total,), dtype=edtype, fillvalue=fill)
            for name, (edtype, fill) in ENTRY_FIELDS.items()
        }
        all_keys: list[str] = []
        digest = _ContentDigest()
        row = 0
        for f, take, keys in plans:
            if not take.size:
                continue
            for start in range(0, take.size, COPY_CHUNK_ROWS):
                idx = take[start : start + COPY_CHUNK_ROWS]
                at = slice(row + start, row + start + idx.size)
                block = f["global"][idx].astype(dtype)
                gds[at] = block
                digest.add_rows(block)
                pds[at] = f["poses"][idx]
                for name, ds in cds.items():
                    if name in f:
                        ds[at] = f[name][idx]
                for name, ds in eds.items():
                    if f"entries/{name}" in f:
                        ds[at] = f[f"entries/{name}"][idx]
            if "extras" in f:
                for group in f["extras"]:
                    g = f["extras"][group]
                    for j, i in enumerate(take.tolist()):
                        if str(i) in g:
                            f.copy(g[str(i)], out.require_group(f"extras/{group}"), name=str(row + j))
            all_keys.extend(keys[i] for i in take.tolist())
            row += take.size
        _create(out, "keys", data=_key_array(all_keys))
        out.attrs[CONTENT_ATTR] = digest.hexdigest(all_keys)
    return total


def _write_extra(f: h5py.File, row: int, extra: Extras, dtype) -> None:
    for group, arrays in extra.items():
        g = f.require_group(f"extras/{group}/{row}")
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.dtype.kind == "f" and arr.dtype.itemsize > np.dtype(dtype).itemsize:
                arr = arr.astype(dtype)  # the store's dtype caps precision; narrower payloads stay as chosen
            _create(g, name, data=arr)


class ExtrasReader:
    """Open store files for random access to per-image extras (re-ranking patches, segments …) by row.
    Use as a context manager or close(). It reads extras only: descriptors, keys and poses are :class:`MapStore`'s.

    ``ExtrasReader(path)`` reads one file; :meth:`MapStore.open_extras` gives one over the whole store
    (``store.h5`` and its append files, the rows numbered as :meth:`MapStore.keys`).
    """

    def __init__(self, path: Path):
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise MapDamagedError(f"{path} is not a readable map store ({exc}); rebuild the map") from None
        self._snap = _Snapshot([Path(path)], [f], [0], 0)

    @classmethod
    def _over(cls, snap: _Snapshot) -> "ExtrasReader":
        reader = cls.__new__(cls)
        reader._snap = snap
        return reader

    @property
    def file(self) -> h5py.File:
        """The first file (``store.h5``), for callers that read it directly."""
        return self._snap.files[0]

    def extras(self, group: str, row: int) -> dict[str, np.ndarray]:
        try:
            i, local = self._snap.locate(int(row))
            g = self._snap.files[i][f"extras/{group}/{local}"]
        except (KeyError, MapError):
            raise MapError(f"map row {row} has no '{group}' data: rebuild the map with it enabled") from None
        return {name: g[name][()] for name in g}

    def has_group(self, group: str) -> bool:
        return any(f"extras/{group}" in f for f in self._snap.files)

    def close(self) -> None:
        if self._snap is not None:
            self._snap.release()
            self._snap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
