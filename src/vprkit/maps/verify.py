"""What binds a map's files together: checksums, cheap fingerprints, the map's identity and paths kept inside the map.

A map folder holds primary data (``store.h5`` and the append log ``live/append-*.h5``) and data derived from
it (the index and its shards, the trained index, the full-precision descriptors copy, the calibration, saved
re-ranking state). Each derived file is recorded where it is listed (``index.json``, the calibration file
itself, a ``<file>.record.json`` beside saved state) with its size, its SHA-256 and a *fingerprint*:

- small files (≤ :data:`FULL_HASH_MAX_BYTES`): the fingerprint *is* the full SHA-256;
- large files: the SHA-256 of the size, the first and last :data:`FINGERPRINT_BLOCK_BYTES` and
  :data:`FINGERPRINT_BLOCKS` evenly spaced blocks — about a megabyte read, whatever the file's size.

Opening a map compares sizes and fingerprints (cheap: a served map opens in the time it always did); a
damaged, swapped or foreign derived file is rebuilt from the store with a warning, a foreign store is refused.
``vprkit map verify`` (:func:`verify_map`) reads every byte and compares full checksums.

The map's identity (``map_id``) is created when the map is first recorded (``build.json`` / ``map.json``) and
written into every file that can carry it (an HDF5 attribute of ``store.h5`` and append files, a field of
``index.json``, the calibration and saved state records), so a file copied from another map is recognised even
when it has the same number of rows. Maps written before identities existed have none: they are accepted as
before and get one at their next write.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from ..errors import MapDamagedError
from ..io import atomic_write_json

# Files up to this size are fingerprinted by their full SHA-256.
FULL_HASH_MAX_BYTES = 4 * 2**20
# A large file's fingerprint: its head, tail and this many evenly spaced blocks of this size.
FINGERPRINT_BLOCKS = 16
FINGERPRINT_BLOCK_BYTES = 64 * 2**10
# Files larger than this that change in place (an appended descriptors copy) record only their fingerprint:
# a full checksum after every live add would read the whole file each time. ``map verify`` says so.
FULL_CHECKSUM_ON_CHANGE_MAX_BYTES = 256 * 2**20
HASH_READ_BYTES = 4 * 2**20
# The HDF5 attribute of store files (``store.h5``, append files) naming the map they belong to.
MAP_ID_ATTR = "map_id"
RECORD_SUFFIX = ".record.json"  # the record beside a saved file that has no manifest of its own
CHECKSUM_FIELD = "sha256"  # a JSON file's checksum of its own content (the calibration)


def new_map_id() -> str:
    """A fresh identity for a map (random: two builds of the same images are still two maps)."""
    return uuid.uuid4().hex


# ---- checksums -----------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of every byte of ``path`` (read in bounded blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_READ_BYTES):
            h.update(block)
    return h.hexdigest()


def fingerprint_file(path: str | os.PathLike) -> str:
    """A cheap content fingerprint: the full SHA-256 of a small file, sampled blocks of a large one."""
    path = Path(path)
    size = path.stat().st_size
    if size <= FULL_HASH_MAX_BYTES:
        return sha256_file(path)
    h = hashlib.sha256(f"vprkit-fingerprint-1:{size}\n".encode())
    last = size - FINGERPRINT_BLOCK_BYTES
    offsets = sorted({0, last, *(last * i // (FINGERPRINT_BLOCKS + 1) for i in range(1, FINGERPRINT_BLOCKS + 1))})
    with open(path, "rb") as fh:
        for offset in offsets:
            fh.seek(offset)
            h.update(fh.read(FINGERPRINT_BLOCK_BYTES))
    return h.hexdigest()


@dataclass(frozen=True)
class FileState:
    """What is recorded of one file: its size, its fingerprint and (when known) the SHA-256 of all of it."""

    size: int
    fingerprint: str
    sha256: str | None

    @classmethod
    def of(cls, path: str | os.PathLike, full: bool = True) -> "FileState":
        """The state of ``path`` now; ``full=False`` skips the full checksum of a large file (see module doc)."""
        size = Path(path).stat().st_size
        fp = fingerprint_file(path)
        if size <= FULL_HASH_MAX_BYTES:
            return cls(size, fp, fp)
        keep_full = full or size <= FULL_CHECKSUM_ON_CHANGE_MAX_BYTES
        return cls(size, fp, sha256_file(path) if keep_full else None)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "fingerprint": self.fingerprint, "sha256": self.sha256}


def check_file(path: Path, size: int | None, fingerprint: str | None, what: str) -> None:
    """Refuse ``path`` when its size or fingerprint differ from the recorded ones (nothing recorded: accepted).

    A :class:`MapDamagedError` naming the file: the caller rebuilds derived data or refuses primary data.
    """
    if size is None and fingerprint is None:
        return
    try:
        actual = path.stat().st_size
    except OSError as exc:
        raise MapDamagedError(f"{path} ({what}) is unreadable ({exc})") from None
    if size is not None and actual != size:
        raise MapDamagedError(f"{path} ({what}) holds {actual:,} bytes, the map recorded {size:,}: it does not belong")
    if fingerprint is not None and fingerprint_file(path) != fingerprint:
        raise MapDamagedError(f"{path} ({what}) is not the file the map recorded (its content changed)")


# ---- paths ----------------------------------------------------------------------------------------------
def confined(map_dir: str | os.PathLike, relative: str) -> Path:
    """``map_dir / relative`` after checking it stays inside the map folder (symbolic links resolved).

    A manifest naming an absolute path, a ``..`` step or a link that leads out of the folder is damaged
    (or crafted): a :class:`MapDamagedError`, and the file is never read.
    """
    root = Path(map_dir)
    pure = PurePosixPath(str(relative))
    if (
        not str(relative)
        or pure.is_absolute()
        or ".." in pure.parts
        or "\\" in str(relative)
        or "\x00" in str(relative)
    ):
        raise MapDamagedError(f"{root}: a manifest names {str(relative)!r}, outside the map folder")
    path = root / pure
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a link loop
        inside = False
    if not inside:
        raise MapDamagedError(f"{root}: {str(relative)!r} leads outside the map folder (a symbolic link)")
    return path


# ---- a JSON file's checksum of itself (the calibration) -----------------------------------------------
def content_checksum(data: Mapping[str, Any]) -> str:
    """SHA-256 of ``data`` without its own checksum field, in one canonical JSON spelling."""
    body = {k: v for k, v in data.items() if k != CHECKSUM_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def with_checksum(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` plus its content checksum (an edit by hand is then told from a file vprkit wrote)."""
    return {**data, CHECKSUM_FIELD: content_checksum(data)}


