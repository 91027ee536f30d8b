"""SegVLAD in a map: the ``segments`` map extension and the ``segvlad`` retriever.

Build time (:class:`SegmentsExtension`, group ``segments``): every map image is segmented, its
segments are mapped onto the backbone's patch grid, grown into SuperSegments of order ``o`` over
the Delaunay graph of their centroids, described by hard VLAD (or SAP), projected by a PCA fitted
on ≤ ``fit_segments`` reference SuperSegments (fitted state in ``extensions/segments.npz``), capped
to ``max_segments`` per image (most distinctive first) and stored as float16 under
``extras/segments/<row>``. ``finalize`` gathers all of them into a FAISS inner-product index
``segments.faiss`` plus ``segments.npz`` (segment → image row, and index within the image).

Query time (:class:`SegVLADRetriever`, ``retriever="segvlad"``): each query SuperSegment retrieves
its top ``k_prime`` (50) map segments; images are scored by voting (:mod:`.voting`: ``weighted``
— SegVLAD's sum of min–max-normalised similarities —, ``maxseg`` or ``maxsim``). ``shortlist = N``
re-scores only the global descriptor's top N images (segment search restricted to them);
``fuse = w`` ranks by ``z(segment score) + w·z(global cosine)`` over the candidates. Images with
equal segment scores (e.g. no votes) are ordered by the global score.

Similarity: cosine (inner product of unit vectors), which is ``(2 − ‖a − b‖²)/2``, i.e. the paper's
``2 − ‖a − b‖²`` up to a factor that min–max normalisation removes.

Storage note: the map store casts float arrays to the map's store dtype, so the float16
descriptors are stored bit-exactly as a ``uint16`` view (``desc_f16``) and viewed back on reading.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import faiss
import numpy as np

from ..errors import ConfigError, MapError
from ..io import atomic_path, atomic_savez
from ..numerics import ReservoirSampler, zscore
from ..maps.extensions import EXTENSIONS, MapExtension
from ..retrieval import RETRIEVERS, QueryBatch, Retriever, SearchSpace, pad_topk
from . import voting
from .base import build_segmenter, handle_uncovered, mask_centroids, masks_to_patches, patch_centroids
from .graph import adjacency, supersegments
from .supersegments import PCA, describe, select_distinctive

if TYPE_CHECKING:
    from ..maps import MapStore

GROUP = "segments"
INDEX_FILE = "segments.faiss"
ROWS_FILE = "segments.npz"

DEFAULTS: dict[str, Any] = {
    "segmenter": "slic",
    "segmenter_options": {},
    "order": 3,
    "pooling": "vlad",  # or "sap"
    "pca_dim": 512,  # 0: no PCA
    "whiten": False,  # True, False or "auto" (whiten only with ≥ 20 fitted segments per PCA dimension)
    "whiten_reg": 0.1,
    "fit_segments": 50_000,
    "max_segments": 64,  # per image; 0 = no cap
    "select": "distinct",  # or "area"
    "uncovered": "nearest",  # or "rest", "drop"
    "storage": "float16",  # or "float32"
    "seed": 0,
}


@dataclass
class SegmentSet:
    """One image's segments and SuperSegments (after selection)."""

    masks: np.ndarray  # S×H×W bool, prepared-image pixels (as returned by the segmenter)
    seg_patch: np.ndarray  # S'×N bool (S' ≥ S with a "rest" segment, 1 when nothing was found)
    centroids: np.ndarray  # S'×2 (x, y) pixels
    members: np.ndarray  # kept SuperSegments: M×N bool
    descriptors: np.ndarray  # M×P float32 unit vectors
    kept: np.ndarray  # M indices into the S' segments (the SuperSegment's centre segment)
    grid: tuple[int, int]
    stride: int

    def centre_mask(self, i: int) -> np.ndarray:
        """Pixel mask of the centre segment of kept SuperSegment ``i``."""
        s = int(self.kept[i])
        if s < len(self.masks):
            return self.masks[s]
        return patches_to_pixels(
            self.seg_patch[s], self.grid, self.stride, self.masks.shape[1:] if len(self.masks) else None
        )

    def super_mask(self, i: int, size: tuple[int, int]) -> np.ndarray:
        return patches_to_pixels(self.members[i], self.grid, self.stride, size)


