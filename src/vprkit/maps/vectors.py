"""The map's full-precision descriptors as one memory-mapped ``.npy`` file (``descriptors.npy``).

Why a second copy beside ``store.h5``: a compressed index (PQ, SQ, PCA …) answers from codes of a
few dozen bytes, and its shortlist is re-scored exactly with the original descriptors. Those must be
readable by row at random and without loading the map into RAM — an HDF5 dataset is slow for
scattered rows and is rewritten whole on every consolidation; a flat ``.npy`` memory map reads a row
with one page fault and lets the operating system's page cache, not the process, hold what is hot.

Writes keep the map's crash-safety rules:

- :func:`write_descriptors` writes a new file under a temporary name (chunk by chunk, bounded
  memory) and renames it into place;
- :meth:`DescriptorFile.append` writes the new rows after the end of the data, flushes them, and
  only then rewrites the header's row count in place (one write inside the header's first page).
  A crash before the header write leaves the old, valid file plus trailing bytes that the next
  append overwrites; readers that mapped the old rows keep seeing exactly them;
- :meth:`DescriptorFile.remove` rewrites the file without the rows (atomic rename): readers holding
  the old file keep their mapping of the old inode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import MapError
from ..io import atomic_path

DESCRIPTORS_FILE = "descriptors.npy"
DESCRIPTOR_DTYPES = {"float16": np.float16, "float32": np.float32}
# The header is padded to this many bytes so the row count can grow in place (npy format 1.0; the
# header dict is padded with spaces, which numpy accepts). One page: its rewrite is a single write.
HEADER_BYTES = 256
# Rows copied per step when a file is rewritten or filled from an iterator: bounds memory to a few MB.
COPY_CHUNK_BYTES = 64 * 2**20
NPY_MAGIC = b"\x93NUMPY\x01\x00"
NPY_PREAMBLE = len(NPY_MAGIC) + 2  # magic, version, little-endian uint16 header length


def _header(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    """A version-1.0 ``.npy`` header of exactly :data:`HEADER_BYTES` bytes for a C-ordered array."""
    text = repr(
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": tuple(int(s) for s in shape),
        }
    )
    body_len = HEADER_BYTES - NPY_PREAMBLE
    if len(text) + 1 > body_len:
        raise MapError(f"descriptor file header for shape {shape} does not fit {HEADER_BYTES} bytes")
    body = text.ljust(body_len - 1) + "\n"
    return NPY_MAGIC + body_len.to_bytes(2, "little") + body.encode("latin1")


def _read_header(path: Path) -> tuple[tuple[int, int], np.dtype]:
    try:
        with open(path, "rb") as fh:
            if np.lib.format.read_magic(fh) != (1, 0):  # this module only writes version 1.0
                raise ValueError("not an npy version 1.0 file")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            offset = fh.tell()
    except (OSError, ValueError) as exc:
        raise MapError(f"{path} is not a readable descriptor file ({exc}); it is rebuilt from the store") from None
    if fortran or len(shape) != 2 or offset != HEADER_BYTES:
        raise MapError(f"{path} has an unexpected layout (shape {shape}); it is rebuilt from the store")
    size = path.stat().st_size
    if size < offset + int(np.prod(shape)) * dtype.itemsize:
        raise MapError(
            f"{path} is shorter than its header says ({size:,} bytes for {shape}); it is rebuilt from the store"
        )
    return (int(shape[0]), int(shape[1])), dtype


def chunk_rows(dim: int, itemsize: int = 4) -> int:
    """Rows of ``dim`` values that fit :data:`COPY_CHUNK_BYTES` (at least one)."""
    return max(1, COPY_CHUNK_BYTES // max(1, dim * itemsize))


def write_descriptors(
    path: str | os.PathLike, chunks: Iterable[np.ndarray], dim: int, dtype: str = "float32"
) -> "DescriptorFile":
    """Write the row blocks of ``chunks`` (each n×dim) as a new descriptor file, atomically."""
    path = Path(path)
    np_dtype = np.dtype(DESCRIPTOR_DTYPES[dtype])
    rows = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(_header((0, dim), np_dtype))
            for block in chunks:
                block = np.ascontiguousarray(block, dtype=np_dtype)
                if block.ndim != 2 or block.shape[1] != dim:
                    raise MapError(f"descriptor block of shape {block.shape} does not match {dim}-d rows")
                fh.write(block.tobytes())
                rows += len(block)
            fh.seek(0)
            fh.write(_header((rows, dim), np_dtype))
    return DescriptorFile(path)


class DescriptorFile:
    """Row-addressable full-precision descriptors on disk (memory-mapped read-only)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.shape, self.dtype = _read_header(self.path)
        self._map: np.ndarray | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    @property
    def array(self) -> np.ndarray:
        """The rows as a read-only memory map (pages are read on access, never copied wholesale)."""
        if self._map is None:
            if self.shape[0] == 0:
                return np.zeros(self.shape, self.dtype)
            self._map = np.memmap(self.path, dtype=self.dtype, mode="r", offset=HEADER_BYTES, shape=self.shape)
        return self._map

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any shape of row numbers) as float32, shape ``rows.shape + (dim,)``."""
        flat = np.asarray(rows, dtype=np.int64).ravel()
        order = np.argsort(flat, kind="stable")  # sorted reads: sequential pages, fewer seeks
        out = np.empty((len(flat), self.dim), np.float32)
        out[order] = self.array[flat[order]]
        return out.reshape(*np.shape(rows), self.dim)

    def iter_chunks(self, keep: np.ndarray | None = None) -> Iterable[np.ndarray]:
        """The rows (or only rows ``keep``, sorted) in blocks of bounded size, as stored (not converted)."""
        step = chunk_rows(self.dim, self.dtype.itemsize)
        if keep is None:
            for start in range(0, len(self), step):
                yield np.asarray(self.array[start : start + step])
        else:
            for start in range(0, len(keep), step):
                yield np.asarray(self.array[keep[start : start + step]])

    def append(self, vectors: np.ndarray) -> None:
        """Add rows at the end: data first (flushed), then the header's row count (see the module doc)."""
        x = np.ascontiguousarray(vectors, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise MapError(f"cannot append vectors of shape {x.shape} to {self.path} ({self.dim}-d)")
        if len(x) == 0:
            return
        new_shape = (self.shape[0] + len(x), self.dim)
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.pwrite(fd, x.tobytes(), HEADER_BYTES + self.nbytes)
            os.fsync(fd)
            os.pwrite(fd, _header(new_shape, self.dtype), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.shape, self._map = new_shape, None

    def remove(self, rows: Sequence[int]) -> None:
        """Delete ``rows`` (later rows move down), rewriting the file atomically chunk by chunk."""
        drop = np.unique(np.asarray(list(rows), dtype=np.int64))
        if len(drop) and (drop[0] < 0 or drop[-1] >= len(self)):
            raise MapError(f"cannot remove rows {drop.tolist()[:5]} from {self.path}: it holds {len(self)}")
        keep = np.setdiff1d(np.arange(len(self), dtype=np.int64), drop)
        dtype_name = next(name for name, t in DESCRIPTOR_DTYPES.items() if np.dtype(t) == self.dtype)
        fresh = write_descriptors(self.path, self.iter_chunks(keep), self.dim, dtype_name)
        self.shape, self._map = fresh.shape, None


def open_descriptors(map_dir: str | os.PathLike) -> DescriptorFile | None:
    """The map's descriptor file, or None when it is missing or damaged (it is derived data)."""
    path = Path(map_dir) / DESCRIPTORS_FILE
    if not path.exists():
        return None
    try:
        return DescriptorFile(path)
    except MapError:
        return None


class MemoryDescriptors:
    """Full-precision rows held in RAM, with the interface of :class:`DescriptorFile`.

    An index built in memory (a read-only open, a build not yet saved) re-scores from these; saving
    the index to a map writes them to ``descriptors.npy``.
    """

    def __init__(self, array: np.ndarray):
        self._array = np.asarray(array)
        self.path: Path | None = None

    def __len__(self) -> int:
        return len(self._array)

    @property
    def dim(self) -> int:
        return int(self._array.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self._array.dtype

    @property
    def nbytes(self) -> int:
        return int(self._array.nbytes)

    @property
    def array(self) -> np.ndarray:
        return self._array

    def rows(self, rows: np.ndarray) -> np.ndarray:
        return self._array[np.asarray(rows, dtype=np.int64)].astype(np.float32, copy=False)

    def iter_chunks(self, keep: np.ndarray | None = None) -> Iterable[np.ndarray]:
        src = self._array if keep is None else self._array[keep]
        step = chunk_rows(self.dim, self.dtype.itemsize)
        for start in range(0, len(src), step):
            yield src[start : start + step]

    def append(self, vectors: np.ndarray) -> None:
        x = np.asarray(vectors, dtype=self.dtype)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise MapError(f"cannot append vectors of shape {x.shape} to {self.dim}-d descriptors")
        self._array = np.concatenate([self._array, x])

    def remove(self, rows: Sequence[int]) -> None:
        self._array = np.delete(self._array, np.unique(np.asarray(list(rows), dtype=np.int64)), axis=0)


class RowSource:
    """Rows read on demand through ``read(rows) -> float32 array`` (e.g. a map store's ``read_global``).

    Lets an index be trained on a sample and filled chunk by chunk from a map larger than RAM:
    ``source[rows]`` and ``source[a:b]`` read just those rows.
    """

    def __init__(self, read: Callable[[np.ndarray], np.ndarray], n: int, dim: int):
        self._read, self.shape = read, (int(n), int(dim))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]), dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, self.shape[1]), np.float32)
        return np.asarray(self._read(rows), dtype=np.float32)


__all__ = [
    "RowSource",
    "DESCRIPTORS_FILE",
    "DescriptorFile",
    "MemoryDescriptors",
    "write_descriptors",
    "open_descriptors",
    "chunk_rows",
]
