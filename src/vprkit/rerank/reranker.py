"""The Patch-NetVLAD re-ranker: shortlist → patch matching → spatial scores → fused ranking.

For each query, the global shortlist (top ``shortlist``, 100 by default) is re-scored: at each
patch scale, mutual nearest neighbours between the query's and the candidate's patches are scored
by the preset's spatial scorer (RANSAC inliers or rapid spatial scoring); the scales are fused by
per-scale z-normalisation and the preset's weights (as the original), and the result is fused with
the z-normalised global similarity (``global_weight``; 0 reproduces the original's patch-only
ranking). Fusing the global score matters where geometry is weak — fisheye corridors, lateral
motion — while the patch evidence decides where it is strong; a shortlist whose patch scores are
all equal leaves the global order unchanged. With a ``global_gap`` only the candidates within it
of the global top-1 are matched and reordered (see :mod:`vprkit.rerank.fusion`). With ``verify`` the
spatial scorer runs on only that many matched candidates, those with the most mutual nearest
neighbours (see :mod:`vprkit.rerank.cascade`). With ``same_place`` the global top-1's route
neighbours keep their global order among themselves (see :mod:`vprkit.rerank.places`).

Candidates' patches come from the map store when it was built with the same re-ranking settings;
otherwise they are computed from the map's images (same result) and cached in RAM, and the fitted
state and the computed patches are saved into the map once (:mod:`vprkit.rerank.saved`). A service
asks for ``compute=False``: only stored or prepared patches are read, and a missing state is a
:class:`~vprkit.errors.StateNotPreparedError` naming ``vprkit rerank prepare`` — a request never
fits a state nor runs the backbone over the map's images. Such a re-ranker follows the live map's
writes (:meth:`PatchReranker.rows_changed`, :meth:`ComputedPatches.row_added`) instead of being built again.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..backbones.base import Backbone
from ..backbones.extract import ExtractionOptions, extract, ignore_failures, sample_keys
from ..config import RerankConfig
from ..device import module_device
from ..errors import MapError, StateNotPreparedError
from ..images import ImageSource
from .base import Reranker
from .cascade import cascade_scores
from .extension import GROUP, PatchesExtension
from .fusion import guard_options, matched_candidates, rank_shortlist, within_global_gap
from .matching import Matches, mutual_nn_grouped
from .options import RerankOptions
from .places import MAX_PLACE_RADIUS, PLACE_SIMILARITY_QUANTILE, RouteNeighbours, place_similarity
from .saved import SavedState
from .scoring import SCORERS, PatchSet, SpatialScore, perfect_score

if TYPE_CHECKING:
    from ..maps import MapStore
    from ..retrieval import QueryBatch

logger = logging.getLogger(__name__)

# Decoded candidate patch sets kept in RAM across queries (maps' images recur in shortlists). Sized
# to hold a performance-preset shortlist of 100 at 320×240 (≈ 7.8 MB each as float32): a smaller
# cache thrashes and decodes every candidate again for every query. Kept as float32 because
# widening float16 per match costs more on a CPU than the matrix product it feeds.
CANDIDATE_CACHE_BYTES = 1024 * 2**20
# Map images per saved shard when preparing a whole map: one shard per chunk bounds the payloads in
# RAM (a few hundred MB at the performance preset) and what an interrupt loses.
PREPARE_CHUNK = 128


@dataclass(frozen=True)
class ScoreRecord:
    """What the re-ranker knew of one query's shortlist just before fusing it (see :meth:`PatchReranker.record_scores`).

    ``rows``: the shortlist's map rows in global order; ``global_scores``: their global similarities;
    ``matched``: which of them were patch-matched; ``spatial``: the matched candidates' spatial scores
    (scales × matched; ``None`` when nothing was matched); ``match_counts``: the cascade's mutual-match
    counts (scales × matched; ``None`` without a cascade); ``perfect``: each scale's perfect score.
    Enough to fuse the shortlist again under other fusion or cascade rules without matching again.
    """

    rows: np.ndarray
    global_scores: np.ndarray
    matched: np.ndarray
    spatial: np.ndarray | None
    match_counts: np.ndarray | None
    perfect: np.ndarray

    @property
    def n_matched(self) -> int:
        """How many candidates were patch-matched."""
        return 0 if self.spatial is None else int(self.matched.sum())


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

    def renumber(self, removed: np.ndarray) -> None:
        """Drop the rows ``removed`` from the map and renumber the later ones (they move down)."""
        if not self.items:
            return
        removed = np.sort(np.asarray(removed, np.int64))
        gone = set(removed.tolist())
        items: OrderedDict[int, tuple[list[PatchSet], int]] = OrderedDict()
        for row, (sets, size) in self.items.items():
            if row in gone:
                self.nbytes -= size
            else:
                items[row - int(np.searchsorted(removed, row))] = (sets, size)
        self.items = items

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
            self._reader = self.store.open_extras()
        return {r: self.extension.decode(self._reader.extras(GROUP, r)) for r in rows}

    def rows_changed(self, removed: np.ndarray | None = None) -> None:
        """The store's rows changed (a place added or removed): read them from its current files from now on."""
        self.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def not_prepared(name: str, map_dir: Path, why: str) -> StateNotPreparedError:
    """The error of a re-ranking whose saved state is missing: names the command that prepares it."""
    return StateNotPreparedError(
        f"re-ranking '{name}' is not prepared for the map {Path(map_dir).name!r} ({why}); prepare it once with "
        f"`vprkit rerank prepare MAP --rerank {name}` (or build the map with --rerank {name}): it is never "
        f"computed while answering a request"
    )


