"""Regions from the backbone's own dense features: k-means on (feature, position) → connected components.

Each grid cell is described by its L2-normalised feature concatenated with its (x, y) position
(scaled to [0, 1] and weighted by ``spatial``); k-means (FAISS, a few iterations) gives ``k`` labels;
every 4-connected component of a label becomes a segment. Components smaller than ``min_cells``
cells are dropped, and those cells are handled by the ``uncovered`` rule of the extension
("nearest" by default, i.e. merged into the nearest kept region). Masks are the cells blown up to
pixels (stride × stride blocks), so they map back onto exactly those cells.
"""

from __future__ import annotations

import faiss
import numpy as np
from scipy import ndimage

from ..errors import ConfigError
from ..numerics import l2_normalise
from .base import SEGMENTERS, Segmenter


@SEGMENTERS.register("features")
class FeatureClusterSegmenter(Segmenter):
    name = "features"
    needs_features = True

    def __init__(self, k: int = 8, spatial: float = 1.0, min_cells: int = 3, niter: int = 20, seed: int = 0):
        self.k = int(k)
        self.spatial = float(spatial)
        self.min_cells = int(min_cells)
        self.niter = int(niter)
        self.seed = int(seed)

    def labels(self, features: np.ndarray) -> np.ndarray:
        """``h×w`` component labels (−1 for dropped cells) of an ``h×w×D`` feature grid."""
        f = np.asarray(features, dtype=np.float32)
        h, w, d = f.shape
        x = f.reshape(-1, d)
        x = l2_normalise(x, axis=1)
        ys, xs = np.meshgrid(np.arange(h) / max(h - 1, 1), np.arange(w) / max(w - 1, 1), indexing="ij")
        pos = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32) * self.spatial
        z = np.ascontiguousarray(np.concatenate([x, pos], 1))
        k = max(1, min(self.k, len(z)))
        if k == 1:
            cluster = np.zeros(len(z), np.int64)
        else:
            km = faiss.Kmeans(z.shape[1], k, niter=self.niter, seed=self.seed, verbose=False, min_points_per_centroid=1)
            km.train(z)
            cluster = km.index.search(z, 1)[1].ravel()
        cluster = cluster.reshape(h, w)
        out = np.full((h, w), -1, np.int64)
        nxt = 0
        for c in np.unique(cluster):
            comp, n = ndimage.label(cluster == c)
            sizes = np.bincount(comp.ravel(), minlength=n + 1)
            for j in range(1, n + 1):
                if sizes[j] >= self.min_cells:
                    out[comp == j] = nxt
                    nxt += 1
        return out

    def segment(self, image, features=None, stride=None):
        if features is None or stride is None:
            raise ConfigError("the 'features' segmenter needs the image's dense features and the backbone stride")
        lab = self.labels(features)
        H, W = image.shape[:2]
        pix = np.repeat(np.repeat(lab, stride, 0), stride, 1)
        full = np.full((H, W), -1, np.int64)
        hh, ww = min(H, pix.shape[0]), min(W, pix.shape[1])
        full[:hh, :ww] = pix[:hh, :ww]
        ids = np.unique(full)
        ids = ids[ids >= 0]
        return full[None] == ids[:, None, None]

    def identity(self):
        return {"segmenter": self.name, "k": self.k, "spatial": self.spatial, "min_cells": self.min_cells}
