"""Sequence-mode answers that carry an estimate, like a single image's: streams, evaluation and the service.

A frame localised as part of a sequence is ranked by its best trajectory
(:mod:`vprkit.retrieval.sequence`); its :class:`~vprkit.pipeline.QueryResult` then gets

- matches whose ``score`` is the mean raw cosine along that row's trajectory (``score_kind``
  ``sequence_mean_cosine``: it reads like a single image's cosine; the ranking itself uses the hub-corrected
  trajectory score) and whose ``cosine`` is the frame's own global cosine with the row;
- the same :class:`~vprkit.retrieval.estimate.Estimate` as a single image (position or route position,
  heading, spread, confidence, unknown), from :func:`vprkit.pipeline.estimates.estimate_for` with the
  sequence-ranked rows, the frame's own cosines and the *sequence support* of the winning trajectory
  (:class:`~vprkit.retrieval.sequence.TrajectoryEvidence`: the share of the window's frames whose own top-1
  lies on it); ``estimate.evidence["sequence"]`` repeats what the trajectory rests on.

:class:`LiveSequence` is one stream's state on a :class:`~vprkit.pipeline.live.LiveMap` (the service's
sequence mode): its matcher, and the map version it refers to — a map changed since (a write, a reload)
restarts the stream instead of mixing rows of two maps.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..images import image_source
from ..retrieval.sequence import (
    SCORE_KIND,
    OnlineSequenceMatcher,
    SequenceSettings,
    TrajectoryEvidence,
    sequence_evidence,
    sequence_scores,
    top_k as sequence_top_k,
)
from .live import LiveMap
from .estimates import estimate_for
from .localization import QueryResult, make_match, query_batches
from .open import Map

# Digits kept of the sequence evidence in an estimate (as the estimate's own numbers).
EVIDENCE_DIGITS = 4


def sequence_result(
    m: Map,
    key: str,
    rows: np.ndarray,
    frame_cosines: np.ndarray,
    evidence: TrajectoryEvidence,
    headings: np.ndarray | None = None,
) -> QueryResult:
    """The result of frame ``key`` ranked ``rows`` (best first, −1 padding) by sequence matching, whose own
    cosine with every map row is ``frame_cosines`` and whose trajectories' evidence is ``evidence``."""
    rows = np.asarray(rows, np.int64)
    keep = rows >= 0
    rows = rows[keep]
    frame_cosines = np.asarray(frame_cosines, np.float32).reshape(-1)
    cosines = frame_cosines[rows]
    mean_cosine, support = evidence.mean_cosine[: keep.sum()], evidence.support[: keep.sum()]
    est = estimate_for(m, rows, cosines, frame_cosines, float(support[0]) if rows.size else None)
    est.evidence["sequence"] = {
        "frames": evidence.frames,
        "length": int(evidence.paths.shape[1]),
        "support": round(float(support[0]), EVIDENCE_DIGITS) if rows.size else None,
        "mean_cosine": round(float(mean_cosine[0]), EVIDENCE_DIGITS) if rows.size else None,
    }
    matches = [
        make_match(m, int(r), float(mc), SCORE_KIND, float(c), headings) for r, mc, c in zip(rows, mean_cosine, cosines)
    ]
    return QueryResult(key, matches, 0.0, estimate=est)


def push_frame(
    m: Map,
    matcher: OnlineSequenceMatcher,
    key: str,
    descriptor: np.ndarray,
    map_globals: np.ndarray,
    top_k: int,
    headings: np.ndarray | None = None,
) -> QueryResult:
    """Frame ``key`` (its global ``descriptor``) added to a stream's ``matcher`` and localised with the frames before."""
    frame_cosines = map_globals @ np.asarray(descriptor, np.float32)
    (rows,), _ = sequence_top_k(matcher.push(frame_cosines)[None], top_k)
    return sequence_result(m, key, rows, frame_cosines, matcher.evidence(rows[rows >= 0]), headings)


