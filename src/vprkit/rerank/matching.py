"""Mutual nearest neighbours between a query's patches and each candidate's, batched.

Descriptors are L2-normalised, so the nearest neighbour is the highest dot product. Candidates
with the same number of patches are matched in one batched matrix product (``C×n_q×n_d``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Matches:
    """Mutual nearest-neighbour pairs of one query–candidate pair: indices and similarities."""

    query: np.ndarray  # m indices into the query's patches
    candidate: np.ndarray  # m indices into the candidate's patches
    similarity: np.ndarray  # m dot products

    def __len__(self) -> int:
        return len(self.query)


def mutual_nn(query: torch.Tensor, candidates: torch.Tensor) -> list[Matches]:
    """``n_q×d`` query patches against ``C×n_d×d`` candidate patches → one :class:`Matches` each.

    A pair (i, j) is kept when j is i's nearest candidate patch and i is j's nearest query patch.
    """
    if candidates.ndim == 2:
        candidates = candidates.unsqueeze(0)
    sim = torch.matmul(candidates, query.T).transpose(1, 2)  # C×n_q×n_d
    best_d_sim, best_d = sim.max(dim=2)  # each query patch's nearest candidate patch
    best_q = sim.argmax(dim=1)  # each candidate patch's nearest query patch
    mutual = torch.gather(best_q, 1, best_d) == torch.arange(query.shape[0]).unsqueeze(0)
    out = []
    for c in range(candidates.shape[0]):
        qi = torch.nonzero(mutual[c], as_tuple=False).squeeze(1)
        out.append(Matches(qi.numpy(), best_d[c, qi].numpy(), best_d_sim[c, qi].numpy()))
    return out


def mutual_nn_grouped(query: torch.Tensor, candidates: list[torch.Tensor]) -> list[Matches]:
    """Like :func:`mutual_nn` for candidates of differing patch counts (grouped by count)."""
    out: list[Matches | None] = [None] * len(candidates)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault(int(c.shape[0]), []).append(i)
    for n, idx in groups.items():
        if n == 0 or query.shape[0] == 0:
            for i in idx:
                out[i] = Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
            continue
        for i, m in zip(idx, mutual_nn(query, torch.stack([candidates[i] for i in idx]))):
            out[i] = m
    return out  # type: ignore[return-value]