def patches_to_pixels(row: np.ndarray, grid: tuple[int, int], stride: int, size: tuple[int, int] | None) -> np.ndarray:
    m = np.asarray(row, bool).reshape(grid)
    pix = np.repeat(np.repeat(m, stride, 0), stride, 1)
    if size is not None:
        out = np.zeros(size, bool)
        h, w = min(size[0], pix.shape[0]), min(size[1], pix.shape[1])
        out[:h, :w] = pix[:h, :w]
        return out
    return pix


def batch_images(batch) -> list[np.ndarray]:
    """Prepared pixels of a :class:`~vprkit.images.Batch` as H×W×3 uint8 arrays."""
    pix = np.asarray(batch.pixels)
    return [np.ascontiguousarray((np.clip(p.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)) for p in pix]


def segment_graph(masks: np.ndarray, grid: tuple[int, int], stride: int, uncovered: str = "nearest"):
    """Masks → (segment × patch matrix, centroids, Delaunay adjacency), with the uncovered rule applied."""
    sp = masks_to_patches(masks, grid, stride) if len(masks) else np.zeros((0, grid[0] * grid[1]), bool)
    sp = handle_uncovered(sp, grid, uncovered)
    cents = mask_centroids(masks) if len(masks) and len(sp) >= len(masks) else np.zeros((0, 2))
    cents = cents[: len(sp)]
    if len(sp) > len(cents):
        cents = np.concatenate([cents, patch_centroids(sp[len(cents) :], grid, stride)])
    return sp, cents, adjacency(cents)


# "auto" whitening: only with at least this many fitted SuperSegments per PCA dimension. Whitening a
# PCA fitted on too few samples collapses recall, with enough it helps (benchmarks/bench_segvlad.py
# measures both; the README has the figures). The paper fits 1,024 dims on 50,000 segments (49/dim).
AUTO_WHITEN_SAMPLES_PER_DIM = 20


def whiten_decision(option, n_samples: int, dim: int) -> bool:
    """``whiten`` option (True / False / "auto") → whether to whiten a PCA fitted on ``n_samples``."""
    if option == "auto":
        return n_samples >= AUTO_WHITEN_SAMPLES_PER_DIM * dim
    if isinstance(option, bool):
        return option
    raise ConfigError(f"segments 'whiten' must be true, false or \"auto\", got {option!r}")


class SegmentsExtension(MapExtension):
    """Stores SuperSegment descriptors per map image and builds the segment index (see module docs)."""

    group = GROUP
    needs_vocabulary = True

    def __init__(self, options: Mapping[str, Any], backbone, vocabulary):
        unknown = set(options) - set(DEFAULTS) - {"fit_images"}
        if unknown:
            raise ConfigError(f"unknown 'segments' options {sorted(unknown)}; known: {sorted(DEFAULTS)} + fit_images")
        super().__init__({**DEFAULTS, **dict(options)}, backbone, vocabulary)
        o = self.options
        self.segmenter = build_segmenter(o["segmenter"], **dict(o["segmenter_options"] or {}))
        self.order = int(o["order"])
        if self.order < 0:
            raise ConfigError(f"SuperSegment order must be ≥ 0, got {self.order}")
        self.pooling = o["pooling"]
        if self.pooling == "vlad" and vocabulary is None:
            raise ConfigError("SegVLAD with VLAD pooling needs a vocabulary (use a VLAD preset)")
        self.centres = None if vocabulary is None else vocabulary.centres
        self.pca: PCA | None = None
        raw_dim = backbone.dim * (vocabulary.k if self.pooling == "vlad" else 1)
        self.needs_fit = 0 < int(o["pca_dim"]) < raw_dim
        whiten_decision(o["whiten"], 0, 1)  # validate early
        if o["storage"] not in ("float16", "float32"):
            raise ConfigError("segments storage must be float16 or float32")
        self._index = None
        self._lock = threading.Lock()

    # ---- per-image analysis ---------------------------------------------------------------
    def raw_segments(self, image: np.ndarray, feats: np.ndarray, stride: int):
        """Segment, build SuperSegments and describe them (before PCA and selection)."""
        grid = feats.shape[:2]
        masks = self.segmenter(image, feats, stride)
        sp, cents, a = segment_graph(masks, grid, stride, self.options["uncovered"])
        members = supersegments(sp, a, self.order)
        raw = describe(feats.reshape(-1, feats.shape[-1]), members, self.centres, self.pooling)
        return masks, sp, cents, members, raw

    def analyse(self, batch, features) -> list[SegmentSet]:
        """SuperSegments of every image of a batch, projected and selected as stored in the map."""
        out = []
        feats = features.patches.float().cpu().numpy()
        for img, f in zip(batch_images(batch), feats):
            masks, sp, cents, members, raw = self.raw_segments(img, f, features.stride)
            desc = self.pca.transform(raw) if self.pca is not None else raw.astype(np.float32)
            keep = select_distinctive(desc, members.sum(1), int(self.options["max_segments"]), self.options["select"])
            out.append(
                SegmentSet(masks, sp, cents, members[keep], desc[keep], keep, tuple(f.shape[:2]), features.stride)
            )
        return out

    # ---- MapExtension -------------------------------------------------------------------
    def fit(self, samples: Iterable) -> None:
        # a uniform sample of all SuperSegments, at most fit_segments of them
        sampler = ReservoirSampler(int(self.options["fit_segments"]), None, seed=int(self.options["seed"]))
        for batch, features in samples:
            feats = features.patches.float().cpu().numpy()
            for img, f in zip(batch_images(batch), feats):
                sampler.add(self.raw_segments(img, f, features.stride)[-1])
        pool = sampler.pool
        if pool is None or len(pool) < 2:
            raise MapError("too few SuperSegments to fit the segment PCA")
        dim = int(self.options["pca_dim"])
        self.pca = PCA.fit(
            pool, dim, whiten_decision(self.options["whiten"], len(pool), dim), float(self.options["whiten_reg"])
        )
        self.fit_count = len(pool)

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.pca is None else self.pca.state()

    def load_state(self, state) -> None:
        self.pca = PCA.from_state(state)

    def encode(self, batch, features) -> list[dict[str, np.ndarray]]:
        out = []
        for s in self.analyse(batch, features):
            if self.options["storage"] == "float16":
                desc = {"desc_f16": s.descriptors.astype(np.float16).view(np.uint16)}
            else:
                desc = {"desc": s.descriptors.astype(np.float32)}
            out.append(
                {
                    **desc,
                    "members": np.packbits(s.members, axis=1),
                    "grid": np.asarray(s.grid, np.int32),
                    "centre": s.kept.astype(np.int32),
                }
            )
        return out

    @staticmethod
    def read_payload(payload: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Stored payload → (M×P float32 descriptors, M×N bool SuperSegment patch sets)."""
        if "desc_f16" in payload:
            desc = np.asarray(payload["desc_f16"]).astype(np.uint16).view(np.float16).astype(np.float32)
        else:
            desc = np.asarray(payload["desc"], np.float32)
        grid = tuple(int(v) for v in payload["grid"])
        n = grid[0] * grid[1]
        members = (
            np.unpackbits(np.asarray(payload["members"], np.uint8), axis=1, count=n).astype(bool)
            if len(desc)
            else np.zeros((0, n), bool)
        )
        return desc.reshape(len(desc), -1), members

    def finalize(self, store: "MapStore", map_dir: Path) -> None:
        self._index = SegmentIndex.build(store, len(store))
        self._index.save(map_dir)

    def index(self, store: "MapStore", n_images: int, cache_dir: Path | None) -> "SegmentIndex":
        """The segment index of a map of ``n_images`` rows: in memory, from ``cache_dir``, or built from ``store``.

        A rebuilt index is saved to ``cache_dir`` unless it is None (a map opened read-only).
        """
        with self._lock:
            if self._index is None or self._index.n_images != n_images:
                idx = SegmentIndex.load(cache_dir) if cache_dir is not None else None
                if idx is None or idx.n_images != n_images:
                    idx = SegmentIndex.build(store, n_images)
                    if cache_dir is not None:
                        idx.save(cache_dir)
                self._index = idx
            return self._index


EXTENSIONS.register(GROUP, SegmentsExtension)


class SegmentIndex:
    """FAISS inner-product index over all map SuperSegments with segment → image back-references."""

    def __init__(self, index, image: np.ndarray, local: np.ndarray, n_images: int):
        self.index = index
        self.image = np.asarray(image, np.int64)
        self.local = np.asarray(local, np.int64)
        self.n_images = int(n_images)
        order = np.argsort(self.image, kind="stable")
        self._by_image = order
        self._offsets = np.searchsorted(self.image[order], np.arange(self.n_images + 1))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def segments_of(self, rows: np.ndarray) -> np.ndarray:
        """Segment ids of map image ``rows``."""
        rows = np.asarray(rows, np.int64)
        rows = rows[(rows >= 0) & (rows < self.n_images)]
        if not len(rows):
            return np.zeros(0, np.int64)
        return np.concatenate([self._by_image[self._offsets[r] : self._offsets[r + 1]] for r in rows])

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, image: np.ndarray, local: np.ndarray, n_images: int) -> "SegmentIndex":
        v = np.ascontiguousarray(vectors, np.float32)
        index = faiss.IndexFlatIP(v.shape[1])
        if len(v):
            index.add(v)
        return cls(index, image, local, n_images)

    @classmethod
    def build(cls, store: "MapStore", n_images: int) -> "SegmentIndex":
        vecs, image, local = [], [], []
        with store.open_extras() as reader:
            if not reader.has_group(GROUP):
                raise MapError(f"{store.dir} has no SuperSegments: rebuild it with a segvlad preset")
            for row in range(n_images):
                desc, _ = SegmentsExtension.read_payload(reader.extras(GROUP, row))
                vecs.append(desc)
                image.append(np.full(len(desc), row, np.int64))
                local.append(np.arange(len(desc)))
        dim = next((v.shape[1] for v in vecs if v.ndim == 2 and v.shape[1]), 1)
        v = np.concatenate([x.reshape(-1, dim) for x in vecs]) if vecs else np.zeros((0, dim), np.float32)
        return cls.from_vectors(
            v, np.concatenate(image) if image else [], np.concatenate(local) if local else [], n_images
        )

    def save(self, map_dir: Path) -> None:
        map_dir = Path(map_dir)
        with atomic_path(map_dir / INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
        atomic_savez(
            map_dir / ROWS_FILE,
            image=self.image.astype(np.int32),
            local=self.local.astype(np.int32),
            n_images=np.int64(self.n_images),
        )

    @classmethod
    def load(cls, map_dir: Path) -> "SegmentIndex | None":
        map_dir = Path(map_dir)
        if not (map_dir / INDEX_FILE).exists() or not (map_dir / ROWS_FILE).exists():
            return None
        with np.load(map_dir / ROWS_FILE, allow_pickle=False) as z:
            image, local, n = z["image"], z["local"], int(z["n_images"])
        index = faiss.read_index(str(map_dir / INDEX_FILE))
        if index.ntotal != len(image):
            return None
        return cls(index, image, local, n)

    def search(self, queries: np.ndarray, k: int, restrict_to: np.ndarray | None = None):
        """Top-``k`` map segments of each query segment → (segment ids, image rows, cosines); −1 where none."""
        q = np.ascontiguousarray(queries, np.float32)
        if self.ntotal == 0 or len(q) == 0:
            z = np.full((len(q), 1), -1, np.int64)
            return z, z, np.full((len(q), 1), -np.inf, np.float32)
        params = None
        if restrict_to is not None:
            ids = self.segments_of(restrict_to)
            k = min(k, max(1, len(ids)))
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids.astype(np.int64)))
        k = max(1, min(k, self.ntotal))
        sims, seg = self.index.search(q, k, params=params) if params is not None else self.index.search(q, k)
        seg = seg.astype(np.int64)
        img = np.where(seg >= 0, self.image[np.maximum(seg, 0)], -1)
        return seg, img, sims.astype(np.float32)


def _z(x: np.ndarray) -> np.ndarray:
    """z-scores over the candidates; non-finite scores (no votes) count as the lowest finite one."""
    return zscore(x, nonfinite="min", flat_std=0.0)


def rank_candidates(
    seg_scores: np.ndarray, global_scores: np.ndarray, fuse: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Order candidates by segment score (ties → global score), or by the fused z-scores when ``fuse > 0``.

    Returns (order, final scores) over the candidate axis.
    """
    seg = np.asarray(seg_scores, np.float64)
    glob = np.asarray(global_scores, np.float64)
    if fuse > 0:
        final = _z(seg) + fuse * _z(glob)
        order = np.lexsort((-glob, -final))
    else:
        final = np.where(np.isfinite(seg), seg, -np.inf)
        order = np.lexsort((-np.where(np.isfinite(glob), glob, -np.inf), -final))
    return order, final[order]


@RETRIEVERS.register("segvlad")
class SegVLADRetriever(Retriever):
    """SuperSegment voting (options: ``k_prime`` 50, ``voting`` weighted|maxseg|maxsim, ``shortlist`` 0 = all
    images, ``fuse`` 0 = segment score only)."""

    name = "segvlad"
    OPTIONS = ("k_prime", "voting", "shortlist", "fuse")

    def __init__(self, space: SearchSpace, options: Mapping[str, Any]):
        super().__init__(space, options)
        unknown = set(self.options) - set(self.OPTIONS)
        if unknown:
            raise ConfigError(f"unknown segvlad options {sorted(unknown)}; known: {list(self.OPTIONS)}")
        self.k_prime = int(self.options.get("k_prime", 50))
        self.voting = self.options.get("voting", "weighted")
        if self.voting not in voting.VOTINGS:
            raise ConfigError(f"voting must be one of {voting.VOTINGS}, got {self.voting!r}")
        self.shortlist = int(self.options.get("shortlist", 0))
        self.fuse = float(self.options.get("fuse", 0.0))
        ext = space.extensions.get(GROUP)
        if ext is None or space.store is None:
            raise MapError("this map was built without the 'segments' extension; the segvlad retriever needs it")
        self.ext: SegmentsExtension = ext

    def score_sets(self, sets: list[SegmentSet], global_descriptors: np.ndarray, k: int):
        index = self.ext.index(self.space.store, self.space.size, self.space.cache_dir)
        n = self.space.size
        all_rows, all_scores = [], []
        for s, g in zip(sets, global_descriptors):
            m = self.shortlist if 0 < self.shortlist < n else n
            grows, gscores = self.space.index.search(g[None], m)
            grows, gscores = grows[0], gscores[0]
            ok = grows >= 0
            cand, cglob = grows[ok], gscores[ok]
            _, img, sims = index.search(s.descriptors, self.k_prime, cand if m < n else None)
            votes = voting.vote(img, sims, n, self.voting)
            order, final = rank_candidates(votes[cand], cglob, self.fuse)
            r, sc = cand[order][:k], final[:k].astype(np.float32)
            r, sc = pad_topk(r[None], sc[None], k)
            all_rows.append(r[0])
            all_scores.append(sc[0])
        return np.stack(all_rows), np.stack(all_scores)

    def search(self, query: QueryBatch, k: int) -> tuple[np.ndarray, np.ndarray]:
        sets = self.ext.analyse(query.batch, query.features)
        return self.score_sets(sets, query.global_descriptors, k)