def offline_results(
    m: Map, keys: list[str], descriptors: np.ndarray, settings: SequenceSettings, k: int, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, list[QueryResult]]:
    """Time-ordered queries (``keys``, their global ``descriptors``) against the route-ordered map: the Q×k
    ranked rows, each row's mean raw cosine along its trajectory, and each query's result with its estimate."""
    map_globals = m.store.read_global().astype(np.float32)
    similarity = np.asarray(descriptors, np.float32) @ map_globals.T
    rows, _ = sequence_top_k(sequence_scores(similarity, settings, progress=progress), k)
    evidence = sequence_evidence(similarity, settings, rows, progress=progress)
    headings = m.data.headings
    results = [sequence_result(m, key, r, s, e, headings) for key, r, s, e in zip(keys, rows, similarity, evidence)]
    scores = np.full(rows.shape, -np.inf, np.float32)
    for i, e in enumerate(evidence):
        scores[i, : len(e.mean_cosine)] = e.mean_cosine
    return rows, scores, results


# ---- the service's streams ---------------------------------------------------------------------
@dataclass
class Described:
    """A frame's global descriptor computed on a live map (or why it could not be: ``error``)."""

    query: str
    descriptor: np.ndarray | None = None
    error: str | None = None


def describe_live(live: LiveMap, frames: Mapping[str, Any]) -> list[Described]:
    """Global descriptors of decoded ``frames`` through the live map's model, queued and batched with its
    other model work (the live map's inference slots bound the passes, as for its localisations)."""

    def run_batch(named: dict[str, Any], _: Any) -> list[Described]:
        failed: dict[str, str] = {}
        out: dict[str, np.ndarray] = {}
        with live.lock.read():
            for qb in query_batches(live.map, image_source(named), on_failure=failed.__setitem__):
                out.update(zip(qb.keys, qb.global_descriptors))
        return [Described(k, out.get(k), None if k in out else failed.get(k, "not described")) for k in named]

    return live._batcher.run(frames, ("describe",), run_batch)


def map_version(live: LiveMap) -> tuple[Any, ...]:
    """What a stream's rows refer to: the live map object (a reload replaces it: its identity and opening time),
    the state of its ``map.json`` (each write records itself there) and its row count."""
    return id(live), live.opened, live._seen, len(live)


class MapGlobals:
    """The global descriptors of the live map served now, read once per map version (one N×D float32 copy)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version: tuple | None = None
        self._globals: np.ndarray | None = None

    def read(self, live: LiveMap, version: tuple) -> np.ndarray:
        """The descriptors of ``live`` at ``version`` (call under the live map's read lock)."""
        with self._lock:
            if self._version != version or self._globals is None:
                self._globals = live.map.store.read_global().astype(np.float32)
                self._version = version
            return self._globals


class LiveSequence:
    """One stream's sequence state on a live map: its matcher (``settings.length`` rows of N floats, raw and
    prepared) and the map version those rows refer to."""

    def __init__(self, settings: SequenceSettings):
        self.settings = settings
        self.matcher = OnlineSequenceMatcher(settings)
        self.version: tuple | None = None

    @property
    def nbytes_per_row(self) -> int:
        """Bytes this stream holds per map row: two float32 rows per frame of the window, one float64 mean."""
        return 2 * 4 * self.settings.length + 8

    def localize(
        self, live: LiveMap, key: str, descriptor: np.ndarray, top_k: int, cache: MapGlobals
    ) -> tuple[QueryResult, str | None]:
        """The frame localised with the stream's earlier frames, and why the stream restarted (None if it did not)."""
        with live.lock.read():
            version = map_version(live)
            restarted = None
            if self.version is not None and version != self.version:
                self.matcher.reset()
                restarted = "the map changed (places added, removed or moved, or reloaded)"
            self.version = version
            result = push_frame(
                live.map, self.matcher, key, descriptor, cache.read(live, version), top_k, live.map.data.headings
            )
        return result, restarted