class ComputedPatches:
    """Candidates' patch sets computed from the map's images (a map stored without them).

    With ``saved`` (a :class:`~vprkit.rerank.saved.SavedState`), payloads computed once are saved
    into the map and read back by later calls instead of running the backbone again. Payloads go
    through the extension's storage format (``encode`` → ``decode``) whether saved or not, so the
    scores are those a map built with the same re-ranking settings gives, on the first call and after.
    ``compute=False`` (a service) never runs the backbone: a row without a saved payload is a
    :class:`StateNotPreparedError`. A live map keeps the rows in step with :meth:`row_added` and
    :meth:`rows_changed` instead of building the re-ranker again.
    """

    stored = False

    def __init__(
        self,
        extension: PatchesExtension,
        backbone: Backbone,
        extraction: ExtractionOptions,
        images: ImageSource,
        keys: Sequence[str],
        saved: SavedState | None = None,
        sha256: Sequence[bytes] | None = None,
        compute: bool = True,
        name: str = "custom",
    ):
        self.name = name  # the re-ranking preset, for messages
        self.extension, self.backbone, self.extraction = extension, backbone, extraction
        self.images, self.keys = images, list(keys)
        self.saved = saved
        self.sha256 = list(sha256) if sha256 is not None else [b""] * len(keys)
        self.compute_missing = compute
        self._index: dict[int, tuple[Path, int]] | None = None
        self._held: dict[int, dict[str, np.ndarray]] = {}  # payloads of rows added live that could not be saved

    def _saved_index(self) -> dict[int, tuple[Path, int]]:
        if self._index is None:
            self._index = {} if self.saved is None else self.saved.index(self.keys, self.sha256)
        return self._index

    def missing_rows(self) -> list[int]:
        """Map rows with no saved (or held) payload."""
        index = self._saved_index()
        return [r for r in range(len(self.keys)) if r not in index and r not in self._held]

    def __call__(self, rows: list[int]) -> dict[int, list[PatchSet]]:
        index = self._saved_index()
        out = {r: self.extension.decode(self.saved.read(*index[r])) for r in rows if r in index}
        out.update({r: self.extension.decode(self._held[r]) for r in rows if r in self._held and r not in out})
        todo = [r for r in rows if r not in out]
        if todo and not self.compute_missing:
            assert self.saved is not None  # compute=False is only made with a saved state (make_reranker)
            raise not_prepared(self.name, self.saved.map_dir, f"{len(todo)} map image(s) lack patches")
        if todo:
            for r, payload in self.compute(todo).items():
                out[r] = self.extension.decode(payload)
        return out

    def compute(self, rows: list[int], progress: bool | str = False) -> dict[int, dict[str, np.ndarray]]:
        """Payloads of ``rows`` from the map's images, saved as one shard when a saver is set."""
        keys = [self.keys[r] for r in rows]
        row_of = dict(zip(keys, rows))
        payloads: dict[int, dict[str, np.ndarray]] = {}
        for batch, feats in extract(
            self.backbone, self.extraction, self.images, keys, progress, on_failure=ignore_failures
        ):
            for key, payload in zip(batch.keys, self.extension.encode(batch, feats)):
                payloads[row_of[key]] = payload
        lost = [self.keys[r] for r in rows if r not in payloads]
        if lost:
            raise MapError(f"cannot re-rank: map images {lost[:3]} are no longer readable in {self.images.describe()}")
        if self.saved is not None:
            done = list(payloads)
            shard = self.saved.save_rows(
                [self.keys[r] for r in done], [self.sha256[r] for r in done], [payloads[r] for r in done]
            )
            if shard is not None:
                self._saved_index().update({r: (shard, i) for i, r in enumerate(done)})
        return payloads

    def prepare(self, chunk: int = PREPARE_CHUNK, progress: bool = True) -> int:
        """Compute and save the payloads of every map row not saved yet; returns how many were computed."""
        todo = [r for r in range(len(self.keys)) if r not in self._saved_index()]
        bar = tqdm(total=len(todo), desc="re-ranking patches", unit="img", disable=not progress)
        for i in range(0, len(todo), chunk):
            self.compute(todo[i : i + chunk])
            bar.update(len(todo[i : i + chunk]))
        bar.close()
        return len(todo)

    def encode_place(self, batch, features) -> dict[str, np.ndarray]:
        """The payload of a place being added (its image's batch and dense features, from the map's models)."""
        return self.extension.encode(batch, features)[0]

    def save_place(self, key: str, sha256: bytes, payload: Mapping[str, np.ndarray]) -> Path | None:
        """Save an added place's payload as a new shard (``None``: not saved, e.g. a map opened without saving).

        Done before the place is written to the map (a shard naming a key the map lacks is never read), so the
        caller removes the shard again if the place is not added.
        """
        return None if self.saved is None else self.saved.save_rows([key], [sha256], [payload])

    def row_added(self, key: str, sha256: bytes, payload: dict[str, np.ndarray], shard: Path | None) -> None:
        """A place appended at the end of the map (its payload saved in ``shard``, or held in memory)."""
        row = len(self.keys)
        self.keys.append(key)
        self.sha256.append(bytes(sha256))
        if shard is not None:
            self._saved_index()[row] = (shard, 0)
        else:
            self._held[row] = payload

    def rows_changed(self, removed: np.ndarray | None = None) -> None:
        """Rows ``removed`` from the map: later rows move down, as in the store."""
        if removed is None or not len(removed):
            return
        index, held = self._saved_index(), self._held
        shift = _row_shift(len(self.keys), removed)
        gone = set(int(r) for r in removed)
        self.keys = [k for r, k in enumerate(self.keys) if r not in gone]
        self.sha256 = [h for r, h in enumerate(self.sha256) if r not in gone]
        self._index = {int(shift[r]): at for r, at in index.items() if r not in gone}
        self._held = {int(shift[r]): p for r, p in held.items() if r not in gone}

    def close(self) -> None:
        pass


