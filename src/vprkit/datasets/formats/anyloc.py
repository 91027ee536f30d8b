"""AnyLoc's "unstructured" sets and VP-Air, laid out as AnyLoc's ``custom_datasets/`` loaders read them.

**Hawkins, Laurel Caverns, Mid-Atlantic Ridge** (``hawkins_dataloader.py``, ``laurel_dataloader.py``,
``eiffel_dataloader.py``)::

    db_images/   database images      q_images/   queries      (both in natural sort order)
    pose_topic_list.npy   numeric array, one row per image, x y first (Hawkins, Laurel)
    ground_truth.csv      optional query,positives list (names relative to q_images/ and db_images/)

AnyLoc slices ``pose_topic_list.npy`` with fixed rows per set — ``hawkins`` db 0:76, queries 76:151;
``hawkins_long_corridor`` 0:127 / 127:245; ``laurel_caverns`` 0:141 / 229:341 — taken here by
folder name, or given as ``db_rows="a:b"``, ``query_rows="a:b"``; with neither, the first rows are
the database and the next the queries. Positives: within 8 m (AnyLoc's ``dist_thresh`` for Hawkins
and Laurel). Mid-Atlantic Ridge's ``eiffel_gt.npy`` is a pickle and is not loaded: convert it to
``ground_truth.csv``. A ``ground_truth.csv`` always wins.

**VP-Air** (``vpair_dataloader.py``)::

    queries/  reference_views/  [distractors/]  [ground_truth.csv]

Each query has the reference view of the same file name, rendered at its pose; positives are that
view (± ``tolerance`` views in name order; 0 by default) unless ``ground_truth.csv`` lists them.
``include_distractors=True`` adds ``distractors/`` to the database (never positives).

**Aerial (Tartan GNSS) sets** (``aerial_dataloader.py``)::

    reference_images/  query_images/  gt_matches.csv   (query_ind,top_1_ref_ind … top_5_ref_ind)

Indices are positions in natural sort order; the five listed references are the positives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import ConfigError, DatasetError
from ..base import GROUND_TRUTH_CSV, RADIUS_OPTIONS, Dataset, radius_option, register_adapter
from ..ground_truth import GroundTruth
from .common import column, images_natural, natural_key, read_csv

DB, Q = "db_images", "q_images"
POSE_FILE = "pose_topic_list.npy"
PICKLED_GT = ("eiffel_gt.npy", "vpair_gt.npy", "gardens_gt.npy")
DEFAULT_RADIUS_M = 8.0
KNOWN_ROWS = {  # AnyLoc's slices of pose_topic_list.npy
    "hawkins_long_corridor": ((0, 127), (127, 245)),
    "hawkins": ((0, 76), (76, 151)),
    "laurel_caverns": ((0, 141), (229, 341)),
}
VPAIR_Q, VPAIR_DB, VPAIR_DISTRACTORS = "queries", "reference_views", "distractors"
AERIAL_DB, AERIAL_Q, AERIAL_GT = "reference_images", "query_images", "gt_matches.csv"
AERIAL_TOP = 5


def _rows(text, what: str) -> tuple[int, int]:
    if isinstance(text, (tuple, list)) and len(text) == 2:
        return int(text[0]), int(text[1])
    try:
        a, b = str(text).split(":")
        return int(a), int(b)
    except ValueError:
        raise ConfigError(f"{what} must look like 'start:stop' (rows of {POSE_FILE}), got {text!r}") from None


def load_pose_rows(path: Path) -> np.ndarray:
    """``pose_topic_list.npy`` as a float array (never unpickled)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DatasetError(
            f"{path} holds Python objects (a pickle), which vprkit does not load; save the poses "
            f"as a numeric array, or give {GROUND_TRUTH_CSV}"
        ) from e
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise DatasetError(f"{path}: expected one row per image with x y first, got shape {arr.shape}")
    return arr


def _pickle_refusal(path: Path, found: Path) -> DatasetError:
    return DatasetError(
        f"{path}: ground truth only in {found.name}, a pickle, which vprkit does not load (unpickling can run code). "
        f"Convert it once to {GROUND_TRUTH_CSV} (header query,positives; names relative to the query and "
        f"database folders)"
    )


