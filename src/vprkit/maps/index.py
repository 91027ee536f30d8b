"""FAISS index over a map's global descriptors. Inner product on unit vectors: scores are cosines, higher is better."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from ..errors import ConfigError, MapError
from ..io import atomic_path
from ..registry import Registry

if TYPE_CHECKING:
    from ..config import Config

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
# Enough training vectors per IVF list / PQ centroid that FAISS does not warn or degrade.
TRAIN_VECTORS_PER_CENTROID = 39


class Index(Protocol):
    """What retrieval needs of a map's index, whatever engine holds it.

    Rows are the map's rows (the store's order): ``remove`` renumbers the rows after the removed
    ones exactly as deleting them from the key list does, so row ``i`` is always ``keys[i]``.
    """

    factory: str

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def add(self, vectors: np.ndarray) -> None: ...

    def remove(self, rows: Sequence[int]) -> None: ...

    def save_to_map(self, map_dir: Path) -> None: ...


# name → a class with ``build_for_map(vectors, config, map_dir)`` and ``load_for_map(map_dir, config)``
INDEX_BACKENDS: Registry[type] = Registry("index backend")


def build_index(vectors: np.ndarray, config: "Config", map_dir: Path | None = None) -> Index:
    """The map's index over ``vectors`` (N×dim, the store's rows) as ``config`` asks (backend, factory, options)."""
    return INDEX_BACKENDS.get(config.index_backend).build_for_map(vectors, config, map_dir)


def load_index(map_dir: Path, config: "Config") -> Index | None:
    """The map's saved index, or None when it is missing or unreadable (it is derived data: rebuild it)."""
    return INDEX_BACKENDS.get(config.index_backend).load_for_map(Path(map_dir), config)


@INDEX_BACKENDS.register("faiss")
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

    @classmethod
    def build_for_map(cls, vectors: np.ndarray, config: "Config", map_dir: Path | None = None) -> "FaissIndex":
        return cls.build(vectors, config.index, seed=config.vocabulary.seed)

    @classmethod
    def load_for_map(cls, map_dir: Path, config: "Config") -> "FaissIndex | None":
        path = Path(map_dir) / INDEX_FILE
        if not path.exists():
            return None
        try:
            return cls.load(path, config.index)
        except MapError as exc:
            logger.warning("%s; rebuilding it from the store", exc)
            return None

    def save_to_map(self, map_dir: Path) -> None:
        self.save(Path(map_dir) / INDEX_FILE)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        """Append rows ``ntotal …`` (an index that needs training must already be trained)."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.index.d:
            raise MapError(f"cannot add vectors of shape {x.shape} to a {self.index.d}-d index")
        self.index.add(x)

    def remove(self, rows: Sequence[int]) -> None:
        """Delete ``rows``; later rows move down as in the key list.

        Flat indexes compact in place (FAISS shifts the ids); indexes that keep explicit ids (IVF,
        HNSW …) are rebuilt from their own reconstructed vectors when they can be, else refused.
        """
        import faiss

        drop = np.unique(np.asarray(list(rows), dtype=np.int64))
        if len(drop) == 0:
            return
        if drop[0] < 0 or drop[-1] >= self.ntotal:
            raise MapError(f"cannot remove rows {drop.tolist()[:5]}: the index holds {self.ntotal}")
        if isinstance(self.index, faiss.IndexFlat):
            self.index.remove_ids(faiss.IDSelectorBatch(drop))
            return
        try:
            kept = np.setdiff1d(np.arange(self.ntotal), drop)
            vectors = self.index.reconstruct_batch(kept) if len(kept) else np.zeros((0, self.index.d), np.float32)
        except RuntimeError as exc:
            raise MapError(f"index {self.factory!r} cannot remove rows in place ({exc}); rebuild it from the store") from None
        self.index.reset()
        if len(vectors):
            self.index.add(vectors)

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
