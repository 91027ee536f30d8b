"""Miners: which tuples of a batch (or of the whole training set) a loss should look at.

Why: most tuples of a VPR batch are already easy; training on them wastes the step. Three kinds:

- **Batch miners from class labels** — pytorch-metric-learning's (PML) triplet-margin miner (easy,
  semi-hard, hard, all violating), batch-all, batch-hard, batch-easy-hard and Multi-Similarity
  (ε 0.1, MixVPR's), subclassed only to record statistics.
- **GPS-aware batch miner** (:class:`GeoMiner`) — PML miners take labels, but GPS supervision gives
  positive and negative *masks* with a gap (soft positives) between them; this one takes
  positives only from the positive mask and negatives only from the negative mask.
- **NetVLAD-style offline mining** (:class:`OfflineHardNegativeMiner`) — hard negatives for each
  query from a cached descriptor pool of the training set, refreshed every N steps.

Every miner exposes ``last_stats = {"tuples": n, "mean_margin": m}`` after each call and logs it
(logger ``vprkit.training.miners``, DEBUG). The margin of a triplet is ``d(a,n) − d(a,p)`` for
distances (``s(a,p) − s(a,n)`` for similarities): positive = already separated. For pair tuples
``(a1, p, a2, n)`` it is the mean negative-pair distance minus the mean positive-pair distance, and
``tuples`` counts both kinds of pairs. Everything is vectorised over the batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..errors import ConfigError
from ..registry import Registry
from .labels import PlaceLabels

log = logging.getLogger(__name__)

# Defaults (REFERENCE.md, "Training conventions").
TRIPLET_MARGIN = 0.1
MS_EPSILON = 0.1
NETVLAD_POOL_SIZE = 1000  # random negatives looked at per query and refresh
NETVLAD_NEGATIVES = 10  # hardest of them kept per query
NETVLAD_REFRESH_STEPS = 1000  # NetVLAD refreshes its cache every 1,000 queries; here: steps
DEFAULT_CACHE_BYTES = 512 * 2**20
# Entries of a query × cache block (distances, masks, keys): ~4M keeps each temporary ≤ 32 MB.
DEFAULT_MAX_BLOCK = 2**22


def tuple_stats(distance, embeddings: torch.Tensor, ref_emb: torch.Tensor, tuples) -> dict:
    """``{"tuples": n, "mean_margin": m}`` of an index tuple (see the module docstring).

    Uses the miner's own distance (normalisation and power included) on the batch × reference matrix.
    """
    with torch.no_grad():
        count = int(len(tuples[0])) if len(tuples) == 3 else int(len(tuples[0]) + len(tuples[2]))
        if len(tuples[0]) == 0 or (len(tuples) == 4 and len(tuples[2]) == 0):
            return {"tuples": count, "mean_margin": math.nan}
        mat = distance(embeddings, ref_emb)
        if len(tuples) == 3:
            a, p, n = tuples
            margin = distance.margin(mat[a, n], mat[a, p])
            return {"tuples": count, "mean_margin": float(margin.mean())}
        a1, p, a2, n = tuples
        margin = distance.margin(mat[a2, n].mean(), mat[a1, p].mean())
        return {
            "tuples": count,
            "mean_margin": float(margin),
            "positive_pairs": int(len(a1)),
            "negative_pairs": int(len(a2)),
        }


class _StatsMixin:
    """Records ``last_stats`` and logs it after every ``forward`` of a PML miner."""

    last_stats: dict

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        out = super().forward(embeddings, labels, ref_emb, ref_labels)
        ref = embeddings if ref_emb is None else ref_emb
        self.last_stats = tuple_stats(self.distance, embeddings.detach(), ref.detach(), out)
        log.debug(
            "%s mined %d tuples, mean margin %.4f",
            type(self).__name__,
            self.last_stats["tuples"],
            self.last_stats["mean_margin"],
        )
        return out


class TripletMiner(_StatsMixin, pml_miners.TripletMarginMiner):
    """PML's ``TripletMarginMiner``: ``kind`` = ``"easy"`` (margin > m), ``"semihard"``
    (0 < margin ≤ m), ``"hard"`` (margin ≤ 0) or ``"all"`` (margin ≤ m), over all batch triplets."""

    def __init__(self, kind: str = "semihard", margin: float = TRIPLET_MARGIN, **kwargs):
        if kind not in ("easy", "semihard", "hard", "all"):
            raise ConfigError(f"triplet kind must be easy, semihard, hard or all; got {kind!r}")
        super().__init__(margin=margin, type_of_triplets=kind, **kwargs)
        self.last_stats = {}


class BatchAllMiner(_StatsMixin, BaseMiner):
    """Batch-all (Hermans et al. 2017): every valid triplet of the batch, whatever its margin."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.last_stats = {}

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        return lmu.get_all_triplets_indices(labels, ref_labels)


