"""Training labels from geography and time: which images show the same place, and which surely not.

Why this module: VPR training data has no clean class labels. What it has is GPS/UTM poses (two
images a few metres apart are *probably* the same place, two images 15 m apart are *ambiguous*),
synchronised sequences (Nordland: the same frame of every season) and hand-made lists. Losses and
miners, on the other hand, want either integer class labels or index tuples. :class:`PlaceLabels`
is the one representation between the two; every source below produces one, and miners and losses
only ever ask it three questions:

(a) :meth:`PlaceLabels.class_labels` — integer class labels per image, where classes exist
    (CosPlace cells, Nordland frames, explicit classes);
(b) :meth:`PlaceLabels.masks` — for a batch, boolean positive and negative masks. *Soft positives*
    (by default 10–25 m away) are in neither: they are never used as negatives, and not as
    positives either;
(c) :meth:`PlaceLabels.pairs` / :meth:`PlaceLabels.triplets` — pytorch-metric-learning index
    tuples ``(a1, p, a2, n)`` / ``(a, p, n)`` in batch coordinates, derived from (b).

Images are identified by their integer index in the training set (the *image id*). A
``PlaceLabels`` is either *square* (one set of images, relations within it; an image is never its
own positive or negative) or *rectangular* (queries × references, ``n_rows × n_cols``).

Large sets: the pose relation is found with a KD-tree (``scipy.spatial.cKDTree``) in chunks of
queries and kept as sorted sparse index lists (CSR), never as an N×N matrix — 100k images with a
few dozen neighbours each is a few MB. Dense masks are only built per batch.

*Domains* (:meth:`PlaceLabels.with_domains`): an optional integer per image — the season, camera or
sequence it comes from. With ``negatives="cross-domain"`` a negative must also come from another
domain than its anchor. Why: when queries of one domain (winter) are matched against references of
another (summer), only cross-domain similarities are ever ranked. Same-domain images of other places
are the most similar ones in a batch (same light, same snow), so with them as negatives a contrastive
loss spends its gradient separating summer from summer instead of aligning winter with summer — on
Nordland (``benchmarks/bench_training.py``, layout head, InfoNCE) the unseen half scores Recall@1
0.651 with every negative, 0.691 with cross-domain negatives only.

CosPlace classes (:func:`cosplace_classes`, Berton et al. 2022): UTM cells of ``M`` metres ×
heading bins of ``α`` degrees are the classes; classes are split into ``N·N·L`` groups by
``(east cell mod N, north cell mod N, heading bin mod L)``, so two classes in one group are at
least ``N`` cells (``N·M`` metres between cell origins) apart in position or ``L`` bins apart in
heading — training one group at a time never pits two views of the same place against each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..datasets import GroundTruth
from ..errors import ConfigError, DatasetError

# Training conventions (REFERENCE.md): positives ≤ 10 m; soft positives ≤ 25 m are never negatives.
DEFAULT_POSITIVE_RADIUS_M = 10.0
DEFAULT_SOFT_RADIUS_M = 25.0
# CosPlace grouping: cells of M = 10 m, heading bins of α = 30°, groups with N = 5, L = 2.
COSPLACE_CELL_M = 10.0
COSPLACE_HEADING_BIN_DEG = 30.0
COSPLACE_GROUP_N = 5
COSPLACE_GROUP_L = 2
# Which pairs may be negatives: any sure negative, or only those whose images come from different domains.
NEGATIVE_RULES = ("any", "cross-domain")
# Queries per KD-tree chunk: bounds the temporary pair arrays, not the result.
DEFAULT_CHUNK = 8192

_EMPTY = np.zeros(0, dtype=np.int64)


def _angle_diff_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest absolute difference between angles in degrees (0…180); NaN stays NaN."""
    return np.abs((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) + 180.0) % 360.0 - 180.0)


def _as_numpy_ids(ids) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64).ravel()


