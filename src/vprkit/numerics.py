"""Numerical idioms shared by the stages, each written once: norm floor, L2 normalisation, z-scores,
reservoir sampling and PCA / whitened PCA.

Ground level: imports only numpy, torch and :mod:`vprkit.errors` (no stage), so every stage can use it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError

# Smallest norm a vector is divided by (zero vectors stay zero instead of becoming NaN).
NORM_FLOOR = 1e-12
# Standard deviations at or below this are "all entries equal": such rows z-score to zeros.
FLAT_STD = 1e-9
# PCA: when the wanted dimension is at most this fraction of the sample's rank, the leading axes come
# from a randomised SVD (Halko, Martinsson & Tropp 2011) instead of an exact eigen-decomposition: much
# faster and lighter for high-dimensional descriptors (patch VLADs), with an error far below what
# matching resolves.
RANDOMISED_PCA_MAX_FRACTION = 0.25
RANDOMISED_PCA_OVERSAMPLE = 16
RANDOMISED_PCA_POWER_ITERATIONS = 4
RANDOMISED_PCA_SEED = 0
PCA_METHODS = ("auto", "exact", "randomised")
# Added to each axis' variance before whitening (numerical safety for near-zero variance).
WHITEN_EPS = 1e-6


def l2_normalise(x, axis: int = -1):
    """Unit-L2 rows along ``axis``; norms below :data:`NORM_FLOOR` are floored (zero stays zero).

    Works on numpy arrays (result keeps a floating dtype) and torch tensors (``F.normalize``).
    """
    if isinstance(x, torch.Tensor):
        return F.normalize(x, p=2, dim=axis, eps=NORM_FLOOR)
    x = np.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), NORM_FLOOR)


def zscore(scores, valid=None, *, nonfinite: str = "exclude", flat_std: float = FLAT_STD) -> np.ndarray:
    """Z-normalise along the last axis (float64), using population statistics (``ddof = 0``).

    - ``valid`` (bool, broadcastable to ``scores``): entries outside it are excluded from the mean
      and standard deviation and come out as 0. Without it, the finite entries are valid.
    - ``nonfinite``: ``"exclude"`` (default) treats NaN/±inf as invalid (→ 0, not in the statistics);
      ``"min"`` replaces each valid non-finite entry by the smallest finite valid value of its row
      and keeps it in the statistics (so a candidate without a score ranks with the worst).
    - A row whose standard deviation is ``≤ flat_std`` carries no ranking information and becomes
      all zeros; so does a row with no valid entry.
    """
    if nonfinite not in ("exclude", "min"):
        raise ValueError(f"nonfinite must be 'exclude' or 'min', got {nonfinite!r}")
    s = np.asarray(scores, np.float64)
    v = np.ones(s.shape, bool) if valid is None else np.broadcast_to(np.asarray(valid, bool), s.shape)
    finite = np.isfinite(s)
    if nonfinite == "exclude":
        v = v & finite
    elif not finite.all():
        ok = v & finite
        row_min = np.where(ok, s, np.inf).min(-1, keepdims=True)
        row_min = np.where(np.isfinite(row_min), row_min, 0.0)
        s = np.where(finite, s, row_min)
        v = v & ok.any(-1, keepdims=True)  # a row without any finite value has nothing to rank
    n = np.maximum(v.sum(-1, keepdims=True), 1)
    mean = np.where(v, s, 0).sum(-1, keepdims=True) / n
    var = np.where(v, (s - mean) ** 2, 0).sum(-1, keepdims=True) / n
    std = np.sqrt(var)
    flat = std <= flat_std
    z = np.where(flat, 0.0, (s - mean) / np.where(flat, 1.0, std))
    return np.where(v, z, 0.0)


class ReservoirSampler:
    """A uniform random sample of at most ``capacity_rows`` rows of everything passed to :meth:`add`.

    The first ``capacity_rows`` rows fill the pool; afterwards row ``j`` of the stream (0-based) is
    kept with probability ``capacity / (j + 1)`` and replaces a uniformly chosen slot (Vitter's
    algorithm R, vectorised per call). ``dim = None`` takes the width of the first rows added.
    """

    def __init__(self, capacity_rows: int, dim: int | None = None, seed: int = 0, dtype=np.float32):
        self.capacity = max(1, int(capacity_rows))
        self.dtype = np.dtype(dtype)
        self.pool = None if dim is None else np.empty((0, int(dim)), self.dtype)
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, rows) -> None:
        x = np.asarray(rows, self.dtype)
        if x.ndim != 2:
            raise ValueError(f"reservoir rows must be 2-D, got shape {x.shape}")
        if self.pool is None:
            self.pool = np.empty((0, x.shape[1]), self.dtype)
        if x.shape[1] != self.pool.shape[1]:
            raise ValueError(f"reservoir holds {self.pool.shape[1]}-d rows, got {x.shape[1]}-d")
        free = self.capacity - len(self.pool)
        if free > 0:
            take = x[:free]
            self.pool = np.concatenate([self.pool, take])
            self.seen += len(take)
            x = x[free:]
        if len(x):
            # row j of the stream is kept with probability capacity / (j + 1), at a uniform slot
            idx = self.seen + np.arange(len(x))
            slots = (self.rng.random(len(x)) * (idx + 1)).astype(np.int64)
            keep = slots < self.capacity
            self.pool[slots[keep]] = x[keep]
            self.seen += len(x)

    def __len__(self) -> int:
        return 0 if self.pool is None else len(self.pool)

    @property
    def nbytes(self) -> int:
        return 0 if self.pool is None else int(self.pool.nbytes)


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.float()
    return torch.from_numpy(np.ascontiguousarray(x, np.float32))


def _f32(a) -> np.ndarray | None:
    return None if a is None else np.asarray(a, np.float32)


class PCA:
    """PCA or whitened PCA to ``dim`` components: ``y = normalise(((x − mean)·Cᵀ) ⊙ scale + bias)``.

    ``components`` are ``dim×in`` (orthonormal rows when fitted), ``scale`` the per-axis whitening
    factors (``None``: no whitening), ``bias`` an additive term (only for trained linear layers, see
    :meth:`from_linear`). ``normalise``: re-normalise outputs to unit L2 (every caller does).
    """

    def __init__(self, mean, components, scale=None, bias=None, normalise: bool = True):
        self.mean = np.asarray(mean, np.float32)
        self.components = np.asarray(components, np.float32)  # out×in
        self.scale = _f32(scale)
        self.bias = _f32(bias)
        self.normalise = bool(normalise)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def scales(self) -> np.ndarray:
        """Whitening factors, ones when not whitened."""
        return self.scale if self.scale is not None else np.ones(self.dim, np.float32)

    @property
    def whitened(self) -> bool:
        return self.scale is not None

    @classmethod
    def fit(
        cls,
        x,
        dim: int,
        whiten: bool = False,
        whiten_reg: float = 0.0,
        seed: int = RANDOMISED_PCA_SEED,
        *,
        eps: float = WHITEN_EPS,
        method: str = "auto",
    ) -> "PCA":
        """Principal axes of ``x`` (``n×in``); ``dim`` is capped at the rank bound ``min(in, n − 1)``.

        ``method="auto"`` takes the randomised SVD (``torch.svd_lowrank``, ``q = dim + 16``, 4 power
        iterations, torch seeded with ``seed`` inside a forked RNG) when ``dim ≤ ¼·rank``, else an exact
        eigen-decomposition of the smaller of the ``in×in`` covariance and the ``n×n`` Gram matrix;
        ``"exact"`` / ``"randomised"`` force one. Whitening scales come from the variance of the
        projected sample (``n − 1`` denominator), so they match the axes either way:
        ``scale_i = 1/sqrt(var_i + whiten_reg·mean(var) + eps)`` (``whiten_reg = 0``: plain whitening).
        """
        if method not in PCA_METHODS:
            raise ConfigError(f"PCA method must be one of {PCA_METHODS}, got {method!r}")
        x = _as_tensor(x)
        if x.ndim != 2 or len(x) < 2:
            raise ConfigError(f"PCA needs at least 2 samples of a 2-D array, got {tuple(x.shape)}")
        n, d = x.shape
        rank = int(min(d, n - 1))
        dim = int(min(dim, rank))
        if dim < 1:
            raise ConfigError(f"too few samples ({n}) to fit a {dim}-d PCA")
        mean = x.mean(0)
        xc = x - mean
        if method == "randomised" or (method == "auto" and dim <= RANDOMISED_PCA_MAX_FRACTION * rank):
            with torch.random.fork_rng():
                torch.manual_seed(seed)  # reproducible fits
                _, _, v = torch.svd_lowrank(
                    xc, q=min(rank, dim + RANDOMISED_PCA_OVERSAMPLE), niter=RANDOMISED_PCA_POWER_ITERATIONS
                )
            comps = v[:, :dim].T.contiguous()
        elif n < d:  # eigen-decompose the n×n Gram matrix instead of the in×in covariance
            evals, evecs = torch.linalg.eigh(xc @ xc.T)
            order = evals.argsort(descending=True)[:dim]
            comps = ((xc.T @ evecs[:, order]) / evals[order].clamp_min(eps).sqrt()).T
        else:
            evals, evecs = torch.linalg.eigh(xc.T @ xc)
            comps = evecs[:, evals.argsort(descending=True)[:dim]].T
        scale = None
        if whiten:
            variance = (xc @ comps.T).pow(2).sum(0) / max(1, n - 1)
            floor = whiten_reg * max(float(variance.mean()), NORM_FLOOR) if whiten_reg else 0.0
            scale = (1.0 / (variance + floor + eps).sqrt()).numpy()
        return cls(mean.numpy(), comps.numpy(), scale)

    @classmethod
    def from_linear(cls, weight, bias=None) -> "PCA":
        """A trained projection ``y = W·x + b`` (e.g. Patch-NetVLAD's WPCA layer, any trailing 1×1 dims
        flattened), then L2."""
        w = np.asarray(weight, np.float32).reshape(np.shape(weight)[0], -1)
        return cls(np.zeros(w.shape[1], np.float32), w, None, bias)

    def transform(self, x, normalise: bool | None = None):
        """Project ``n×in`` rows (numpy → float32 numpy, torch → torch float32)."""
        is_tensor = isinstance(x, torch.Tensor)
        y = (_as_tensor(x) - torch.from_numpy(self.mean)) @ torch.from_numpy(self.components).T
        if self.scale is not None:
            y = y * torch.from_numpy(self.scale)
        if self.bias is not None:
            y = y + torch.from_numpy(self.bias)
        if self.normalise if normalise is None else normalise:
            y = l2_normalise(y)
        return y if is_tensor else y.numpy()

    __call__ = transform

    def state(self, prefix: str = "") -> dict[str, np.ndarray]:
        """``{prefix}mean``, ``{prefix}components``, and ``{prefix}scale`` / ``{prefix}bias`` when set."""
        st = {f"{prefix}mean": self.mean, f"{prefix}components": self.components}
        if self.scale is not None:
            st[f"{prefix}scale"] = self.scale
        if self.bias is not None:
            st[f"{prefix}bias"] = self.bias
        return st

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], prefix: str = "") -> "PCA":
        """Inverse of :meth:`state`; also reads SegVLAD's format, where whitening factors are stored
        (always, ones when not whitened) as ``{prefix}scales``."""

        def get(key):
            k = f"{prefix}{key}"
            return np.asarray(state[k]) if k in state else None

        scale = get("scale")
        if scale is None:
            scale = get("scales")
        return cls(state[f"{prefix}mean"], state[f"{prefix}components"], scale, get("bias"))
