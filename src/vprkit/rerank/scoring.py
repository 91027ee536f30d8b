"""Spatial scoring of patch matches: RANSAC homography and rapid spatial scoring, one interface.

Both scorers take a query's and a candidate's :class:`PatchSet` at one scale plus their mutual
matches, and return a :class:`SpatialScore` (higher is better; also which matches are inliers, for
drawing). Register new scorers in :data:`SCORERS`.
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
    model: np.ndarray | None = None  # the fitted geometry (RANSAC: 3×3 homography query → candidate)


def _empty(m: Matches) -> SpatialScore:
    return SpatialScore(0.0, np.zeros(len(m), bool))


def ransac_score(query: PatchSet, candidate: PatchSet, matches: Matches) -> SpatialScore:
    """Inliers of a RANSAC homography between matched patch centres, over the query's patch count."""
    import cv2

    if len(matches) < HOMOGRAPHY_MIN_MATCHES or len(query) == 0:
        return _empty(matches)
    src = query.centres[matches.query].astype(np.float32)
    dst = candidate.centres[matches.candidate].astype(np.float32)
    threshold = RANSAC_THRESHOLD_STEPS * query.step_px
    h, mask = cv2.findHomography(src, dst, cv2.RANSAC, threshold, maxIters=RANSAC_MAX_ITERS, confidence=RANSAC_CONFIDENCE)
    if mask is None:
        return _empty(matches)
    inliers = mask.ravel().astype(bool)
    return SpatialScore(float(inliers.sum()) / len(query), inliers, h)


def rapid_spatial_score(query: PatchSet, candidate: PatchSet, matches: Matches) -> SpatialScore:
    """Patch-NetVLAD's rapid spatial scoring: how tightly match displacements cluster about their mean.

    ``d = p_db − p_q`` per match (patch-grid units), ``r = |d − mean(d)|`` per axis, score
    ``Σ[(x_max − r_x)² + (y_max − r_y)²] / n_query`` with ``x_max, y_max`` the query grid's extents.
    Matches within one step of the mean displacement are reported as inliers (for drawing).
    """
    if len(matches) == 0 or len(query) == 0:
        return _empty(matches)
    d = candidate.positions[matches.candidate] - query.positions[matches.query]
    r = np.abs(d - d.mean(0))
    y_max, x_max = query.grid
    value = float((((x_max - r[:, 0]) ** 2) + ((y_max - r[:, 1]) ** 2)).sum()) / len(query)
    return SpatialScore(value, (r <= 1.0).all(1))


SCORERS: Registry[Callable[[PatchSet, PatchSet, Matches], SpatialScore]] = Registry("spatial scorer")
SCORERS.register("ransac", ransac_score)
SCORERS.register("rapid", rapid_spatial_score)
