"""Mutual nearest neighbours between a query's patches and each candidate's, batched.

Descriptors are L2-normalised, so the nearest neighbour is the highest dot product. Each
candidate is matched with one matrix product (``n_q×n_d``).

Same pairs as the reference (Patch-NetVLAD ``patchnetvlad/tools/patch_matcher.py``, ``torch_nn``
and the ``mutuals`` test in ``PatchMatcher``): it takes the smallest ``sqrt(2 − 2·q·d)``, which on
unit vectors is the largest dot product, and keeps a pair when each side is the other's nearest.
Only the listing order differs: the reference lists the pairs by candidate patch index, here they
come by query patch index. Where the order matters (RANSAC draws its samples from the list),
:func:`vprkit.rerank.scoring.ransac_score` re-sorts them into the reference's candidate order.
Exact ties in similarity (duplicate descriptors) may be broken differently.
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
    return mutual_nn_grouped(query, list(candidates))


def _mutual_one(query: torch.Tensor, candidate: torch.Tensor) -> Matches:
    """Mutual nearest neighbours of one query–candidate pair (``n_q×d`` against ``n_d×d``), on their device."""
    sim = query @ candidate.T  # n_q×n_d
    best_d_sim, best_d = sim.max(dim=1)
    best_q = sim.argmax(dim=0)
    qi = torch.nonzero(best_q[best_d] == torch.arange(query.shape[0], device=sim.device), as_tuple=False).squeeze(1)
    return Matches(qi.cpu().numpy(), best_d[qi].cpu().numpy(), best_d_sim[qi].float().cpu().numpy())


def mutual_nn_grouped(query: torch.Tensor, candidates: list[torch.Tensor],
                      device: torch.device | str | None = None) -> list[Matches]:
    """Like :func:`mutual_nn` for a list of candidates of any patch counts.

    One matrix product per candidate: stacking a shortlist of large patch sets into one batch
    costs a copy as large as the products themselves (hundreds of MB for the performance preset).
    ``device`` is where the products run (the configured device); indices come back as NumPy.
    """
    empty = Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if device is not None:
        query = query.to(device)
    return [empty if len(c) == 0 or len(query) == 0 else _mutual_one(query, c if device is None else c.to(device))
            for c in candidates]
