"""Hard-assignment VLAD exactly as AnyLoc defines it, and the vocabulary it needs.

Order of operations (tested in ``tests/aggregation/test_vlad.py``):
1. L2-normalise each local descriptor;
2. assign it to the centre of highest cosine similarity;
3. residual = normalised descriptor − centre; sum residuals per cluster;
4. L2-normalise each cluster's sum (intra-normalisation; empty clusters stay zero);
5. concatenate (K·D) and L2-normalise the whole.

``assignments = m > 1`` is *multiple assignment* (Jégou, Douze & Schmid, IJCV 2010; for VLAD in
Jégou et al., TPAMI 2012): step 2 assigns each descriptor to its m highest-cosine centres and step 3
adds its residual to each of them. A patch seen from a shifted viewpoint often lands in a
neighbouring cell of the vocabulary; with m cells it still shares residual mass with the database
image, at no cost in dimension. m = 1 (the default) is AnyLoc's VLAD exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..backbones.base import DenseFeatures
from ..errors import ConfigError, VocabularyMismatchError
from .base import AGGREGATORS, Aggregator, l2n

# Keys of the descriptor identity that must agree between a vocabulary and the descriptors it encodes.
IDENTITY_KEYS = ("backbone", "block", "layer", "facet", "dim", "stride", "image")
KMEANS_ITERATIONS = 25  # FAISS's default; more iterations did not improve recall on Corridor


@dataclass
class Vocabulary:
    """K cluster centres (unit vectors, K×D float32) with what produced them.

    ``metadata`` holds the backbone identity (name, layer/block, facet, dim), the image spec and
    how the vocabulary was sampled; ``checksum`` covers centres and metadata so a map can refer to
    a shared (domain) vocabulary by checksum and notice if it changed.
    """

    centres: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    # Further centre sets from other k-means seeds on the same sample (S×K×D), for multi-vocabulary
    # VLAD (Jégou & Chum 2012). Everything else (SegVLAD, NetVLAD, patches) uses ``centres``.
    alternates: np.ndarray | None = None

    def __post_init__(self):
        self.centres = np.ascontiguousarray(self.centres, dtype=np.float32)
        if self.centres.ndim != 2:
            raise ConfigError(f"vocabulary centres must be K×D, got shape {self.centres.shape}")
        if self.alternates is not None:
            self.alternates = np.ascontiguousarray(self.alternates, dtype=np.float32)
            if self.alternates.ndim != 3 or self.alternates.shape[1:] != self.centres.shape:
                raise ConfigError(f"alternate centre sets must be S×{self.k}×{self.dim}, got {self.alternates.shape}")

    @property
    def sets(self) -> int:
        """How many centre sets (1 + alternates) the vocabulary holds."""
        return 1 + (0 if self.alternates is None else int(self.alternates.shape[0]))

    def centre_sets(self, n: int) -> list[np.ndarray]:
        """The first ``n`` centre sets (``centres`` first)."""
        if n > self.sets:
            raise VocabularyMismatchError(
                f"multi-vocabulary VLAD wants {n} centre sets but vocabulary {self.metadata.get('name', self.checksum)} "
                f"has {self.sets}; rebuild it with vocabulary sets ≥ {n}")
        return [self.centres] + ([] if n == 1 else list(self.alternates[: n - 1]))

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centres.shape[1])

    @property
    def checksum(self) -> str:
        h = hashlib.sha256(self.centres.tobytes())
        if self.alternates is not None:
            h.update(self.alternates.tobytes())
        h.update(json.dumps(self.metadata, sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def check_compatible(self, identity: dict[str, Any], source: str = "the descriptors") -> None:
        """Refuse to encode descriptors of another backbone, layer, facet, size or dimension."""
        mine = self.metadata.get("identity", {})
        diffs = [
            f"{k}: vocabulary {mine.get(k)!r} vs {source} {identity.get(k)!r}"
            for k in IDENTITY_KEYS
            if k in mine and k in identity and mine[k] != identity[k]
        ]
        if identity.get("dim") is not None and identity["dim"] != self.dim:
            diffs.append(f"dim: vocabulary {self.dim} vs {source} {identity['dim']}")
        if diffs:
            raise VocabularyMismatchError(
                f"vocabulary {self.metadata.get('name', self.checksum)} was built for other descriptors ("
                + "; ".join(dict.fromkeys(diffs))
                + "). Build a vocabulary with the same backbone, layer, facet and image size (vprkit vocab build)."
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as ``.npz`` (centres + JSON metadata + checksum)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        os.close(fd)
        try:
            extra = {} if self.alternates is None else {"alternates": self.alternates}
            np.savez(tmp, centres=self.centres, metadata=json.dumps(self.metadata, default=str), checksum=self.checksum, **extra)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"vocabulary file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                voc = cls(z["centres"], json.loads(str(z["metadata"])), z["alternates"] if "alternates" in z.files else None)
                stored = str(z["checksum"])
        except (KeyError, ValueError, OSError) as exc:
            raise ConfigError(f"{path} is not a vprkit vocabulary ({exc})") from None
        if stored != voc.checksum:
            raise VocabularyMismatchError(f"{path}: checksum mismatch (stored {stored}, computed {voc.checksum}); the file is corrupt")
        return voc


def _spherical_kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=max(256, len(x) // k + 1))
    km.train(x)
    return km.centroids / np.maximum(np.linalg.norm(km.centroids, axis=1, keepdims=True), 1e-12)


def fit_vocabulary(
    descriptors: np.ndarray, k: int = 32, metadata: dict[str, Any] | None = None, niter: int = KMEANS_ITERATIONS,
    seed: int = 0, sets: int = 1,
) -> Vocabulary:
    """Spherical k-means (FAISS, cosine) on L2-normalised descriptors → :class:`Vocabulary`.

    ``sets > 1`` also clusters the same sample with seeds ``seed + 1 …`` into alternate centre sets
    for multi-vocabulary VLAD.
    """
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim != 2 or len(x) < k:
        raise ConfigError(f"need at least K={k} descriptors to build a vocabulary, got {x.shape}")
    if sets < 1:
        raise ConfigError(f"a vocabulary needs at least one centre set, got sets={sets}")
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centres = _spherical_kmeans(x, k, niter, seed)
    alternates = np.stack([_spherical_kmeans(x, k, niter, seed + i) for i in range(1, sets)]) if sets > 1 else None
    meta = dict(metadata or {})
    meta.update({"k": k, "dim": int(x.shape[1]), "n_descriptors": int(len(x)), "niter": niter, "seed": seed, "sets": sets})
    # NetVLAD's α-initialisation needs how decisively descriptors pick their nearest centre
    from .netvlad import assignment_margin

    meta["assignment_margin"] = round(assignment_margin(x, centres), 6)
    return Vocabulary(centres, meta, alternates)


class DescriptorSampler:
    """Collects a bounded random sample of local descriptors across many images.

    AnyLoc samples 30% of the images above 2,000 and every 2nd patch in each direction; on top of
    that, ``max_bytes`` caps the pool so a 100k-image map never holds more than that in RAM.
    Images beyond the budget replace random earlier rows (reservoir sampling), so the sample stays
    uniform over everything seen.
    """

    def __init__(self, dim: int, max_bytes: int = 256 * 2**20, patch_step: int = 1, seed: int = 0):
        self.capacity = max(1, max_bytes // (4 * dim))
        self.pool = np.empty((0, dim), np.float32)
        self.patch_step = patch_step
        self.seen = 0
        self.rng = np.random.default_rng(seed)

    def add(self, features: DenseFeatures) -> None:
        p = features.patches[:, :: self.patch_step, :: self.patch_step]
        x = l2n(p.reshape(-1, p.shape[-1]).float()).cpu().numpy()
        free = self.capacity - len(self.pool)
        if free > 0:
            take = x[:free]
            self.pool = np.concatenate([self.pool, take])
            self.seen += len(take)
            x = x[free:]
        if len(x):
            # reservoir: row j of the stream is kept with probability capacity / (j + 1)
            idx = self.seen + np.arange(len(x))
            slots = (self.rng.random(len(x)) * (idx + 1)).astype(np.int64)
            keep = slots < self.capacity
            self.pool[slots[keep]] = x[keep]
            self.seen += len(x)

    @property
    def nbytes(self) -> int:
        return int(self.pool.nbytes)


def assign(descriptors: torch.Tensor, centres: torch.Tensor, assignments: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise ``…×N×D`` descriptors and return them with the index of their highest-cosine centre.

    With ``assignments = m > 1`` the labels are the m highest-cosine centres (``…×N×m``).
    """
    x = l2n(descriptors.float())
    sim = x @ centres.T
    if assignments == 1:
        return x, sim.argmax(dim=-1)
    return x, sim.topk(assignments, dim=-1).indices