def checksum_matches(data: Mapping[str, Any]) -> bool:
    """Whether ``data``'s recorded checksum is its content's (files without one, from older versions: True)."""
    recorded = data.get(CHECKSUM_FIELD)
    if recorded is None:
        return True
    try:
        return recorded == content_checksum(data)
    except (TypeError, ValueError):  # NaN or a value JSON cannot hold: not what vprkit wrote
        return False


# ---- a record beside a file (saved re-ranking state) ---------------------------------------------------
def record_path(path: Path) -> Path:
    return path.with_name(path.name + RECORD_SUFFIX)


def write_record(path: Path, map_id: str | None) -> None:
    """Record ``path``'s size and checksum (and the map it belongs to) in ``<path>.record.json``."""
    atomic_write_json(record_path(path), {"map_id": map_id, **FileState.of(path).to_dict()})


def check_record(path: Path, map_id: str | None) -> None:
    """Refuse ``path`` (a :class:`MapDamagedError`) when its record says it belongs elsewhere or it changed.

    Files without a record (written before records existed) are accepted.
    """
    rec = record_path(path)
    if not rec.exists():
        return
    try:
        data = json.loads(rec.read_text(encoding="utf-8"))
        size, fingerprint, owner = data.get("size"), data.get("fingerprint"), data.get("map_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise MapDamagedError(f"{rec} is unreadable ({exc})") from None
    if owner is not None and map_id is not None and owner != map_id:
        raise MapDamagedError(f"{path} belongs to another map (map id {owner}, this map's {map_id})")
    check_file(path, size, fingerprint, "saved state")
