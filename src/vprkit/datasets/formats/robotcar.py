"""Oxford RobotCar-style traversals: images named by timestamp plus a pose CSV per traversal.

On disk, one folder per traversal (e.g. ``2014-12-09-13-21-02/``), each with

- a pose CSV with columns ``timestamp``, ``northing``, ``easting`` (RobotCar's ``gps/ins.csv``:
  ``timestamp,ins_status,latitude,longitude,altitude,northing,easting,down,utm_zone,…``; also
  ``gps/gps.csv``, ``ins.csv``, ``gps.csv`` or ``poses.csv`` in the traversal folder), timestamps
  in microseconds like the image names;
- images anywhere below it (``stereo/centre/<timestamp>.png`` …) whose file stem is the integer
  timestamp.

Each image's position is interpolated linearly in time between the pose rows around it; images
more than ``max_time_gap`` seconds (default 5) from any pose row get none (and so no positive).
``database``/``queries`` name the traversals (default with two: first alphabetically is the map).
Positives: within 25 m (``positive_dist_threshold``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import ConfigError, DatasetError
from ...images import list_images
from ..base import RADIUS_OPTIONS, Dataset, radius_option, register_adapter
from ..ground_truth import GroundTruth
from .common import column, floats, read_csv

POSE_CSVS = ("gps/ins.csv", "gps/gps.csv", "ins.csv", "gps.csv", "poses.csv")
POSE_COLUMNS = ("timestamp", "northing", "easting")
MICROSECONDS = 1e6
DEFAULT_MAX_GAP_S = 5.0


def _pose_csv(folder: Path) -> Path | None:
    for name in POSE_CSVS:
        p = folder / name
        if p.is_file():
            try:
                with open(p, encoding="utf-8-sig") as f:
                    header = [h.strip() for h in f.readline().split(",")]
            except (OSError, UnicodeDecodeError):
                continue
            if all(c in header for c in POSE_COLUMNS):
                return p
    return None


def _traversals(path: Path) -> dict[str, Path]:
    out = {}
    for d in sorted(path.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            csv_path = _pose_csv(d)
            if csv_path is not None:
                out[d.name] = csv_path
    return out


def read_traversal(folder: Path, csv_path: Path, max_gap_s: float) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image keys sorted by time, N×2 easting/northing (NaN where unknown), timestamps µs)."""
    header, rows = read_csv(csv_path, POSE_COLUMNS, "pose CSV")
    t = np.asarray(floats(column(header, rows, "timestamp"), csv_path, "timestamp"))
    north = np.asarray(floats(column(header, rows, "northing"), csv_path, "northing"))
    east = np.asarray(floats(column(header, rows, "easting"), csv_path, "easting"))
    order = np.argsort(t, kind="stable")
    t, north, east = t[order], north[order], east[order]
    keys, stamps = [], []
    for k in list_images(folder):
        stem = k.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if stem.isdigit():
            keys.append(k)
            stamps.append(int(stem))
    if not keys:
        raise DatasetError(f"{folder}: no images named by timestamp (e.g. stereo/centre/1418133243617621.png)")
    ts = np.asarray(stamps, dtype=np.float64)
    srt = np.argsort(ts, kind="stable")
    keys = [keys[i] for i in srt]
    ts = ts[srt]
    xy = np.stack([np.interp(ts, t, east), np.interp(ts, t, north)], axis=1)
    nearest = np.abs(t[np.clip(np.searchsorted(t, ts), 0, len(t) - 1)] - ts)
    nearest = np.minimum(nearest, np.abs(t[np.clip(np.searchsorted(t, ts) - 1, 0, len(t) - 1)] - ts))
    xy[nearest > max_gap_s * MICROSECONDS] = np.nan
    return keys, xy, ts.astype(np.int64)


@register_adapter(
    "robotcar-csv",
    35,
    ("queries", "database", "max_time_gap") + RADIUS_OPTIONS,
    "Oxford RobotCar-style traversals: one folder per traversal with gps/ins.csv (timestamp,northing,easting …) "
    "and images named <timestamp>.png anywhere below it; queries=/database= name the traversals",
    "radius 25 m on positions interpolated at the image timestamps",
)
def _robotcar():
    def detect(path: Path) -> bool:
        return len(_traversals(path)) >= 2

    def load(
        path: Path,
        queries: str | None = None,
        database: str | None = None,
        max_time_gap: float = DEFAULT_MAX_GAP_S,
        positive_dist_threshold: float | None = None,
        radius: float | None = None,
    ) -> Dataset:
        r = radius_option(positive_dist_threshold, radius)
        found = _traversals(path)
        names = list(found)
        if queries is None or database is None:
            if len(names) != 2 and (queries is None and database is None):
                raise ConfigError(f"{path} has traversals {', '.join(names)}; choose with queries=… and database=…")
            if database is None:
                database = next(n for n in names if n != queries) if queries else names[0]
            if queries is None:
                queries = next(n for n in names if n != database)
        for role, n in (("queries", queries), ("database", database)):
            if n not in found:
                raise DatasetError(
                    f"{path}: no traversal {n!r} with a pose CSV for {role}; available: {', '.join(names)}"
                )
        if queries == database:
            raise ConfigError(f"queries and database are the same traversal {queries!r}")
        db, d_xy, d_t = read_traversal(path / database, found[database], float(max_time_gap))
        q, q_xy, q_t = read_traversal(path / queries, found[queries], float(max_time_gap))
        gt = GroundTruth.from_radius(q_xy, d_xy, r)
        n_missing = int(np.isnan(q_xy[:, 0]).sum() + np.isnan(d_xy[:, 0]).sum())
        ds = Dataset(
            path.name,
            path / database,
            db,
            path / queries,
            q,
            gt,
            d_xy,
            q_xy,
            layout="robotcar-csv",
            description=f"queries {queries}, database {database}"
            + (f"; {n_missing} image(s) beyond {max_time_gap:g} s of any pose row (no position)" if n_missing else ""),
        )
        ds.database_metadata["timestamp"], ds.query_metadata["timestamp"] = d_t, q_t
        return ds

    return detect, load
