"""Image scores from a SuperSegment retrieval table (pure functions).

The table for one query: ``images`` (Qs×K′ map-image rows of the retrieved segments, −1 = none)
and ``sims`` (Qs×K′ similarities, higher is better), one row per query SuperSegment.

- :func:`weighted`: SegVLAD's rule — similarities min–max normalised over the whole table of *this
  query*, then an image's score is the sum of the normalised similarities of its retrieved segments.
- :func:`max_seg`: MaxSeg — number of query segments whose top-1 neighbour is in the image.
- :func:`max_sim`: MaxSim — the best single raw similarity of any of the image's segments.

Deliberate difference from the reference code (Revisit-Anything, ``func_vpr.py``, ``get_matches``
with ``method="max_seg_topk_wt_borda_Im"``, called from ``place_rec_main.py``'s ``recall_segloc``
with ``sims = 2 − (top-50 squared L2 distances)``): there ``sims_min = np.min(sims)`` and
``sims_max = np.max(sims)`` are taken over the similarity table of *all* query segments of *all*
queries at once. Here the minimum and maximum are those of the one query's table. Because an image's
score sums normalised similarities, ``Σ(s − min)/(max − min)``, images with different numbers of
retrieved segments change order when ``min`` changes; so with the reference's rule one query's
ranking depends on which other queries are evaluated with it (scored alone or in another batch, the
same query can rank its candidates differently). Normalising per query keeps each query's ranking a function of that query only; it is the
intended behaviour, not an approximation to be fixed.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..options import did_you_mean

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


VOTING_RULES = {"weighted": weighted, "maxseg": max_seg, "maxsim": max_sim}


def vote(images: np.ndarray, sims: np.ndarray, n_images: int, rule: str = "weighted") -> np.ndarray:
    """Each map image's score under the voting ``rule`` (one of :data:`VOTINGS`)."""
    if rule not in VOTING_RULES:
        raise ConfigError(f"voting must be one of {', '.join(VOTINGS)}, got {rule!r}{did_you_mean(rule, VOTINGS)}")
    return VOTING_RULES[rule](images, sims, n_images)
