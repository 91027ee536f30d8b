"""Localising queries on an opened map: describe them, retrieve, re-rank, estimate where they were taken.

Data flow of :func:`localize`: the queries (paths, decoded frames) become an image source
(:func:`vprkit.images.image_source`) → the map's backbone and aggregator describe them batch by batch
(:func:`query_batches`) → the map's retriever (FAISS index, or SegVLAD's segments) proposes rows
(:func:`search`) → the re-ranker, if any, reorders the shortlist (:mod:`vprkit.rerank`) → the
estimate (position, heading, confidence, unknown; :mod:`vprkit.retrieval.estimate`) is computed
from the global cosines.

Re-ranking has one carrier, :attr:`Config.rerank`: a map built for a re-ranking (``--rerank speed``)
records it, and :func:`rerank_settings` resolves what a call asks for against it, once.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..backbones.extract import extract
from ..config import Config, RerankConfig
from ..errors import ConfigError, ImageReadError, MapError
from ..images import FileImages, ImageInput, ImageSource, image_source
from ..presets import get_rerank_config
from ..rerank import RerankOptions, make_reranker
from ..retrieval import RETRIEVERS, QueryBatch, pad_topk
from ..retrieval.estimate import (
    Estimate,
    estimate,
    row_cosines,
    score_kind,
)
from .models import on_cpu
from .estimates import geolocated, map_calibration
from .open import Map, open_map
from .verify import VerifySettings, answer_check, verify_batch, verify_settings

logger = logging.getLogger(__name__)

QueryImages = ImageSource | Sequence[ImageInput] | Mapping[str, ImageInput]
# The ranking score when verification re-ranks: the global cosine plus the saturating inlier bonus.
VERIFIED_SCORE_KIND = "cosine_plus_inlier_bonus"
# What a caller passes to switch off the re-ranking a map was built for (the CLI's ``--rerank none``).
RERANK_OFF = "none"
# What a call may pass as ``rerank``: None (the map's own), RERANK_OFF/False, a preset name, settings, a re-ranker.
RerankChoice = str | RerankConfig | bool | None


def rerank_settings(config: Config, rerank: RerankChoice) -> RerankConfig | None:
    """The re-ranking a call applies: ``None`` → the one the map was built for (``config.rerank``, maybe none);
    ``"none"`` or ``False`` → none; a preset name → that preset; a :class:`RerankConfig` (named or not) → itself."""
    return config.rerank if rerank is None else _explicit_settings(rerank)


def _explicit_settings(rerank: RerankChoice) -> RerankConfig | None:
    """What an explicit choice (not None) asks for: None when it switches re-ranking off."""
    if rerank is False or (isinstance(rerank, str) and rerank.lower() in (RERANK_OFF, "")):
        return None
    if rerank is True:
        raise ConfigError("rerank=True is ambiguous: name a re-ranking preset, or pass None for the map's own")
    return get_rerank_config(rerank)


def checked_choice(rerank: RerankChoice | Any) -> RerankChoice | Any:
    """A call's re-ranking choice with any preset name looked up now (an unknown name fails before a map is
    opened): None (the map's own) and a re-ranker stay as they are, off becomes :data:`RERANK_OFF`."""
    if rerank is None or _is_reranker(rerank):
        return rerank
    return _explicit_settings(rerank) or RERANK_OFF


def _is_reranker(value: Any) -> bool:
    """A re-ranker already built (a service keeps one per setting), not a choice to resolve."""
    return hasattr(value, "rerank") and hasattr(value, "shortlist")


@dataclass
class Match:
    """One ranked map image. ``score`` ranks (its meaning is ``score_kind``: ``cosine`` for global retrieval,
    ``fused_zscore`` after re-ranking, …); ``cosine`` is the global cosine in every mode, comparable across modes."""

    key: str
    row: int
    score: float
    position: tuple[float, float] | None
    heading: float | None = None  # degrees, where the map has headings
    score_kind: str = "cosine"
    cosine: float | None = None
    latlon: tuple[float, float] | None = None  # WGS84 degrees, for a map whose poses are UTM (built from lat/lon)


@dataclass
class QueryResult:
    """A query's ranked matches and the :class:`~vprkit.retrieval.estimate.Estimate` (position, confidence, unknown)."""

    query: str
    matches: list[Match]
    seconds: float = 0.0
    error: str | None = None  # why the query could not be localised (unreadable image); matches are then empty
    estimate: Estimate | None = None
    rerank: str | None = None  # the re-ranking applied (its name), None for global retrieval only

    def to_dict(self) -> dict[str, Any]:
        out = {
            "query": self.query,
            "seconds": round(self.seconds, 4),
            "rerank": self.rerank,
            "matches": [
                {
                    "image": m.key,
                    "row": m.row,
                    "score": round(m.score, 6),
                    "score_kind": m.score_kind,
                    "cosine": None if m.cosine is None else round(m.cosine, 6),
                    "position": m.position,
                    **({} if m.latlon is None else {"latlon": [round(v, 8) for v in m.latlon]}),
                    "heading_deg": m.heading,
                }
                for m in self.matches
            ],
        }
        if self.estimate is not None:
            out["estimate"] = self.estimate.to_dict()
        return out if self.error is None else {**out, "error": self.error}


def query_batches(
    map: Map,
    images: ImageSource | str | os.PathLike,
    keys: Sequence[str] | None = None,
    progress: bool = False,
    on_failure: Callable[[str, str], None] | None = None,
) -> Iterator[QueryBatch]:
    """Queries of ``images`` through the map's backbone and aggregator, batch by batch."""
    for batch, feats in extract(map.backbone, map.config, images, keys, progress and "queries", on_failure):
        with torch.inference_mode():
            g = map.aggregator(feats).float().cpu().numpy()
        yield QueryBatch(batch, on_cpu(feats), g)


def search(map: Map, query: QueryBatch, top_k: int, reranker=None) -> tuple[np.ndarray, np.ndarray]:
    """Retrieve (and optionally re-rank) a query batch → rows and scores, Q×top_k, best first."""
    retriever = map.retriever()
    k = max(top_k, reranker.shortlist if reranker is not None else 0)
    rows, scores = retriever.search(query, k)
    rows, scores = pad_topk(rows, scores, k)
    if reranker is not None:
        rows, scores = reranker.rerank(query, rows, scores)
    return pad_topk(rows, scores, top_k)


def get_reranker(
    map: Map,
    rerank: RerankChoice | Any,
    log: Callable[[str], None] = logger.info,
    save: bool = True,
    compute: bool = True,
):
    """The re-ranker for ``map`` that ``rerank`` asks for (see :func:`rerank_settings`), or None.

    It reads the map's stored patches when they match the settings, else computes them on the fly:
    the patch state is fitted once and, with ``save``, saved into the map with the candidates'
    patches (new files only, under the map's write lock, renamed into place — even on a read-only
    open, so readers sharing the map never refit; ``save=False`` writes nothing, see
    :mod:`vprkit.rerank.saved`). A re-ranker already built (kept by a service) is returned as is.
    ``compute=False`` (a service answering a request) never fits nor runs the backbone on the map's
    images: a state that is neither stored nor prepared is a :class:`~vprkit.errors.StateNotPreparedError`
    naming ``vprkit rerank prepare``.
    """
    if _is_reranker(rerank):
        return rerank
    settings = rerank_settings(map.config, rerank)
    if settings is None:
        return None
    images = None
    if compute:
        try:
            images = map.data.images
        except MapError:
            if "patches" not in map.extensions:
                raise MapError(
                    f"re-ranking needs the map's images or stored patches; {map.dir} was built from decoded "
                    f"frames without --rerank, so neither is available"
                ) from None
    return make_reranker(
        RerankOptions.from_config(map.config, settings),
        backbone=map.backbone,
        vocabulary=map.vocabulary,
        stored=map.extensions.get("patches"),
        store=map.store,
        keys=map.keys,
        images=images,
        log=log,
        save=save,
        compute=compute,
    )


def query_source(queries: QueryImages, check_files: bool = True) -> ImageSource:
    """Query images as given (paths, decoded frames, a mapping name → image, or a source).

    With ``check_files``, a path that is not a file is an :class:`ImageReadError` before any work.
    """
    source = image_source(queries)
    if check_files and isinstance(source, FileImages):
        for key in source.keys:
            if not Path(key).is_file():
                raise ImageReadError(f"{key}: query image not found")
    return source


def localize(
    map: Map | str | os.PathLike,
    queries: QueryImages,
    top_k: int = 10,
    rerank: RerankChoice = None,
    progress: bool = False,
    device: str | None = None,
    unreadable: str = "raise",
    verify: VerifySettings | int | None = None,
) -> list[QueryResult]:
    """Top-``top_k`` places for each query: image paths, decoded frames (arrays / PIL images), or both.

    Results are in the order of ``queries`` and named as given (paths) or ``frame-000000`` … by
    position (frames; pass a mapping name → frame to name them). An unreadable query raises
    :class:`ImageReadError` (``unreadable="raise"``) or gets a result with its ``error`` and no
    matches while the others are localised (``"report"``). ``device`` applies when ``map`` is a
    path (an opened map keeps its models). ``rerank``: None re-ranks as the map was built to
    (``Config.rerank``), ``"none"`` not at all, or a preset name / :class:`RerankConfig`.

    Each result carries an :class:`~vprkit.retrieval.estimate.Estimate` (position, heading, spread,
    confidence, unknown) whose confidence comes from the global cosines whatever ``rerank`` is, and
    each match names its score (``score_kind``) and gives its global ``cosine``.

    ``verify`` (a number of candidates, or :class:`~vprkit.pipeline.verify.VerifySettings`) checks the top
    answers with local features and a two-view model: the answer's inliers enter the confidence and its
    relative rotation is in ``estimate.verification``; ``VerifySettings(rerank=True)`` also reorders by inliers.
    """
    if unreadable not in ("raise", "report"):
        raise ConfigError(f"unreadable must be 'raise' or 'report', got {unreadable!r}")
    rerank = checked_choice(rerank)
    checks = verify_settings(verify)
    m = map if isinstance(map, Map) else open_map(map, read_only=True, device=device)
    source = query_source(queries, check_files=unreadable == "raise")
    reranker = get_reranker(m, rerank)
    failed: dict[str, str] = {}
    done = _localize_batches(
        m, source, top_k, reranker, progress, None if unreadable == "raise" else failed.__setitem__, checks
    )
    if reranker is not None and not isinstance(map, Map):
        reranker.close()
    return [done[k] if k in done else QueryResult(k, [], 0.0, failed.get(k, "not localised")) for k in source.keys]


def _localize_batches(
    m: Map,
    source: ImageSource,
    top_k: int,
    reranker,
    progress: bool,
    on_failure: Callable[[str, str], None] | None,
    checks: VerifySettings | None = None,
) -> dict[str, QueryResult]:
    cal = map_calibration(m)
    kind = score_kind(RETRIEVERS.get(m.config.retriever), reranker)
    if checks is not None and checks.rerank:
        kind = VERIFIED_SCORE_KIND
    rerank_name = None if reranker is None else getattr(getattr(reranker, "settings", None), "name", "custom")
    headings = m.data.headings
    done: dict[str, QueryResult] = {}
    t0 = time.perf_counter()
    for qb in query_batches(m, source, progress=progress, on_failure=on_failure):
        rows, scores = search(m, qb, top_k, reranker)
        reports = None
        if checks is not None:
            rows, scores, reports = verify_batch(m, qb, rows, scores, checks)
        q = qb.global_descriptors
        # the global cosine of every returned row, and the query's top global cosines: the mode-independent evidence
        cos = scores if kind == "cosine" else row_cosines(m.store.read_global, q, rows)
        ev_rows, evidence = m.index.search(q, cal.search_depth())  # the answer's place and the best of another
        for i, key in enumerate(qb.keys):
            check = None if reports is None else answer_check(m, reports[i], int(rows[i][0]))
            est = estimate(
                rows[i],
                cos[i],
                m.poses,
                headings,
                cal,
                evidence=evidence[i],
                sequence=cal.sequence,
                evidence_rows=ev_rows[i],
                inliers=None if check is None else check.inliers,
            )
            if reports is not None:
                est.verification = {
                    "answer": None if check is None else check.to_dict(),
                    **{k: v for k, v in reports[i].to_dict().items() if k != "candidates"},
                    "checked": [c.key for c in reports[i].candidates],
                }
            matches = [
                make_match(m, int(r), float(v), kind, float(c), headings)
                for r, v, c in zip(rows[i], scores[i], cos[i])
                if r >= 0
            ]
            done[key] = QueryResult(key, matches, 0.0, estimate=geolocated(m, est), rerank=rerank_name)
        dt = (time.perf_counter() - t0) / len(qb.keys)  # extraction + search + estimate, per query
        for key in qb.keys:
            done[key].seconds = dt
        t0 = time.perf_counter()
    return done


def make_match(
    m: Map,
    row: int,
    score: float,
    kind: str = "cosine",
    cosine: float | None = None,
    headings: np.ndarray | None = None,
) -> Match:
    """The :class:`Match` of map row ``row``: its key, position and heading from the map."""
    pos = m.poses[row]
    heading = None if headings is None or not np.isfinite(headings[row]) else float(headings[row])
    position = None if np.isnan(pos).any() else (float(pos[0]), float(pos[1]))
    return Match(
        m.keys[row],
        row,
        score,
        position,
        heading,
        kind,
        score if cosine is None and kind == "cosine" else cosine,
        m.data.position_latlon(position),
    )
