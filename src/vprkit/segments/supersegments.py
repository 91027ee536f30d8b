"""SuperSegment descriptors: hard VLAD (or segment-average pooling) per SuperSegment, PCA, selection.

- :func:`supersegment_vlad` computes the AnyLoc hard VLAD of every SuperSegment of an image at once
  with :func:`vprkit.aggregation.vlad.residual_sums` and a ``S×N`` membership matrix (no N×K×D
  tensor), then :func:`~vprkit.aggregation.vlad.vlad_normalise`.
- :func:`supersegment_sap` (segment-average pooling, an ablation): mean of the L2-normalised patch
  descriptors of each SuperSegment, L2-normalised.
- :class:`PCA` projects to ≤ 1024-d (fitted on ≤ 50,000 reference SuperSegments), optionally with
  *regularised* whitening: component ``i`` is scaled by ``1/sqrt(λᵢ + reg·mean(λ))``. ``reg = 0`` is
  plain whitening, which hurts recall when fitted on few segments per dimension (see REFERENCE.md);
  the default is no whitening. Outputs are re-normalised. It is :class:`vprkit.numerics.PCA` with
  SegVLAD's signature and stored-state names.
- :func:`select_distinctive` caps the SuperSegments stored per image.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ..aggregation.vlad import assign, hard_vlad, residual_sums, vlad_normalise
from ..errors import ConfigError
from ..numerics import NORM_FLOOR, PCA as _PCA, l2_normalise
from ..options import did_you_mean

POOLINGS = ("vlad", "sap")
SELECTIONS = ("distinct", "area")


@contextmanager
def single_thread():
    """Run small torch ops on one thread: per-image SuperSegment matrices are tiny, and two OpenMP
    threads on a busy 2-core machine spend far longer synchronising than computing."""
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


def _t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def supersegment_vlad(features, membership, centres) -> np.ndarray:
    """``N×D`` patch descriptors, ``S×N`` membership, ``K×D`` centres → ``S×(K·D)`` VLADs (float32)."""
    x = _t(features).float().reshape(-1, centres.shape[-1])
    m = _t(membership).float()
    c = _t(centres).float()
    with single_thread():
        xn, labels = assign(x[None], c)
        res = residual_sums(xn, labels, c, m[None])[0]  # S×K×D
        return vlad_normalise(res).numpy()


def supersegment_vlad_loop(features, membership, centres) -> np.ndarray:
    """Reference implementation (one VLAD per SuperSegment, a loop); for tests."""
    x = _t(features).float()
    c = _t(centres).float()
    m = np.asarray(membership, dtype=bool)
    out = np.zeros((len(m), c.shape[0] * c.shape[1]), np.float32)
    for s, row in enumerate(m):
        if row.any():
            out[s] = hard_vlad(x[torch.from_numpy(row)][None], c)[0].numpy()
    return out


def supersegment_sap(features, membership) -> np.ndarray:
    """Segment-average pooling: L2-normalised mean of L2-normalised patch descriptors per SuperSegment."""
    x = l2_normalise(_t(features).float())
    m = _t(membership).float()
    with single_thread():
        return l2_normalise(m @ x).numpy()


def describe(features, membership, centres=None, pooling: str = "vlad") -> np.ndarray:
    if pooling == "vlad":
        if centres is None:
            raise ConfigError("VLAD pooling of SuperSegments needs a vocabulary")
        return supersegment_vlad(features, membership, centres)
    if pooling == "sap":
        return supersegment_sap(features, membership)
    raise ConfigError(f"SuperSegment pooling must be one of {POOLINGS}, got {pooling!r}")


class PCA(_PCA):
    """SegVLAD's view of :class:`vprkit.numerics.PCA`: ``fit(x, dim, whiten, reg)`` with regularised
    whitening, exact eigen-decomposition (as SegVLAD always fitted), single-threaded ``transform``, and
    state stored as ``pca_mean`` / ``pca_components`` / ``pca_scales`` (``extensions/segments.npz``)."""

    @classmethod
    def fit(cls, x: np.ndarray, dim: int, whiten: bool = False, reg: float = 0.1) -> "PCA":
        """Fit on ``x`` (n×D); ``dim`` is capped at ``min(D, n − 1)``. Whitening scales component ``i``
        by ``1/sqrt(λᵢ + reg·mean(λ))``."""
        return super().fit(x, dim, whiten=whiten, whiten_reg=reg, eps=NORM_FLOOR, method="exact")

    def transform(self, x, normalise: bool | None = None):
        with single_thread():
            return super().transform(x, normalise)

    __call__ = transform

    def state(self, prefix: str = "pca_") -> dict[str, np.ndarray]:
        return {f"{prefix}mean": self.mean, f"{prefix}components": self.components, f"{prefix}scales": self.scales}

    @classmethod
    def from_state(cls, state, prefix: str = "pca_") -> "PCA":
        return super().from_state(state, prefix)


def _distinct_key(descriptors: np.ndarray, areas: np.ndarray) -> np.ndarray:
    d = np.asarray(descriptors, np.float32)
    return d @ l2_normalise(d.mean(0))


def _area_key(descriptors: np.ndarray, areas: np.ndarray) -> np.ndarray:
    return -np.asarray(areas, np.float64)


# Selection rule → sort key (ascending: the first ``cap`` are kept).
SELECTION_KEYS = {"distinct": _distinct_key, "area": _area_key}


def select_distinctive(descriptors: np.ndarray, areas: np.ndarray, cap: int, rule: str = "distinct") -> np.ndarray:
    """Indices (ascending) of at most ``cap`` SuperSegments to keep.

    ``distinct``: lowest cosine similarity to the image's mean SuperSegment descriptor (what makes
    the image unlike its own average: the regions carrying place-specific content); ``area``: largest
    patch count. ``cap ≤ 0`` keeps everything.
    """
    if rule not in SELECTION_KEYS:
        raise ConfigError(
            f"segment selection must be one of {', '.join(SELECTIONS)}, got {rule!r}{did_you_mean(rule, SELECTIONS)}"
        )
    n = len(descriptors)
    if cap <= 0 or n <= cap:
        return np.arange(n)
    key = SELECTION_KEYS[rule](descriptors, areas)
    return np.sort(np.argsort(key, kind="stable")[:cap])
