"""FAISS index over a map's global descriptors. Inner product on unit vectors: scores are cosines, higher is better."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MapError
from ..io import atomic_path

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
            _seed_training(index, seed)
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
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, factory: str = "?") -> "FaissIndex":
        """Read an index file; a truncated or foreign file is a :class:`MapError` (the index can be rebuilt)."""
        import faiss

        try:
            return cls(faiss.read_index(str(path)), factory)
        except (RuntimeError, MemoryError) as exc:  # MemoryError: a damaged header asked for an absurd allocation
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise MapError(f"{path} is not a readable FAISS index ({reason})") from None


def _seed_training(index, seed: int) -> None:
    """Seed the k-means FAISS runs while training ``index`` (IVF coarse quantiser, product quantisers).

    FAISS's clustering otherwise uses a fixed seed of its own; taking the map's seed makes an index
    trained on a sample reproducible from the map's settings and lets benchmarks vary it.
    """
    import faiss

    parts = []
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index (flat, HNSW, PQ …)
        ivf = None
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        parts += [ivf, getattr(ivf, "pq", None)]
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    parts += [inner, getattr(inner, "pq", None)]
    for part in parts:
        params = getattr(part, "cp", None)
        if params is not None and hasattr(params, "seed"):
            params.seed = int(seed)
