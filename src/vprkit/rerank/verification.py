"""Geometric verification of a query against its shortlisted map images, and a re-ranker built on it.

:class:`Verifier` extracts the query's local features once, takes each candidate's from a bounded LRU
cache (a map image is extracted once however often it is shortlisted), matches them and fits the
two-view model (:mod:`vprkit.rerank.two_view`). It verifies at most ``top_n`` candidates (5 by default)
and, with a ``time_budget``, stops starting new ones once the query has spent it — the first candidate
(the answer) is always verified. Each verified candidate reports matches, inliers, inlier ratio, the
model, the relative rotation (and translation direction) and the seconds it cost.

:class:`LocalFeatureReranker` is the re-ranking face of it (the :class:`~vprkit.rerank.base.Reranker`
contract): the verified head of each shortlist is reordered by ``cosine + inlier_weight · s(inliers)``
with the saturating ``s(n) = n / (n + inlier_scale)`` ∈ [0, 1). The bonus is never negative and only the
global top ``top_n`` receive it, so the fused scores stay in descending order over the whole shortlist
and unverified candidates keep their global order. The query's pixels come from the query batch
(``QueryBatch.batch.pixels``, the images as prepared for the map's backbone) unless the caller passes
the images itself; the map images come from ``load_image(key)``.

The fusion weights are fixed constants chosen without looking at any evaluation set (a geometric
tie-breaker among near-equal cosines, not a vote against a clear global winner): choosing them by
leave-one-dataset-out is the job of the re-ranking benchmarks (issue 27, item 6).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .base import Reranker
from .local_features import LocalFeaturePipeline, LocalFeatures, make_local_features
from .two_view import Intrinsics, TwoViewOptions, TwoViewResult, two_view

if TYPE_CHECKING:
    from ..retrieval import QueryBatch

# XFeat with mutual nearest neighbours: on Corridor it separates right from wrong places as well as
# LighterGlue and rejects foreign pictures as cleanly, at a third of the cost (benchmarks/bench_verify.py).
DEFAULT_PIPELINE = "xfeat"
VERIFY_TOP_N = 5  # the budget: verify the top 5
# Candidate features kept across queries. XFeat at 320×240 is ~0.2 MB per image (≤ 1.1 MB at its 4096
# keypoints), DISK at 2048 keypoints ~1.1 MB: 128 MB holds a hundred or more map images.
FEATURE_CACHE_BYTES = 128 * 2**20
# Fusion (see the module docs): the bonus for n inliers is INLIER_WEIGHT · n / (n + INLIER_SCALE). At 0.5 the
# inlier evidence decides among the verified candidates (as in hloc-style verification, which ranks by inliers
# alone) — 50 vs 80 inliers is 0.25 vs 0.31, more than the usual cosine gaps of a top 5 — and the cosine breaks
# near-ties; the saturation keeps hundreds of inliers on a repetitive texture from counting without bound.
INLIER_WEIGHT = 0.5
INLIER_SCALE = 50.0
RERANK_SHORTLIST = 20  # global candidates fetched; only the top ``top_n`` of them are verified


@dataclass(frozen=True)
class CandidateCheck:
    """One verified candidate: its key, global rank, the two-view model and what it cost (seconds)."""

    key: str
    rank: int
    result: TwoViewResult
    extract_seconds: float
    match_seconds: float
    fit_seconds: float
    cached: bool

    @property
    def inliers(self) -> int:
        return self.result.n_inliers

    @property
    def seconds(self) -> float:
        return self.extract_seconds + self.match_seconds + self.fit_seconds

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "rank": self.rank,
            **self.result.to_dict(),
            "seconds": round(self.seconds, 4),
            "features_cached": self.cached,
        }


@dataclass(frozen=True)
class Verification:
    """What verifying one query found: the verified candidates (in shortlist order), the keys left
    unverified once the budget was spent, and the query's own extraction time."""

    candidates: list[CandidateCheck]
    skipped: list[str] = field(default_factory=list)
    query_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def budget_spent(self) -> bool:
        return bool(self.skipped)

    @property
    def best(self) -> CandidateCheck | None:
        """The candidate with the most inliers (the earliest on ties), or None when none was verified."""
        return max(self.candidates, key=lambda c: (c.inliers, -c.rank), default=None)

    def to_dict(self) -> dict:
        return {
            "candidates": [c.to_dict() for c in self.candidates],
            "skipped": list(self.skipped),
            "query_seconds": round(self.query_seconds, 4),
            "seconds": round(self.seconds, 4),
        }


