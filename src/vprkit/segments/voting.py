"""Image scores from a SuperSegment retrieval table (pure functions).

The table for one query: ``images`` (Qs×K′ map-image rows of the retrieved segments, −1 = none)
and ``sims`` (Qs×K′ similarities, higher is better), one row per query SuperSegment.

- :func:`weighted`: SegVLAD's rule — similarities min–max normalised over the whole table, then an
  image's score is the sum of the normalised similarities of its retrieved segments.
- :func:`max_seg`: MaxSeg — number of query segments whose top-1 neighbour is in the image.
- :func:`max_sim`: MaxSim — the best single raw similarity of any of the image's segments.
"""

from __future__ import annotations

import numpy as np

VOTINGS = ("weighted", "maxseg", "maxsim")


def minmax(sims: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    s = np.asarray(sims, np.float64)
    valid = np.isfinite(s) if valid is None else valid & np.isfinite(s)
    if not valid.any():
        return np.zeros_like(s)
    lo, hi = s[valid].min(), s[valid].max()
    out = (s - lo) / (hi - lo) if hi > lo else np.ones_like(s)
    return np.where(valid, out, 0.0)


def weighted(images: np.ndarray, sims: np.ndarray, n_images: int) -> np.ndarray:
    images = np.asarray(images, np.int64)
    valid = images >= 0
    w = minmax(sims, valid)
    return np.bincount(images[valid], weights=w[valid], minlength=n_images)[:n_images]


def max_seg(images: np.ndarray, sims: np.ndarray, n_images: int) -> np.ndarray:
    images = np.asarray(images, np.int64).reshape(len(images), -1)
    sims = np.asarray(sims, np.float64).reshape(images.shape)
    s = np.where(images >= 0, sims, -np.inf)
    best = images[np.arange(len(images)), np.argmax(s, 1)] if images.shape[1] else np.zeros(0, np.int64)
    best = best[best >= 0]
    return np.bincount(best, minlength=n_images)[:n_images].astype(np.float64)


def max_sim(images: np.ndarray, sims: np.ndarray, n_images: int) -> np.ndarray:
    images = np.asarray(images, np.int64)
    valid = images >= 0
    out = np.full(n_images, -np.inf)
    np.maximum.at(out, images[valid], np.asarray(sims, np.float64)[valid])
    return out


def vote(images: np.ndarray, sims: np.ndarray, n_images: int, rule: str = "weighted") -> np.ndarray:
    if rule == "weighted":
        return weighted(images, sims, n_images)
    if rule == "maxseg":
        return max_seg(images, sims, n_images)
    if rule == "maxsim":
        return max_sim(images, sims, n_images)
    from ..errors import ConfigError

    raise ConfigError(f"voting must be one of {VOTINGS}, got {rule!r}")
