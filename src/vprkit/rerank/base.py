"""The re-ranking contract: a shortlist of map rows in, a re-ordered shortlist with new scores out."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..retrieval import QueryBatch


class Reranker:
    """Re-scores each query's shortlist. ``shortlist`` is how many global candidates it wants."""

    name = "reranker"
    shortlist: int = 100

    def rerank(
        self, query: "QueryBatch", rows: np.ndarray, scores: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        """Return ``(rows, scores)`` of the same shape, re-ordered best first (higher is better)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files the re-ranker holds open."""