@register_adapter(
    "anyloc-unstructured",
    8,
    ("db_rows", "query_rows") + RADIUS_OPTIONS,
    "AnyLoc unstructured sets (Hawkins, Laurel Caverns, Mid-Atlantic Ridge): db_images/ + q_images/ with "
    "pose_topic_list.npy (rows sliced as AnyLoc does, or db_rows=a:b, query_rows=a:b) or ground_truth.csv",
    "ground_truth.csv if present, else radius 8 m on pose_topic_list.npy x, y (AnyLoc)",
)
def _unstructured():
    def detect(path: Path) -> bool:
        return (path / DB).is_dir() and (path / Q).is_dir()

    def load(
        path: Path,
        db_rows=None,
        query_rows=None,
        positive_dist_threshold: float | None = None,
        radius: float | None = None,
    ) -> Dataset:
        db = images_natural(path / DB, "database")
        q = images_natural(path / Q, "query")
        if (path / GROUND_TRUTH_CSV).is_file():
            if positive_dist_threshold is not None or radius is not None:
                raise ConfigError(f"{path} has {GROUND_TRUTH_CSV}: a list, so positive_dist_threshold does not apply")
            gt = GroundTruth.from_list(path / GROUND_TRUTH_CSV, q, db, query_prefix=Q, db_prefix=DB)
            return Dataset(path.name, path / DB, db, path / Q, q, gt, layout="anyloc-unstructured")
        if not (path / POSE_FILE).is_file():
            for name in PICKLED_GT:
                if (path / name).is_file():
                    raise _pickle_refusal(path, path / name)
            return Dataset(
                path.name,
                path / DB,
                db,
                path / Q,
                q,
                None,
                description=f"no {POSE_FILE} or {GROUND_TRUTH_CSV}: unlabelled",
                layout="anyloc-unstructured",
            )
        r = radius_option(positive_dist_threshold, radius, DEFAULT_RADIUS_M)
        poses = load_pose_rows(path / POSE_FILE)
        known = next((rows for key, rows in KNOWN_ROWS.items() if path.name.lower().startswith(key)), None)
        if db_rows is not None or query_rows is not None:
            d_rows = _rows(db_rows, "db_rows") if db_rows is not None else (0, len(db))
            q_rows = _rows(query_rows, "query_rows") if query_rows is not None else (d_rows[1], d_rows[1] + len(q))
            how = "given rows"
        elif known is not None:
            d_rows, q_rows = known
            how = f"AnyLoc's rows for {path.name}"
        else:
            d_rows, q_rows = (0, len(db)), (len(db), len(db) + len(q))
            how = "database rows first, then queries"
        for role, (a, b), n in (("database", d_rows, len(db)), ("query", q_rows, len(q))):
            if not (0 <= a <= b <= len(poses)) or b - a != n:
                raise DatasetError(
                    f"{path / POSE_FILE}: {role} rows {a}:{b} ({how}) do not match the {n} {role} images "
                    f"({len(poses)} rows in the file); give db_rows=a:b and query_rows=a:b"
                )
        d_xy = poses[d_rows[0] : d_rows[1], :2]
        q_xy = poses[q_rows[0] : q_rows[1], :2]
        gt = GroundTruth.from_radius(q_xy, d_xy, r)
        rule = dict(
            gt.rule,
            source="AnyLoc dist_thresh" if positive_dist_threshold is None and radius is None else "option",
            pose_rows={"database": list(d_rows), "queries": list(q_rows)},
        )
        return Dataset(
            path.name,
            path / DB,
            db,
            path / Q,
            q,
            gt,
            d_xy,
            q_xy,
            description=f"poses from {POSE_FILE} ({how})",
            layout="anyloc-unstructured",
            ground_truth_rule=rule,
        )

    return detect, load


