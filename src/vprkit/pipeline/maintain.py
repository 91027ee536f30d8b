"""Maintaining a built map: what it holds (:func:`map_info`), removing places, setting poses.

Each change holds the map's write lock and is atomic (the store first, then the index, then
``map.json``), and notes itself in ``map.json`` (``last_change``).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..datasets.pose_values import FULL_TURN_DEG, valid_positions, valid_timestamps
from ..errors import MapError
from ..maps import (
    build_index,
    crs_to_latlon,
    map_crs,
    map_write_lock,
    MapStore,
    open_map_data,
    pose_rows,
    pose_updates,
    read_map_info,
    serving_footprint,
    write_manifest,
)
from .models import load_backbone, make_extensions

logger = logging.getLogger(__name__)


def map_info(map_dir: str | os.PathLike) -> dict[str, Any]:
    """``map.json`` plus bytes per image of the global descriptor and of each stored extra, a summary of the
    poses (``poses``: how many rows have one, extent in metres and — UTM maps — degrees, CRS, how many
    have a heading / timestamp) and each run's image count (``runs[i]["images"]``: rows stored from it).

    Counts come from the map's files, not from ``map.json``'s counters, which a kill during its write (or a
    failed write) can leave behind: ``counts.images`` is the store's row count and ``index.ntotal`` the
    index's own; when ``map.json`` recorded others, ``stale_counts`` says what it recorded. Stored values
    outside their valid range (written before they were checked) are counted in ``poses.out_of_range``, left
    out of the extent and time range, and never crash this (unknown is None, never NaN)."""
    d = Path(map_dir)
    info = read_map_info(d)
    store = MapStore(d, info["config"].get("store_dtype", "float32"))
    info["bytes_per_image"] = store.extra_bytes()
    n = len(store)
    info["poses"] = _poses_summary(store, map_crs(info))
    rows_of_run = np.unique(store.read_entries()["run"], return_counts=True) if n else ([], [])
    counts = {int(r): int(c) for r, c in zip(*rows_of_run)}
    info["runs"] = [{**r, "images": counts.get(int(r.get("run", -1)), 0)} for r in info.get("runs", [])]
    if counts.get(-1):
        info["runs_unrecorded_images"] = counts[-1]  # rows of maps built before runs were recorded
    info["serving"] = serving_footprint(d)  # bytes per place on disk and the RAM to serve the map
    _counts_from_files(info, n, info["serving"]["places"])
    return info


def _counts_from_files(info: dict[str, Any], images: int, indexed: int) -> None:
    """Set ``info``'s image count (the store's rows) and index size (the index's own record) from the files; what
    ``map.json`` recorded instead, when it differs, goes to ``info["stale_counts"]``."""
    recorded = {"images": info.get("counts", {}).get("images"), "ntotal": info.get("index", {}).get("ntotal")}
    stale = {k: v for k, v in recorded.items() if v is not None and v != {"images": images, "ntotal": indexed}[k]}
    info.setdefault("counts", {})["images"] = images
    info.setdefault("index", {})["ntotal"] = indexed
    if stale:
        info["stale_counts"] = stale


def _poses_summary(store: MapStore, crs: dict[str, Any]) -> dict[str, Any]:
    """How many rows have a pose, heading and timestamp, the extent (metres; degrees for UTM) and time range of
    the values in their valid range, and how many stored values are outside it (``out_of_range``)."""
    n = len(store)
    xy = store.read_poses() if n else np.zeros((0, 2))
    headings = store.read_headings() if n else np.zeros(0)
    stamps = store.read_timestamps() if n else np.zeros(0)
    stored = ~np.isnan(xy).any(axis=1)  # NaN is "unknown"; anything else was stored as a pose, valid or not
    usable = valid_positions(xy, crs)
    timed = valid_timestamps(stamps)
    poses: dict[str, Any] = {
        "images": n,
        "with_pose": int(stored.sum()),
        "crs": crs,
        "with_heading": int((~np.isnan(headings)).sum()),
        "with_timestamp": int((~np.isnan(stamps)).sum()),
        "extent": None,
        "extent_latlon": None,
        "time_range": None,
    }
    if usable.any():
        lo, hi = xy[usable].min(axis=0), xy[usable].max(axis=0)
        poses["extent"] = {"easting": [float(lo[0]), float(hi[0])], "northing": [float(lo[1]), float(hi[1])]}
        if crs.get("kind") == "utm":
            ll = crs_to_latlon(crs, xy[usable])
            ll = ll[np.isfinite(ll).all(axis=1)]
            if len(ll):
                poses["extent_latlon"] = {
                    "lat": [float(ll[:, 0].min()), float(ll[:, 0].max())],
                    "lon": [float(ll[:, 1].min()), float(ll[:, 1].max())],
                }
    if timed.any():
        t = stamps[timed]
        poses["time_range"] = [
            datetime.fromtimestamp(float(v), timezone.utc).isoformat(timespec="seconds") for v in (t.min(), t.max())
        ]
    outside = {
        "positions": int((stored & ~usable).sum()),
        "headings": int((~np.isnan(headings) & ~((headings >= 0) & (headings < FULL_TURN_DEG))).sum()),
        "timestamps": int((~np.isnan(stamps) & ~timed).sum()),
    }
    if any(outside.values()):
        poses["out_of_range"] = outside
    return poses


def record_change(map_dir: Path, **change: Any) -> dict[str, Any]:
    """Note a maintenance change in ``map.json`` (counts, index size, time, what changed) atomically."""
    info = read_map_info(map_dir)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    store = MapStore(map_dir, info["config"].get("store_dtype", "float32"))
    info.setdefault("counts", {})["images"] = len(store)
    if "ntotal" in change:
        info.setdefault("index", {})["ntotal"] = change.pop("ntotal")
    if "crs" in change:
        crs = change.pop("crs")
        if crs is not None:
            info["crs"] = crs
    info["updated"] = now
    info["last_change"] = {"at": now, **change}
    write_manifest(map_dir, info)
    return info


# How many keys a map.json change record lists (the count is always complete).
MAX_LISTED_KEYS = 20


def remove_places(map_dir: str | os.PathLike, keys: Sequence[str]) -> dict[str, Any]:
    """Remove the images ``keys`` from a map: store rows, index entries and derived extension data.

    Holds the map's write lock. Every key must be in the map (else one :class:`MapError` and nothing
    changes). The store changes atomically first; the index follows (rows removed in place, or rebuilt
    from the store when its kind cannot remove) — a crash in between leaves a stale index, which the
    next open rebuilds. Returns ``{"removed": keys, "rows": removed rows (ascending), "images": rows left}``.
    """
    d = Path(map_dir)
    keys = list(dict.fromkeys(str(k) for k in keys))
    if not keys:
        raise MapError("no image keys given to remove")
    with map_write_lock(d):
        data = open_map_data(d, read_only=False)
        try:
            rows = data.store.remove(keys)
            try:
                data.index.remove(rows)
            except (RuntimeError, NotImplementedError, MapError) as exc:  # an index kind that cannot delete
                logger.info("rebuilding the index after removing rows (%s)", exc)
                data.index = build_index(data.store.read_global(), data.config, d)
            data.index.save_to_map(d)
            if data.config.extensions:  # derived per-map data (e.g. a SuperSegment index) follows the rows
                backbone = load_backbone(data.config)
                for ext in make_extensions(data.config, backbone, data.vocabulary).values():
                    if not ext.needs_fit or ext.try_load_state(d):
                        ext.finalize(data.store, d)
            n = len(data.store)
            record_change(d, removed=len(rows), removed_keys=keys[:MAX_LISTED_KEYS], ntotal=data.index.ntotal)
        finally:
            data.store.close()
    return {"removed": keys, "rows": rows.tolist(), "images": n}


def update_place_poses(map_dir: str | os.PathLike, poses: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Set the poses of images already in a map, from a poses CSV or a mapping (see :func:`vprkit.maps.poses.pose_updates`).

    Holds the map's write lock. A CSV's lat/lon are projected into the map's UTM zone; its rows that
    match no image are reported (none matching is an error); a heading or timestamp column replaces
    the stored values of the rows it covers (an empty cell: unknown). A mapping names keys that must
    be in the map. Returns ``{"updated": rows changed, "crs": the map's frame, "report": CSV match report}``.
    """
    d = Path(map_dir)
    with map_write_lock(d):
        info = read_map_info(d)
        store = MapStore(d, info["config"].get("store_dtype", "float32"))
        keys = store.keys()
        xy_now = store.read_poses()
        has_poses = bool(np.isfinite(xy_now).all(axis=1).any())
        crs = map_crs(info)
        report = None
        if isinstance(poses, Mapping):
            update = pose_updates(poses, keys, xy_now, store.read_headings(), store.read_timestamps(), crs)
            updated = store.update_poses(update.keys, update.xy, headings=update.headings, timestamps=update.timestamps)
            frame = update.frame
        else:
            rows = pose_rows(poses, keys, None, info.get("crs"), has_poses)
            matched = np.isfinite(rows.xy).all(axis=1)
            names = [k for k, m in zip(keys, matched) if m]
            updated = store.update_poses(
                names,
                rows.xy[matched],
                headings=rows.headings[matched] if rows.has_headings else None,
                timestamps=rows.timestamps[matched] if rows.has_timestamps else None,
            )
            frame, report = rows.frame, rows.report
        record_change(
            d,
            poses_updated=updated,
            crs=frame if frame != crs else None,
            **({"poses": report} if report is not None else {}),
        )
    return {"updated": updated, "crs": frame, "report": report}
