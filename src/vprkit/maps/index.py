"""FAISS index over a map's global descriptors. Inner product on unit vectors: scores are cosines, higher is better."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MapError

INDEX_FILE = "index.faiss"
# Enough training vectors per IVF list / PQ centroid that FAISS does not warn or degrade.
TRAIN_VECTORS_PER_CENTROID = 39


class FaissIndex:
    """A FAISS index built from a factory string (``"Flat"``, ``"PCA256,Flat"``, ``"IVF1024,PQ64"`` …)."""

    def __init__(self, index, factory: str):
        self.index = index
        self.factory = factory

    @classmethod
    def build(cls, vectors: np.ndarray, factory: str = "Flat", seed: int = 0) -> "FaissIndex":
        import faiss

        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2:
            raise MapError(f"index vectors must be 2-D, got {x.shape}")
        try:
            index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(f"FAISS cannot build index {factory!r} for {x.shape[1]}-d vectors: {exc}") from None
        if not index.is_trained:
            if len(x) == 0:
                raise MapError(f"index {factory!r} needs training vectors, and the map is empty")
            index.train(x)
        index.add(x)
        return cls(index, factory)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows and scores (higher is better); rows are -1 where fewer than k exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.ntotal)) if self.ntotal else 1
        scores, rows = self.index.search(q, k)
        return rows.astype(np.int64), scores.astype(np.float32)

    def save(self, path: str | os.PathLike) -> Path:
        import faiss

        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, factory: str = "?") -> "FaissIndex":
        import faiss

        return cls(faiss.read_index(str(path)), factory)
