"""Seeded AnyLoc vocabularies and descriptors, shared by the AnyLoc record script and its test.

numpy only (imported by ``.venv-ref`` and ``.venv``). The centres look like AnyLoc's ``c_centers.pt``: the
raw means of unit descriptors, so each is a direction scaled to a norm below 1 (AnyLoc's cosine k-means
stores ``mean(x/‖x‖)``); descriptors are drawn around them so that every cluster is used and the cosine
assignment (AnyLoc's) differs from a dot-product one on the short centres.
"""

from __future__ import annotations

import numpy as np

NUM_CLUSTERS = 32
DIM = 1536  # DINOv2 ViT-G/14
CENTRE_SEED = 0
DESCRIPTOR_SEED = 1
CENTRE_NORMS = (0.2, 0.9)
NOISE = 1.0  # noise norm relative to the unit pull towards the descriptor's centre
GRIDS = ((34, 45), (16, 16))  # AnyLoc's 476×630 input (34×45 patches), and a square one
BATCH = 2


def seeded_centres(k: int = NUM_CLUSTERS, dim: int = DIM, seed: int = CENTRE_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((k, dim))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return (c * rng.uniform(*CENTRE_NORMS, size=(k, 1))).astype(np.float32)


def seeded_descriptors(centres: np.ndarray, grids=GRIDS, batch: int = BATCH, seed: int = DESCRIPTOR_SEED):
    """One ``batch×(h·w)×D`` float32 array per grid: a random centre's direction plus noise, random scale."""
    rng = np.random.default_rng(seed)
    k, dim = centres.shape
    directions = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    out = []
    for h, w in grids:
        n = h * w
        pick = rng.integers(0, k, size=(batch, n))
        noise = rng.standard_normal((batch, n, dim)) * (NOISE / np.sqrt(dim))
        scale = rng.uniform(0.5, 5.0, size=(batch, n, 1))  # DINOv2 values are not unit vectors
        out.append(((directions[pick] + noise) * scale).astype(np.float32))
    return out
