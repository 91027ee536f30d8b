"""The estimate of a localisation: the map's confidence calibration, and each answer's estimate with its lat/lon.

Shared by single images (:mod:`vprkit.pipeline.localization`) and sequence frames
(:mod:`vprkit.pipeline.sequence_frames`), so both say the same thing about the same evidence.
"""

from __future__ import annotations

import numpy as np

from ..retrieval.estimate import Calibration, Estimate, estimate, load_or_fit_calibration, sequence_positions
from .open import Map


def map_calibration(m: Map) -> Calibration:
    """The map's confidence calibration, fitted now if a read-only open left it (or the map changed much)."""
    cal = m.calibration
    if cal is None or not cal.covers(len(m.keys)):
        cal = m.calibration = load_or_fit_calibration(
            m.data.dir,
            m.index.search,
            m.store.read_global,
            m.keys,
            m.poses,
            write=not m.data.read_only,
            seed=m.config.vocabulary.seed,
        )
    elif cal.sequence is None or len(cal.sequence) != len(m.keys):  # a few places added or removed live
        cal.sequence = sequence_positions(m.keys)
    return cal


def estimate_for(
    m: Map,
    rows: np.ndarray,
    cosines: np.ndarray,
    frame_cosines: np.ndarray,
    sequence_support: float | None = None,
) -> Estimate:
    """The estimate of one query (or sequence frame) whose final ranking is ``rows``.

    ``cosines``: the query's global cosine with each of ``rows``; ``frame_cosines``: its global cosine
    with every map row (the evidence of its own place and of every other place); ``sequence_support``:
    how consistently the frames before it agree with the ranking (sequence mode), None for a single image.
    """
    cal = map_calibration(m)
    frame_cosines = np.asarray(frame_cosines, np.float64).reshape(-1)
    depth = min(cal.search_depth(), frame_cosines.size)
    top = np.argpartition(-frame_cosines, depth - 1)[:depth] if depth else np.zeros(0, np.int64)
    top = top[np.argsort(-frame_cosines[top], kind="stable")]
    est = estimate(
        rows,
        cosines,
        m.poses,
        m.data.headings,
        cal,
        evidence=frame_cosines[top],
        sequence=cal.sequence,
        evidence_rows=top,
        sequence_support=sequence_support,
    )
    return geolocated(m, est)


def geolocated(m: Map, est: Estimate) -> Estimate:
    """``est`` with the WGS84 lat/lon of its position when the map's poses are UTM (a map built from lat/lon)."""
    est.latlon = m.data.position_latlon(est.position)
    if est.latlon is not None:
        crs = m.data.crs
        est.crs = f"EPSG:{crs['epsg']}" if crs.get("epsg") else f"UTM {crs.get('zone')}{crs.get('hemisphere', 'N')}"
    return est