def _row_shift(n_rows: int, removed: np.ndarray) -> np.ndarray:
    """Each old row's new number once ``removed`` rows are deleted (later rows move down)."""
    rows = np.arange(n_rows)
    return rows - np.searchsorted(np.sort(np.asarray(removed, np.int64)), rows, side="left")


def make_reranker(
    options: RerankOptions,
    *,
    backbone: Backbone,
    vocabulary,
    stored: PatchesExtension | None,
    store: "MapStore",
    keys: Sequence[str],
    images: ImageSource | None,
    log: Callable[[str], None] = logger.info,
    save: bool = True,
    compute: bool = True,
) -> "PatchReranker":
    """A re-ranker for a map: its stored patches when they match ``options.patches``, else patches computed on the fly.

    On the fly, the patch state (NetVLAD centres, α, PCA) is fitted on a sample of the map's images
    the first time and saved into the map with the candidates' patches as they are computed
    (:mod:`vprkit.rerank.saved`); later calls read them back. ``save=False`` keeps everything in memory.
    ``compute=False`` (what a service asks) neither fits nor runs the backbone on the map's images: the
    patches must be stored or prepared (saved state covering every row), else :class:`StateNotPreparedError`.
    """
    settings = options.settings
    device = module_device(backbone)  # match where the models run
    if stored is not None and stored.stores_same_as(options.patches):
        return PatchReranker(
            settings, stored, StoredPatches(store, stored), device, route_neighbours(settings, store, log)
        )
    if not compute:
        computed = prepared_patches(options, backbone, vocabulary, store, keys, save, log)
        return PatchReranker(settings, computed.extension, computed, device, route_neighbours(settings, store, log))
    places = route_neighbours(settings, store, log)
    if images is None:
        raise MapError(
            f"re-ranking '{settings.name}' needs the map's images or patches stored with these settings; "
            f"{store.dir} has neither"
        )
    ext = PatchesExtension(options.patches, backbone, vocabulary)
    saved = SavedState(store.dir, ext, writable=save, log=log)
    if ext.needs_fit and not saved.load_state():
        sample = sample_keys(keys, int(ext.options["fit_images"]), options.seed)
        log(
            f"re-ranking '{settings.name}': the map stores no matching patch descriptors; computing them from "
            f"{images.describe()} as needed, after fitting their state on {len(sample)} images (once: state and "
            f"patches are saved into the map; `vprkit rerank prepare` or --rerank at build time does it up front)"
        )
        ext.fit(extract(backbone, options.extraction, images, sample, "re-ranking fit", on_failure=ignore_failures))
        saved.save_state()
    else:
        log(f"re-ranking '{settings.name}': using the patch state saved in {saved.folder}")
    sha = store.read_entries()["content_sha256"]
    computed = ComputedPatches(ext, backbone, options.extraction, images, keys, saved, list(sha), name=settings.name)
    return PatchReranker(settings, ext, computed, device, places)