class BatchHardMiner(_StatsMixin, pml_miners.BatchHardMiner):
    """Batch-hard: per anchor, its farthest positive and closest negative (PML)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.last_stats = {}


class BatchEasyHardMiner(_StatsMixin, pml_miners.BatchEasyHardMiner):
    """PML's ``BatchEasyHardMiner`` (e.g. easiest positive, semi-hard negative), returns pairs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.last_stats = {}


class MultiSimilarityMiner(_StatsMixin, pml_miners.MultiSimilarityMiner):
    """PML's Multi-Similarity miner (cosine similarity), ε = 0.1 as MixVPR trains; returns pairs."""

    def __init__(self, epsilon: float = MS_EPSILON, **kwargs):
        super().__init__(epsilon=epsilon, **kwargs)
        self.last_stats = {}


class GeoMiner(BaseMiner):
    """Triplets from geographic masks, in PML's miner style.

    ``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` where **labels are image ids** into
    ``places`` (a :class:`PlaceLabels`), or :meth:`mine_masks` with explicit boolean masks. Per
    anchor:

    - positive from the positive mask: ``"easiest"`` (closest in descriptor space — NetVLAD's
      choice, because a GPS positive may not show the same scene) or ``"hardest"``;
    - negatives from the negative mask only (soft positives never): ``"hardest"`` (the
      ``negatives_per_anchor`` closest), ``"semihard"`` (the closest that are farther than the
      positive but within ``margin``, FaceNet's rule) or ``"all"`` (every negative within
      ``margin`` of the positive).

    Returns ``(a, p, n)``; anchors without a positive or a suitable negative give no triplet.
    """

    def __init__(
        self,
        places: PlaceLabels | None = None,
        positive: str = "easiest",
        negative: str = "hardest",
        negatives_per_anchor: int = 1,
        margin: float = TRIPLET_MARGIN,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if positive not in ("easiest", "hardest"):
            raise ConfigError(f"positive must be 'easiest' or 'hardest', got {positive!r}")
        if negative not in ("hardest", "semihard", "all"):
            raise ConfigError(f"negative must be 'hardest', 'semihard' or 'all', got {negative!r}")
        self.places = places
        self.positive = positive
        self.negative = negative
        self.negatives_per_anchor = int(negatives_per_anchor)
        self.margin = margin
        self.last_stats: dict = {}

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        if self.places is None:
            raise ConfigError("GeoMiner without places: call mine_masks(embeddings, pos, neg) instead")
        ref_ids = None if ref_emb is embeddings else ref_labels
        pos, neg = self.places.masks(labels, ref_ids, device=embeddings.device)
        return self._mine(embeddings, ref_emb, pos, neg)

    def mine_masks(self, embeddings, pos_mask, neg_mask, ref_emb=None):
        """Triplets from explicit masks (rows = ``embeddings``, columns = ``ref_emb`` or ``embeddings``)."""
        ref = embeddings if ref_emb is None else ref_emb
        with torch.no_grad():
            out = self._mine(
                embeddings, ref, pos_mask.to(embeddings.device).bool(), neg_mask.to(embeddings.device).bool()
            )
        self.output_assertion(out)
        return out

    def _mine(self, embeddings, ref_emb, pos, neg):
        mat = self.distance(embeddings, ref_emb)
        # Work in "dissimilarity": larger = farther, whatever the distance.
        d = -mat if self.distance.is_inverted else mat
        inf = torch.tensor(math.inf, dtype=d.dtype, device=d.device)
        rows = torch.arange(d.shape[0], device=d.device)
        if self.positive == "easiest":
            p = torch.where(pos, d, inf).argmin(dim=1)
        else:
            p = torch.where(pos, d, -inf).argmax(dim=1)
        has_pos = pos.any(dim=1)
        d_ap = d[rows, p].unsqueeze(1)
        allowed = neg.clone()
        if self.negative in ("semihard", "all"):
            allowed &= d < d_ap + self.margin
        if self.negative == "semihard":
            allowed &= d > d_ap
        allowed &= has_pos.unsqueeze(1)
        if self.negative == "all":
            a, n = torch.where(allowed)
        else:
            k = min(self.negatives_per_anchor, d.shape[1])
            cand = torch.where(allowed, d, inf)
            vals, idx = cand.topk(k, dim=1, largest=False)
            ok = torch.isfinite(vals)
            a = rows.unsqueeze(1).expand_as(idx)[ok]
            n = idx[ok]
        out = (a, p[a], n)
        self.last_stats = tuple_stats(self.distance, embeddings, ref_emb, out)
        log.debug(
            "GeoMiner mined %d triplets, mean margin %.4f", self.last_stats["tuples"], self.last_stats["mean_margin"]
        )
        return out


# --- NetVLAD-style offline mining ------------------------------------------------------------------
@dataclass
class MinedTuples:
    """Per query: one positive and up to k hard negatives (global image ids, −1 = none)."""

    queries: torch.Tensor  # (Q,)
    positives: torch.Tensor  # (Q,)
    negatives: torch.Tensor  # (Q, k), −1 padded

    def batch(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(image_ids, (a, p, n))``: the distinct images to embed, and triplets indexing into them.

        Embed ``image_ids`` with the model (with gradients), then call any tuple loss with
        ``indices_tuple=(a, p, n)``.
        """
        ok_q = self.positives >= 0
        q, pz, negs = self.queries[ok_q], self.positives[ok_q], self.negatives[ok_q]
        valid = negs >= 0
        rows = torch.arange(q.numel()).unsqueeze(1).expand_as(negs)[valid]
        ids = torch.cat([q, pz, negs[valid]])
        image_ids, inverse = torch.unique(ids, return_inverse=True)
        nq = q.numel()
        qa, pa, na = inverse[:nq], inverse[nq : 2 * nq], inverse[2 * nq :]
        return image_ids, (qa[rows], pa[rows], na)


class OfflineHardNegativeMiner:
    """NetVLAD-style hard negatives from a cached descriptor pool of the training set.

    - ``describe(ids) -> Tensor[len(ids), D]`` computes descriptors of training images with the
      current model (any model); it is called in chunks of ``chunk_size`` at each refresh.
    - The cache holds the descriptors of ``pool_ids`` (default: every reference image of
      ``places``), refreshed every ``refresh_every`` calls of :meth:`mine`. It is stored as float16
      when float32 would exceed ``max_cache_bytes``; if even float16 does not fit, a random subset
      of the pool that fits is cached at each refresh (logged). Query × cache distances are
      computed in blocks of at most ``max_block`` entries, so memory stays bounded.
    - For each query: ``pool_size`` random sure negatives (soft positives excluded) from the cache,
      plus the query's hard negatives from the previous call (NetVLAD keeps them); the
      ``negatives_per_query`` closest are returned. The positive is the cached positive closest in
      descriptor space (NetVLAD's "best positive"); a query without one gets −1.

    ``mine(query_ids, query_desc=None)`` → :class:`MinedTuples`; query descriptors are computed
    with ``describe`` unless given. ``last_stats``: tuples (query, positive, negative) mined and
    their mean margin ``d(q,n) − d(q,p)`` on the descriptors used.
    """

    def __init__(
        self,
        places: PlaceLabels,
        describe: Callable[[torch.Tensor], torch.Tensor],
        *,
        pool_ids=None,
        pool_size: int = NETVLAD_POOL_SIZE,
        negatives_per_query: int = NETVLAD_NEGATIVES,
        refresh_every: int = NETVLAD_REFRESH_STEPS,
        chunk_size: int = 64,
        max_cache_bytes: int = DEFAULT_CACHE_BYTES,
        max_block: int = DEFAULT_MAX_BLOCK,
        distance=None,
        seed: int | None = None,
    ):
        if pool_size < 1 or negatives_per_query < 1 or refresh_every < 1:
            raise ConfigError("pool_size, negatives_per_query and refresh_every must be ≥ 1")
        self.places = places
        self.describe = describe
        self.pool_ids = (
            torch.arange(places.n_cols)
            if pool_ids is None
            else torch.as_tensor(pool_ids, dtype=torch.long).ravel().unique()
        )  # sorted
        self.pool_size = int(pool_size)
        self.negatives_per_query = int(negatives_per_query)
        self.refresh_every = int(refresh_every)
        self.chunk_size = int(chunk_size)
        self.max_cache_bytes = int(max_cache_bytes)
        self.max_block = int(max_block)
        self.distance = distance if distance is not None else LpDistance(normalize_embeddings=True)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, (1,))))
        self.step = 0
        self.refreshes = 0
        self.cache: torch.Tensor | None = None
        self.cache_ids: torch.Tensor | None = None
        self._last_hard_ids = torch.full((places.n_rows, self.negatives_per_query), -1, dtype=torch.long)
        self.last_stats: dict = {}

    # --- cache ----------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the cached descriptors with the current ``describe``."""
        ids = self.pool_ids
        first = self.describe(ids[: min(self.chunk_size, ids.numel())]).detach()
        dim = first.shape[1]
        dtype = torch.float32 if ids.numel() * dim * 4 <= self.max_cache_bytes else torch.float16
        fit = self.max_cache_bytes // (dim * (4 if dtype == torch.float32 else 2))
        if fit < 1:
            raise ConfigError(f"max_cache_bytes={self.max_cache_bytes} cannot hold one {dim}-d descriptor")
        if ids.numel() > fit:
            keep = torch.randperm(ids.numel(), generator=self.generator)[:fit].sort().values
            ids = ids[keep]
            log.info(
                "descriptor cache: %d of %d pool images fit in %d bytes; caching a random subset",
                fit,
                self.pool_ids.numel(),
                self.max_cache_bytes,
            )
            first = None
        cache = torch.empty((ids.numel(), dim), dtype=dtype)
        start = 0
        if first is not None:
            cache[: first.shape[0]] = first.to(dtype)
            start = first.shape[0]
        for s in range(start, ids.numel(), self.chunk_size):
            cache[s : s + self.chunk_size] = self.describe(ids[s : s + self.chunk_size]).detach().to("cpu", dtype)
        self.cache, self.cache_ids = cache, ids
        self.refreshes += 1
        log.debug("descriptor cache refreshed (%d images, %s) at step %d", ids.numel(), dtype, self.step)

    def _due(self) -> bool:
        return self.cache is None or self.step % self.refresh_every == 0

    # --- mining ---------------------------------------------------------------------------------
    @torch.no_grad()
    def mine(self, query_ids, query_desc: torch.Tensor | None = None) -> MinedTuples:
        q_ids = torch.as_tensor(query_ids, dtype=torch.long).ravel().cpu()
        if self._due():
            self.refresh()
        self.step += 1
        qd = (self.describe(q_ids) if query_desc is None else query_desc).detach().cpu().float()
        cache_ids = self.cache_ids
        m = cache_ids.numel()
        q_np, c_np = q_ids.numpy(), cache_ids.numpy()
        k = self.negatives_per_query
        positives = torch.full((q_ids.numel(),), -1, dtype=torch.long)
        negatives = torch.full((q_ids.numel(), k), -1, dtype=torch.long)
        d_pos = torch.full((q_ids.numel(),), math.nan)
        d_neg = torch.full((q_ids.numel(), k), math.inf)
        rows_per_block = max(1, self.max_block // max(m, 1))
        cols = max(1, self.max_block // max(self.cache.shape[1], 1))
        for s in range(0, q_ids.numel(), rows_per_block):
            sl = slice(s, s + rows_per_block)
            qb = q_np[sl]
            # Column chunks keep the float32 copy of a float16 cache small as well.
            dist = torch.cat(
                [self.distance(qd[sl], self.cache[c : c + cols].float()) for c in range(0, m, cols)], dim=1
            )
            d = -dist if self.distance.is_inverted else dist
            is_pos = torch.from_numpy(self.places.is_positive(qb[:, None], c_np[None, :]))
            is_neg = torch.from_numpy(self.places.is_negative(qb[:, None], c_np[None, :]))
            # Best positive: the closest cached positive.
            dp = torch.where(is_pos, d, torch.full_like(d, math.inf))
            best, arg = dp.min(dim=1)
            has = torch.isfinite(best)
            positives[sl] = torch.where(has, cache_ids[arg], torch.full_like(arg, -1))
            d_pos[sl] = torch.where(has, best, torch.full_like(best, math.nan))
            # A random sample of sure negatives: random keys, negatives only, keep the largest keys.
            keys = torch.rand(d.shape, generator=self.generator)
            keys[~is_neg] = -1.0
            n_pool = min(self.pool_size, m)
            kv, sample = keys.topk(n_pool, dim=1)
            sampled = torch.zeros_like(is_neg)
            sampled.scatter_(1, sample, kv >= 0)
            # Last call's hard negatives of these queries join the pool (if still cached and negative).
            prev = self._last_hard_ids[torch.from_numpy(qb)]
            pos_in_cache = torch.from_numpy(np.searchsorted(c_np, prev.clamp(min=0).numpy()).clip(0, max(m - 1, 0)))
            found = (prev >= 0) & (cache_ids[pos_in_cache] == prev)
            r, c = torch.where(found)
            sampled[r, pos_in_cache[r, c]] = True
            sampled &= is_neg
            cand = torch.where(sampled, d, torch.full_like(d, math.inf))
            kk = min(k, m)
            vals, idx = cand.topk(kk, dim=1, largest=False)
            ok = torch.isfinite(vals)
            negatives[sl, :kk] = torch.where(ok, cache_ids[idx], torch.full_like(idx, -1))
            d_neg[sl, :kk] = vals
        self._last_hard_ids[q_ids] = negatives
        valid = (positives >= 0).unsqueeze(1) & (negatives >= 0)
        margins = (d_neg - d_pos.unsqueeze(1))[valid]
        self.last_stats = {
            "tuples": int(valid.sum()),
            "mean_margin": float(margins.mean()) if margins.numel() else math.nan,
        }
        log.debug(
            "offline miner (step %d) mined %d tuples, mean margin %.4f",
            self.step,
            self.last_stats["tuples"],
            self.last_stats["mean_margin"],
        )
        return MinedTuples(q_ids, positives, negatives)


# --- the registry (batch miners) -------------------------------------------------------------------
MINERS: Registry[Callable[..., BaseMiner]] = Registry("miner")
MINERS.register("triplet-easy", lambda **kw: TripletMiner("easy", **kw))
MINERS.register("triplet-semihard", lambda **kw: TripletMiner("semihard", **kw))
MINERS.register("triplet-hard", lambda **kw: TripletMiner("hard", **kw))
MINERS.register("triplet-all", lambda **kw: TripletMiner("all", **kw))
MINERS.register("batch-all", BatchAllMiner)
MINERS.register("batch-hard", BatchHardMiner)
MINERS.register("batch-easy-hard", BatchEasyHardMiner)
MINERS.register("multi-similarity", MultiSimilarityMiner)
MINERS.register("gps", GeoMiner)
