"""Test helpers importable by test modules (``from helpers import make_images``).

Kept out of conftest.py: several conftest modules exist, and only one can be imported as ``conftest``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


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


def run_cli(args, **kw):
    """Invoke the ``vprkit`` command in-process (exceptions propagate, so a failure shows its traceback)."""
    from click.testing import CliRunner

    from vprkit.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kw)
