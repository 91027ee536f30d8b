"""Test helpers importable by test modules (``from helpers import make_images``).

Kept out of conftest.py: several conftest modules exist, and only one can be imported as ``conftest``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from vprkit.rerank.reranker import PatchReranker


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
