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

from ..errors import MapError, ReadOnlyMapError, StorageFullError

LOCK_FILE = ".lock"


# The map folders this thread holds the write lock of with ``reentrant=True`` (and how deep): such a holder (a
# live add, which saves re-ranking payloads through SavedState) lets its own nested acquisitions through.
_held = threading.local()


@contextmanager
def map_write_lock(map_dir: str | os.PathLike, reentrant: bool = False) -> Iterator[Path]:
    """Hold the exclusive write lock of ``map_dir`` (created if missing); a clear error if it is taken or unwritable.

    ``reentrant``: while held, this thread's nested ``map_write_lock`` of the same folder goes through (otherwise
    a second acquisition is refused, as another process's would be). A folder that cannot be written is a
    :class:`ReadOnlyMapError`, a full disk a :class:`StorageFullError`, a lock held by another writer a
    :class:`MapError`."""
    d = Path(map_dir)
    held: dict[Path, int] = _held.__dict__.setdefault("folders", {})
    mine = d.resolve()
    if held.get(mine):
        held[mine] += 1
        try:
            yield d
        finally:
            held[mine] -= 1
        return
    fd = _open_lock_file(d)
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
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        except OSError as exc:
            raise _unwritable(d, exc) from None
        if reentrant:
            held[mine] = 1
        try:
            yield d
        finally:
            held.pop(mine, None)
    finally:
        os.close(fd)  # closing releases the lock


def _open_lock_file(d: Path) -> int:
    try:
        d.mkdir(parents=True, exist_ok=True)
        return os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise _unwritable(d, exc) from None


def _unwritable(d: Path, exc: OSError) -> MapError:
    """The error of a map folder the lock file cannot be written in."""
    why = f"cannot write to {d} ({exc.strerror or exc})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(f"{why}; free some space")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ReadOnlyMapError(f"{why}; choose a folder you can write to")
    return MapError(f"{why}; choose a folder you can write to")


class ReadWriteLock:
    """Many readers or one writer, fair both ways (phase-fair).

    A waiting writer blocks readers that arrive after it, so a stream of queries cannot starve it; and when
    a writer finishes, every reader waiting at that moment goes in before the next writer, so a stream of
    writes cannot starve readers either. Writers take turns in arrival order. A writer therefore waits at
    most for the readers already inside and, per writer ahead of it, that write and one read phase; a reader
    waits at most for the write running and the one writer whose turn comes next.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # readers inside
        self._writer = False  # a writer inside
        self._writers_waiting = 0
        self._readers_waiting = 0
        self._phase = 0  # writes finished: a reader waiting since an earlier phase goes in next
        self._admitting = 0  # readers released by the last write that have not entered yet (writers wait for them)
        self._next_ticket = 0  # writers' turns, in arrival order
        self._serving = 0
        self._abandoned: set[int] = set()  # turns of writers that stopped waiting (interrupted)

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            if self._writer or self._writers_waiting:
                self._wait_for_read_phase()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    def _wait_for_read_phase(self) -> None:
        """Wait (holding the condition) until the write running, or the next one in turn, has finished."""
        phase = self._phase
        self._readers_waiting += 1
        try:
            while self._writer or (self._writers_waiting and self._phase == phase):
                self._cond.wait()
        finally:
            self._readers_waiting -= 1
            if self._phase != phase and self._admitting:
                self._admitting -= 1  # one of the readers the last write released
                if not self._admitting:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._writers_waiting += 1
            try:
                while self._writer or self._readers or self._admitting or self._serving != ticket:
                    self._cond.wait()
            except BaseException:
                self._abandoned.add(ticket)
                self._next_turn(advance=False)
                raise
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._phase += 1
                self._admitting = self._readers_waiting  # they go in before the next writer
                self._next_turn(advance=True)

    def _next_turn(self, advance: bool) -> None:
        """Pass the turn on (skipping writers that stopped waiting) and wake everyone waiting (holding the condition)."""
        if advance:
            self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()
