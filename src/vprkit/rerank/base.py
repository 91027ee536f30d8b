"""The re-ranking contract: a shortlist of map rows in, a re-ordered shortlist with new scores out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from ..registry import Registry

if TYPE_CHECKING:
    from ..pipeline import Map
    from ..retrieval import QueryBatch


class Reranker:
    """Re-scores each query's shortlist. ``shortlist`` is how many global candidates it wants."""

    name = "reranker"
    shortlist: int = 100

    def __init__(self, map: "Map"):
        self.map = map

    def rerank(self, query: "QueryBatch", rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        """Return ``(rows, scores)`` of the same shape, re-ordered best first (higher is better)."""
        raise NotImplementedError


# name → factory(map) -> Reranker; e.g. "performance", "speed", "storage"
RERANKERS: Registry[Callable[["Map"], Reranker]] = Registry("re-ranking preset")