def prepared_patches(
    options: RerankOptions,
    backbone: Backbone,
    vocabulary,
    store: "MapStore",
    keys: Sequence[str],
    save: bool,
    log: Callable[[str], None] = logger.info,
) -> ComputedPatches:
    """The saved patch state and payloads of every map row (``vprkit rerank prepare``), read without computing any;
    a :class:`StateNotPreparedError` naming the command when the state or any row's payload is missing."""
    name = options.settings.name
    ext = PatchesExtension(options.patches, backbone, vocabulary)
    saved = SavedState(store.dir, ext, writable=save, log=log)
    if ext.needs_fit and not saved.load_state():
        raise not_prepared(name, store.dir, "no saved patch state")
    sha = store.read_entries()["content_sha256"]
    computed = ComputedPatches(
        ext, backbone, options.extraction, None, keys, saved, list(sha), compute=False, name=name
    )
    missing = computed.missing_rows()
    if missing:
        raise not_prepared(name, store.dir, f"{len(missing)} of {len(keys)} map images lack saved patches")
    log(f"re-ranking '{name}': using the patch state and patches saved in {saved.folder}")
    return computed


def route_neighbours(
    settings: RerankConfig, store: "MapStore", log: Callable[[str], None] = logger.info
) -> RouteNeighbours | None:
    """The map's places for ``settings.same_place`` (``None`` when the preset does not use them);
    ``"auto"``: each top-1's own place, read off the map's descriptors around it
    (:func:`~vprkit.rerank.places.place_similarity`, :class:`~vprkit.rerank.places.RouteNeighbours`)."""
    if settings.same_place is None:
        return None
    if settings.same_place == "auto":
        read = lambda rows: store.read_global(rows)  # noqa: E731
        similarity = place_similarity(read, len(store))
        log(
            f"re-ranking '{settings.name}': the global top-1's place is its route neighbours, outward while they are "
            f"as alike as the map's top {1 - PLACE_SIMILARITY_QUANTILE:.0%} of image pairs (cosine > {similarity:.3f}, "
            f"at most ±{MAX_PLACE_RADIUS} rows); within it the global order stands"
        )
        return RouteNeighbours(len(store), MAX_PLACE_RADIUS, store.read_poses(), read_rows=read, similarity=similarity)
    return RouteNeighbours(len(store), settings.same_place, store.read_poses())


