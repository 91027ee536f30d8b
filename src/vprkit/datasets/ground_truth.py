"""Ground truth for place recognition: which database images are correct matches for each query.

One type, :class:`GroundTruth`, whatever the source — distances between poses, an explicit list,
synchronised frame numbers or a boolean matrix — so that evaluation has one code path. Positives
are stored per query as sorted database indices (a ragged list), the compact form for large maps;
:meth:`GroundTruth.csr` gives the same data as flat CSR arrays for vectorised evaluation.

What to do with queries that have no positive at all is *not* decided here: it is the
``no_positive`` policy of :func:`vprkit.evaluation.metrics.recall_at_n`, because published
protocols differ (counted as failures vs skipped).

Ground-truth list grammar (:meth:`GroundTruth.from_list`, :func:`read_ground_truth_csv`; anything
else is one :class:`DatasetError` naming the file and line):

- UTF-8 text (a BOM is allowed); blank lines are skipped. The header is exactly ``query,positives``
  (case-insensitive; trailing empty header fields are tolerated). The separator between the two
  header words — ``,``, ``;`` or tab — is the column separator of the whole file.
- Each row: the first field is the query image; **every further field, split at whitespace, ``,``
  and ``;``, is a positive database image**. So Corridor's ``q.jpg,r0.jpg r1.jpg``, the
  spreadsheet export ``q.jpg,r0.jpg,r1.jpg``, ``q.jpg,"r0.jpg;r1.jpg"`` and ``q.jpg;r0.jpg;r1.jpg``
  (with a ``query;positives`` header) all give the positives ``r0.jpg, r1.jpg``. A row with only a
  query (or an empty positives field) gives that query no positive.
- Image names therefore may not contain whitespace, ``,`` or ``;``; a query field that does
  (e.g. a row separated by ``;`` in a ``,`` file) is an error, not a guess. ``\\`` is read as
  ``/`` and a leading ``./`` is dropped. Each query appears at most once; every name must match an
  image (optionally with its folder prefix).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.spatial import cKDTree

from ..errors import DatasetError
from .poses import SEPARATOR_NAMES, latlon_to_utm, normalise_image_name, read_csv_table

# Evaluation threshold for street-level datasets (Pittsburgh, Tokyo 24/7, SF-XL, MSLS, St Lucia).
DEFAULT_RADIUS_M = 25.0
# Nordland protocol: ±1 file of the every-10th-frame sequence, i.e. ±10 original frames.
DEFAULT_FRAME_TOLERANCE = 1
# How many offending names an error message lists before "…".
MAX_NAMES_IN_ERROR = 5

GROUND_TRUTH_COLUMNS = ("query", "positives")
GROUND_TRUTH_EXPECTED = (
    "query,positives (one row per query; positives separated by spaces, ',' or ';', e.g. "
    "'query/0000.jpg,ref/0000.jpg ref/0001.jpg')"
)
# Inside the positives, names are split at whitespace, ',' and ';' (any mix).
_NAME_SEPARATORS = re.compile(r"[\s,;]+")
_SEPARATOR_WORDS = SEPARATOR_NAMES

_EMPTY = np.zeros(0, dtype=np.int64)


def _names_for_error(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:MAX_NAMES_IN_ERROR])
    return shown + (f" … ({len(names)} in total)" if len(names) > MAX_NAMES_IN_ERROR else "")


def _split_csr(indptr: np.ndarray, indices: np.ndarray) -> list[np.ndarray]:
    return [a.astype(np.int64, copy=False) for a in np.split(indices, indptr[1:-1])]


def _angle_diff_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Absolute smallest difference between angles in degrees (0…180)."""
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


