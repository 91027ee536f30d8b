"""The on-disk map store: global descriptors, keys, poses and per-image extras in HDF5.

Crash safety comes from never modifying a complete file in place:

- a build appends *shards* (``pending/shard-NNNNNN.h5``), each written to a temporary name and
  renamed into place, so a shard is either whole or absent;
- :meth:`MapStore.consolidate` merges ``store.h5`` and the shards into a new file and renames it
  over ``store.h5``, then deletes the shards. Keys already present are skipped, so a crash between
  the rename and the deletion duplicates nothing when the build is run again. When a key occurs
  twice the *last* occurrence wins, so a shard re-encoding a changed image replaces its old row.

An interrupted build therefore resumes from the last shard, and readers only ever see the last
consolidated ``store.h5``.

Layout of ``store.h5``: ``/global`` N×dim (float16 or float32), ``/keys`` N UTF-8 strings (paths
relative to the image folder), ``/poses`` N×2 metres (NaN when unknown) and
``/extras/<group>/<row>/<array>`` for payloads such as re-ranking patches or SuperSegments.
Each row also records what it describes (:data:`ENTRY_FIELDS`): the SHA-256 of the image's bytes
(or decoded pixels), the file's size and modification time, and the build run it came from —
so a re-build can tell a changed picture from an unchanged one (maps written before these fields
existed read as unknown: empty hash, size −1, NaN time, run −1).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from ..errors import MapError
from ..io import atomic_path, clean_orphans

STORE_FILE = "store.h5"
PENDING_DIR = "pending"
def _key_array(keys: list[str]) -> np.ndarray:
    """Keys as fixed-length UTF-8 bytes: read without HDF5's variable-length heap (faster, and a damaged
    heap cannot make the reader loop). Stores written with variable-length strings still read."""
    encoded = [k.encode("utf-8") for k in keys]
    return np.array(encoded, dtype=f"S{max(1, max((len(e) for e in encoded), default=1))}")
POSE_DIMS = 2
DTYPES = {"float16": np.float16, "float32": np.float32}

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


@contextmanager
def _atomic_h5(path: Path):
    """An h5py File on a temporary name in ``path``'s folder, closed and renamed over ``path`` on success."""
    with atomic_path(path) as tmp:
        f = h5py.File(tmp, "w")
        try:
            yield f
        finally:
            f.close()


