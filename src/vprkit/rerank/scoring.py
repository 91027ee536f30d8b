"""Spatial scoring of patch matches: RANSAC homography and rapid spatial scoring, one interface.

Both scorers take a query's and a candidate's :class:`PatchSet` at one scale plus their mutual
matches, and return a :class:`SpatialScore` (higher is better; also which matches are inliers, for
drawing). Register new scorers in :data:`SCORERS`.

Both follow the reference implementation (Patch-NetVLAD, ``patchnetvlad/tools/patch_matcher.py``,
``PatchMatcher.compare_two_ransac`` and ``compare_two_spatial``) on identical inputs, and are tested
against it in ``tests/rerank/test_fidelity_*.py``:

- RANSAC fits the homography *candidate → query* (source = candidate patch centres, destination =
  query patch centres) with the matches in *candidate* order, as the reference does (its mutual
  matches come out ordered by database patch index); direction and order change which minimal
  samples OpenCV draws, so inlier counts differ per pair otherwise (see
  ``benchmarks/bench_ransac_direction.py``). Threshold 1.5 × the pixel step between neighbouring
  patches (the reference's ``16 * stride * 1.5``), OpenCV's default 2,000 iterations and 0.995
  confidence; score = inliers / number of query patches.
- Rapid spatial scoring anchors at the largest patch index on each axis of the query's patch grid
  (columns − 1, rows − 1), not at the grid size.

The sign is flipped (the reference returns negative scores so that smaller is better) and a fit
that OpenCV rejects scores 0 instead of raising. Patch centres differ from the reference's VGG16
receptive-field centres by a constant offset applied to both images, which leaves homography
inliers unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..registry import Registry
from .matching import Matches

# RANSAC needs at least this many correspondences to fit a homography.
HOMOGRAPHY_MIN_MATCHES = 4
# The original's inlier threshold: 1.5 × the pixel step between neighbouring patches (24 px for
# VGG16's 16-px cells at patch stride 1).
RANSAC_THRESHOLD_STEPS = 1.5
RANSAC_CONFIDENCE = 0.995
RANSAC_MAX_ITERS = 2000

# |h₃₃| below this: the inverse homography maps points to infinity and is left unnormalised.
DEGENERATE_HOMOGRAPHY = 1e-12


@dataclass
class PatchSet:
    """One image's patches at one scale.

    ``centres`` are pixel (x, y) centres in the backbone's input image; ``positions`` are (col, row)
    in patch-grid units; ``grid`` is the patch grid's (rows, cols); ``step_px`` the pixel distance
    between neighbouring patches.
    """

    descriptors: torch.Tensor
    centres: np.ndarray
    positions: np.ndarray
    grid: tuple[int, int]
    step_px: float

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])


@dataclass
class SpatialScore:
    value: float
    inliers: np.ndarray  # bool per match
    # the fitted geometry. RANSAC: 3×3 homography mapping query pixels to candidate pixels — the
    # inverse of the candidate → query homography that is fitted (the reference's direction).
    model: np.ndarray | None = None


def _empty(m: Matches) -> SpatialScore:
    return SpatialScore(0.0, np.zeros(len(m), bool))


def _homography_score(query: PatchSet, candidate: PatchSet, matches: Matches, method: str) -> SpatialScore:
    """Inliers of a robust homography fit (OpenCV ``method``) over the query's patch count; see :func:`ransac_score`."""
    import cv2

    if len(matches) < HOMOGRAPHY_MIN_MATCHES or len(query) == 0:
        return _empty(matches)
    order = np.argsort(np.asarray(matches.candidate), kind="stable")  # the reference's candidate order
    src = candidate.centres[np.asarray(matches.candidate)[order]].astype(np.float32)
    dst = query.centres[np.asarray(matches.query)[order]].astype(np.float32)
    threshold = RANSAC_THRESHOLD_STEPS * query.step_px
    h, mask = cv2.findHomography(src, dst, getattr(cv2, method), threshold, maxIters=RANSAC_MAX_ITERS,
                                 confidence=RANSAC_CONFIDENCE)
    if mask is None or h is None:
        return _empty(matches)
    inliers = np.zeros(len(matches), bool)
    inliers[order] = mask.ravel().astype(bool)
    try:
        model = np.linalg.inv(h)
        model = model / model[2, 2] if abs(model[2, 2]) > DEGENERATE_HOMOGRAPHY else model
    except np.linalg.LinAlgError:
        model = None
    return SpatialScore(float(inliers.sum()) / len(query), inliers, model)


def ransac_score(query: PatchSet, candidate: PatchSet, matches: Matches) -> SpatialScore:
    """Inliers of a RANSAC homography between matched patch centres, over the query's patch count.

    As the reference (``PatchMatcher.compare_two_ransac``): ``cv2.findHomography(candidate centres,
    query centres, RANSAC, 1.5 × step)`` with the matches sorted by candidate patch index. Matches may
    come in any order; ``inliers`` is returned in the order of ``matches``.
    """
    return _homography_score(query, candidate, matches, "RANSAC")


def usac_score(query: PatchSet, candidate: PatchSet, matches: Matches) -> SpatialScore:
    """:func:`ransac_score`'s inlier ratio, fitted by OpenCV's USAC (``USAC_DEFAULT``) instead of plain RANSAC.

    Same homography, threshold, confidence and score; what changes is how hypotheses are tested. Plain
    RANSAC scores every hypothesis on every match, and on a wrong candidate (few inliers, so no early
    stop) that is 2,000 full passes per scale — most of a re-ranked shortlist's time. USAC rejects a
    bad hypothesis after a few matches by a sequential probability ratio test (SPRT) and polishes the
    best one by local optimisation, so a wrong candidate costs tens of times less while a right one
    keeps its inliers (``benchmarks/bench_rerank.py`` compares the two on whole shortlists).
    """
    return _homography_score(query, candidate, matches, "USAC_DEFAULT")


def rapid_spatial_score(query: PatchSet, candidate: PatchSet, matches: Matches) -> SpatialScore:
    """Patch-NetVLAD's rapid spatial scoring: how tightly match displacements cluster about their mean.

    ``d = p_db − p_q`` per match (patch-grid units), ``r = |d − mean(d)|`` per axis, score
    ``Σ[(x_max − r_x)² + (y_max − r_y)²] / n_query`` with ``x_max = cols − 1`` and ``y_max = rows − 1``
    of the query's patch grid: the largest patch index on each axis, as the reference
    (``PatchMatcher.compare_two_spatial`` anchors at ``max(indices[0])``, ``max(indices[1])`` of the
    patch index grid, which the reference shares between query and database images).
    Matches within one step of the mean displacement are reported as inliers (for drawing).
    """
    if len(matches) == 0 or len(query) == 0:
        return _empty(matches)
    d = candidate.positions[matches.candidate].astype(np.float64) - query.positions[matches.query].astype(np.float64)
    r = np.abs(d - d.mean(0))
    rows, cols = query.grid
    x_max, y_max = cols - 1, rows - 1
    value = float((((x_max - r[:, 0]) ** 2) + ((y_max - r[:, 1]) ** 2)).sum()) / len(query)
    return SpatialScore(value, (r <= 1.0).all(1))


SCORERS: Registry[Callable[[PatchSet, PatchSet, Matches], SpatialScore]] = Registry("spatial scorer")
SCORERS.register("ransac", ransac_score)
SCORERS.register("usac", usac_score)
SCORERS.register("rapid", rapid_spatial_score)