@dataclass(eq=False)
class GroundTruth:
    """Positive database indices per query.

    - ``positives[q]``: sorted unique int64 database indices that count as a correct match for query ``q``.
    - ``n_database``: size of the database the indices refer to.
    - ``soft_positives``: optional wider set (e.g. ≤ 25 m when positives are ≤ 10 m) that training
      must never use as negatives; evaluation ignores it.
    - ``source``: human-readable description of how it was made (goes into reports).
    - ``rule``: the same, machine-readable, e.g. ``{"kind": "radius", "meters": 25.0}``,
      ``{"kind": "frames", "tolerance": 1, "match": "name"}``, ``{"kind": "list", "file": …}`` or
      ``{"kind": "matrix"}`` (set by the constructors; kept by :meth:`subset`).
    """

    positives: list[np.ndarray]
    n_database: int
    soft_positives: list[np.ndarray] | None = None
    source: str = ""
    rule: dict | None = None
    _csr: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.positives = [np.unique(np.asarray(p, dtype=np.int64).ravel()) for p in self.positives]
        if self.soft_positives is not None:
            self.soft_positives = [np.unique(np.asarray(p, dtype=np.int64).ravel()) for p in self.soft_positives]
            if len(self.soft_positives) != len(self.positives):
                raise DatasetError("soft_positives must have one entry per query")
        indptr, indices = self.csr()
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_database):
            raise DatasetError(
                f"positive indices must lie in [0, {self.n_database}); got {indices.min()}…{indices.max()}"
            )

    # --- views --------------------------------------------------------------------------------
    @property
    def n_queries(self) -> int:
        return len(self.positives)

    def __len__(self) -> int:
        return len(self.positives)

    def csr(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr, indices): positives of query q are ``indices[indptr[q]:indptr[q+1]]`` (cached)."""
        if self._csr is None:
            counts = np.fromiter((p.size for p in self.positives), dtype=np.int64, count=len(self.positives))
            indptr = np.zeros(len(self.positives) + 1, dtype=np.int64)
            np.cumsum(counts, out=indptr[1:])
            indices = np.concatenate(self.positives) if self.positives else _EMPTY
            self._csr = (indptr, indices.astype(np.int64, copy=False))
        return self._csr

    @property
    def n_positives(self) -> np.ndarray:
        """Number of positives per query."""
        return np.diff(self.csr()[0])

    @property
    def no_positive_queries(self) -> np.ndarray:
        """Indices of queries without any positive (how they count is the evaluation's policy)."""
        return np.flatnonzero(self.n_positives == 0)

    def to_matrix(self) -> np.ndarray:
        """Dense boolean Q×N matrix (only for small sets: Q·N bytes)."""
        indptr, indices = self.csr()
        m = np.zeros((self.n_queries, self.n_database), dtype=bool)
        rows = np.repeat(np.arange(self.n_queries), np.diff(indptr))
        m[rows, indices] = True
        return m

    def subset(
        self, query_indices: Sequence[int] | np.ndarray, db_indices: Sequence[int] | np.ndarray
    ) -> "GroundTruth":
        """Ground truth restricted to some queries and database images, renumbered to the subset.

        A positive survives only if its database image is kept, so positives keep their original
        meaning (the same place) rather than being widened to the nearest kept image.
        """
        q = np.asarray(query_indices, dtype=np.int64)
        d = np.asarray(db_indices, dtype=np.int64)
        remap = np.full(self.n_database, -1, dtype=np.int64)
        remap[d] = np.arange(d.size)

        def restrict(lists: list[np.ndarray]) -> list[np.ndarray]:
            out = []
            for qi in q:
                m = remap[lists[qi]]
                out.append(np.sort(m[m >= 0]))
            return out

        soft = restrict(self.soft_positives) if self.soft_positives is not None else None
        return GroundTruth(
            restrict(self.positives),
            int(d.size),
            soft,
            source=self.source,
            rule=dict(self.rule) if self.rule is not None else None,
        )

    def summary(self) -> dict:
        """Counts for reports."""
        n_pos = self.n_positives
        return {
            "n_queries": self.n_queries,
            "n_database": self.n_database,
            "n_no_positive": int((n_pos == 0).sum()),
            "mean_positives": float(n_pos.mean()) if n_pos.size else 0.0,
            "source": self.source,
            "rule": dict(self.rule) if self.rule is not None else None,
        }

    # --- constructors --------------------------------------------------------------------------
    @classmethod
    def from_matrix(cls, matrix: np.ndarray, source: str = "matrix") -> "GroundTruth":
        """From a boolean (or 0/1) Q×N matrix."""
        m = np.asarray(matrix)
        if m.ndim != 2:
            raise DatasetError(f"ground-truth matrix must be 2-D (queries × database), got shape {m.shape}")
        rows, cols = np.nonzero(m.astype(bool))  # row-major, so cols are sorted within each row
        indptr = np.zeros(m.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=m.shape[0]), out=indptr[1:])
        return cls(_split_csr(indptr, cols.astype(np.int64)), int(m.shape[1]), source=source, rule={"kind": "matrix"})

    @classmethod
    def from_radius(
        cls,
        query_xy: np.ndarray,
        db_xy: np.ndarray,
        radius: float = DEFAULT_RADIUS_M,
        soft_radius: float | None = None,
        query_headings: np.ndarray | None = None,
        db_headings: np.ndarray | None = None,
        max_heading_diff: float | None = None,
    ) -> "GroundTruth":
        """Positives = database images within ``radius`` metres of the query (KD-tree, C speed).

        ``soft_radius`` fills ``soft_positives``. With ``max_heading_diff`` (degrees, e.g. 20 for
        Baidu Mall) and headings for both sides, a positive must also face the same way. Queries or
        database images with NaN positions get / give no positives.
        """
        qxy = np.asarray(query_xy, dtype=np.float64).reshape(-1, 2)
        dxy = np.asarray(db_xy, dtype=np.float64).reshape(-1, 2)
        if radius <= 0 or (soft_radius is not None and soft_radius < radius):
            raise DatasetError(f"radius must be > 0 and soft_radius ≥ radius; got {radius}, {soft_radius}")
        db_ok = np.flatnonzero(np.all(np.isfinite(dxy), axis=1))
        q_ok = np.flatnonzero(np.all(np.isfinite(qxy), axis=1))
        tree = cKDTree(dxy[db_ok]) if db_ok.size else None

        def within(r: float) -> list[np.ndarray]:
            out = [_EMPTY] * len(qxy)
            if tree is None or q_ok.size == 0:
                return out
            found = tree.query_ball_point(qxy[q_ok], r, return_sorted=True)
            for qi, hits in zip(q_ok, found):
                out[qi] = db_ok[np.asarray(hits, dtype=np.int64)]
            return out

        positives = within(radius)
        soft = within(soft_radius) if soft_radius is not None else None
        source = f"radius {radius:g} m"
        if max_heading_diff is not None:
            if query_headings is None or db_headings is None:
                raise DatasetError("max_heading_diff needs headings for both queries and database")
            qh = np.asarray(query_headings, dtype=np.float64)
            dh = np.asarray(db_headings, dtype=np.float64)
            # NaN heading differences compare False, so images without heading never match.
            positives = [p[_angle_diff_deg(dh[p], qh[i]) <= max_heading_diff] for i, p in enumerate(positives)]
            source += f", heading ≤ {max_heading_diff:g}°"
        rule: dict = {"kind": "radius", "meters": float(radius)}
        if max_heading_diff is not None:
            rule["max_heading_diff_deg"] = float(max_heading_diff)
        if soft_radius is not None:
            source += f" (soft {soft_radius:g} m)"
            rule["soft_meters"] = float(soft_radius)
        return cls(positives, len(dxy), soft, source=source, rule=rule)

    @classmethod
    def from_radius_latlon(
        cls,
        query_latlon: np.ndarray,
        db_latlon: np.ndarray,
        radius: float = DEFAULT_RADIUS_M,
        **kwargs,
    ) -> "GroundTruth":
        """Like :meth:`from_radius` for N×2 (lat, lon) degrees: both sets go into one UTM zone first."""
        q = np.asarray(query_latlon, dtype=np.float64).reshape(-1, 2)
        d = np.asarray(db_latlon, dtype=np.float64).reshape(-1, 2)
        both = np.concatenate([d, q])
        xy, _, _ = latlon_to_utm(both[:, 0], both[:, 1])
        return cls.from_radius(xy[len(d) :], xy[: len(d)], radius, **kwargs)

    @classmethod
    def from_frames(
        cls,
        query_frames: Sequence[str] | np.ndarray,
        db_frames: Sequence[str] | np.ndarray,
        tolerance: int = DEFAULT_FRAME_TOLERANCE,
    ) -> "GroundTruth":
        """Ground truth of frame-synchronised sequences (Nordland: same file name = same place).

        - With names (str): a query matches the database image of the *same name*, plus the
          ``tolerance`` images before and after it in sorted-name order (Nordland: ±1 file = ±10
          original frames; 0 = exact frame). A query whose name is not in the database has no positive.
        - With integers (frame numbers): positives are database frames whose number differs by at
          most ``tolerance`` from the query's.
        """
        if tolerance < 0:
            raise DatasetError(f"frame tolerance must be ≥ 0, got {tolerance}")
        q = np.asarray(query_frames)
        d = np.asarray(db_frames)
        if q.size and d.size and np.issubdtype(q.dtype, np.integer) and np.issubdtype(d.dtype, np.integer):
            order = np.argsort(d, kind="stable")
            ds = d[order]
            lo = np.searchsorted(ds, q - tolerance, side="left")
            hi = np.searchsorted(ds, q + tolerance, side="right")
            counts = hi - lo
            indptr = np.zeros(q.size + 1, dtype=np.int64)
            np.cumsum(counts, out=indptr[1:])
            # Flat positions lo[q] … hi[q]-1 for every query, without a Python loop.
            flat = np.arange(indptr[-1]) - np.repeat(indptr[:-1] - lo, counts)
            return cls(
                _split_csr(indptr, order[flat]),
                int(d.size),
                source=f"frame number ±{tolerance}",
                rule={"kind": "frames", "tolerance": int(tolerance), "match": "number"},
            )
        q_names = [str(x) for x in q.tolist()]
        d_names = [str(x) for x in d.tolist()]
        order = np.argsort(np.asarray(d_names, dtype=object), kind="stable") if d_names else _EMPTY
        sorted_names = [d_names[i] for i in order]
        position = {name: i for i, name in enumerate(sorted_names)}
        if len(position) != len(d_names):
            raise DatasetError("database frame names must be unique for frame-synchronised ground truth")
        pos = np.fromiter((position.get(n, -1) for n in q_names), dtype=np.int64, count=len(q_names))
        offsets = np.arange(-tolerance, tolerance + 1)
        cand = pos[:, None] + offsets[None, :]
        valid = (pos[:, None] >= 0) & (cand >= 0) & (cand < len(d_names))
        positives = [np.sort(order[c[v]]) for c, v in zip(cand, valid)]
        return cls(
            positives,
            len(d_names),
            source=f"same file name ±{tolerance} file(s)",
            rule={"kind": "frames", "tolerance": int(tolerance), "match": "name"},
        )

    @classmethod
    def from_list(
        cls,
        csv_path: str | os.PathLike,
        query_keys: Sequence[str],
        db_keys: Sequence[str],
        query_prefix: str = "",
        db_prefix: str = "",
    ) -> "GroundTruth":
        """Read a ``query,positives`` CSV (grammar in the module docstring) against image keys.

        Names may be the keys themselves or the keys prefixed with their folder (``query/0001.jpg``
        with ``query_prefix="query"``), as in Corridor's file. Queries absent from the file get no
        positive; names that match no image raise :class:`DatasetError` (a typo must not silently
        become a wrong ground truth).
        """
        rows = read_ground_truth_csv(csv_path)
        path = Path(csv_path)
        q_index = _key_index(query_keys, query_prefix)
        d_index = _key_index(db_keys, db_prefix)
        positives: list[np.ndarray] = [_EMPTY] * len(query_keys)
        seen: dict[int, int] = {}
        unknown_q: list[str] = []
        unknown_d: list[str] = []
        for row in rows:
            qi = q_index.get(row.query)
            if qi is None:
                unknown_q.append(f"{row.query} (line {row.line})")
                continue
            if qi in seen:
                raise DatasetError(f"{path}, line {row.line}: query {row.query!r} already listed on line {seen[qi]}")
            seen[qi] = row.line
            idx = []
            for name in row.positives:
                di = d_index.get(name)
                if di is None:
                    unknown_d.append(f"{name} (line {row.line})")
                else:
                    idx.append(di)
            positives[qi] = np.asarray(idx, dtype=np.int64)
        if unknown_q or unknown_d:
            parts = []
            if unknown_q:
                example = (
                    f"{query_prefix}/{query_keys[0]}"
                    if query_prefix and query_keys
                    else (query_keys[0] if query_keys else "")
                )
                parts.append(f"unknown query image(s) {_names_for_error(unknown_q)} (names look like {example!r})")
            if unknown_d:
                example = f"{db_prefix}/{db_keys[0]}" if db_prefix and db_keys else (db_keys[0] if db_keys else "")
                parts.append(f"unknown database image(s) {_names_for_error(unknown_d)} (names look like {example!r})")
            raise DatasetError(f"{path}: " + "; ".join(parts) + ". Fix the names or the image folders")
        return cls(positives, len(db_keys), source=f"list {path.name}", rule={"kind": "list", "file": path.name})


