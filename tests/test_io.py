"""vprkit.io: atomic writes, permissions that follow the umask, orphan cleaning."""

from __future__ import annotations

import json
import os
import stat
import time
from contextlib import contextmanager

import numpy as np
import pytest

from vprkit.io import (
    atomic_path,
    atomic_savez,
    atomic_write_json,
    atomic_write_text,
    clean_orphans,
    current_umask,
    is_orphan_name,
)


@contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_path_renames_on_success(tmp_path):
    dest = tmp_path / "sub" / "out.bin"
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp.exists() and not dest.exists()
        assert tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tmp") and is_orphan_name(tmp.name)
        tmp.write_bytes(b"data")
    assert dest.read_bytes() == b"data"
    assert _leftovers(dest.parent) == []


def test_atomic_path_keeps_the_old_file_and_removes_the_temporary_on_error(tmp_path):
    dest = tmp_path / "report.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("killed mid-write")
    assert dest.read_text() == "old"
    assert _leftovers(tmp_path) == []
    # a writer that removed the temporary itself is not an error either
    with pytest.raises(KeyError):
        with atomic_path(dest) as tmp:
            tmp.unlink()
            raise KeyError("x")
    assert dest.read_text() == "old"


def test_helpers_write_what_they_are_given(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"r@1": 0.5, "name": "é"})
    text = (tmp_path / "a.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"r@1": 0.5, "name": "é"} and text.endswith("\n") and "é" in text
    atomic_write_text(tmp_path / "b.csv", "a,b\r\n1,2\n")
    assert (tmp_path / "b.csv").read_bytes() == b"a,b\r\n1,2\n"  # no newline translation
    path = atomic_savez(tmp_path / "state.npz", x=np.arange(3), y=np.eye(2))
    assert path == tmp_path / "state.npz" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json",
        "b.csv",
        "state.npz",
    ]
    with np.load(path) as z:
        np.testing.assert_array_equal(z["x"], np.arange(3))
    # also at a name without .npz: nothing appended
    atomic_savez(tmp_path / "plain", x=np.ones(2))
    assert (tmp_path / "plain").exists() and not (tmp_path / "plain.npz").exists()


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, mask, mode):
    with umask(mask):
        assert current_umask() == mask
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_path(tmp_path / "g.bin") as tmp:
            tmp.write_bytes(b"y")
    assert stat.S_IMODE(os.stat(tmp_path / "f.txt").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "g.bin").st_mode) == mode


def test_clean_orphans_removes_only_old_temporaries(tmp_path):
    old, fresh = time.time() - 7200, time.time()
    names = {
        ".store.h5.abcd_123.tmp": old,  # orphan → removed
        ".index.faiss.zz9yx8wv.tmp": old,  # orphan → removed
        ".store.h5.k2j3h4g5.tmp": fresh,  # a write in progress → kept
        ".hidden.tmp": old,  # not one of ours (no random part) → kept
        "store.h5": old,
        "notes.tmp": old,
    }
    for name, mtime in names.items():
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (mtime, mtime))
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()  # directories are never touched
    os.utime(tmp_path / ".dir.abcdefgh.tmp", (old, old))
    removed = clean_orphans(tmp_path, older_than_s=3600)
    assert sorted(p.name for p in removed) == [".index.faiss.zz9yx8wv.tmp", ".store.h5.abcd_123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".store.h5.k2j3h4g5.tmp", ".hidden.tmp", "store.h5", "notes.tmp", ".dir.abcdefgh.tmp"]
    )
    assert [p.name for p in clean_orphans(tmp_path, older_than_s=0)] == [".store.h5.k2j3h4g5.tmp"]
    assert clean_orphans(tmp_path / "missing") == []


def test_orphans_of_a_killed_writer_are_found(tmp_path):
    """What a SIGKILL inside ``atomic_path`` leaves (its mkstemp file) matches the orphan pattern."""
    import tempfile

    fd, name = tempfile.mkstemp(dir=tmp_path, prefix=".map.h5.", suffix=".tmp")  # as atomic_path names it
    os.close(fd)
    assert is_orphan_name(os.path.basename(name))
    assert clean_orphans(tmp_path, older_than_s=0) == [tmp_path / os.path.basename(name)]