class FeatureCache:
    """Thread-safe LRU of candidates' :class:`LocalFeatures`, bounded in bytes."""

    def __init__(self, max_bytes: int = FEATURE_CACHE_BYTES):
        self.max_bytes, self.nbytes = int(max_bytes), 0
        self.items: OrderedDict[str, LocalFeatures] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> LocalFeatures | None:
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
            return hit

    def put(self, key: str, features: LocalFeatures) -> None:
        size = features.nbytes
        with self.lock:
            if size > self.max_bytes:
                return
            old = self.items.pop(key, None)
            self.nbytes += size - (old.nbytes if old is not None else 0)
            self.items[key] = features
            while self.nbytes > self.max_bytes:
                _, dropped = self.items.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def discard(self, keys: Sequence[str]) -> None:
        """Forget ``keys`` (map images replaced or removed)."""
        with self.lock:
            for key in keys:
                old = self.items.pop(key, None)
                if old is not None:
                    self.nbytes -= old.nbytes

    def __len__(self) -> int:
        return len(self.items)


class Verifier:
    """Verifies a query image against map images by key (see the module docs).

    ``load_image(key)`` returns a map image as ``H×W×3`` uint8 RGB. ``intrinsics``: the query camera
    (also taken for the map images unless ``map_intrinsics`` is given); None → assumed focal, uncalibrated.
    """

    def __init__(
        self,
        load_image: Callable[[str], np.ndarray],
        features: LocalFeaturePipeline | str = DEFAULT_PIPELINE,
        top_n: int = VERIFY_TOP_N,
        time_budget: float | None = None,
        cache_bytes: int = FEATURE_CACHE_BYTES,
        options: TwoViewOptions = TwoViewOptions(),
        intrinsics: Intrinsics | None = None,
        map_intrinsics: Intrinsics | None = None,
    ):
        self.load_image = load_image
        self.features = make_local_features(features) if isinstance(features, str) else features
        self.top_n, self.time_budget = int(top_n), time_budget
        self.cache = FeatureCache(cache_bytes)
        self.options, self.intrinsics, self.map_intrinsics = options, intrinsics, map_intrinsics

    def map_features(self, key: str) -> tuple[LocalFeatures, bool]:
        """A map image's features and whether they came from the cache."""
        hit = self.cache.get(key)
        if hit is not None:
            return hit, True
        feats = self.features.extract(self.load_image(key))
        self.cache.put(key, feats)
        return feats, False

    def check(
        self, query: LocalFeatures, key: str, rank: int = 0, intrinsics: Intrinsics | None = None
    ) -> CandidateCheck:
        """Match one candidate and fit its two-view model."""
        t0 = time.perf_counter()
        cand, cached = self.map_features(key)
        t1 = time.perf_counter()
        ia, ib, _ = self.features.match(query, cand)
        t2 = time.perf_counter()
        cam = intrinsics if intrinsics is not None else self.intrinsics
        result = two_view(
            query.keypoints[ia],
            cand.keypoints[ib],
            query.image_size,
            cand.image_size,
            cam,
            self.map_intrinsics,
            self.options,
        )
        return CandidateCheck(key, rank, result, t1 - t0, t2 - t1, time.perf_counter() - t2, cached)

    def verify(
        self, query_image: np.ndarray, keys: Sequence[str], intrinsics: Intrinsics | None = None
    ) -> Verification:
        """Verify the first ``top_n`` of ``keys`` (the shortlist, best first) against ``query_image``.

        ``intrinsics`` overrides the verifier's query camera for this query (e.g. from the query's EXIF).
        """
        start = time.perf_counter()
        query = self.features.extract(query_image)
        query_seconds = time.perf_counter() - start
        done: list[CandidateCheck] = []
        todo = list(keys)[: self.top_n]
        for rank, key in enumerate(todo):
            if done and self.time_budget is not None and time.perf_counter() - start >= self.time_budget:
                return Verification(done, todo[rank:], query_seconds, time.perf_counter() - start)
            done.append(self.check(query, key, rank, intrinsics))
        return Verification(done, [], query_seconds, time.perf_counter() - start)


