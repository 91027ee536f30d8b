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


def mutual_nn_grouped(
    query: torch.Tensor, candidates: list[torch.Tensor], device: torch.device | str | None = None
) -> list[Matches]:
    """Like :func:`mutual_nn` for a list of candidates of any patch counts.

    One matrix product per candidate: stacking a shortlist of large patch sets into one batch
    costs a copy as large as the products themselves (hundreds of MB for the performance preset).
    ``device`` is where the products run (the configured device); indices come back as NumPy.
    """
    empty = Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if device is not None:
        query = query.to(device)
    return [
        empty if len(c) == 0 or len(query) == 0 else _mutual_one(query, c if device is None else c.to(device))
        for c in candidates
    ]


# Upper bound on one stacked block of candidate patches in :func:`mutual_nn_stacked` (bytes of the
# stacked descriptors): large enough that a 256-d shortlist of 100 goes in one product, small enough
# that the paper's 4096-d patches at 320×240 (≈ 8 MB per image) are matched in blocks of a few.
STACK_MAX_BYTES = 64 * 2**20
# Upper bound on one block's similarity matrix (``B×n_d×n_q`` float32) in :func:`mutual_nn_stacked`.
# Why: the two reductions that find mutual nearest neighbours (best candidate patch per query patch,
# best query patch per candidate patch) read the whole matrix again; a block that fits a core's L2
# cache (1 MiB here) is read from cache, a whole shortlist's is read from memory. Measured on this
# 2-core machine, 100 candidates × 512-d: 266 patches a side (Corridor's size-2 scale) 146 → 76 ms
# per scale, 176 patches 53 → 41 ms; small sets (Nordland's 78 / 30 / 8) unchanged (timed on random unit
# descriptors of those shapes; end to end: README, "Re-ranking you can afford").
SIM_BLOCK_BYTES = 1 * 2**20


def mutual_nn_stacked(
    query: torch.Tensor,
    candidates: list[torch.Tensor],
    device: torch.device | str | None = None,
    max_bytes: int = STACK_MAX_BYTES,
    sim_bytes: int = SIM_BLOCK_BYTES,
) -> list[Matches]:
    """Like :func:`mutual_nn_grouped`, with candidates of equal patch count matched in one batched product.

    Why: with the compact presets' patch sets (tens of patches of 256 dimensions) one pair's matrix
    product takes microseconds and the per-pair framework calls (product, two reductions, a gather,
    three copies to NumPy) cost far more than the arithmetic: a 100-candidate shortlist at three
    scales is 300 such rounds. Stacking candidates of the same patch count (at a fixed image size,
    all of them) makes it a handful of calls per scale. Blocks are bounded by ``max_bytes`` of
    stacked descriptors so that the stacking copy stays small where patch sets are large, and by
    ``sim_bytes`` of similarities so that the reductions over a block read it from cache
    (:data:`SIM_BLOCK_BYTES`). Same pairs as the one-by-one matcher (the maxima of the same products),
    whatever the blocks.
    """
    empty = Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    out: list[Matches] = [empty] * len(candidates)
    if len(query) == 0:
        return out
    if device is not None:
        query = query.to(device)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(candidates):
        if len(c):
            groups.setdefault(int(c.shape[0]), []).append(i)
    for n_d, members in groups.items():
        per_candidate = max(1, n_d * candidates[members[0]].shape[1] * candidates[members[0]].element_size())
        per_similarity = max(1, n_d * len(query) * 4)
        block = max(1, min(max_bytes // per_candidate, sim_bytes // per_similarity))
        for start in range(0, len(members), block):
            idx = members[start : start + block]
            stacked = candidates[idx[0]].unsqueeze(0) if len(idx) == 1 else torch.stack([candidates[i] for i in idx])
            if device is not None:
                stacked = stacked.to(device)
            for i, m in zip(idx, _mutual_block(query, stacked)):
                out[i] = m
    return out


def _mutual_block(query: torch.Tensor, stacked: torch.Tensor) -> list[Matches]:
    """Mutual nearest neighbours of ``n_q×d`` query patches against ``B×n_d×d`` stacked candidates."""
    sim = torch.matmul(stacked, query.T)  # B×n_d×n_q
    best_d_sim, best_d = sim.max(dim=1)  # B×n_q: each query patch's nearest candidate patch
    best_q = sim.argmax(dim=2)  # B×n_d: each candidate patch's nearest query patch
    back = torch.gather(best_q, 1, best_d)  # B×n_q: the nearest query patch of that nearest candidate patch
    mutual = (back == torch.arange(query.shape[0], device=sim.device)).cpu().numpy()
    best_d, best_d_sim = best_d.cpu().numpy(), best_d_sim.float().cpu().numpy()
    out = []
    for b in range(mutual.shape[0]):
        qi = np.flatnonzero(mutual[b])
        out.append(Matches(qi, best_d[b, qi], best_d_sim[b, qi]))
    return out
