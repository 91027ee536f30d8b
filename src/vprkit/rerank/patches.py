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

from ..aggregation.netvlad import NetVLADLayer
from ..aggregation.vlad import vlad_normalise
from ..errors import ConfigError
from ..numerics import PCA

# Residual channels processed at once when building the integral map: bounds memory to
# (h+1)·(w+1)·CLUSTER_CHUNK·D floats per image whatever K is.
CLUSTER_CHUNK = 16


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
    patches = [
        cells[i * scale.stride : i * scale.stride + p, j * scale.stride : j * scale.stride + p].reshape(-1, d)
        for i in range(rows)
        for j in range(cols)
    ]
    return torch.cat([layer(q.unsqueeze(0).float()) for q in patches])


# PCA / WPCA of patch descriptors: the toolkit's one PCA (exact or randomised SVD, optional
# whitening, L2 re-normalised; state stored as ``pca_*`` arrays in ``extensions/patches.npz``).
PatchProjection = PCA
