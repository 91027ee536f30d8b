"""Patch-NetVLAD's locally-global patch descriptors through an integral feature space.

Every square patch of ``P×P`` feature-map cells gets the NetVLAD of the cells inside it. Instead of
aggregating each patch separately, each cell's soft-assignment-weighted residuals
``a_k(x)·(x − c_k)`` are summed once into a zero-padded 2-D cumulative sum (an "integral VLAD"
map); a patch is then four look-ups, ``S[i+P, j+P] − S[i, j+P] − S[i+P, j] + S[i, j]``, for every
patch size and stride. Each patch is divided by ``P²`` (as the original), intra-normalised, flattened
and L2-normalised, then optionally projected by a PCA/WPCA and re-normalised.

A patch whose top-left cell is ``(i, j)`` has its centre at ``((j + P/2)·stride, (i + P/2)·stride)``
in the backbone's input pixels (cell ``(i, j)`` is centred at ``((j + ½)·stride, (i + ½)·stride)``).
Patch sizes larger than the feature map are clamped to it (small inputs such as 224×112 Nordland
frames give only a 7×14 map at stride 16), so every scale yields at least one patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..aggregation.base import l2n
from ..aggregation.netvlad import NetVLADLayer
from ..aggregation.vlad import vlad_normalise
from ..errors import ConfigError

# Residual channels processed at once when building the integral map: bounds memory to
# (h+1)·(w+1)·CLUSTER_CHUNK·D floats per image whatever K is.
CLUSTER_CHUNK = 16
# PCA of patch descriptors: when the wanted dimension is at most this fraction of the sample's
# rank, the leading axes come from a randomised SVD (Halko, Martinsson & Tropp 2011) instead of a
# full eigen-decomposition. For 10,000 samples of 11,520-d (K = 96 × 120-d Lite2) to 512-d that is
# 8 s and 1 GB instead of 130 s and 4.6 GB; its error is far below what patch matching resolves.
RANDOMISED_PCA_MAX_FRACTION = 0.25
RANDOMISED_PCA_OVERSAMPLE = 16
RANDOMISED_PCA_POWER_ITERATIONS = 4
RANDOMISED_PCA_SEED = 0


@dataclass(frozen=True)
class PatchScale:
    """One scale of patches: size and stride in feature-map cells."""

    size: int
    stride: int = 1

    def __post_init__(self):
        if self.size < 1 or self.stride < 1:
            raise ConfigError(f"patch size and stride must be ≥ 1, got size {self.size} stride {self.stride}")

    def effective(self, grid: tuple[int, int]) -> tuple[int, int, int]:
        """``(size, rows, cols)`` of the patch grid on a feature map of ``grid`` cells (size clamped)."""
        p = min(self.size, grid[0], grid[1])
        return p, (grid[0] - p) // self.stride + 1, (grid[1] - p) // self.stride + 1


def patch_centres(scale: PatchScale, grid: tuple[int, int], cell_stride: int) -> np.ndarray:
    """``n×2`` (x, y) pixel centres of the patches of ``scale`` on a ``grid`` feature map, row-major."""
    p, rows, cols = scale.effective(grid)
    ys, xs = np.meshgrid(np.arange(rows) * scale.stride, np.arange(cols) * scale.stride, indexing="ij")
    return np.stack([(xs.ravel() + p / 2) * cell_stride, (ys.ravel() + p / 2) * cell_stride], 1).astype(np.float32)


def patch_grid_positions(scale: PatchScale, grid: tuple[int, int]) -> np.ndarray:
    """``n×2`` (col, row) positions of the patches in patch-grid units (for rapid spatial scoring)."""
    _, rows, cols = scale.effective(grid)
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)


def box_sums(integral: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Sums over all ``size×size`` boxes (step ``stride``) of the map whose zero-padded cumulative
    sum is ``integral`` (``(h+1)×(w+1)×…``) → ``rows×cols×…``."""
    rows = (integral.shape[0] - 1 - size) // stride + 1
    cols = (integral.shape[1] - 1 - size) // stride + 1
    top, left = slice(0, (rows - 1) * stride + 1, stride), slice(0, (cols - 1) * stride + 1, stride)
    bottom = slice(size, size + (rows - 1) * stride + 1, stride)
    right = slice(size, size + (cols - 1) * stride + 1, stride)
    return integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]


def integral_map(values: torch.Tensor) -> torch.Tensor:
    """``h×w×…`` → zero-padded 2-D cumulative sum ``(h+1)×(w+1)×…`` (float64 to keep box sums exact)."""
    s = values.double().cumsum(0).cumsum(1)
    return torch.nn.functional.pad(s, [0, 0] * (values.ndim - 2) + [1, 0, 1, 0])


