"""A map's poses in the map's frame: rows for a build or an update, from a poses CSV, an array or a mapping.

Poses keep their frame (``map.json`` → ``crs``): lat/lon are projected into the map's UTM zone,
easting/northing stay in the frame stated or recorded, and a frame that contradicts the one of a
map that already has poses is refused (local metres and UTM cannot be mixed). The CSV parsing and
the projections themselves are :mod:`vprkit.datasets.poses`'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..datasets.pose_values import check_positions, normalise_headings
from ..datasets.poses import LOCAL_CRS, match_poses, parse_crs, project_pose, read_poses
from ..errors import MapError


@dataclass
class PoseRows:
    """Positions (N×2), headings and timestamps (N, NaN unknown) aligned with a build's image keys."""

    xy: np.ndarray
    headings: np.ndarray
    timestamps: np.ndarray
    frame: dict[str, Any] | None  # the CRS of ``xy``; None when no poses were given
    report: dict[str, Any] | None  # what a CSV matched (PoseMatchReport + has_headings / has_timestamps)

    @property
    def has_headings(self) -> bool:
        return self.report is not None and bool(self.report.get("has_headings"))

    @property
    def has_timestamps(self) -> bool:
        return self.report is not None and bool(self.report.get("has_timestamps"))


def describe_crs(crs: Mapping[str, Any]) -> str:
    if crs.get("kind") == "utm":
        return f"UTM zone {crs['zone']}{crs.get('hemisphere', 'N')} (EPSG:{crs.get('epsg')})"
    return f"local {crs.get('unit', 'm')}"


def pose_rows(
    poses: str | os.PathLike | np.ndarray | None,
    keys: Sequence[str],
    crs: str | dict | None = None,
    previous_crs: dict | None = None,
    has_poses: bool = False,
) -> PoseRows:
    """The poses of ``keys`` (NaN where unknown), their frame, and what a CSV matched.

    The frame is the one stated (``crs``), else the CSV's (UTM of its lat/lon, local metres for
    easting/northing), else the map's; None when no poses are given. Lat/lon are projected into the
    map's UTM zone when it has one. A frame that contradicts the map's recorded one is refused when
    the map already has poses (``has_poses``).
    """
    n = len(keys)
    stated = parse_crs(crs)
    previous = parse_crs(previous_crs) if previous_crs else None
    if poses is None or isinstance(poses, np.ndarray):
        xy = np.full((n, 2), np.nan) if poses is None else _checked_array(poses, keys, stated or previous)
        rows = PoseRows(xy, np.full(n, np.nan), np.full(n, np.nan), stated, None)
    else:
        rows = _csv_rows(poses, keys, stated, previous)
    if previous and has_poses and rows.frame and rows.frame != previous:
        raise MapError(
            f"the map's poses are in {describe_crs(previous)} but these are in {describe_crs(rows.frame)}; "
            f"give poses in the map's frame (or build another map)"
        )
    return rows


def _checked_array(poses: np.ndarray, keys: Sequence[str], frame: dict | None) -> np.ndarray:
    """An N×2 array of positions in ``frame`` (NaN rows: unknown), each in the frame's valid range."""
    n = len(keys)
    if poses.shape != (n, 2):
        raise MapError(f"poses array must be {n}×2, got {poses.shape}")
    return check_positions(poses, frame, lambda i: f"poses row {i} ({keys[i]!r}): ")


def _csv_rows(path: str | os.PathLike, keys: Sequence[str], stated: dict | None, previous: dict | None) -> PoseRows:
    target = (
        stated if stated and stated["kind"] == "utm" else (previous if previous and previous["kind"] == "utm" else None)
    )
    table = read_poses(
        path,
        zone=target["zone"] if target else None,
        northern=target["hemisphere"] == "N" if target else None,
        frame=stated or previous,
    )
    if table.utm_zone is None:  # easting/northing: the frame stated, or the map's, or local metres
        frame = stated or previous or dict(LOCAL_CRS)
    else:
        frame = table.crs
        if stated and stated["kind"] == "local":
            raise MapError(
                f"{path} gives lat/lon but the stated frame is local metres; drop --crs or give easting,northing"
            )
    names = list(keys)
    matched, match_report = match_poses(table, names)
    report = {
        **match_report.to_dict(),
        "has_headings": table.headings is not None,
        "has_timestamps": table.timestamps is not None,
    }
    return PoseRows(
        matched.lookup(names),
        normalise_headings(matched.lookup_column("headings", names)),  # stored in [0, 360)
        matched.lookup_column("timestamps", names),
        frame,
        report,
    )


@dataclass
class PoseUpdate:
    """New poses for named map rows (values not given keep the map's) and the frame they are in."""

    keys: list[str]
    xy: np.ndarray
    headings: np.ndarray
    timestamps: np.ndarray
    frame: dict[str, Any]


def pose_updates(
    poses: Mapping[str, Any],
    keys: list[str],
    current_xy: np.ndarray,
    current_h: np.ndarray,
    current_t: np.ndarray,
    crs: dict,
) -> PoseUpdate:
    """Rows for :meth:`MapStore.update_poses` from ``key → (easting, northing)`` or ``key → {easting, northing |
    lat, lon, heading, timestamp}`` (see :func:`vprkit.datasets.poses.project_pose`); values not given keep the
    map's. The frame is the map's; UTM once lat/lon land in a map without poses."""
    row_of = {k: i for i, k in enumerate(keys)}
    unknown = [k for k in poses if k not in row_of]
    if unknown:
        raise MapError(f"{len(unknown)} key(s) not in the map: {', '.join(repr(k) for k in unknown[:5])}")
    names = list(poses)
    rows = np.array([row_of[k] for k in names], np.int64)
    xy, heads, stamps = current_xy[rows].copy(), current_h[rows].copy(), current_t[rows].copy()
    frame = dict(crs)
    empty = not np.isfinite(current_xy).all(axis=1).any()
    local_given = False  # easting/northing given while the frame was still local metres
    for i, k in enumerate(names):
        before = frame
        pos, heading, stamp, frame = project_pose(poses[k], frame, allow_local_latlon=empty and not local_given)
        if pos is not None and before.get("kind") != "utm" and frame.get("kind") != "utm":
            local_given = True
        if pos is not None:
            xy[i] = pos
        if heading is not None:
            heads[i] = heading
        if stamp is not None:
            stamps[i] = stamp
    return PoseUpdate(names, xy, heads, stamps, frame)