def assignment_matrix(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``B×N`` (one centre each) or ``B×N×m`` (m distinct centres each) labels → ``B×N×K`` 0/1 weights."""
    onehot = torch.nn.functional.one_hot(labels, k).to(dtype)
    return onehot if labels.dim() == 2 else onehot.sum(dim=-2)


def residual_sums(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, membership: torch.Tensor | None = None) -> torch.Tensor:
    """Per-cluster residual sums for hard (or multiple) assignment, vectorised.

    ``x`` is ``B×N×D`` (already normalised), ``labels`` ``B×N`` (or ``B×N×m`` for multiple
    assignment, see :func:`assign`). Without ``membership`` the result is
    ``B×K×D`` (one VLAD per image). With ``membership`` (``B×S×N``, 0/1 weights of each patch in
    each of S regions) it is ``B×S×K×D``: one VLAD per region (SegVLAD's SuperSegments), computed
    as ``membership @ (onehot ⊙ x)`` without ever forming an N×K×D tensor.
    """
    k = centres.shape[0]
    onehot = assignment_matrix(labels, k, x.dtype)  # B×N×K
    if membership is None:
        sums = onehot.transpose(1, 2) @ x  # B×K×D
        counts = onehot.sum(dim=1)  # B×K
        return sums - counts.unsqueeze(-1) * centres
    m = membership.to(x.dtype)
    counts = m @ onehot  # B×S×K
    # Σ_i m[s,i]·[label_i = k]·x_i = (m ⊙ onehot[:, :, k]) @ x: one matmul per cluster (K is small),
    # so memory stays B×S×N + B×S×K×D instead of an N×K×D expansion.
    sums = torch.stack([(m * onehot[:, None, :, j]) @ x for j in range(k)], dim=2)
    return sums - counts.unsqueeze(-1) * centres


def vlad_normalise(res: torch.Tensor) -> torch.Tensor:
    """Intra-normalise each cluster (last axis), flatten clusters, L2-normalise the whole."""
    res = l2n(res, dim=-1)
    return l2n(res.flatten(-2), dim=-1)


def hard_vlad(descriptors: torch.Tensor, centres: torch.Tensor, assignments: int = 1) -> torch.Tensor:
    """AnyLoc hard VLAD of ``B×N×D`` descriptors → ``B×(K·D)`` (each descriptor to its ``assignments`` nearest centres)."""
    x, labels = assign(descriptors, centres, assignments)
    return vlad_normalise(residual_sums(x, labels, centres))


class VLAD(Aggregator):
    """Hard VLAD over a :class:`Vocabulary`; ``dim = K × D`` (× ``vocabularies``).

    ``vocabularies = n > 1`` is multi-vocabulary VLAD (Jégou & Chum, ECCV 2012): the AnyLoc VLAD
    under each of ``n`` centre sets (k-means with different seeds on the same sample), concatenated
    and scaled by 1/√n, so the similarity of two images is the mean of their per-vocabulary VLAD
    similarities. It averages out the vocabulary's random draw (on Nordland-600 a single K=32
    vocabulary gives R@1 0.16–0.23 depending on the seed; three give 0.20–0.24).

    ``assignments = m > 1`` is multiple assignment (see the module docstring): each descriptor's
    residual goes to its m nearest centres; the dimension stays K × D.
    """

    name = "vlad"
    needs_vocabulary = True

    def __init__(self, backbone_dim: int, vocabulary: Vocabulary, vocabularies: int = 1, assignments: int = 1,
                 chunk: int = 16):
        super().__init__(backbone_dim)
        if vocabulary.dim != backbone_dim:
            raise VocabularyMismatchError(
                f"vocabulary has {vocabulary.dim}-d centres but the backbone gives {backbone_dim}-d descriptors"
            )
        if vocabularies < 1:
            raise ConfigError(f"vlad needs vocabularies ≥ 1, got {vocabularies}")
        if not 1 <= int(assignments) <= vocabulary.k:
            raise ConfigError(
                f"vlad assignments={assignments} must be between 1 and the vocabulary's K={vocabulary.k} "
                "(the number of nearest centres each descriptor is added to)")
        self.vocabulary = vocabulary
        self.vocabularies = int(vocabularies)
        self.assignments = int(assignments)
        self.centre_sets = [torch.from_numpy(c) for c in vocabulary.centre_sets(self.vocabularies)]
        self.centres = self.centre_sets[0]
        self.chunk = chunk

    @property
    def dim(self) -> int:
        return self.vocabularies * self.vocabulary.k * self.vocabulary.dim

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vocabularies == 1:
            return hard_vlad(x, self.centres, self.assignments)
        return torch.cat([hard_vlad(x, c, self.assignments) for c in self.centre_sets], dim=1) / math.sqrt(self.vocabularies)

    def __call__(self, features: DenseFeatures) -> torch.Tensor:
        flat = features.flat()
        return torch.cat([self._encode(flat[i : i + self.chunk]) for i in range(0, len(flat), self.chunk)])

    def identity(self):
        return {**super().identity(), "k": self.vocabulary.k, "vocabulary": self.vocabulary.checksum,
                **({"vocabularies": self.vocabularies} if self.vocabularies > 1 else {}),
                **({"assignments": self.assignments} if self.assignments > 1 else {})}


AGGREGATORS.register("vlad", VLAD)