@dataclass(frozen=True)
class GroundTruthRow:
    """One data row of a ground-truth list: the query name and its positive names, as written."""

    line: int
    query: str
    positives: tuple[str, ...]


def read_ground_truth_csv(csv_path: str | os.PathLike) -> list[GroundTruthRow]:
    """Parse a ``query,positives`` file (grammar in the module docstring) without resolving names.

    Names are normalised as pose names are (``\\`` → ``/``, no leading ``./``). Raises one
    :class:`DatasetError` naming the file and line for anything outside the grammar.
    """
    table = read_csv_table(csv_path, "ground-truth file", GROUND_TRUTH_EXPECTED)
    path, header, sep = table.path, table.header, table.delimiter
    lowered = [h.lower() for h in header]
    while len(lowered) > 2 and lowered[-1] == "":
        lowered.pop()
    missing = [c for c in GROUND_TRUTH_COLUMNS if c not in lowered]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; the header has {', '.join(header)}. "
            f"Expected {GROUND_TRUTH_EXPECTED}"
        )
    if lowered != list(GROUND_TRUTH_COLUMNS):
        raise DatasetError(
            f"{path}, line 1: the header is {', '.join(header)}; a ground-truth list has exactly the columns "
            f"query,positives in that order. Expected {GROUND_TRUTH_EXPECTED}"
        )
    out: list[GroundTruthRow] = []
    for line, row in table.rows:
        query = normalise_image_name(row[0])
        if not query:
            raise DatasetError(f"{path}, line {line}: empty query name; expected {GROUND_TRUTH_EXPECTED}")
        if _NAME_SEPARATORS.search(query):
            others = [s for s in ",;\t" if s != sep and s in row[0]]
            why = (
                f"contains {', '.join(_SEPARATOR_WORDS[s] for s in others)} but the header separates columns with "
                f"{_SEPARATOR_WORDS[sep]} (mixed separators?)"
                if others
                else "contains whitespace"
            )
            raise DatasetError(
                f"{path}, line {line}: the query field {row[0].strip()!r} {why}; image names may not contain "
                f"whitespace, ',' or ';'. Expected {GROUND_TRUTH_EXPECTED}"
            )
        names: list[str] = []
        for fld in row[1:]:
            names.extend(normalise_image_name(t) for t in _NAME_SEPARATORS.split(fld))
        out.append(GroundTruthRow(line, query, tuple(n for n in names if n)))
    return out


def _key_index(keys: Sequence[str], prefix: str) -> dict[str, int]:
    """Name → index accepting both ``key`` and ``prefix/key``."""
    index = {k: i for i, k in enumerate(keys)}
    if len(index) != len(keys):
        raise DatasetError("image keys must be unique")
    prefix = prefix.strip("/")
    if prefix:
        index.update({f"{prefix}/{k}": i for i, k in enumerate(keys)})
    return index
