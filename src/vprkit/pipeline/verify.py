"""Geometric verification inside a localisation: which candidates are checked, with which camera, and what
the estimate learns from it (:mod:`vprkit.rerank.verification` does the checking).

A localisation with ``verify`` checks the top ``top_n`` answers of each query with real local features
and a robust two-view model. The answer's inliers enter the confidence (the ``verified`` model of
:mod:`vprkit.retrieval.estimate`), its two-view model gives the query's rotation (and translation
direction) relative to the matched map image, and with ``rerank`` the verified head of the ranking is
reordered by inliers fused with the global cosine. The verifier (its network and its cache of map
images' features) is kept on the :class:`~vprkit.pipeline.open.Map`, so a service pays for each map
image's features once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ConfigError, MapError
from ..rerank.two_view import Intrinsics
from ..rerank.verification import (
    DEFAULT_PIPELINE,
    VERIFY_TOP_N,
    LocalFeatureReranker,
    Verification,
    Verifier,
)
from ..retrieval import QueryBatch
from .open import Map


@dataclass(frozen=True)
class VerifySettings:
    """What a localisation verifies: the top ``top_n`` answers with the ``features`` pipeline (``xfeat`` …),
    within ``time_budget_s`` per query (None: no limit; the answer itself is always checked); ``rerank``
    reorders the verified head by inliers; ``intrinsics`` ("fx,fy,cx,cy" or "f", pixels of the query as
    given) — else each query file's EXIF focal length, else an assumed focal, flagged uncalibrated."""

    top_n: int = VERIFY_TOP_N
    features: str = DEFAULT_PIPELINE
    rerank: bool = False
    time_budget_s: float | None = None
    intrinsics: str | None = None

    def __post_init__(self) -> None:
        if self.top_n < 1:
            raise ConfigError(f"verify needs top_n ≥ 1 candidates, got {self.top_n}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"the verification time budget must be > 0 seconds, got {self.time_budget_s}")
        if self.intrinsics is not None:
            Intrinsics.parse(self.intrinsics)  # a wrong spelling fails before any work


def verify_settings(verify: VerifySettings | int | bool | None) -> VerifySettings | None:
    """A call's ``verify``: None/False/0 → none, True → the defaults, N → the top N, or settings as given."""
    if verify is None or verify is False or (isinstance(verify, int) and not isinstance(verify, bool) and verify == 0):
        return None
    if verify is True:
        return VerifySettings()
    if isinstance(verify, VerifySettings):
        return verify
    if isinstance(verify, int):
        return VerifySettings(top_n=verify)
    raise ConfigError(f"verify must be a number of candidates or VerifySettings, got {verify!r}")


def get_verifier(m: Map, settings: VerifySettings) -> Verifier:
    """The map's verifier for ``settings`` (kept on the map: one network, one cache of map features)."""
    key = (settings.features, settings.top_n, settings.time_budget_s)
    if key not in m.verifiers:
        try:
            files = m.data.images
        except MapError:
            raise MapError(
                f"verification reads the map's images, and {m.dir} was built from decoded frames (not on disk)"
            ) from None
        spec = m.config.image  # map images prepared exactly as queries are (resize and crop)

        def load(name: str) -> np.ndarray:
            return files.prepare(name, spec)[0]

        m.verifiers[key] = Verifier(load, settings.features, top_n=settings.top_n, time_budget=settings.time_budget_s)
    return m.verifiers[key]


def _query_intrinsics(keys: Sequence[str], settings: VerifySettings) -> list[Intrinsics | None]:
    """Each query's camera in pixels of its original file: as given, else its EXIF focal, else None (assumed)."""
    out: list[Intrinsics | None] = []
    for key in keys:
        cam = None
        if settings.intrinsics is not None:
            cam = Intrinsics.parse(settings.intrinsics)  # size None: pixels of the file as given
        elif Path(key).is_file():
            try:
                cam = Intrinsics.from_exif(key)
            except (OSError, ValueError):  # no readable EXIF: the focal is assumed, and the answer says so
                cam = None
        out.append(cam)
    return out


def verify_batch(
    m: Map, qb: QueryBatch, rows: np.ndarray, scores: np.ndarray, settings: VerifySettings
) -> tuple[np.ndarray, np.ndarray, list[Verification]]:
    """Verify each query's top answers; with ``settings.rerank`` the rows and scores come back reordered."""
    verifier = get_verifier(m, settings)
    reranker = LocalFeatureReranker(verifier, m.keys, shortlist=rows.shape[1])
    new_rows, new_scores = reranker.rerank(qb, rows, scores, intrinsics=_query_intrinsics(qb.keys, settings))
    if settings.rerank:
        return new_rows, new_scores, reranker.last
    return rows, scores, reranker.last


def answer_check(m: Map, report: Verification, answer_row: int):
    """The verified candidate that is the final answer (``answer_row``), or None if it was not verified."""
    key = m.keys[answer_row] if answer_row >= 0 else None
    return next((c for c in report.candidates if c.key == key), None)