@torch.no_grad()
def integral_patch_vlad(cells: torch.Tensor, layer: NetVLADLayer, scales: list[PatchScale]) -> list[torch.Tensor]:
    """NetVLAD of every patch at every scale for one image's ``h×w×D`` cells, in one pass.

    Returns one ``n_s×(K·D)`` tensor per scale (rows in row-major patch order), normalised like
    NetVLAD (intra-norm, flatten, L2).
    """
    h, w, d = cells.shape
    x = layer.prepare(cells.reshape(h * w, d).float())
    a = layer.soft_assign(x)  # (h·w)×K
    k = a.shape[1]
    shapes = [s.effective((h, w)) for s in scales]
    out = [torch.empty(r * c, k, d) for _, r, c in shapes]
    for k0 in range(0, k, CLUSTER_CHUNK):
        k1 = min(k, k0 + CLUSTER_CHUNK)
        ak = a[:, k0:k1]
        # residual map a_k(x)·(x − c_k) = a_k(x)·x − a_k(x)·c_k for this chunk of clusters
        res = ak.unsqueeze(-1) * x.unsqueeze(1) - ak.unsqueeze(-1) * layer.centroids[k0:k1].detach()
        integral = integral_map(res.reshape(h, w, k1 - k0, d))
        for o, scale, (p, rows, cols) in zip(out, scales, shapes):
            o[:, k0:k1] = (box_sums(integral, p, scale.stride) / (p * p)).reshape(rows * cols, k1 - k0, d).float()
    return [vlad_normalise(o) for o in out]


@torch.no_grad()
def direct_patch_vlad(cells: torch.Tensor, layer: NetVLADLayer, scale: PatchScale) -> torch.Tensor:
    """Reference: NetVLAD of each patch computed separately (slow; for tests and checks)."""
    h, w, d = cells.shape
    p, rows, cols = scale.effective((h, w))
    patches = [cells[i * scale.stride : i * scale.stride + p, j * scale.stride : j * scale.stride + p].reshape(-1, d)
               for i in range(rows) for j in range(cols)]
    return torch.cat([layer(q.unsqueeze(0).float()) for q in patches])


class PatchProjection:
    """PCA or whitened PCA (WPCA) of patch descriptors, fitted on a sample; output re-normalised."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, scale: np.ndarray | None = None,
                 bias: np.ndarray | None = None):
        self.mean = np.asarray(mean, np.float32)
        self.components = np.asarray(components, np.float32)  # out×in
        self.scale = None if scale is None else np.asarray(scale, np.float32)
        self.bias = None if bias is None else np.asarray(bias, np.float32)

    @classmethod
    def from_linear(cls, weight: np.ndarray, bias: np.ndarray | None = None) -> "PatchProjection":
        """A trained projection ``y = W·x + b`` (e.g. Patch-NetVLAD's WPCA layer), then L2."""
        w = np.asarray(weight, np.float32).reshape(np.shape(weight)[0], -1)
        return cls(np.zeros(w.shape[1], np.float32), w, None, bias)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, samples: np.ndarray, dim: int, whiten: bool = False, eps: float = 1e-6) -> "PatchProjection":
        """Principal axes of ``samples`` (n×in); ``dim`` is capped at ``min(in, n − 1)``.

        Small ``dim`` relative to the rank uses a randomised SVD (see ``RANDOMISED_PCA_*``), else an
        exact eigen-decomposition of the smaller of the covariance and Gram matrices. Whitening
        scales come from the variance of the projected samples, so they match the axes either way.
        """
        x = torch.from_numpy(np.asarray(samples, np.float32))
        rank = int(min(x.shape[1], x.shape[0] - 1))
        dim = int(min(dim, rank))
        if dim < 1:
            raise ConfigError(f"too few patch descriptors ({len(x)}) to fit a projection")
        mean = x.mean(0)
        xc = x - mean
        if dim <= RANDOMISED_PCA_MAX_FRACTION * rank:
            with torch.random.fork_rng():
                torch.manual_seed(RANDOMISED_PCA_SEED)  # reproducible fits
                _, _, v = torch.svd_lowrank(xc, q=min(rank, dim + RANDOMISED_PCA_OVERSAMPLE),
                                            niter=RANDOMISED_PCA_POWER_ITERATIONS)
            comps = v[:, :dim].T.contiguous()
        elif x.shape[0] < x.shape[1]:  # n < in: eigen-decompose the n×n Gram matrix instead
            evals, evecs = torch.linalg.eigh(xc @ xc.T)
            order = evals.argsort(descending=True)[:dim]
            comps = ((xc.T @ evecs[:, order]) / evals[order].clamp_min(eps).sqrt()).T
        else:
            evals, evecs = torch.linalg.eigh(xc.T @ xc)
            comps = evecs[:, evals.argsort(descending=True)[:dim]].T
        scale = None
        if whiten:
            variance = (xc @ comps.T).pow(2).sum(0) / max(1, len(x) - 1)
            scale = (1.0 / (variance + eps).sqrt()).numpy()
        return cls(mean.numpy(), comps.numpy(), scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.float() - torch.from_numpy(self.mean)) @ torch.from_numpy(self.components).T
        if self.scale is not None:
            y = y * torch.from_numpy(self.scale)
        if self.bias is not None:
            y = y + torch.from_numpy(self.bias)
        return l2n(y)

    def state(self, prefix: str = "") -> dict[str, np.ndarray]:
        st = {f"{prefix}mean": self.mean, f"{prefix}components": self.components}
        if self.scale is not None:
            st[f"{prefix}scale"] = self.scale
        if self.bias is not None:
            st[f"{prefix}bias"] = self.bias
        return st

    @classmethod
    def from_state(cls, state, prefix: str = "") -> "PatchProjection":
        return cls(state[f"{prefix}mean"], state[f"{prefix}components"], state.get(f"{prefix}scale"), state.get(f"{prefix}bias"))
