"""The Patch-NetVLAD re-ranker: shortlist → patch matching → spatial scores → fused ranking.

For each query, the global shortlist (top ``shortlist``, 100 by default) is re-scored: at each
patch scale, mutual nearest neighbours between the query's and the candidate's patches are scored
by the preset's spatial scorer (RANSAC inliers or rapid spatial scoring); the scales are fused by
per-scale z-normalisation and the preset's weights (as the original), and the result is fused with
the z-normalised global similarity (``global_weight``; 0 reproduces the original's patch-only
ranking). Fusing the global score matters where geometry is weak — fisheye corridors, lateral
motion — while the patch evidence decides where it is strong; a shortlist whose patch scores are
all equal leaves the global order unchanged.

Candidates' patches come from the map store when it was built with the same re-ranking settings;
otherwise they are computed on the fly from the map's images (slower, same result) and cached.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from ..backbones.extract import extract, ignore_failures, sample_keys
from ..device import module_device
from ..errors import MapError
from .base import Reranker
from .extension import GROUP, PatchesExtension
from .fusion import fuse_scales, fuse_with_global
from .matching import Matches, mutual_nn_grouped
from .scoring import SCORERS, PatchSet, SpatialScore

if TYPE_CHECKING:
    from ..backbones.base import Backbone
    from ..config import Config
    from ..images import ImageSource
    from ..maps import MapStore
    from ..retrieval import QueryBatch
    from .presets import RerankSettings

logger = logging.getLogger(__name__)

# Decoded candidate patch sets kept in RAM across queries (maps' images recur in shortlists). Sized
# to hold a performance-preset shortlist of 100 at 320×240 (≈ 7.8 MB each as float32): a smaller
# cache thrashes and decodes every candidate again for every query. Kept as float32 because
# widening float16 per match costs more on a CPU than the matrix product it feeds.
CANDIDATE_CACHE_BYTES = 1024 * 2**20


@dataclass
class PairResult:
    """Everything known about one query–candidate pair: per-scale matches and spatial scores."""

    matches: list[Matches]
    scores: list[SpatialScore]
    query_sets: list[PatchSet] = field(default_factory=list)
    candidate_sets: list[PatchSet] = field(default_factory=list)


class CandidateCache:
    """LRU cache of decoded candidate patch sets, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = max_bytes, 0
        self.items: OrderedDict[int, tuple[list[PatchSet], int]] = OrderedDict()

    def get(self, row: int) -> list[PatchSet] | None:
        hit = self.items.get(row)
        if hit is None:
            return None
        self.items.move_to_end(row)
        return hit[0]

    def put(self, row: int, sets: list[PatchSet]) -> None:
        size = sum(s.descriptors.numel() * s.descriptors.element_size() for s in sets)
        if size > self.max_bytes:
            return
        self.items[row] = (sets, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, (_, old) = self.items.popitem(last=False)
            self.nbytes -= old


def score_pair(query_sets: list[PatchSet], candidate_sets: list[PatchSet], scorer: Callable) -> PairResult:
    """Match and score one pair at every scale (the ``match-two`` view and the tests use this)."""
    matches = [mutual_nn_grouped(q.descriptors, [c.descriptors])[0] for q, c in zip(query_sets, candidate_sets)]
    scores = [scorer(q, c, m) for q, c, m in zip(query_sets, candidate_sets, matches)]
    return PairResult(matches, scores, query_sets, candidate_sets)


class StoredPatches:
    """Candidates' patch sets decoded from the map store (built with the same re-ranking settings)."""

    stored = True

    def __init__(self, store: "MapStore", extension: PatchesExtension):
        self.store, self.extension = store, extension
        self._reader = None

    def __call__(self, rows: list[int]) -> dict[int, list[PatchSet]]:
        if self._reader is None:
            self._reader = self.store.open()
        return {r: self.extension.decode(self._reader.extras(GROUP, r)) for r in rows}

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class ComputedPatches:
    """Candidates' patch sets computed from the map's images on the fly (a map stored without them)."""

    stored = False

    def __init__(self, extension: PatchesExtension, backbone: "Backbone", config: "Config", images: "ImageSource",
                 keys: Sequence[str]):
        self.extension, self.backbone, self.config, self.images, self.keys = extension, backbone, config, images, keys

    def __call__(self, rows: list[int]) -> dict[int, list[PatchSet]]:
        keys = [self.keys[r] for r in rows]
        row_of = dict(zip(keys, rows))
        out: dict[int, list[PatchSet]] = {}
        for batch, feats in extract(self.backbone, self.config, self.images, keys, on_failure=ignore_failures):
            for key, sets in zip(batch.keys, self.extension.describe_batch(batch, feats)):
                out[row_of[key]] = sets
        lost = [self.keys[r] for r in rows if r not in out]
        if lost:
            raise MapError(f"cannot re-rank: map images {lost[:3]} are no longer readable in {self.images.describe()}")
        return out

    def close(self) -> None:
        pass


def make_reranker(
    settings: "RerankSettings", *, config: "Config", backbone: "Backbone", vocabulary, stored: PatchesExtension | None,
    store: "MapStore", keys: Sequence[str], images: "ImageSource", log: Callable[[str], None] = logger.info,
) -> "PatchReranker":
    """A re-ranker for a map: its stored patches when they match ``settings``, else patches computed on the fly.

    On the fly, the patch state (NetVLAD centres, α, PCA) is fitted on a sample of the map's images.
    """
    from .presets import patch_options

    options = patch_options(settings, config)
    device = module_device(backbone)  # match where the models run
    if stored is not None and stored.stores_same_as(options):
        return PatchReranker(settings, stored, StoredPatches(store, stored), device)
    log(f"re-ranking '{settings.name}': the map stores no matching patch descriptors; computing them from "
        f"{images.describe()} as needed (build the map with --rerank {settings.name} to store them)")
    ext = PatchesExtension(options, backbone, vocabulary)
    if ext.needs_fit:
        sample = sample_keys(keys, int(ext.options["fit_images"]), config.vocabulary.seed)
        ext.fit(extract(backbone, config, images, sample, on_failure=ignore_failures))
    return PatchReranker(settings, ext, ComputedPatches(ext, backbone, config, images, keys), device)


class PatchReranker(Reranker):
    """Re-ranks a global shortlist with multi-scale patch matching (see module docs).

    ``candidates`` turns map rows into their patch sets (:class:`StoredPatches` or
    :class:`ComputedPatches`); decoded sets are cached across queries.
    """

    def __init__(self, settings: "RerankSettings", extension: PatchesExtension,
                 candidates: "StoredPatches | ComputedPatches", device: "torch.device | str | None" = None):
        self.settings = settings
        self.device = device  # where patch matching runs (None: where the descriptors are, the CPU)
        self.name = settings.name
        self.shortlist = settings.shortlist
        self.scorer = SCORERS.get(settings.scorer)
        self.cache = CandidateCache(CANDIDATE_CACHE_BYTES)
        self.timings: list[float] = []
        self.extension = extension
        self.candidates = candidates
        self.stored = candidates.stored

    # ---- candidates ----------------------------------------------------------------------------
    def candidate_sets(self, rows: list[int]) -> dict[int, list[PatchSet]]:
        out: dict[int, list[PatchSet]] = {}
        missing = []
        for r in rows:
            hit = self.cache.get(r)
            if hit is not None:
                out[r] = hit
            else:
                missing.append(r)
        if missing:
            for r, sets in self.candidates(missing).items():
                out[r] = sets
                self.cache.put(r, sets)
        return out

    # ---- re-ranking ----------------------------------------------------------------------------
    def patch_scores(self, query_sets: list[PatchSet], candidates: list[list[PatchSet]]) -> np.ndarray:
        """``scales × candidates`` spatial scores of one query against its shortlist."""
        out = np.zeros((len(query_sets), len(candidates)))
        for s, q in enumerate(query_sets):
            matches = mutual_nn_grouped(q.descriptors, [c[s].descriptors for c in candidates], self.device)
            for c, (cand, m) in enumerate(zip(candidates, matches)):
                out[s, c] = self.scorer(q, cand[s], m).value
        return out

    def fuse(self, per_scale: np.ndarray, global_scores: np.ndarray) -> np.ndarray:
        patch = fuse_scales(list(per_scale), self.settings.weights)
        return fuse_with_global(patch, global_scores, self.settings.global_weight)

    def rerank(self, query: "QueryBatch", rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, scores = np.array(rows), np.array(scores, np.float64)
        query_sets = self.extension.describe_batch(query.batch, query.features)
        out_rows, out_scores = rows.copy(), scores.copy()
        for qi, qsets in enumerate(query_sets):
            t0 = time.perf_counter()
            n = min(self.shortlist, rows.shape[1])
            head = [int(r) for r in rows[qi, :n] if r >= 0]
            if len(head) < 2:
                continue
            sets = self.candidate_sets(head)
            per_scale = self.patch_scores(qsets, [sets[r] for r in head])
            fused = self.fuse(per_scale, scores[qi, : len(head)])
            order = np.argsort(-fused, kind="stable")
            out_rows[qi, : len(head)] = np.asarray(head)[order]
            out_scores[qi, : len(head)] = fused[order]
            tail = slice(len(head), rows.shape[1])  # beyond the shortlist: global order, below it
            out_scores[qi, tail] = np.where(rows[qi, tail] >= 0, fused.min() - 1.0 - np.arange(rows.shape[1] - len(head)), -np.inf)
            self.timings.append(time.perf_counter() - t0)
        return out_rows, out_scores

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "stored": self.stored, **self.settings.to_dict()}

    def close(self) -> None:
        self.candidates.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