class SparseRelation:
    """A sparse boolean relation rows × cols as CSR (sorted, unique column indices per row).

    ``contains(rows, cols)`` answers elementwise membership for many pairs at once by binary search
    over the flat keys ``row · n_cols + col`` (sorted by construction of the CSR).
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, n_cols: int):
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.n_cols = int(n_cols)
        self._keys: np.ndarray | None = None

    @classmethod
    def from_pairs(cls, rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> "SparseRelation":
        keys = np.unique(np.asarray(rows, dtype=np.int64) * n_cols + np.asarray(cols, dtype=np.int64))
        r = keys // n_cols if n_cols else keys
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(r, minlength=n_rows), out=indptr[1:])
        rel = cls(indptr, keys - r * n_cols, n_cols)
        rel._keys = keys
        return rel

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def row(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i] : self.indptr[i + 1]]

    def to_lists(self) -> list[np.ndarray]:
        return [a.copy() for a in np.split(self.indices, self.indptr[1:-1])] if self.n_rows else []

    def keys(self) -> np.ndarray:
        if self._keys is None:
            rows = np.repeat(np.arange(self.n_rows, dtype=np.int64), np.diff(self.indptr))
            self._keys = rows * self.n_cols + self.indices
        return self._keys

    def contains(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        rows, cols = np.broadcast_arrays(np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64))
        keys = self.keys()
        if keys.size == 0:
            return np.zeros(rows.shape, dtype=bool)
        q = rows * self.n_cols + cols
        at = np.minimum(np.searchsorted(keys, q), keys.size - 1)
        return keys[at] == q


class PlaceLabels:
    """Same-place relations of a training set, for miners and losses (see the module docstring).

    - ``n_rows``, ``n_cols``: images on each side; ``square`` when both sides are one set.
    - ``positives``: :class:`SparseRelation` of positive pairs (or ``None`` when classes decide).
    - ``soft``: pairs that must never be negatives (a superset of ``positives``; ``None`` = same).
    - ``classes`` / ``ref_classes``: int64 class per image (−1 = none), optional.
    - ``valid`` / ``ref_valid``: images with a known place (a pose, a frame, a class). An invalid
      image is nobody's positive *or* negative.
    - ``domains`` / ``ref_domains``: int64 domain per image (season, camera; −1 = unknown), optional.
    - ``negatives``: ``"any"`` (every sure negative) or ``"cross-domain"`` (a sure negative whose two
      images have known, different domains — see the module docstring). Positives are not affected.

    Precedence: when a relation exists it decides positives/negatives; classes (if any) only feed
    class-based losses. Without a relation, same class = positive, other class = negative.
    """

    def __init__(
        self,
        n_rows: int,
        n_cols: int | None = None,
        *,
        positives: SparseRelation | None = None,
        soft: SparseRelation | None = None,
        classes: np.ndarray | None = None,
        ref_classes: np.ndarray | None = None,
        valid: np.ndarray | None = None,
        ref_valid: np.ndarray | None = None,
        domains: np.ndarray | None = None,
        ref_domains: np.ndarray | None = None,
        negatives: str = "any",
        source: str = "",
    ):
        self.square = n_cols is None
        self.n_rows = int(n_rows)
        self.n_cols = self.n_rows if n_cols is None else int(n_cols)
        self.positives = positives
        self.soft = soft if soft is not None else positives
        self.classes = None if classes is None else np.asarray(classes, dtype=np.int64).ravel()
        if self.square:
            ref_classes = self.classes
        self.ref_classes = None if ref_classes is None else np.asarray(ref_classes, dtype=np.int64).ravel()
        if positives is None and (self.classes is None or self.ref_classes is None):
            raise ConfigError("PlaceLabels needs a positive relation or class labels for both sides")
        if valid is None:
            valid = (
                self.classes >= 0 if (positives is None and self.classes is not None) else np.ones(self.n_rows, bool)
            )
        self.valid = np.asarray(valid, dtype=bool).ravel()
        if self.square:
            ref_valid = self.valid
        elif ref_valid is None:
            ref_valid = (
                self.ref_classes >= 0
                if (positives is None and self.ref_classes is not None)
                else np.ones(self.n_cols, bool)
            )
        self.ref_valid = np.asarray(ref_valid, dtype=bool).ravel()
        if negatives not in NEGATIVE_RULES:
            raise ConfigError(f"negatives must be one of {NEGATIVE_RULES}, got {negatives!r}")
        self.domains = None if domains is None else np.asarray(domains, dtype=np.int64).ravel()
        if self.square:
            ref_domains = self.domains
        self.ref_domains = None if ref_domains is None else np.asarray(ref_domains, dtype=np.int64).ravel()
        if negatives == "cross-domain" and (self.domains is None or self.ref_domains is None):
            raise ConfigError("cross-domain negatives need a domain per image on both sides (with_domains)")
        self.negatives = negatives
        for name, arr, n in (
            ("classes", self.classes, self.n_rows),
            ("ref_classes", self.ref_classes, self.n_cols),
            ("valid", self.valid, self.n_rows),
            ("ref_valid", self.ref_valid, self.n_cols),
            ("domains", self.domains, self.n_rows),
            ("ref_domains", self.ref_domains, self.n_cols),
        ):
            if arr is not None and arr.size != n:
                raise ConfigError(f"PlaceLabels: {name} has {arr.size} entries for {n} images")
        self.source = source

    def __repr__(self) -> str:
        shape = f"{self.n_rows} images" if self.square else f"{self.n_rows}×{self.n_cols}"
        rule = ", cross-domain negatives" if self.negatives == "cross-domain" else ""
        return f"PlaceLabels({shape}, {self.source or 'classes'}{rule})"

    # --- (a) class labels ---------------------------------------------------------------------
    @property
    def has_classes(self) -> bool:
        return self.classes is not None

    @property
    def num_classes(self) -> int:
        if self.classes is None:
            return 0
        c = [self.classes.max(initial=-1), self.ref_classes.max(initial=-1) if self.ref_classes is not None else -1]
        return int(max(c)) + 1

    def class_labels(self, ids, ref: bool = False) -> torch.Tensor:
        """Class labels (LongTensor) of images ``ids`` (of the reference side with ``ref=True``)."""
        table = self.ref_classes if ref else self.classes
        if table is None:
            raise ConfigError(
                f"these place labels ({self.source}) have no classes; use masks / index tuples, or attach "
                "classes (e.g. cosplace_classes) with with_classes()"
            )
        return torch.from_numpy(table[_as_numpy_ids(ids)].copy())

    def with_classes(self, classes: np.ndarray, ref_classes: np.ndarray | None = None) -> "PlaceLabels":
        """The same relation with class labels attached (e.g. CosPlace cells for a classifier loss)."""
        return PlaceLabels(
            self.n_rows,
            None if self.square else self.n_cols,
            positives=self.positives,
            soft=self.soft,
            classes=classes,
            ref_classes=ref_classes,
            valid=self.valid,
            ref_valid=None if self.square else self.ref_valid,
            domains=self.domains,
            ref_domains=None if self.square else self.ref_domains,
            negatives=self.negatives,
            source=self.source,
        )

    def with_domains(self, domains, ref_domains=None, negatives: str = "cross-domain") -> "PlaceLabels":
        """The same relation with a domain per image (season, camera; −1 = unknown) and a negative rule.

        ``negatives="cross-domain"``: a negative pair must join two images of known, different
        domains (see the module docstring); ``"any"`` keeps every sure negative (domains recorded only).
        """
        return PlaceLabels(
            self.n_rows,
            None if self.square else self.n_cols,
            positives=self.positives,
            soft=self.soft,
            classes=self.classes,
            ref_classes=None if self.square else self.ref_classes,
            valid=self.valid,
            ref_valid=None if self.square else self.ref_valid,
            domains=_as_numpy_ids(domains),
            ref_domains=None if self.square or ref_domains is None else _as_numpy_ids(ref_domains),
            negatives=negatives,
            source=self.source,
        )

    # --- elementwise relations -----------------------------------------------------------------
    def is_positive(self, rows, cols) -> np.ndarray:
        """Elementwise: is (row image, col image) a positive pair? (numpy broadcasting)."""
        return self._relation(rows, cols, soft=False)

    def is_negative(self, rows, cols) -> np.ndarray:
        """Elementwise: is the pair a sure negative (valid, distinct, not even a soft positive)?"""
        rows, cols = np.broadcast_arrays(np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64))
        ok = self.valid[rows] & self.ref_valid[cols]
        if self.square:
            ok &= rows != cols
        if self.negatives == "cross-domain":
            a, b = self.domains[rows], self.ref_domains[cols]
            ok &= (a != b) & (a >= 0) & (b >= 0)
        return ok & ~self._relation(rows, cols, soft=True, check_valid=False)

    def _relation(self, rows, cols, soft: bool, check_valid: bool = True) -> np.ndarray:
        rows, cols = np.broadcast_arrays(np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64))
        rel = self.soft if soft else self.positives
        if rel is not None:
            out = rel.contains(rows, cols)
        else:
            a, b = self.classes[rows], self.ref_classes[cols]
            out = (a == b) & (a >= 0)
        if check_valid:
            out &= self.valid[rows] & self.ref_valid[cols]
        if self.square:
            out &= rows != cols
        return out

    def positives_of(self, i: int) -> np.ndarray:
        """Reference ids that are positives of image ``i``."""
        if self.positives is not None:
            return self.positives.row(i).copy()
        return np.flatnonzero(self._relation(np.int64(i), np.arange(self.n_cols), soft=False))

    def soft_positives_of(self, i: int) -> np.ndarray:
        """Reference ids that are never negatives of image ``i`` (positives included)."""
        if self.soft is not None:
            return self.soft.row(i).copy()
        return self.positives_of(i)

    # --- (b) batch masks ------------------------------------------------------------------------
    def masks(self, ids, ref_ids=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean (positive, negative) masks of shape ``len(ids) × len(ref_ids)`` for a batch.

        ``ids`` are row image ids, ``ref_ids`` column image ids (default: ``ids``, for square labels).
        Soft positives are False in both masks; so is an image against itself.
        """
        r = _as_numpy_ids(ids)
        c = r if ref_ids is None else _as_numpy_ids(ref_ids)
        if ref_ids is None and not self.square:
            raise ConfigError("rectangular (query × reference) labels need ref_ids")
        rr, cc = r[:, None], c[None, :]
        pos = self._relation(rr, cc, soft=False)
        neg = self.is_negative(rr, cc)
        dev = device if device is not None else (ids.device if isinstance(ids, torch.Tensor) else None)
        return torch.from_numpy(np.ascontiguousarray(pos)).to(dev), torch.from_numpy(np.ascontiguousarray(neg)).to(dev)

    # --- (c) pytorch-metric-learning index tuples -----------------------------------------------
    def pairs(self, ids, ref_ids=None) -> tuple[torch.Tensor, ...]:
        """All positive and negative pairs of the batch as PML's ``(a1, p, a2, n)`` (batch indices)."""
        return pairs_from_masks(*self.masks(ids, ref_ids))

    def triplets(self, ids, ref_ids=None) -> tuple[torch.Tensor, ...]:
        """All triplets ``(a, p, n)`` of the batch: p a positive and n a sure negative of a."""
        return triplets_from_masks(*self.masks(ids, ref_ids))

    # --- conversions ----------------------------------------------------------------------------
    def to_ground_truth(self) -> GroundTruth:
        """Positives (and soft positives) per row image, as evaluation's :class:`GroundTruth`."""
        if self.positives is not None:
            pos = self.positives.to_lists()
            soft = self.soft.to_lists() if self.soft is not None else None
        else:
            pos = [self.positives_of(i) for i in range(self.n_rows)]
            soft = None
        return GroundTruth(pos, self.n_cols, soft, source=f"training labels: {self.source}")

    def summary(self) -> dict:
        out = {"n_rows": self.n_rows, "n_cols": self.n_cols, "square": self.square, "source": self.source}
        if self.positives is not None:
            counts = np.diff(self.positives.indptr)
            out["mean_positives"] = float(counts.mean()) if counts.size else 0.0
            out["no_positive"] = int((counts == 0).sum())
        if self.classes is not None:
            out["num_classes"] = self.num_classes
        out["negatives"] = self.negatives
        return out

    # --- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_classes(cls, classes, ref_classes=None, source: str = "classes") -> "PlaceLabels":
        """Same class = positive, other class = negative; class −1 = unlabelled (neither)."""
        classes = _as_numpy_ids(classes)
        if ref_classes is None:
            return cls(classes.size, classes=classes, source=source)
        ref_classes = _as_numpy_ids(ref_classes)
        return cls(classes.size, ref_classes.size, classes=classes, ref_classes=ref_classes, source=source)

    @classmethod
    def from_poses(
        cls,
        xy: np.ndarray,
        headings: np.ndarray | None = None,
        *,
        ref_xy: np.ndarray | None = None,
        ref_headings: np.ndarray | None = None,
        radius: float = DEFAULT_POSITIVE_RADIUS_M,
        soft_radius: float | None = DEFAULT_SOFT_RADIUS_M,
        max_heading_diff: float | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> "PlaceLabels":
        """Positives within ``radius`` metres, soft positives within ``soft_radius``, negatives beyond.

        ``xy``: N×2 UTM metres (NaN = unknown pose: that image is neither positive nor negative).
        Without ``ref_xy`` the labels are square (one set). With ``max_heading_diff`` (degrees) a
        positive must also face the same way (± that many degrees); images within ``soft_radius``
        facing elsewhere are still never negatives. Headings are needed on both sides then; a NaN
        heading is never a positive.
        """
        if radius <= 0 or (soft_radius is not None and soft_radius < radius):
            raise ConfigError(f"need radius > 0 and soft_radius ≥ radius; got {radius}, {soft_radius}")
        soft_r = radius if soft_radius is None else float(soft_radius)
        qxy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        square = ref_xy is None
        dxy = qxy if square else np.asarray(ref_xy, dtype=np.float64).reshape(-1, 2)
        qh = None if headings is None else np.asarray(headings, dtype=np.float64).ravel()
        dh = qh if square else (None if ref_headings is None else np.asarray(ref_headings, dtype=np.float64).ravel())
        if max_heading_diff is not None and (qh is None or dh is None):
            raise ConfigError("max_heading_diff needs headings for both sides")
        q_valid = np.all(np.isfinite(qxy), axis=1)
        d_valid = np.all(np.isfinite(dxy), axis=1)
        q_ok, d_ok = np.flatnonzero(q_valid), np.flatnonzero(d_valid)
        n_q, n_d = len(qxy), len(dxy)
        soft_rows, soft_cols, pos_keep = [], [], []
        if q_ok.size and d_ok.size:
            tree = cKDTree(dxy[d_ok])
            for start in range(0, q_ok.size, max(1, int(chunk_size))):
                chunk = q_ok[start : start + chunk_size]
                found = cKDTree(qxy[chunk]).sparse_distance_matrix(tree, soft_r, output_type="ndarray")
                i = chunk[found["i"].astype(np.int64)]
                j = d_ok[found["j"].astype(np.int64)]
                dist = found["v"]
                keep = i != j if square else np.ones(i.size, bool)
                i, j, dist = i[keep], j[keep], dist[keep]
                pos = dist <= radius
                if max_heading_diff is not None:
                    pos &= _angle_diff_deg(qh[i], dh[j]) <= max_heading_diff
                soft_rows.append(i)
                soft_cols.append(j)
                pos_keep.append(pos)
        si = np.concatenate(soft_rows) if soft_rows else _EMPTY
        sj = np.concatenate(soft_cols) if soft_cols else _EMPTY
        pk = np.concatenate(pos_keep) if pos_keep else np.zeros(0, bool)
        positives = SparseRelation.from_pairs(si[pk], sj[pk], n_q, n_d)
        soft = SparseRelation.from_pairs(si, sj, n_q, n_d) if soft_radius is not None else positives
        source = f"poses: positives ≤ {radius:g} m"
        if max_heading_diff is not None:
            source += f" and heading ≤ {max_heading_diff:g}°"
        if soft_radius is not None:
            source += f", soft ≤ {soft_radius:g} m"
        return cls(
            n_q,
            None if square else n_d,
            positives=positives,
            soft=soft,
            valid=q_valid,
            ref_valid=None if square else d_valid,
            source=source,
        )

    @classmethod
    def from_frames(
        cls,
        frames: Sequence | np.ndarray,
        ref_frames: Sequence | np.ndarray | None = None,
        *,
        tolerance: int = 0,
        soft_tolerance: int | None = None,
    ) -> "PlaceLabels":
        """Frame-synchronised sequences (Nordland): the same frame in every sequence is one place.

        ``frames`` per image: integer frame numbers, or names (e.g. file names — Nordland's
        ``summer/images-00010.png`` and ``winter/images-00010.png`` both give ``images-00010.png``;
        see :func:`frame_keys`). Names are numbered by their sorted order among all distinct names,
        so ``tolerance`` counts files, as in :meth:`GroundTruth.from_frames`. Positives are frames
        at most ``tolerance`` apart, soft positives at most ``soft_tolerance`` (default: the same);
        classes are the exact frames (one class per frame).
        """
        if tolerance < 0 or (soft_tolerance is not None and soft_tolerance < tolerance):
            raise ConfigError(f"need 0 ≤ tolerance ≤ soft_tolerance; got {tolerance}, {soft_tolerance}")
        soft_tol = tolerance if soft_tolerance is None else int(soft_tolerance)
        square = ref_frames is None
        q_num, d_num = _frame_numbers(frames, None if square else ref_frames)
        positives = _interval_relation(q_num, d_num, tolerance, square)
        soft = positives if soft_tol == tolerance else _interval_relation(q_num, d_num, soft_tol, square)
        # One class per distinct frame, shared by both sides.
        _, inverse = np.unique(np.concatenate([q_num, d_num]), return_inverse=True)
        classes, ref_classes = inverse[: q_num.size], inverse[q_num.size :]
        source = f"frames ±{tolerance}" + (f", soft ±{soft_tol}" if soft_tol != tolerance else "")
        return cls(
            q_num.size,
            None if square else d_num.size,
            positives=positives,
            soft=soft,
            classes=classes,
            ref_classes=None if square else ref_classes,
            source=source,
        )

    @classmethod
    def from_ground_truth(cls, gt: GroundTruth) -> "PlaceLabels":
        """Queries × database from a :class:`GroundTruth` (radius, list, frames or matrix).

        Its positives are the positives; its ``soft_positives`` (when present) are never negatives.
        Everything else is a negative — so a hand-made list should list every true match.
        """
        indptr, indices = gt.csr()
        positives = SparseRelation(indptr.copy(), indices.copy(), gt.n_database)
        soft = None
        if gt.soft_positives is not None:
            s = [np.union1d(a, b) for a, b in zip(gt.soft_positives, gt.positives)]
            counts = np.fromiter((x.size for x in s), dtype=np.int64, count=len(s))
            sp = np.zeros(len(s) + 1, dtype=np.int64)
            np.cumsum(counts, out=sp[1:])
            soft = SparseRelation(sp, np.concatenate(s) if s else _EMPTY, gt.n_database)
        return cls(gt.n_queries, gt.n_database, positives=positives, soft=soft, source=f"ground truth: {gt.source}")


def frame_keys(paths: Sequence[str]) -> list[str]:
    """Frame key of each image of a synchronised dataset: its file name without the sequence folder."""
    return [str(p).replace("\\", "/").rsplit("/", 1)[-1] for p in paths]


def _frame_numbers(frames, ref_frames) -> tuple[np.ndarray, np.ndarray]:
    q = np.asarray(frames)
    d = q if ref_frames is None else np.asarray(ref_frames)
    if q.size == 0 and d.size == 0:
        return _EMPTY, _EMPTY
    if (q.size == 0 or np.issubdtype(q.dtype, np.integer)) and (d.size == 0 or np.issubdtype(d.dtype, np.integer)):
        return q.astype(np.int64).ravel(), d.astype(np.int64).ravel()
    if np.issubdtype(q.dtype, np.number) or np.issubdtype(d.dtype, np.number):
        raise DatasetError("frames must be all integers or all names, on both sides")
    names = np.concatenate([q.astype(str).ravel(), d.astype(str).ravel()])
    _, inverse = np.unique(names, return_inverse=True)
    inverse = inverse.astype(np.int64)
    return inverse[: q.size], inverse[q.size :]


def _interval_relation(q: np.ndarray, d: np.ndarray, tol: int, square: bool) -> SparseRelation:
    """Pairs with ``|q_i − d_j| ≤ tol`` (sorting and searchsorted, no pair loop)."""
    order = np.argsort(d, kind="stable")
    ds = d[order]
    lo = np.searchsorted(ds, q - tol, side="left")
    hi = np.searchsorted(ds, q + tol, side="right")
    counts = hi - lo
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    flat = np.arange(total) - starts + np.repeat(lo, counts)
    rows = np.repeat(np.arange(q.size, dtype=np.int64), counts)
    cols = order[flat].astype(np.int64)
    if square:
        keep = rows != cols
        rows, cols = rows[keep], cols[keep]
    return SparseRelation.from_pairs(rows, cols, q.size, d.size)


# --- index tuples from masks ----------------------------------------------------------------------
def pairs_from_masks(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PML pair tuple ``(a1, p, a2, n)`` from boolean positive / negative masks (rows × refs)."""
    a1, p = torch.where(pos)
    a2, n = torch.where(neg)
    return a1, p, a2, n


def restrict_tuples(tuples: tuple[torch.Tensor, ...], pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keep only the tuples the masks allow: pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``.

    Why: class-label miners (PML's) know same class / other class only; the labels may forbid more
    negatives (soft positives, same-domain pairs). A pair tuple keeps the positive pairs with
    ``pos[a1, p]`` and the negative pairs with ``neg[a2, n]``; a triplet needs both ``pos[a, p]``
    and ``neg[a, n]``. Order is kept.
    """
    if len(tuples) == 4:
        a1, p, a2, n = tuples
        kp, kn = pos[a1, p], neg[a2, n]
        return a1[kp], p[kp], a2[kn], n[kn]
    if len(tuples) == 3:
        a, p, n = tuples
        keep = pos[a, p] & neg[a, n]
        return a[keep], p[keep], n[keep]
    raise ConfigError(f"restrict_tuples takes pairs (4 tensors) or triplets (3), got {len(tuples)}")


def triplets_from_masks(pos: torch.Tensor, neg: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All triplets ``(a, p, n)`` with ``pos[a, p]`` and ``neg[a, n]`` (memory rows × refs²)."""
    a, p, n = torch.where(pos.unsqueeze(2) & neg.unsqueeze(1))
    return a, p, n


# --- CosPlace classes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CellClasses:
    """CosPlace classes of a set of images.

    - ``labels``: class id per image (dense, 0…C−1; −1 for images without a pose).
    - ``groups``: group id per image (0…n_groups−1; −1 without a pose).
    - ``cells``: C×3 int64 (east cell, north cell, heading bin) of each class.
    - ``class_groups``: group id of each class.
    """

    labels: np.ndarray
    groups: np.ndarray
    cells: np.ndarray
    class_groups: np.ndarray
    n_groups: int
    cell_m: float
    heading_bin_deg: float | None

    @property
    def num_classes(self) -> int:
        return int(self.cells.shape[0])

    def group(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Images of group ``g`` and their class labels renumbered 0…k−1 within the group (one head per group)."""
        images = np.flatnonzero(self.groups == g)
        _, local = np.unique(self.labels[images], return_inverse=True)
        return images, local.astype(np.int64)


def cosplace_classes(
    xy: np.ndarray,
    headings: np.ndarray | None = None,
    *,
    cell_m: float = COSPLACE_CELL_M,
    heading_bin_deg: float | None = COSPLACE_HEADING_BIN_DEG,
    n: int = COSPLACE_GROUP_N,
    l: int = COSPLACE_GROUP_L,  # noqa: E741  (the paper's name)
) -> CellClasses:
    """CosPlace classes and groups from UTM positions (and headings in degrees).

    Class = (⌊east/M⌋, ⌊north/M⌋, ⌊heading/α⌋); group = (east cell mod N, north cell mod N,
    heading bin mod L), numbered ``(e·N + n)·L + h``. Without headings (or ``heading_bin_deg=None``)
    there is one heading bin and N·N groups. ``360/α`` must be a whole multiple of L so that the
    heading separation survives the wrap-around at 360°.
    """
    p = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if cell_m <= 0 or n < 1 or l < 1:
        raise ConfigError(f"CosPlace grouping needs cell_m > 0, n ≥ 1, l ≥ 1; got {cell_m}, {n}, {l}")
    use_heading = headings is not None and heading_bin_deg is not None
    ok = np.all(np.isfinite(p), axis=1)
    if use_heading:
        bins = 360.0 / heading_bin_deg
        if abs(bins - round(bins)) > 1e-9 or round(bins) % l:
            raise ConfigError(f"heading bins of {heading_bin_deg}° must split 360° into a multiple of L = {l} bins")
        h = np.asarray(headings, dtype=np.float64).ravel()
        ok &= np.isfinite(h)
    cells = np.zeros((p.shape[0], 3), dtype=np.int64)
    cells[ok, :2] = np.floor(p[ok] / cell_m).astype(np.int64)
    if use_heading:
        cells[ok, 2] = np.floor((h[ok] % 360.0) / heading_bin_deg).astype(np.int64) % int(
            round(360.0 / heading_bin_deg)
        )
    n_l = l if use_heading else 1
    labels = np.full(p.shape[0], -1, dtype=np.int64)
    groups = np.full(p.shape[0], -1, dtype=np.int64)
    if ok.any():
        uniq, inverse = np.unique(cells[ok], axis=0, return_inverse=True)
        labels[ok] = inverse.ravel()
    else:
        uniq = np.zeros((0, 3), dtype=np.int64)
    class_groups = (np.mod(uniq[:, 0], n) * n + np.mod(uniq[:, 1], n)) * n_l + np.mod(uniq[:, 2], n_l)
    groups[ok] = class_groups[labels[ok]]
    return CellClasses(
        labels, groups, uniq, class_groups, n * n * n_l, float(cell_m), heading_bin_deg if use_heading else None
    )