class PatchReranker(Reranker):
    """Re-ranks a global shortlist with multi-scale patch matching (see module docs).

    ``candidates`` turns map rows into their patch sets (:class:`StoredPatches` or
    :class:`ComputedPatches`); decoded sets are cached across queries.
    """

    def __init__(
        self,
        settings: RerankConfig,
        extension: PatchesExtension,
        candidates: "StoredPatches | ComputedPatches",
        device: "torch.device | str | None" = None,
        places: RouteNeighbours | None = None,
    ):
        if settings.same_place is not None and places is None:
            raise ValueError(
                f"re-ranking preset {settings.name!r} uses same_place = {settings.same_place}: "
                "pass the map's RouteNeighbours (make_reranker does)"
            )
        self.settings = settings
        self.places = places if settings.same_place is not None else None
        self.device = device  # where patch matching runs (None: where the descriptors are, the CPU)
        self.name = settings.name
        self.shortlist = settings.shortlist
        self.scorer = SCORERS.get(settings.scorer)
        self.prescorer = None if settings.prescorer is None else SCORERS.get(settings.prescorer)
        self.cache = CandidateCache(CANDIDATE_CACHE_BYTES)
        self.timings: list[float] = []  # seconds per re-ranked query
        # the guarded fusion's constants (vprkit.rerank.fusion.guard_options)
        self.guard = guard_options(settings.global_gap)
        self._observer: Callable[[ScoreRecord], None] | None = None
        self._match_counts: np.ndarray | None = None  # the cascade's counts of the last patch_scores call
        self.extension = extension
        self.candidates = candidates
        self.stored = candidates.stored

    def record_scores(self, observer: Callable[[ScoreRecord], None] | None, whole_shortlist: bool = False) -> None:
        """Report every query's :class:`ScoreRecord` to ``observer`` (``None``: stop) — how benchmarks
        record scores to replay other fusion and cascade rules without matching again.

        ``whole_shortlist``: from now on also match and spatially verify every shortlist candidate (no
        global gap; a cascade that verifies them all, so their mutual-match counts are known), whatever
        the preset's gap and ``verify``; one recording then serves every preset with the same patches
        and scorer. The ranking this re-ranker returns is then that of the whole shortlist.
        """
        self._observer = observer
        if whole_shortlist:
            self.settings = self.settings.replace(global_gap=None, verify=self.shortlist)
            self.guard = guard_options(None)

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
        """``scales × candidates`` spatial scores of one query against its shortlist (candidates in global order).

        With the ``verify`` setting, only that many candidates are spatially verified (the cascade of
        :mod:`vprkit.rerank.cascade`); otherwise every candidate is, one pair at a time, as the original.
        """
        self._match_counts = None
        if self.settings.verify is not None:
            found = cascade_scores(
                query_sets,
                candidates,
                self.scorer,
                self.settings.weights,
                self.settings.verify,
                self.device,
                self.prescorer,
                self.settings.fine_budget,
            )
            self._match_counts = found.match_counts
            return found.scores
        out = np.zeros((len(query_sets), len(candidates)))
        for s, q in enumerate(query_sets):
            matches = mutual_nn_grouped(q.descriptors, [c[s].descriptors for c in candidates], self.device)
            for c, (cand, m) in enumerate(zip(candidates, matches)):
                out[s, c] = self.scorer(q, cand[s], m).value
        return out

    def perfect_scores(self, query_sets: list[PatchSet]) -> np.ndarray:
        """Each scale's perfect spatial score for this query (:func:`vprkit.rerank.scoring.perfect_score`)."""
        return np.array([perfect_score(self.settings.scorer, q) for q in query_sets])

    def fuse(
        self,
        per_scale: np.ndarray | None,
        head_scores: np.ndarray,
        keep: np.ndarray,
        matched: np.ndarray | None = None,
        head: np.ndarray | None = None,
        perfect: np.ndarray | None = None,
    ) -> np.ndarray:
        """Final scores of one query's shortlist from its matched candidates' spatial scores
        (:func:`vprkit.rerank.fusion.rank_shortlist`; ``per_scale`` is ``None`` when nothing was matched;
        ``head``: the shortlist's map rows, which the preset's ``same_place`` needs; ``perfect``: each
        scale's perfect score, which its ``min_agreement`` needs)."""
        same_place = None
        if self.places is not None:
            if head is None:
                raise ValueError(
                    f"re-ranking preset {self.name!r} needs the shortlist's map rows to find the top-1's place"
                )
            same_place = self.places.mask(np.asarray(head))
        return rank_shortlist(
            per_scale,
            head_scores,
            keep,
            self.settings.weights,
            self.settings.global_weight,
            matched,
            self.guard["alpha"],
            same_place,
            perfect,
            self.settings.min_agreement,
        )

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
            # only the candidates within the global gap may move (the rest keep their global order
            # below); a few more are matched to measure the spread of chance patch scores
            head_scores = scores[qi, : len(head)]
            keep = within_global_gap(head_scores, self.settings.global_gap)
            matched = matched_candidates(head_scores, keep, self.guard["minimum"])
            per_scale = self._match_counts = None
            if keep.sum() >= 2:
                picked = np.flatnonzero(matched)
                sets = self.candidate_sets([head[i] for i in picked])
                per_scale = self.patch_scores(qsets, [sets[head[i]] for i in picked])
            perfect = self.perfect_scores(qsets)
            if self._observer is not None:
                self._observer(
                    ScoreRecord(np.asarray(head), head_scores, matched, per_scale, self._match_counts, perfect)
                )
            fused = self.fuse(per_scale, head_scores, keep, matched, np.asarray(head), perfect)
            order = np.argsort(-fused, kind="stable")
            out_rows[qi, : len(head)] = np.asarray(head)[order]
            out_scores[qi, : len(head)] = fused[order]
            tail = slice(len(head), rows.shape[1])  # beyond the shortlist: global order, below it
            out_scores[qi, tail] = np.where(
                rows[qi, tail] >= 0, fused.min() - 1.0 - np.arange(rows.shape[1] - len(head)), -np.inf
            )
            self.timings.append(time.perf_counter() - t0)
        return out_rows, out_scores

    def prepare(self, progress: bool = True) -> int:
        """Compute and save every map image's patches (a map stored without them); returns how many were computed."""
        return 0 if self.stored else self.candidates.prepare(progress=progress)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "stored": self.stored, **self.settings.to_dict()}

    # ---- a live map's writes ---------------------------------------------------------------------
    def rows_changed(self, poses: np.ndarray, removed: np.ndarray | None = None) -> None:
        """Follow a write to the map (rows ``removed``, or one added at the end) without building anything again:
        cached candidates are renumbered, the candidates' source reads the new rows, the route places the new poses."""
        if removed is not None and len(removed):
            self.cache.renumber(removed)
        self.candidates.rows_changed(removed)
        if self.places is not None:
            old = self.places
            self.places = RouteNeighbours(
                len(poses), old.radius, poses, read_rows=old.read_rows, similarity=old.similarity
            )

    def close(self) -> None:
        self.candidates.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