@contextmanager
def _open_for_reading(path: Path):
    """``path`` opened read-only and its layout checked; a damaged or foreign file is one :class:`MapError` line."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise MapError(f"{path} is not a readable map store ({exc}); rebuild the map") from None
    try:
        try:
            _check_layout(f, path)
            yield f
        except (KeyError, OSError, RuntimeError, TypeError, ValueError) as exc:  # HDF5's errors on a damaged file
            raise MapError(f"{path} is not a readable map store ({exc}); rebuild the map") from None
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
    datasets = [f["keys"], f["global"], f["poses"]] + [f[f"entries/{k}"] for k in ENTRY_FIELDS if f"entries/{k}" in f]
    for ds in datasets:
        if ds.ndim < 1 or ds.shape[0] != n:
            raise ValueError(f"/{ds.name.lstrip('/')} has shape {ds.shape}, the store {n} rows")
        itemsize = 1 if h5py.check_string_dtype(ds.dtype) else ds.dtype.itemsize  # a string takes at least a byte
        if ds.size * itemsize > size:
            raise ValueError(f"/{ds.name.lstrip('/')} claims {ds.shape} {ds.dtype} but the file holds {size:,} bytes")
    if f["global"].ndim != 2 or f["poses"].ndim != 2 or f["poses"].shape[1] != POSE_DIMS:
        raise ValueError(f"/global {f['global'].shape} and /poses {f['poses'].shape} do not have the store's layout")


def _write_rows(f: h5py.File, keys: list[str], vectors: np.ndarray, poses: np.ndarray, dtype) -> None:
    f.create_dataset("keys", data=_key_array(keys))
    chunk_rows = max(1, min(len(keys), 1024))
    f.create_dataset("global", data=vectors.astype(dtype), chunks=(chunk_rows, vectors.shape[1]) if len(keys) else None)
    f.create_dataset("poses", data=poses.astype(np.float64))


class MapStore:
    """Reads and appends to a map's descriptor store. ``dtype`` is ``float16`` or ``float32``."""

    def __init__(self, map_dir: str | os.PathLike, dtype: str = "float32"):
        self.dir = Path(map_dir)
        if dtype not in DTYPES:
            raise MapError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.path = self.dir / STORE_FILE
        self.pending = self.dir / PENDING_DIR

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
    ) -> Path:
        """Append one batch of images as an atomic shard (rows ``keys``, descriptors ``vectors``).

        ``entries`` are the rows' :data:`ENTRY_FIELDS` (content hash, file size and time, run).
        """
        if len(keys) != len(vectors):
            raise MapError(f"{len(keys)} keys but {len(vectors)} descriptors")
        self.pending.mkdir(parents=True, exist_ok=True)
        existing = self.shards()
        index = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.pending / f"shard-{index:06d}.h5"
        poses = np.full((len(keys), POSE_DIMS), np.nan) if poses is None else np.asarray(poses, np.float64)
        records = unknown_entries(len(keys))
        for name, values in (entries or {}).items():
            if name not in ENTRY_FIELDS:
                raise MapError(f"unknown entry field {name!r}; known: {sorted(ENTRY_FIELDS)}")
            records[name] = np.asarray(values, ENTRY_FIELDS[name][0])
        with _atomic_h5(path) as f:
            _write_rows(f, list(keys), np.asarray(vectors), poses, self.dtype)
            for name, values in records.items():
                f.create_dataset(f"entries/{name}", data=values)
            for row, extra in enumerate(extras or []):
                _write_extra(f, row, extra, self.dtype)
        return path

    def consolidate(self) -> int:
        """Merge ``store.h5`` and pending shards into a new ``store.h5`` atomically; returns row count."""
        shards = self.shards()
        if not shards:
            return len(self)
        for folder in (self.dir, self.pending):  # temporary files of killed builds
            clean_orphans(folder)
        sources = ([self.path] if self.path.exists() else []) + shards
        listed = []  # (file, keys), in order
        for src in sources:
            with _open_for_reading(src) as f:
                listed.append((src, [k.decode() if isinstance(k, bytes) else k for k in f["keys"][()]]))
        last = {k: (si, i) for si, (_, keys) in enumerate(listed) for i, k in enumerate(keys)}  # last occurrence wins
        with _atomic_h5(self.path) as out:
            plans = []  # (file, rows to take)
            total, dim = 0, None
            for si, (src, keys) in enumerate(listed):
                take = [i for i, k in enumerate(keys) if last[k] == (si, i)]
                with _open_for_reading(src) as f:
                    if len(keys):
                        d = f["global"].shape[1]
                        if dim is not None and d != dim:
                            raise MapError(f"{src} holds {d}-d descriptors, the map {dim}-d; remove it and rebuild")
                        dim = d
                plans.append((src, take, keys))
                total += len(take)
            dim = dim or 0
            gds = out.create_dataset("global", shape=(total, dim), dtype=self.dtype, chunks=(max(1, min(total, 1024)), dim) if total and dim else None)
            pds = out.create_dataset("poses", shape=(total, POSE_DIMS), dtype=np.float64)
            eds = {name: out.create_dataset(f"entries/{name}", shape=(total,), dtype=dtype, fillvalue=fill)
                   for name, (dtype, fill) in ENTRY_FIELDS.items()}
            all_keys: list[str] = []
            row = 0
            for src, take, keys in plans:
                if not take:
                    continue
                with _open_for_reading(src) as f:
                    idx = np.asarray(take)
                    gds[row : row + len(take)] = f["global"][()][idx].astype(self.dtype)
                    pds[row : row + len(take)] = f["poses"][()][idx]
                    for name, ds in eds.items():
                        if f"entries/{name}" in f:
                            ds[row : row + len(take)] = f[f"entries/{name}"][()][idx]
                    if "extras" in f:
                        for group in f["extras"]:
                            g = f["extras"][group]
                            for j, i in enumerate(take):
                                if str(i) in g:
                                    f.copy(g[str(i)], out.require_group(f"extras/{group}"), name=str(row + j))
                    all_keys.extend(keys[i] for i in take)
                row += len(take)
            out.create_dataset("keys", data=_key_array(all_keys))
        for s in shards:
            s.unlink()
        return total

    # ---- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        if not self.path.exists():
            return 0
        with _open_for_reading(self.path) as f:
            return int(f["keys"].shape[0])

    def keys(self, include_pending: bool = False) -> list[str]:
        """Keys in row order (``include_pending``: plus those of shards not yet consolidated)."""
        files = ([self.path] if self.path.exists() else []) + (self.shards() if include_pending else [])
        out: list[str] = []
        for p in files:
            try:
                with _open_for_reading(p) as f:
                    out.extend(k.decode() if isinstance(k, bytes) else k for k in f["keys"][()])
            except OSError as exc:
                raise MapError(f"{p} is not a readable map store ({exc}); delete it and rebuild") from None
        return out

    def read_global(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Global descriptors as float32 (all rows, or ``rows``)."""
        self._require()
        with _open_for_reading(self.path) as f:
            data = f["global"]
            if rows is None:
                return data[()].astype(np.float32)
            uniq, inverse = np.unique(np.asarray(rows), return_inverse=True)
            return data[uniq].astype(np.float32)[inverse]

    def read_entries(self) -> dict[str, np.ndarray]:
        """Each row's :data:`ENTRY_FIELDS` (unknown values for maps written before they were recorded)."""
        self._require()
        with _open_for_reading(self.path) as f:
            out = unknown_entries(int(f["keys"].shape[0]))
            for name in ENTRY_FIELDS:
                if f"entries/{name}" in f:
                    out[name] = f[f"entries/{name}"][()]
        return out

    def entry_table(self, include_pending: bool = True) -> dict[str, tuple[str, int, float, int]]:
        """key → (content SHA-256 hex, file size, file time, run) of every stored row (and pending shard rows).

        When a key occurs twice the last occurrence wins, as in :meth:`consolidate`.
        """
        files = ([self.path] if self.path.exists() else []) + (self.shards() if include_pending else [])
        table: dict[str, tuple[str, int, float, int]] = {}
        for p in files:
            try:
                with _open_for_reading(p) as f:
                    keys = [k.decode() if isinstance(k, bytes) else k for k in f["keys"][()]]
                    cols = unknown_entries(len(keys))
                    for name in ENTRY_FIELDS:
                        if f"entries/{name}" in f:
                            cols[name] = f[f"entries/{name}"][()]
            except (OSError, KeyError) as exc:
                raise MapError(f"{p} is not a readable map store ({exc}); delete it and rebuild") from None
            for i, key in enumerate(keys):
                table[key] = (cols["content_sha256"][i].decode(), int(cols["file_size"][i]),
                              float(cols["file_mtime"][i]), int(cols["run"][i]))
        return table

    def update_poses(self, keys: Sequence[str], xy: np.ndarray, skip: Iterable[str] = ()) -> int:
        """Set the poses of the stored rows among ``keys`` (``xy`` aligned with them), except ``skip``; returns how many changed."""
        row_of = {k: i for i, k in enumerate(keys)}
        skip = set(skip)
        current = self.read_poses()
        new = current.copy()
        for row, key in enumerate(self.keys()):
            if key in row_of and key not in skip:
                new[row] = xy[row_of[key]]
        differs = ~((new == current) | (np.isnan(new) & np.isnan(current))).all(axis=1)
        if differs.any():
            self.replace_poses(new)
        return int(differs.sum())

    def replace_poses(self, poses: np.ndarray) -> None:
        """Replace every row's pose (N×2 metres, NaN unknown), atomically: a copy is edited and renamed over the store."""
        self._require()
        poses = np.asarray(poses, np.float64)
        n = len(self)
        if poses.shape != (n, POSE_DIMS):
            raise MapError(f"poses must be {n}×{POSE_DIMS} for this map, got {poses.shape}")
        import shutil

        with atomic_path(self.path) as tmp:
            shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "r+") as f:
                f["poses"][...] = poses

    def read_poses(self) -> np.ndarray:
        self._require()
        with _open_for_reading(self.path) as f:
            return f["poses"][()]

    def open(self) -> "StoreReader":
        """A reader that keeps the file open, for reading many per-image extras."""
        self._require()
        return StoreReader(self.path)

    def _require(self) -> None:
        if not self.path.exists():
            raise MapError(f"{self.dir} has no {STORE_FILE}: build the map first (vprkit map build)")

    def extra_bytes(self) -> dict[str, float]:
        """Average bytes per image of each extras group (for ``vprkit map info``)."""
        if not self.path.exists():
            return {}
        out: dict[str, float] = {}
        with _open_for_reading(self.path) as f:
            n = max(1, f["keys"].shape[0])
            out["global"] = f["global"].dtype.itemsize * f["global"].shape[1] if f["global"].ndim == 2 else 0
            if "extras" in f:
                for group in f["extras"]:
                    total = 0

                    def visit(_, obj):
                        nonlocal total
                        if isinstance(obj, h5py.Dataset):
                            total += obj.size * obj.dtype.itemsize

                    f["extras"][group].visititems(visit)
                    out[group] = total / n
        return out


def _write_extra(f: h5py.File, row: int, extra: Extras, dtype) -> None:
    for group, arrays in extra.items():
        g = f.require_group(f"extras/{group}/{row}")
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.dtype.kind == "f" and arr.dtype.itemsize > np.dtype(dtype).itemsize:
                arr = arr.astype(dtype)  # the store's dtype caps precision; narrower payloads stay as chosen
            g.create_dataset(name, data=arr)


class StoreReader:
    """Open ``store.h5`` for random access to per-image extras. Use as a context manager or close()."""

    def __init__(self, path: Path):
        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            raise MapError(f"{path} is not a readable map store ({exc}); rebuild the map") from None

    def extras(self, group: str, row: int) -> dict[str, np.ndarray]:
        try:
            g = self.file[f"extras/{group}/{int(row)}"]
        except KeyError:
            raise MapError(f"map row {row} has no '{group}' data: rebuild the map with it enabled") from None
        return {name: g[name][()] for name in g}

    def has_group(self, group: str) -> bool:
        return f"extras/{group}" in self.file

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
