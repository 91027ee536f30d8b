"""Hard-assignment VLAD exactly as AnyLoc defines it, and the vocabulary it needs.

Order of operations (tested in ``tests/aggregation/test_vlad.py``):
1. L2-normalise each local descriptor;
2. assign it to the centre of highest *cosine* similarity (the centres are normalised for the
   assignment only, whatever their length);
3. residual = normalised descriptor − the vocabulary's stored centre; sum residuals per cluster;
4. L2-normalise each cluster's sum (intra-normalisation; empty clusters stay zero);
5. concatenate (K·D) and L2-normalise the whole.

Two kinds of centres (:data:`CENTRE_KINDS`, recorded in the vocabulary's metadata as ``centres``):

- ``unit``: vprkit's spherical k-means centres, unit vectors (every vocabulary built before the
  kind was recorded is one of these);
- ``raw``: AnyLoc's centres, the plain means of the L2-normalised descriptors of each cluster
  (fast_pytorch_kmeans in cosine mode keeps ``mean`` without re-normalising), so their norms are
  below 1 and the residuals ``x − c`` are not those of the unit centre. An empty cluster's centre
  is the zero vector (AnyLoc's k-means turns the 0/0 mean into 0). :meth:`Vocabulary.from_anyloc`
  reads AnyLoc's published ``c_centers.pt`` files.

The assignment is the same for both (cosine), so a vocabulary of either kind is encoded correctly.

``assignments = m > 1`` is *multiple assignment* (Jégou, Douze & Schmid, IJCV 2010; for VLAD in
Jégou et al., TPAMI 2012): step 2 assigns each descriptor to its m highest-cosine centres and step 3
adds its residual to each of them. A patch seen from a shifted viewpoint often lands in a
neighbouring cell of the vocabulary; with m cells it still shares residual mass with the database
image, at no cost in dimension. m = 1 (the default) with ``raw`` centres is AnyLoc's VLAD exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from ..backbones.base import DenseFeatures
from ..errors import ConfigError, VocabularyMismatchError
from ..io import atomic_savez, load_npz
from ..numerics import ReservoirSampler
from .base import AGGREGATORS, Aggregator, as_descriptor_array, l2n, l2n_np

# Keys of the descriptor identity that must agree between a vocabulary and the descriptors it encodes.
IDENTITY_KEYS = ("backbone", "block", "layer", "facet", "dim", "stride", "image")
KMEANS_ITERATIONS = 25  # FAISS's default; more iterations did not improve recall on Corridor
# What a vocabulary's centres are (metadata key "centres"); files without the key hold unit centres.
CENTRE_KINDS = ("unit", "raw")
DEFAULT_CENTRES = "unit"
# AnyLoc's vocabulary cache layout: <model>/l<layer>_<facet>_c<K>/<domain>/c_centers.pt
_ANYLOC_DIR = re.compile(r"^l(?P<layer>\d+)_(?P<facet>[a-z]+)_c(?P<k>\d+)$")


def _check_kind(kind: str, what: str = "centres") -> str:
    if kind not in CENTRE_KINDS:
        raise ConfigError(
            f"{what}={kind!r} is not a centre kind; choose one of {CENTRE_KINDS} "
            "('unit': spherical k-means unit vectors, 'raw': AnyLoc's plain cluster means)"
        )
    return kind


@dataclass
class Vocabulary:
    """K cluster centres (K×D float32) with what produced them.

    ``metadata`` holds the backbone identity (name, layer/block, facet, dim), the image spec, how
    the vocabulary was sampled and the centre kind (``centres``: ``unit`` or ``raw``, see the module
    docstring; absent = ``unit``); ``checksum`` covers centres and metadata so a map can refer to a
    shared (domain) vocabulary by checksum and notice if it changed.
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
        _check_kind(self.kind, "vocabulary metadata centres")

    @property
    def kind(self) -> str:
        """``unit`` or ``raw`` (see the module docstring); vocabularies that do not say are ``unit``."""
        return str(self.metadata.get("centres", DEFAULT_CENTRES))

    @property
    def sets(self) -> int:
        """How many centre sets (1 + alternates) the vocabulary holds."""
        return 1 + (0 if self.alternates is None else int(self.alternates.shape[0]))

    def centre_sets(self, n: int) -> list[np.ndarray]:
        """The first ``n`` centre sets (``centres`` first)."""
        if n > self.sets:
            raise VocabularyMismatchError(
                f"multi-vocabulary VLAD wants {n} centre sets but vocabulary {self.metadata.get('name', self.checksum)} "
                f"has {self.sets}; rebuild it with vocabulary sets ≥ {n}"
            )
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
        extra = {} if self.alternates is None else {"alternates": self.alternates}
        atomic_savez(
            path, centres=self.centres, metadata=json.dumps(self.metadata, default=str), checksum=self.checksum, **extra
        )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"vocabulary file {path} does not exist")
        if path.suffix == ".pt":  # AnyLoc's own c_centers.pt (published domain vocabularies, --vocab PATH)
            return cls.from_anyloc(path)
        try:
            z = load_npz(path)
            voc = cls(z["centres"], json.loads(str(z["metadata"])), z.get("alternates"))
            stored = str(z["checksum"])
        except (KeyError, ValueError, OSError) as exc:
            raise ConfigError(f"{path} is not a vprkit vocabulary ({exc})") from None
        if stored != voc.checksum:
            raise VocabularyMismatchError(
                f"{path}: checksum mismatch (stored {stored}, computed {voc.checksum}); the file is corrupt"
            )
        return voc

    @classmethod
    def from_anyloc(cls, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> "Vocabulary":
        """Read one of AnyLoc's vocabularies: ``c_centers.pt``, a torch-saved K×D tensor of raw centres.

        Loaded with ``weights_only=True`` (plain tensors only, never arbitrary pickles) onto the
        CPU. Where the path follows AnyLoc's cache layout
        (``…/dinov2_vitg14/l31_value_c32/indoor/c_centers.pt``), the backbone, layer, facet and domain
        are recorded, so :meth:`check_compatible` refuses other descriptors; the image spec is not
        known and is not checked. ``metadata`` adds to (and overrides) what is read.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"AnyLoc vocabulary {path} does not exist")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises several types for foreign files
            raise ConfigError(
                f"{path} is not a torch-saved tensor of AnyLoc centres ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(obj, torch.Tensor) or obj.ndim != 2 or not obj.is_floating_point() or min(obj.shape) < 1:
            what = f"a {tuple(obj.shape)} {obj.dtype} tensor" if isinstance(obj, torch.Tensor) else type(obj).__name__
            raise ConfigError(f"{path}: AnyLoc's c_centers.pt holds a K×D float tensor, this file holds {what}")
        centres = obj.detach().to(torch.float32).numpy()
        if not np.isfinite(centres).all():
            raise ConfigError(f"{path}: the centres contain NaN or infinite values")
        k, d = centres.shape
        meta: dict[str, Any] = {
            "name": f"anyloc:{path.parent.name}",
            "source": "anyloc",
            "file": path.name,
            "centres": "raw",
            "k": int(k),
            "dim": int(d),
        }
        m = _ANYLOC_DIR.match(path.parent.parent.name)
        if m and int(m["k"]) == k:
            meta["domain"] = path.parent.name
            meta["identity"] = {
                "backbone": path.parent.parent.parent.name,
                "layer": int(m["layer"]),
                "facet": m["facet"],
                "dim": int(d),
            }
        meta.update(metadata or {})
        return cls(centres, meta)


def _spherical_kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        spherical=True,
        seed=seed,
        verbose=False,
        max_points_per_centroid=max(256, len(x) // k + 1),
    )
    km.train(x)
    return l2n_np(km.centroids)


def cluster_means(x: np.ndarray, centres: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """AnyLoc's raw centres: the plain mean of the (normalised) descriptors ``x`` nearest by cosine to each centre.

    An empty cluster's mean is the zero vector, as in AnyLoc's k-means (fast_pytorch_kmeans
    replaces the 0/0 mean by 0).
    """
    c = torch.from_numpy(l2n_np(np.asarray(centres, np.float32)))
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    sums = torch.zeros(c.shape, dtype=torch.float64)
    counts = torch.zeros(len(c), dtype=torch.float64)
    for i in range(0, len(xt), chunk):
        part = xt[i : i + chunk]
        labels = (part @ c.T).argmax(dim=1)
        sums.index_add_(0, labels, part.double())
        counts += torch.bincount(labels, minlength=len(c)).double()
    means = sums / counts.clamp(min=1).unsqueeze(1)
    return means.float().numpy()


def fit_vocabulary(
    descriptors: np.ndarray | torch.Tensor,
    k: int = 32,
    metadata: dict[str, Any] | None = None,
    niter: int = KMEANS_ITERATIONS,
    seed: int = 0,
    sets: int = 1,
    centres: str = DEFAULT_CENTRES,
) -> Vocabulary:
    """Spherical k-means (FAISS, cosine) on L2-normalised descriptors → :class:`Vocabulary`.

    ``centres`` is the centre kind (recorded in the metadata): ``unit`` keeps the spherical k-means
    centres; ``raw`` replaces each by the plain mean of the normalised descriptors nearest to it (by
    cosine), AnyLoc's centres. AnyLoc's k-means (fast_pytorch_kmeans, cosine mode) is the same Lloyd
    iteration, since a cosine assignment ignores the centres' length; it differs in the random
    start, the iteration count (≤ 100, stopping when the centres move less than 1e-4) and in
    leaving a cluster that empties as a zero vector where FAISS splits a large one.

    ``sets > 1`` also clusters the same sample with seeds ``seed + 1 …`` into alternate centre sets
    for multi-vocabulary VLAD.
    """
    _check_kind(centres)
    x = as_descriptor_array(descriptors)
    if x.ndim != 2 or len(x) < k:
        raise ConfigError(f"need at least K={k} descriptors to build a vocabulary, got {x.shape}")
    if sets < 1:
        raise ConfigError(f"a vocabulary needs at least one centre set, got sets={sets}")
    x = np.ascontiguousarray(l2n_np(x), dtype=np.float32)

    def one(s: int) -> np.ndarray:
        c = _spherical_kmeans(x, k, niter, s)
        return cluster_means(x, c) if centres == "raw" else c

    first = one(seed)
    alternates = np.stack([one(seed + i) for i in range(1, sets)]) if sets > 1 else None
    meta = dict(metadata or {})
    meta.update(
        {
            "k": k,
            "dim": int(x.shape[1]),
            "n_descriptors": int(len(x)),
            "niter": niter,
            "seed": seed,
            "sets": sets,
            "centres": centres,
        }
    )
    # NetVLAD's α-initialisation needs how decisively descriptors pick their nearest centre
    meta["assignment_margin"] = round(assignment_margin(x, first), 6)
    return Vocabulary(first, meta, alternates)


def assignment_margin(
    descriptors: np.ndarray | torch.Tensor, centres: np.ndarray | torch.Tensor, chunk: int = 65536
) -> float:
    """Mean gap between the best and second-best centre cosine of L2-normalised ``descriptors``.

    Recorded in every vocabulary's metadata: NetVLAD's α is set from it
    (:func:`vprkit.aggregation.netvlad.alpha_from_margin`), here so that fitting a vocabulary does not
    need the NetVLAD module.
    """
    x = torch.as_tensor(np.asarray(descriptors, dtype=np.float32))
    c = l2n(torch.as_tensor(np.asarray(centres, dtype=np.float32)))
    if c.shape[0] < 2:
        raise ConfigError("NetVLAD needs at least two clusters")
    total, n = 0.0, 0
    for i in range(0, len(x), chunk):
        top = torch.topk(l2n(x[i : i + chunk]) @ c.T, 2, dim=1).values
        total += float((top[:, 0] - top[:, 1]).sum())
        n += len(top)
    if n == 0:
        raise ConfigError("no descriptors to estimate NetVLAD's α from")
    return total / n


class DescriptorSampler:
    """Collects a bounded random sample of local descriptors across many images.

    AnyLoc samples 30% of the images above 2,000 and every 2nd patch in each direction; on top of
    that, ``max_bytes`` caps the pool so a 100k-image map never holds more than that in RAM.
    Images beyond the budget replace random earlier rows (reservoir sampling), so the sample stays
    uniform over everything seen.
    """

    def __init__(self, dim: int, max_bytes: int = 256 * 2**20, patch_step: int = 1, seed: int = 0):
        self.patch_step = patch_step
        self._reservoir = ReservoirSampler(max(1, max_bytes // (4 * dim)), dim, seed=seed)

    def add(self, features: DenseFeatures) -> None:
        p = features.patches[:, :: self.patch_step, :: self.patch_step]
        self._reservoir.add(l2n(p.reshape(-1, p.shape[-1]).float()).cpu().numpy())

    capacity = property(lambda self: self._reservoir.capacity)
    pool = property(lambda self: self._reservoir.pool)
    seen = property(lambda self: self._reservoir.seen)
    nbytes = property(lambda self: self._reservoir.nbytes)


def assign(descriptors: torch.Tensor, centres: torch.Tensor, assignments: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise ``…×N×D`` descriptors and return them with the index of their highest-cosine centre.

    Cosine for any centres: they are normalised for the assignment (a zero centre scores 0).
    With ``assignments = m > 1`` the labels are the m highest-cosine centres (``…×N×m``).
    """
    x = l2n(descriptors.float())
    sim = x @ l2n(centres.to(x.dtype)).T
    if assignments == 1:
        return x, sim.argmax(dim=-1)
    return x, sim.topk(assignments, dim=-1).indices


def assignment_matrix(labels: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``B×N`` (one centre each) or ``B×N×m`` (m distinct centres each) labels → ``B×N×K`` 0/1 weights."""
    idx = labels if labels.dim() == 3 else labels.unsqueeze(-1)
    weights = torch.zeros(*idx.shape[:2], k, dtype=dtype, device=labels.device)
    return weights.scatter_(-1, idx, 1.0)


def residual_sums(
    x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, membership: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-cluster residual sums for hard (or multiple) assignment, vectorised.

    ``x`` is ``B×N×D`` (already normalised), ``labels`` ``B×N`` (or ``B×N×m`` for multiple
    assignment, see :func:`assign`); residuals are taken against ``centres`` as given (raw or
    unit). Without ``membership`` the result is
    ``B×K×D`` (one VLAD per image). With ``membership`` (``B×S×N``, 0/1 weights of each patch in
    each of S regions) it is ``B×S×K×D``: one VLAD per region (SegVLAD's SuperSegments), computed
    as ``membership @ (onehot ⊙ x)`` without ever forming an N×K×D tensor.
    """
    k = centres.shape[0]
    centres = centres.to(x.dtype)
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

    The centres are a buffer ``centre_sets`` (S×K×D), so ``.to(device)`` moves them and
    ``state_dict()`` carries them (with the vocabulary's metadata as extra state). Built without a
    vocabulary (``k=K``), the aggregator is unfitted until :meth:`fit` (k-means on a sample) or
    ``load_state_dict``.

    ``centres`` (option): the centre kind this aggregator requires, ``unit`` or ``raw``; a vocabulary
    of the other kind is refused, and :meth:`fit` builds this kind. ``None`` (default) accepts either
    (fit builds ``unit``). The encoding itself is correct for both kinds (cosine assignment,
    residuals against the stored centres).

    ``vocabularies = n > 1`` is multi-vocabulary VLAD (Jégou & Chum, ECCV 2012): the AnyLoc VLAD
    under each of ``n`` centre sets (k-means with different seeds on the same sample), concatenated
    and scaled by 1/√n, so the similarity of two images is the mean of their per-vocabulary VLAD
    similarities. It averages out the vocabulary's random draw (the README gives the measured spread).

    ``assignments = m > 1`` is multiple assignment (see the module docstring): each descriptor's
    residual goes to its m nearest centres; the dimension stays K × D.
    """

    name = "vlad"
    needs_vocabulary = True
    learns_from_sample = True

    def __init__(
        self,
        backbone_dim: int,
        vocabulary: Vocabulary | None = None,
        vocabularies: int = 1,
        assignments: int = 1,
        chunk: int = 16,
        k: int | None = None,
        centres: str | None = None,
    ):
        super().__init__(backbone_dim)
        if vocabularies < 1:
            raise ConfigError(f"vlad needs vocabularies ≥ 1, got {vocabularies}")
        self.centres_kind = None if centres is None else _check_kind(centres)
        if vocabulary is None and k is None:
            raise ConfigError("the vlad aggregator needs a vocabulary (or k=K to fit one with .fit(descriptors))")
        if vocabulary is not None and k is not None and int(k) != vocabulary.k:
            raise VocabularyMismatchError(f"vlad k={k} but the vocabulary has K={vocabulary.k}")
        self.k = int(vocabulary.k if vocabulary is not None else k)
        if not 1 <= int(assignments) <= self.k:
            raise ConfigError(
                f"vlad assignments={assignments} must be between 1 and the vocabulary's K={self.k} "
                "(the number of nearest centres each descriptor is added to)"
            )
        self.vocabularies = int(vocabularies)
        self.assignments = int(assignments)
        self.chunk = int(chunk)
        self.vocabulary: Vocabulary | None = None
        self.register_buffer("centre_sets", torch.zeros(self.vocabularies, self.k, self.backbone_dim))
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)

    # -- state ---------------------------------------------------------------------------------
    def set_vocabulary(self, vocabulary: Vocabulary) -> None:
        """Use ``vocabulary``'s centres (checked against the backbone dimension, K and the centre kind)."""
        if vocabulary.dim != self.backbone_dim:
            raise VocabularyMismatchError(
                f"vocabulary has {vocabulary.dim}-d centres but the backbone gives {self.backbone_dim}-d descriptors"
            )
        if vocabulary.k != self.k:
            raise VocabularyMismatchError(f"vocabulary has K={vocabulary.k} centres, this vlad aggregator K={self.k}")
        if self.centres_kind is not None and vocabulary.kind != self.centres_kind:
            raise VocabularyMismatchError(
                f"vlad wants {self.centres_kind} centres but vocabulary {vocabulary.metadata.get('name', vocabulary.checksum)} "
                f"holds {vocabulary.kind} centres; rebuild it with centres={self.centres_kind!r}"
            )
        sets = np.stack(vocabulary.centre_sets(self.vocabularies))
        with torch.no_grad():
            self.centre_sets.copy_(torch.from_numpy(sets))
        self.vocabulary = vocabulary

    def fit(
        self,
        descriptors: np.ndarray | torch.Tensor,
        seed: int = 0,
        niter: int = KMEANS_ITERATIONS,
        metadata: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        """k-means vocabulary (``self.vocabularies`` sets, this aggregator's centre kind) from an N×D sample."""
        self.set_vocabulary(
            fit_vocabulary(
                descriptors,
                self.k,
                metadata,
                niter=niter,
                seed=seed,
                sets=self.vocabularies,
                centres=self.centres_kind or DEFAULT_CENTRES,
            )
        )

    @property
    def is_fitted(self) -> bool:
        return self.vocabulary is not None

    def get_extra_state(self) -> str:
        meta = None if self.vocabulary is None else self.vocabulary.metadata
        return json.dumps({"metadata": meta}, sort_keys=True, default=str)

    def set_extra_state(self, state: str) -> None:
        meta = json.loads(state)["metadata"]
        if meta is None:
            self.vocabulary = None
            return
        sets = self.centre_sets.detach().cpu().numpy()  # already loaded (buffers before extra state)
        voc = Vocabulary(sets[0], meta, sets[1:] if len(sets) > 1 else None)
        if self.centres_kind is not None and voc.kind != self.centres_kind:
            raise VocabularyMismatchError(
                f"the state holds {voc.kind} centres, this vlad aggregator wants {self.centres_kind}"
            )
        self.vocabulary = voc

    # -- encoding ------------------------------------------------------------------------------
    @property
    def centres(self) -> torch.Tensor:
        """The first centre set (K×D), on the aggregator's device."""
        return self.centre_sets[0]

    @property
    def dim(self) -> int:
        return self.vocabularies * self.k * self.backbone_dim

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vocabularies == 1:
            return hard_vlad(x, self.centre_sets[0], self.assignments)
        return torch.cat([hard_vlad(x, c, self.assignments) for c in self.centre_sets], dim=1) / math.sqrt(
            self.vocabularies
        )

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        if self.vocabulary is None:
            raise ConfigError(
                "this vlad aggregator has no vocabulary yet: call .fit(descriptors) or load_state_dict(...)"
            )
        flat = features.flat()
        return torch.cat([self._encode(flat[i : i + self.chunk]) for i in range(0, len(flat), self.chunk)])

    def identity(self):
        voc = self.vocabulary
        return {
            **super().identity(),
            "k": self.k,
            "vocabulary": None if voc is None else voc.checksum,
            **({"centres": voc.kind} if voc is not None and voc.kind != DEFAULT_CENTRES else {}),
            **({"vocabularies": self.vocabularies} if self.vocabularies > 1 else {}),
            **({"assignments": self.assignments} if self.assignments > 1 else {}),
        }


AGGREGATORS.register("vlad", VLAD)
