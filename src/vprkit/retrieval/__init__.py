"""Query descriptors → top-K map rows with scores (higher is better).

A *retriever* is chosen by the preset (``Config.retriever``): ``global`` searches the FAISS index of
global descriptors; SegVLAD registers ``segvlad``, which votes with SuperSegment matches.
Retrievers see a :class:`SearchSpace` — the index, the store's extras and the map's extensions —
never the models or the whole map, so a service or a loop-closure module can hand them its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..backbones.base import DenseFeatures
from ..registry import Registry

if TYPE_CHECKING:
    from ..images import Batch
    from ..maps import MapStore
    from ..maps.index import Index
    from ..maps.extensions import MapExtension


@dataclass
class SearchSpace:
    """What a retriever searches: the global index over ``size`` map rows, and what the map stores beside it.

    ``store`` gives per-image extras (SuperSegments, patches); ``extensions`` are the map's fitted
    extensions by group; ``cache_dir`` is where derived indexes may be saved (None: keep them in memory,
    as a read-only map does).
    """

    index: "Index"
    size: int
    store: "MapStore | None" = None
    extensions: Mapping[str, "MapExtension"] = field(default_factory=dict)
    cache_dir: Path | None = None


@dataclass
class QueryBatch:
    """What retrievers and re-rankers get for a batch of queries: pixels, dense features, global descriptors."""

    batch: "Batch"
    features: DenseFeatures
    global_descriptors: np.ndarray  # Q×dim, L2-normalised float32

    @property
    def keys(self) -> list[str]:
        return self.batch.keys


class Retriever:
    name = "retriever"

    def __init__(self, space: SearchSpace, options: Mapping[str, Any]):
        self.space = space
        self.options = dict(options)

    def search(self, query: QueryBatch, k: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        """``(rows, scores)``, each Q×k, best first; rows are -1 where the map has fewer than k images."""
        raise NotImplementedError


RETRIEVERS: Registry[Callable[..., Retriever]] = Registry("retriever")


@RETRIEVERS.register("global")
class GlobalRetriever(Retriever):
    """Nearest neighbours of the global descriptor (cosine similarity via inner product)."""

    name = "global"

    def search(self, query: QueryBatch, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.space.index.search(query.global_descriptors, k)


def pad_topk(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad Q×k' results to Q×k with row -1 / score -inf, so callers always get k columns."""
    if rows.shape[1] >= k:
        return rows[:, :k], scores[:, :k]
    pad = k - rows.shape[1]
    return (
        np.concatenate([rows, np.full((len(rows), pad), -1, rows.dtype)], 1),
        np.concatenate([scores, np.full((len(scores), pad), -np.inf, np.float32)], 1),
    )
