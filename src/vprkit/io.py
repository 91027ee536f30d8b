"""Atomic file writes, written once.

Every file vprkit writes (maps, indexes, vocabularies, reports, downloaded weights) goes to a
temporary file in the destination's folder and is renamed over the destination only when complete,
so an interrupted run never leaves a truncated file that a later run would read as valid.

Temporary files are named ``.<name>.<8 random chars>.tmp``; whatever a killed process leaves behind
is found and removed by :func:`clean_orphans`. Files get the permissions ``open()`` would give them
(``0o666 & ~umask``), not the ``0o600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ReadOnlyMapError, StorageFullError

TMP_SUFFIX = ".tmp"
# Leftover temporary files older than this are orphans (an active writer keeps touching its file).
ORPHAN_AGE_S = 3600.0
# ``.<name>.<mkstemp's 8 random characters>[extra suffix].tmp``
_ORPHAN_RE = re.compile(r"^\..+\.[a-z0-9_]{8}(\.[^/]*)?\.tmp$")
_UMASK_LOCK = threading.Lock()
log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``); elsewhere
    set-and-restore under a lock (``os.umask`` has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


# OSError numbers meaning "no room": disk full, quota exceeded; and "may not write here".
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
# HDF5 reports the OS's error inside its message (``errno = 28, error message = 'No space left on device'``).
_HDF5_ERRNO_RE = re.compile(r"errno\s*=\s*(\d+)")


def _errno_of(exc: BaseException) -> int | None:
    """The OS error number behind ``exc``, also when a library only names it in its message: HDF5 writes
    ``errno = 28``, FAISS the OS's text (``write error in …: No space left on device``)."""
    number = getattr(exc, "errno", None)
    if isinstance(number, int):
        return number
    text = str(exc)
    found = _HDF5_ERRNO_RE.search(text)
    if found:
        return int(found.group(1))
    return next((n for n in sorted(FULL_ERRNOS | READ_ONLY_ERRNOS) if os.strerror(n) in text), None)


def storage_error(exc: BaseException, path: str | os.PathLike) -> Exception | None:
    """The user-facing error for a failed write of ``path``: :class:`StorageFullError` for a full disk or quota,
    :class:`ReadOnlyMapError` for a read-only or forbidden folder; None for any other failure."""
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    number = _errno_of(exc)
    if number in FULL_ERRNOS:
        return StorageFullError(f"no space left to write {path} ({os.strerror(number)}); nothing of it was kept")
    if number in READ_ONLY_ERRNOS:
        return ReadOnlyMapError(f"cannot write {path} ({os.strerror(number)}); nothing of it was kept")
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = TMP_SUFFIX, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, on any exception
    it is removed (and the exception propagates). Creates the parent folder.

    The temporary file exists (empty) when yielded; write to it by name (a writer may truncate or
    re-create it). Its name is ``.<name>.XXXXXXXX<suffix>``: keep ``suffix`` ending in ``.tmp`` so
    :func:`clean_orphans` finds leftovers. Writers that pick a format from the file extension
    (``np.savez``, ``savefig``) need a file object or an explicit format, see :func:`atomic_savez`.
    ``fsync``: flush the data to disk before the rename, so a crash cannot expose an empty file.
    A full disk or quota becomes :class:`~vprkit.errors.StorageFullError`, a read-only or forbidden folder
    :class:`~vprkit.errors.ReadOnlyMapError` (see :func:`storage_error`), with the temporary file removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as exc:
        raise (storage_error(exc, path) or exc) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        translated = storage_error(exc, path)
        if translated is not None:
            raise translated from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically. Returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation). Returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding, newline="") as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(
    path: str | os.PathLike, data: Any, *, indent: int | None = 2, ensure_ascii: bool = False, default=None
) -> Path:
    """``json.dumps(data)`` plus a final newline, written atomically as UTF-8. Returns the path."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=ensure_ascii, default=default) + "\n")


def atomic_savez(path: str | os.PathLike, **arrays) -> Path:
    """``np.savez(path, **arrays)`` atomically, at exactly ``path`` (no ``.npz`` appended). Returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return Path(path)


def is_orphan_name(name: str) -> bool:
    """Whether ``name`` looks like a temporary file of :func:`atomic_path`."""
    return bool(_ORPHAN_RE.match(name))


def clean_orphans(folder: str | os.PathLike, older_than_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Remove temporary files of :func:`atomic_path` in ``folder`` (not recursive) last modified more than
    ``older_than_s`` seconds ago: leftovers of killed writers. Returns the paths removed; a missing
    folder or a file that vanishes meanwhile is not an error."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for e in entries:
        if not is_orphan_name(e.name):
            continue
        try:
            if not e.is_file(follow_symlinks=False) or now - e.stat(follow_symlinks=False).st_mtime < older_than_s:
                continue
            os.unlink(e.path)
        except FileNotFoundError:
            continue
        removed.append(Path(e.path))
        log.info("removed %s, left by an interrupted write", e.path)
    return removed


def clean_orphans_tree(folder: str | os.PathLike, older_than_s: float = ORPHAN_AGE_S) -> list[Path]:
    """:func:`clean_orphans` in ``folder`` and every folder below it (symbolic links are not followed), e.g. a
    live map's image folder whose keys hold sub-folders. Returns the paths removed."""
    removed: list[Path] = []
    for root, _, _ in os.walk(folder, followlinks=False):
        removed += clean_orphans(root, older_than_s)
    return removed


def load_npz(path: str | os.PathLike) -> dict:
    """Every array of an ``.npz`` file, after checking each member's header against its stored size.

    A crafted or corrupt header can claim a billion rows: ``numpy.load`` would then try to allocate
    them (a MemoryError) before noticing the data is not there. Here such a file is a ``ValueError``
    naming the member, and pickled members are refused (``allow_pickle=False``).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as fh:
                    major, _ = np.lib.format.read_magic(fh)
                    read_header = (
                        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(fh)
                    if dtype.hasobject:
                        raise ValueError(f"member {info.filename!r} holds Python objects (pickles are not loaded)")
                    claimed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                    if claimed > info.file_size:
                        raise ValueError(
                            f"member {info.filename!r} claims {shape} {dtype} ({claimed:,} bytes) but holds "
                            f"{info.file_size:,} bytes"
                        )
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"not an .npz archive ({exc})") from None