@register_adapter(
    "vp-air",
    9,
    ("include_distractors", "tolerance"),
    "VP-Air: queries/ + reference_views/ (same file names) [+ distractors/] [+ ground_truth.csv]",
    "the reference view of the same name ±tolerance (0), or ground_truth.csv",
)
def _vpair():
    def detect(path: Path) -> bool:
        return (path / VPAIR_Q).is_dir() and (path / VPAIR_DB).is_dir()

    def load(path: Path, include_distractors: bool = False, tolerance: int = 0) -> Dataset:
        tolerance = int(tolerance)
        if tolerance < 0:
            raise ConfigError(f"tolerance must be ≥ 0, got {tolerance}")
        if isinstance(include_distractors, str):
            include_distractors = include_distractors.strip().lower() in ("1", "true", "yes")
        q = images_natural(path / VPAIR_Q, "query")
        refs = images_natural(path / VPAIR_DB, "reference view")
        db = [f"{VPAIR_DB}/{k}" for k in refs]
        if include_distractors:
            db += [f"{VPAIR_DISTRACTORS}/{k}" for k in images_natural(path / VPAIR_DISTRACTORS, "distractor")]
        if (path / GROUND_TRUTH_CSV).is_file():
            gt = GroundTruth.from_list(path / GROUND_TRUTH_CSV, q, db, query_prefix=VPAIR_Q)
            rule = dict(gt.rule)
        else:
            if (path / "vpair_gt.npy").is_file() and not refs:
                raise _pickle_refusal(path, path / "vpair_gt.npy")
            pos = {Path(k).stem: i for i, k in enumerate(refs)}
            order = sorted(range(len(refs)), key=lambda i: natural_key(refs[i]))
            rank = {i: r for r, i in enumerate(order)}
            positives = []
            for k in q:
                i = pos.get(Path(k).stem)
                if i is None:
                    positives.append(np.zeros(0, dtype=np.int64))
                    continue
                r0 = rank[i]
                positives.append(np.asarray(order[max(0, r0 - tolerance) : r0 + tolerance + 1], dtype=np.int64))
            rule = {
                "kind": "frames",
                "match": "name",
                "tolerance": int(tolerance),
                "source": "VP-Air: reference view rendered at the query's pose",
            }
            gt = GroundTruth(
                positives, len(db), source=f"reference view of the same name ±{tolerance}", rule=dict(rule)
            )
        return Dataset(
            path.name,
            path,
            db,
            path / VPAIR_Q,
            q,
            gt,
            layout="vp-air",
            ground_truth_rule=rule,
            description="with distractors" if include_distractors else "",
        )

    return detect, load


@register_adapter(
    "anyloc-aerial",
    9,
    (),
    "AnyLoc aerial (Tartan GNSS) sets: reference_images/ + query_images/ + gt_matches.csv "
    "(query_ind, top_1_ref_ind … top_5_ref_ind; indices in natural sort order)",
    "the 5 references listed per query in gt_matches.csv",
)
def _aerial():
    def detect(path: Path) -> bool:
        return (path / AERIAL_DB).is_dir() and (path / AERIAL_Q).is_dir()

    def load(path: Path) -> Dataset:
        db = images_natural(path / AERIAL_DB, "database")
        q = images_natural(path / AERIAL_Q, "query")
        gt_path = path / AERIAL_GT
        if not gt_path.is_file():
            return Dataset(
                path.name,
                path / AERIAL_DB,
                db,
                path / AERIAL_Q,
                q,
                None,
                description=f"no {AERIAL_GT}: unlabelled",
                layout="anyloc-aerial",
            )
        cols = ["query_ind"] + [f"top_{k}_ref_ind" for k in range(1, AERIAL_TOP + 1)]
        header, rows = read_csv(gt_path, cols, "ground-truth file")
        positives = [np.zeros(0, dtype=np.int64)] * len(q)
        try:
            qi = [int(float(v)) for v in column(header, rows, "query_ind")]
            refs = [[int(float(v)) for v in column(header, rows, c)] for c in cols[1:]]
        except ValueError as e:
            raise DatasetError(f"{gt_path}: indices must be integers ({e})") from None
        for row, i in enumerate(qi):
            hits = [r[row] for r in refs]
            if not 0 <= i < len(q) or not all(0 <= h < len(db) for h in hits):
                raise DatasetError(
                    f"{gt_path}, line {row + 2}: index out of range ({len(q)} queries, {len(db)} references)"
                )
            positives[i] = np.asarray(hits, dtype=np.int64)
        rule = {"kind": "list", "file": AERIAL_GT, "source": "AnyLoc aerial_dataloader (top-5 references)"}
        gt = GroundTruth(positives, len(db), source=f"list {AERIAL_GT}", rule=dict(rule))
        return Dataset(
            path.name, path / AERIAL_DB, db, path / AERIAL_Q, q, gt, layout="anyloc-aerial", ground_truth_rule=rule
        )

    return detect, load
