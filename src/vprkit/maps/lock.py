"""One writer per map: an exclusive lock held for the whole of a build; and the live map's readers–writer lock.

The lock is ``MAP_DIR/.lock`` locked with ``flock`` (released by the kernel when the process ends,
so a killed build never leaves a stale lock). A second build into the same folder is refused at
once with who holds it, before it reads an image; readers never take the lock (writers only ever
rename complete files into place).
"""

from __future__ import annotations

import errno
import fcntl
import threading
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import MapError

LOCK_FILE = ".lock"


@contextmanager
def map_write_lock(map_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive write lock of ``map_dir`` (created if missing); a clear error if it is taken or unwritable."""
    d = Path(map_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise MapError(f"cannot write to {d} ({exc.strerror or exc}); choose a folder you can write to") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise MapError(
                f"{d} is being built by {holder}; wait for it to finish or build into another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        yield d
    finally:
        os.close(fd)  # closing releases the lock


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers, so a stream of queries cannot starve it."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
