"""Test helpers importable by test modules (``from helpers import make_images``).

Kept out of conftest.py: several conftest modules exist, and only one can be imported as ``conftest``.
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, NamedTuple

import numpy as np
import psutil
import torch
from PIL import Image

from vprkit.rerank.reranker import PatchReranker
from vprkit.rerank.scoring import PatchSet


def make_images(folder: Path, n: int, size=(48, 64), seed: int = 0, ext: str = "png") -> list[str]:
    """``n`` random-texture images (distinct per index) in ``folder``; returns their names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        base = rng.integers(0, 255, size=(size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size[1], size[0]), Image.BILINEAR)
        name = f"img{i:03d}.{ext}"
        img.save(folder / name)
        names.append(name)
    return names


def synchronised_seasons(root: Path, n: int = 16) -> None:
    """Two synchronised 'seasons' (``summer/``, ``winter/``) of n frames named like Nordland's: the same
    texture per frame index, a brightness change and noise."""
    rng = np.random.default_rng(0)
    for season in ("summer", "winter"):
        (root / season).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.integers(0, 255, size=(8, 8, 3)).astype(np.float32)
        for season, gain in (("summer", 1.0), ("winter", 0.8)):
            img = np.clip(base * gain + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).resize((64, 64), Image.BILINEAR).save(root / season / f"images-{i:05d}.png")


def run_cli(args, **kw):
    """Invoke the ``vprkit`` command in-process (exceptions propagate, so a failure shows its traceback)."""
    from click.testing import CliRunner

    from vprkit.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kw)


class Listener(NamedTuple):
    """One listening inet socket: the process holding it and the address it binds."""

    pid: int
    process: str
    ip: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port} ({self.process}, pid {self.pid})"


def _with_children(procs: Iterable[psutil.Process | int]) -> list[psutil.Process]:
    """``procs`` (psutil processes or pids) and all their descendants, each once; gone ones skipped."""
    found: dict[int, psutil.Process] = {}
    for proc in procs:
        try:
            proc = proc if isinstance(proc, psutil.Process) else psutil.Process(proc)
            for p in (proc, *proc.children(recursive=True)):
                found.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def listening_sockets(*procs: psutil.Process | int) -> list[Listener]:
    """Every TCP socket in LISTEN state held by ``procs`` or their children (default: this test process).

    Unix sockets are not inet sockets, so they are not listed (they are not reachable from the network).
    """
    out: list[Listener] = []
    for proc in _with_children(procs or [psutil.Process()]):
        try:
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        out += [Listener(proc.pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return sorted(set(out), key=lambda s: (s.pid, s.port, s.ip))


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or IPv4 loopback mapped into IPv6 (``::ffff:127.0.0.1``, a dual-stack socket)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def assert_loopback_only(listeners: Iterable[Listener]) -> list[Listener]:
    """Fail, naming them, if any of ``listeners`` binds another address than loopback; returns them all."""
    listeners = list(listeners)
    exposed = [s for s in listeners if not is_loopback(s.ip)]
    assert not exposed, (
        "listening beyond loopback: "
        + ", ".join(map(str, exposed))
        + "; all listeners: "
        + ", ".join(map(str, listeners))
    )
    return listeners


class FixedPatchScores(PatchReranker):
    """A re-ranker whose patch scores per map row are given (no images involved): fusion tests."""

    def __init__(self, settings, patch_by_row: dict[int, float], perfect: float = 1.0):
        stub_ext = SimpleNamespace(describe_batch=lambda batch, feats: [[None]])
        super().__init__(settings, stub_ext, SimpleNamespace(stored=True, close=lambda: None))
        self.patch_by_row = patch_by_row
        self.perfect = perfect  # the one scale's perfect score (min_agreement reads scores against it)
        self.matched: list[list[int]] = []  # the rows matched, per query

    def candidate_sets(self, rows):
        self.matched.append(list(rows))
        return {r: [r] for r in rows}

    def patch_scores(self, query_sets, candidates):
        return np.array([[self.patch_by_row[c[0]] for c in candidates]])

    def perfect_scores(self, query_sets):
        return np.array([self.perfect])


def grid_patch_set(
    rows: int, cols: int, step: float = 16.0, offset: float = 1.0, descriptors: torch.Tensor | None = None
) -> PatchSet:
    """A ``rows × cols`` grid of patches ``step`` pixels apart, centred at ``(cell + offset) · step``
    (``offset`` 1: vprkit's keypoints; 0.5: cell centres), with zero 1-d descriptors unless given."""
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    pos = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
    desc = torch.zeros(rows * cols, 1) if descriptors is None else descriptors
    return PatchSet(desc, (pos + offset) * step, pos, (rows, cols), step)


def tiny_image(path: Path, value: int = 0, size: tuple[int, int] = (8, 6)) -> None:
    """A uniform grey ``size`` (width, height) image at ``path`` (folders created): dataset layouts need files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def copy_first_images(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` files of ``src`` (sorted) copied into ``dst``: a small real image folder, never in the repo."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir())[:n]:
        shutil.copy(p, dst / p.name)
    return dst


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run ``vprkit ARGS`` through the CLI's real entry point (its one-line error handling and exit codes
    included) in-process; returns (exit code, stdout, stderr)."""
    import sys

    from vprkit.cli import main

    monkeypatch.setattr(sys, "argv", ["vprkit", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    """Exit status 2 with one ``error:`` line on stderr (no traceback) that names each of ``words``."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for w in words:
        assert w in err, err