def inlier_bonus(inliers: np.ndarray, weight: float = INLIER_WEIGHT, scale: float = INLIER_SCALE) -> np.ndarray:
    """``weight · n / (n + scale)``: saturating, 0 for no inliers (see the module docs)."""
    n = np.asarray(inliers, np.float64)
    return weight * n / (n + scale)


def batch_images(query: "QueryBatch") -> list[np.ndarray]:
    """The query batch's prepared pixels (B×3×H×W float in [0, 1]) as ``H×W×3`` uint8 images."""
    pixels = np.asarray(query.batch.pixels)
    return list(np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8).transpose(0, 2, 3, 1))


class LocalFeatureReranker(Reranker):
    """Re-ranks each shortlist's verified head by inliers fused with the global cosine (see the module docs).

    ``keys[row]`` names the map image of each map row (what ``verifier.load_image`` reads). After
    :meth:`rerank`, :attr:`last` holds each query's :class:`Verification` (rotation, inliers) in batch order.
    """

    name = "local-features"

    def __init__(
        self,
        verifier: Verifier,
        keys: Sequence[str],
        shortlist: int = RERANK_SHORTLIST,
        inlier_weight: float = INLIER_WEIGHT,
        inlier_scale: float = INLIER_SCALE,
    ):
        self.verifier, self.keys = verifier, list(keys)
        self.shortlist = max(int(shortlist), verifier.top_n)
        self.inlier_weight, self.inlier_scale = float(inlier_weight), float(inlier_scale)
        self.last: list[Verification] = []

    def rerank(
        self,
        query: "QueryBatch",
        rows: np.ndarray,
        scores: np.ndarray,
        images: Sequence[np.ndarray] | None = None,
        intrinsics: Sequence[Intrinsics | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, scores)`` reordered; ``images`` (one per query) replace the batch's prepared pixels.

        ``intrinsics`` (one per query, each None or in pixels of the query's original file) replace the
        verifier's query camera; with the batch's pixels they are mapped onto the prepared image (its
        ``Geometry``: resize and crop), with explicit ``images`` they must be in those images' pixels.
        """
        given = images is not None
        images = list(images) if given else batch_images(query)
        out_rows, out_scores = np.array(rows, copy=True), np.array(scores, dtype=np.float64, copy=True)
        self.last = []
        for q, image in enumerate(images):
            valid = [int(r) for r in rows[q] if r >= 0]
            camera = self._camera(query, q, intrinsics[q] if intrinsics else None, given)
            report = self.verifier.verify(image, [self.keys[r] for r in valid], camera)
            self.last.append(report)
            fused = out_scores[q]
            for check in report.candidates:
                fused[check.rank] += inlier_bonus(check.inliers, self.inlier_weight, self.inlier_scale)
            order = np.argsort(-fused, kind="stable")
            out_rows[q], out_scores[q] = rows[q][order], fused[order]
        return out_rows, out_scores.astype(np.asarray(scores).dtype)

    def _camera(
        self, query: "QueryBatch", q: int, given: Intrinsics | None, explicit_images: bool
    ) -> Intrinsics | None:
        """The query camera for query ``q`` in pixels of the image verified (see :meth:`rerank`)."""
        camera = given if given is not None else self.verifier.intrinsics
        geometries = query.batch.geometries
        if camera is None or explicit_images or q >= len(geometries):
            return camera
        return camera.for_prepared(geometries[q])

    def rows_changed(self, removed: np.ndarray | None = None) -> None:
        """The map's rows changed: cached features are keyed by image key, so only removed keys are dropped."""
        if removed is not None and len(removed):
            gone = set(int(r) for r in removed)
            self.verifier.cache.discard([self.keys[r] for r in gone])
            self.keys = [k for r, k in enumerate(self.keys) if r not in gone]
