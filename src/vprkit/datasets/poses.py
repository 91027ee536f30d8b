"""Camera positions for ground truth: CSV reading, WGS84 → UTM, and coordinates in file names.

Ground truth by distance (``GroundTruth.from_radius``) needs positions in metres. Datasets ship
them either as projected coordinates (``image,easting,northing``), as GPS (``image,lat,lon``) or
inside the file names (``@UTM_east@UTM_north@…@.jpg``, the layout of VPR-methods-evaluation).

The lat/lon → UTM conversion is Krüger's series for the transverse Mercator projection to sixth
order in the third flattening (Karney 2011, "Transverse Mercator with an accuracy of a few
nanometers"), in plain numpy. It is accurate to well under a millimetre within a UTM zone, so
pyproj is not needed and results do not depend on whether it happens to be installed.

Pose CSV grammar (:func:`read_poses`; anything else is one :class:`DatasetError` naming the file
and line):

- UTF-8 text (a BOM is allowed), one header line, then one row per image; blank lines are skipped.
- Separator: ``,``, ``;`` or tab — whichever the header uses; every line must use the same one
  (a header with two kinds, or with none, is refused). Fields may be quoted with ``"``.
- Columns (header names are case-insensitive, in any order; :data:`COLUMN_ALIASES` lists the
  accepted spellings): ``image`` (required) plus either ``easting,northing`` (metres, any metric
  frame) or ``lat,lon`` (WGS84 degrees, projected into the UTM zone of the first row); optional
  ``heading`` (degrees) and ``timestamp`` (seconds since 1970-01-01 UTC as a number, or an ISO-8601
  date-time such as ``2024-05-01T12:30:00Z``, UTC when it has no offset; see :func:`parse_timestamp`).
  The frame is recorded (:attr:`Poses.crs`): UTM zone and hemisphere for lat/lon, local metres
  otherwise; :func:`utm_to_latlon` turns UTM metres back into degrees. When both pairs are present the metric one is
  used. Other columns are ignored (logged at INFO). A column given twice (e.g. ``x`` and
  ``easting``) is an error.
- Each row has as many fields as the header (trailing optional fields may be left out, never
  extra fields). Numbers use a decimal point (``12.5``; exponent allowed; no ``12,5``, no
  thousands separators, no ``nan``/``inf``). Positions are required; ``heading``/``timestamp`` may
  be empty (NaN). ``lat`` must lie in −80…84 (UTM's range) and ``lon`` in −180…180, all points
  within 9° of longitude of the first row's zone. Easting/northing lie within ±100,000 km (local
  metres) or a UTM frame's range, timestamps within 1900-01-01 … 2100-01-01: the ranges of
  :mod:`vprkit.datasets.pose_values`, whose message names the line, the field, the value and the range.
- ``image`` is the path relative to the image folder, ``/`` or ``\\`` separated (a leading ``./``
  is dropped); each image appears once.

:func:`match_poses` then matches the rows to image keys and reports rows that match no image and
images without a pose (:class:`PoseMatchReport`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DatasetError
from .pose_values import (
    UTM_MAX_LAT,
    UTM_MIN_LAT,
    check_latlon,
    check_positions,
    check_timestamp,
    check_timestamps,
    check_utm_zone,
    normalise_heading,
)

log = logging.getLogger(__name__)

# --- WGS84 and UTM constants (from the standards, not tunables) --------------------------------
WGS84_A = 6_378_137.0  # semi-major axis, metres
WGS84_F = 1.0 / 298.257_223_563  # flattening
UTM_K0 = 0.9996  # scale on the central meridian
UTM_FALSE_EASTING = 500_000.0
UTM_FALSE_NORTHING_SOUTH = 10_000_000.0
UTM_ZONE_WIDTH_DEG = 6.0
# UTM_MIN_LAT / UTM_MAX_LAT (80°S … 84°N; UPS beyond, which is refused) and every other valid range of a pose
# value are defined once, in :mod:`vprkit.datasets.pose_values`.

# Points further than this from the chosen zone's central meridian make the projection's scale
# error grow past ~0.1 % (≈ 2.5 cm per 25 m): fine for one neighbouring zone (3° + 6° = 9°), not for
# points spread across a continent, where metres-based radii stop meaning anything.
MAX_DEGREES_FROM_CENTRAL_MERIDIAN = 9.0

POSE_COLUMNS_METRIC = ("easting", "northing")
POSE_COLUMNS_LATLON = ("lat", "lon")
# Accepted spellings of the same columns (lower-case); the first of each is the canonical one.
COLUMN_ALIASES = {
    "image": ("image", "path", "file", "filename", "name"),
    "easting": ("easting", "east", "utm_east", "x"),
    "northing": ("northing", "north", "utm_north", "y"),
    "lat": ("lat", "latitude"),
    "lon": ("lon", "lng", "long", "longitude"),
    "heading": ("heading", "yaw", "bearing"),
    "timestamp": ("timestamp", "time", "t"),
}
# CSV files: the separators a header may use (one per file), and how each is named in messages.
CSV_SEPARATORS = (",", ";", "\t")
SEPARATOR_NAMES = {",": "','", ";": "';'", "\t": "tab"}
# Pose and ground-truth tables are read whole; beyond this size the file is not a pose table.
MAX_CSV_BYTES = 512 * 1024 * 1024
POSES_EXPECTED = "image,easting,northing (metres) or image,lat,lon (degrees), optional heading,timestamp"
# How many unmatched names a PoseMatchReport keeps.
MAX_NAMES_IN_REPORT = 5
# Numbers in pose files: decimal point, optional exponent; no thousands separators, no nan/inf.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+", re.ASCII)
# Field positions in VPR-methods-evaluation file names: "@east@north@zone@letter@lat@lon@…@.jpg"
# split on "@" gives ["", east, north, zone, letter, lat, lon, pano, tile, heading, …].
FILENAME_EAST_FIELD = 1
FILENAME_NORTH_FIELD = 2
FILENAME_HEADING_FIELD = 9


# --- lat/lon → UTM ------------------------------------------------------------------------------


def _kruger_alpha(n: float) -> np.ndarray:
    """Krüger's forward-series coefficients α1…α6 for third flattening ``n`` (Karney 2011, eq. 35)."""
    n2, n3, n4, n5, n6 = n**2, n**3, n**4, n**5, n**6
    return np.array(
        [
            n / 2 - 2 * n2 / 3 + 5 * n3 / 16 + 41 * n4 / 180 - 127 * n5 / 288 + 7891 * n6 / 37800,
            13 * n2 / 48 - 3 * n3 / 5 + 557 * n4 / 1440 + 281 * n5 / 630 - 1983433 * n6 / 1935360,
            61 * n3 / 240 - 103 * n4 / 140 + 15061 * n5 / 26880 + 167603 * n6 / 181440,
            49561 * n4 / 161280 - 179 * n5 / 168 + 6601661 * n6 / 7257600,
            34729 * n5 / 80640 - 3418889 * n6 / 1995840,
            212378941 * n6 / 319334400,
        ]
    )


_N = WGS84_F / (2 - WGS84_F)
_E = math.sqrt(WGS84_F * (2 - WGS84_F))  # first eccentricity
_RECTIFYING_RADIUS = WGS84_A / (1 + _N) * (1 + _N**2 / 4 + _N**4 / 64 + _N**6 / 256)
_ALPHA = _kruger_alpha(_N)


def utm_zone(lat: float, lon: float) -> int:
    """Standard UTM zone number of a point, including the Norway (32V) and Svalbard exceptions."""
    lon = (lon + 180.0) % 360.0 - 180.0
    zone = int((lon + 180.0) // UTM_ZONE_WIDTH_DEG) + 1
    zone = min(zone, 60)
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        return 32
    if 72.0 <= lat < 84.0 and lon >= 0.0:
        if lon < 9.0:
            return 31
        if lon < 21.0:
            return 33
        if lon < 33.0:
            return 35
        if lon < 42.0:
            return 37
    return zone


def central_meridian(zone: int) -> float:
    """Longitude (degrees) of the central meridian of UTM ``zone``."""
    return (zone - 1) * UTM_ZONE_WIDTH_DEG - 180.0 + UTM_ZONE_WIDTH_DEG / 2


def _far_from_central_meridian(lon: np.ndarray, zone: int) -> tuple[int, float] | None:
    """The first point (index, degrees) too far from ``zone``'s central meridian for one metric frame, or None."""
    dlon = np.abs((np.asarray(lon, np.float64) - central_meridian(zone) + 180.0) % 360.0 - 180.0)
    far = np.flatnonzero(dlon > MAX_DEGREES_FROM_CENTRAL_MERIDIAN)
    return None if not far.size else (int(far[0]), float(dlon[far[0]]))


def latlon_to_utm(
    lat: np.ndarray | Sequence[float],
    lon: np.ndarray | Sequence[float],
    zone: int | None = None,
    northern: bool | None = None,
) -> tuple[np.ndarray, int, bool]:
    """Project WGS84 degrees to UTM metres, all points in ONE zone so distances stay comparable.

    ``zone`` and ``northern`` default to those of the first point. Returns ``(xy, zone, northern)``
    with ``xy`` N×2 (easting, northing). Points in a neighbouring zone are projected in the extended
    zone (still accurate to millimetres); points further than
    :data:`MAX_DEGREES_FROM_CENTRAL_MERIDIAN` from its central meridian raise :class:`DatasetError`,
    because one metric frame cannot cover them.
    """
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    if lat.shape != lon.shape or lat.ndim != 1:
        raise DatasetError(f"latitudes and longitudes must be 1-D and of equal length, got {lat.shape} and {lon.shape}")
    if lat.size == 0:
        return np.zeros((0, 2)), zone or 0, True if northern is None else northern
    if not (np.all(np.isfinite(lat)) and np.all(np.isfinite(lon))):
        raise DatasetError("latitude/longitude contain NaN or infinite values")
    bad = np.flatnonzero((lat < UTM_MIN_LAT) | (lat > UTM_MAX_LAT) | (np.abs(lon) > 180.0))
    if bad.size:
        i = int(bad[0])
        raise DatasetError(
            f"point {i} (lat {lat[i]}, lon {lon[i]}) is outside UTM's range (lat {UTM_MIN_LAT}…{UTM_MAX_LAT}, "
            f"|lon| ≤ 180); check that the columns are not swapped"
        )
    if zone is None:
        zone = utm_zone(float(lat[0]), float(lon[0]))
    zone = check_utm_zone(zone)[0]
    if northern is None:
        northern = bool(lat[0] >= 0.0)
    far = _far_from_central_meridian(lon, zone)
    if far is not None:
        i, dlon_i = far
        raise DatasetError(
            f"points span several UTM zones far apart: point {i} (lat {lat[i]:.5f}, lon {lon[i]:.5f}) is "
            f"{dlon_i:.1f}° from the central meridian of zone {zone} (limit "
            f"{MAX_DEGREES_FROM_CENTRAL_MERIDIAN}°); split the dataset by region or provide easting/northing"
        )
    phi = np.radians(lat)
    lam = np.radians((lon - central_meridian(zone) + 180.0) % 360.0 - 180.0)  # signed offset from the meridian
    sin_phi = np.sin(phi)
    # Conformal latitude via tan χ = sinh(atanh(sin φ) − e·atanh(e·sin φ)).
    t = np.sinh(np.arctanh(sin_phi) - _E * np.arctanh(_E * sin_phi))
    xi_p = np.arctan2(t, np.cos(lam))
    eta_p = np.arctanh(np.sin(lam) / np.sqrt(1.0 + t * t))
    j2 = 2.0 * np.arange(1, _ALPHA.size + 1)  # 2j for j = 1…6
    xi = xi_p + np.sum(_ALPHA * np.sin(j2 * xi_p[:, None]) * np.cosh(j2 * eta_p[:, None]), axis=1)
    eta = eta_p + np.sum(_ALPHA * np.cos(j2 * xi_p[:, None]) * np.sinh(j2 * eta_p[:, None]), axis=1)
    easting = UTM_FALSE_EASTING + UTM_K0 * _RECTIFYING_RADIUS * eta
    northing = UTM_K0 * _RECTIFYING_RADIUS * xi + (0.0 if northern else UTM_FALSE_NORTHING_SOUTH)
    return np.stack([easting, northing], axis=1), int(zone), bool(northern)


def _kruger_beta(n: float) -> np.ndarray:
    """Krüger's inverse-series coefficients β1…β6 for third flattening ``n`` (Karney 2011, eq. 36)."""
    n2, n3, n4, n5, n6 = n**2, n**3, n**4, n**5, n**6
    return np.array(
        [
            n / 2 - 2 * n2 / 3 + 37 * n3 / 96 - n4 / 360 - 81 * n5 / 512 + 96199 * n6 / 604800,
            n2 / 48 + n3 / 15 - 437 * n4 / 1440 + 46 * n5 / 105 - 1118711 * n6 / 3870720,
            17 * n3 / 480 - 37 * n4 / 840 - 209 * n5 / 4480 + 5569 * n6 / 90720,
            4397 * n4 / 161280 - 11 * n5 / 504 - 830251 * n6 / 7257600,
            4583 * n5 / 161280 - 108847 * n6 / 3991680,
            20648693 * n6 / 638668800,
        ]
    )


_BETA = _kruger_beta(_N)
# Newton steps from the conformal to the geodetic latitude (Karney 2011, eqs. 19–21): each squares the
# error, so a handful reach float64 precision from the conformal latitude as the start.
CONFORMAL_NEWTON_STEPS = 5


def utm_to_latlon(xy: np.ndarray, zone: int, northern: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """WGS84 (lat, lon) degrees of UTM ``xy`` (n×2 easting, northing) in ``zone`` — the inverse of
    :func:`latlon_to_utm` (Krüger's inverse series, Karney 2011), exact to well under a micro-degree
    within the extended zone."""
    zone = check_utm_zone(zone)[0]
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    xi = (xy[:, 1] - (0.0 if northern else UTM_FALSE_NORTHING_SOUTH)) / (UTM_K0 * _RECTIFYING_RADIUS)
    eta = (xy[:, 0] - UTM_FALSE_EASTING) / (UTM_K0 * _RECTIFYING_RADIUS)
    j2 = 2.0 * np.arange(1, _BETA.size + 1)
    xi_p = xi - np.sum(_BETA * np.sin(j2 * xi[:, None]) * np.cosh(j2 * eta[:, None]), axis=1)
    eta_p = eta - np.sum(_BETA * np.cos(j2 * xi[:, None]) * np.sinh(j2 * eta[:, None]), axis=1)
    tau_p = np.sin(xi_p) / np.sqrt(np.sinh(eta_p) ** 2 + np.cos(xi_p) ** 2)  # tan of the conformal latitude
    lam = np.arctan2(np.sinh(eta_p), np.cos(xi_p))
    e2 = _E * _E
    tau = tau_p.copy()
    for _ in range(CONFORMAL_NEWTON_STEPS):
        sigma = np.sinh(_E * np.arctanh(_E * tau / np.sqrt(1.0 + tau * tau)))
        tau_i = tau * np.sqrt(1.0 + sigma * sigma) - sigma * np.sqrt(1.0 + tau * tau)
        tau = tau + (tau_p - tau_i) / np.sqrt(1.0 + tau_i * tau_i) * (1.0 + (1.0 - e2) * tau * tau) / (
            (1.0 - e2) * np.sqrt(1.0 + tau * tau)
        )
    lat = np.degrees(np.arctan(tau))
    lon = (np.degrees(lam) + central_meridian(zone) + 180.0) % 360.0 - 180.0
    return lat, lon


# EPSG codes of WGS84 / UTM: 326zz north, 327zz south.
EPSG_UTM_NORTH = 32600
EPSG_UTM_SOUTH = 32700


def utm_crs(zone: int, northern: bool) -> dict:
    """The ``map.json`` record of a UTM frame: ``{"kind": "utm", "zone", "hemisphere", "epsg"}`` (zones 1 … 60)."""
    zone = check_utm_zone(zone)[0]
    return {
        "kind": "utm",
        "zone": int(zone),
        "hemisphere": "N" if northern else "S",
        "epsg": (EPSG_UTM_NORTH if northern else EPSG_UTM_SOUTH) + int(zone),
    }


LOCAL_CRS = {"kind": "local", "unit": "m"}
_UTM_SPEC = re.compile(r"utm:?\s*(\d{1,2})\s*([ns])", re.IGNORECASE)
_EPSG_SPEC = re.compile(r"epsg:\s*(\d+)", re.IGNORECASE)


def project_pose(
    pose: "dict | Sequence[float]", crs: dict | None, allow_local_latlon: bool = False
) -> tuple[np.ndarray | None, float | None, float | None, dict]:
    """One pose in a map's frame: ``(xy or None, heading or None, timestamp or None, frame)``.

    ``pose`` is ``(easting, northing)`` or a dict with ``easting``/``northing`` (metres in the map's
    frame) or ``lat``/``lon`` (WGS84, projected into the map's UTM zone; for a map without a UTM frame
    into the point's own zone — only when ``allow_local_latlon``, i.e. the map has no poses yet),
    plus optional ``heading`` (degrees, returned in [0, 360)) and ``timestamp`` (epoch seconds or ISO-8601).
    Values not given are None (leave as they are). ``frame`` is the CRS the position is in. Bad input is one
    :class:`DatasetError`; a value outside its range (:mod:`vprkit.datasets.pose_values`) names the field.
    """
    frame = parse_crs(crs) if crs else dict(LOCAL_CRS)
    if not isinstance(pose, dict):
        try:
            values = [float(v) for v in pose]
        except (TypeError, ValueError):
            raise DatasetError(f"a pose is (easting, northing) or a dict of pose fields, got {pose!r}") from None
        if len(values) != 2:
            raise DatasetError(f"a pose is (easting, northing), got {pose!r}")
        pose = {"easting": values[0], "northing": values[1]}
    unknown = set(pose) - {"easting", "northing", "lat", "lon", "heading", "timestamp"}
    if unknown:
        raise DatasetError(
            f"unknown pose field(s) {sorted(unknown)}; use easting,northing or lat,lon, heading, timestamp"
        )
    try:
        xy, frame = _projected_position(pose, frame, allow_local_latlon)
        heading = None if pose.get("heading") is None else _finite_number(pose, "heading")
        stamp = pose.get("timestamp")
        if stamp is not None:
            stamp = _finite_number(pose, "timestamp") if not isinstance(stamp, str) else parse_timestamp(stamp)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"pose {pose!r}: {exc}") from None
    if xy is not None:
        xy = check_positions(xy, frame)[0]
    heading = None if heading is None else normalise_heading(heading)
    stamp = None if stamp is None else check_timestamp(stamp)
    return xy, heading, stamp, frame


def _finite_number(pose: dict, name: str) -> float:
    """``pose[name]`` as a finite float (a bool is not a number here), else one :class:`DatasetError` naming it."""
    value = pose[name]
    if isinstance(value, bool):
        raise DatasetError(f"pose field {name!r} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise DatasetError(f"pose field {name!r} must be a finite number, got {value!r}")
    return number


def _projected_position(pose: dict, frame: dict, allow_local_latlon: bool) -> tuple[np.ndarray | None, dict]:
    """A pose dict's position in ``frame`` (None when it gives none) and the frame it is in (UTM for lat/lon)."""
    if ("easting" in pose) != ("northing" in pose) or ("lat" in pose) != ("lon" in pose):
        raise DatasetError("a position needs both easting and northing, or both lat and lon")
    if "easting" in pose and "lat" in pose:
        raise DatasetError("give easting,northing or lat,lon, not both")
    if "easting" in pose:
        return np.array([_finite_number(pose, "easting"), _finite_number(pose, "northing")]), frame
    if "lat" not in pose:
        return None, frame
    utm = frame.get("kind") == "utm"
    if not utm and not allow_local_latlon:
        raise DatasetError("the map's poses are in local metres: give easting,northing in that frame, not lat/lon")
    lat, lon = check_latlon(_finite_number(pose, "lat"), _finite_number(pose, "lon"))
    projected, zone, northern = latlon_to_utm(
        lat, lon, frame["zone"] if utm else None, frame.get("hemisphere", "N") == "N" if utm else None
    )
    return projected[0], utm_crs(zone, northern)


def parse_crs(spec: str | dict | None) -> dict | None:
    """A stated frame: ``"utm:33N"`` / ``"utm33s"``, ``"epsg:32633"`` (WGS84 / UTM), ``"local"`` or a ``map.json``
    record (dict) → the record (:func:`utm_crs` or local metres); None stays None. Anything else is a :class:`DatasetError`."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        if spec.get("kind") == "utm":
            return utm_crs(*check_utm_zone(spec.get("zone"), spec.get("hemisphere", "N")))
        if spec.get("kind") == "local":
            return dict(LOCAL_CRS)
        raise DatasetError(f"unknown CRS record {spec!r}; expected kind 'utm' or 'local'")
    text = str(spec).strip()
    if text.lower() == "local":
        return dict(LOCAL_CRS)
    m = _UTM_SPEC.fullmatch(text)
    if m and 1 <= int(m.group(1)) <= 60:
        return utm_crs(int(m.group(1)), m.group(2).upper() == "N")
    m = _EPSG_SPEC.fullmatch(text)
    if m:
        code = int(m.group(1))
        for base, northern in ((EPSG_UTM_NORTH, True), (EPSG_UTM_SOUTH, False)):
            if base + 1 <= code <= base + 60:
                return utm_crs(code - base, northern)
    raise DatasetError(f"unknown CRS {text!r}; write utm:ZONE(N|S) (e.g. utm:33N), epsg:326ZZ / epsg:327ZZ, or local")


# --- Poses ---------------------------------------------------------------------------------------


@dataclass
class Poses:
    """Positions of images in metres, keyed by image path.

    ``xy`` is N×2 (easting, northing). ``headings`` (degrees) and ``timestamps`` are optional and
    NaN where a row left them empty. ``utm_zone``/``northern`` say which UTM frame lat/lon input was
    projected into (None for metric input, whose frame is the file's own).
    """

    keys: list[str]
    xy: np.ndarray
    headings: np.ndarray | None = None
    timestamps: np.ndarray | None = None
    utm_zone: int | None = None
    northern: bool | None = None
    source: str = ""

    def __post_init__(self) -> None:
        self.xy = np.asarray(self.xy, dtype=np.float64).reshape(-1, 2)
        if len(self.keys) != len(self.xy):
            raise DatasetError(f"{len(self.keys)} keys but {len(self.xy)} positions")
        self._index = {k: i for i, k in enumerate(self.keys)}
        if len(self._index) != len(self.keys):
            raise DatasetError("pose keys must be unique")

    def __len__(self) -> int:
        return len(self.keys)

    def indices(self, keys: Sequence[str]) -> np.ndarray:
        """Row of each key in this table, −1 where a key has no pose."""
        return np.fromiter((self._index.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """Positions aligned to ``keys`` (len(keys)×2); rows of keys without a pose are NaN."""
        idx = self.indices(keys)
        out = np.full((len(keys), 2), np.nan)
        found = idx >= 0
        out[found] = self.xy[idx[found]]
        return out

    @property
    def crs(self) -> dict:
        """The frame of :attr:`xy`: UTM (lat/lon input, see :func:`utm_crs`) or local metres."""
        return utm_crs(self.utm_zone, bool(self.northern)) if self.utm_zone else dict(LOCAL_CRS)

    def lookup_column(self, name: str, keys: Sequence[str]) -> np.ndarray:
        """``headings`` or ``timestamps`` aligned to ``keys``; NaN for keys without a pose or a column the file lacked."""
        values = getattr(self, name)
        out = np.full(len(keys), np.nan)
        if values is None:
            return out
        idx = self.indices(keys)
        found = idx >= 0
        out[found] = values[idx[found]]
        return out

    def lookup_headings(self, keys: Sequence[str]) -> np.ndarray | None:
        """Headings aligned to ``keys`` (NaN for missing), or None when the file had no headings."""
        if self.headings is None:
            return None
        idx = self.indices(keys)
        out = np.full(len(keys), np.nan)
        found = idx >= 0
        out[found] = self.headings[idx[found]]
        return out


# --- strict CSV reading (shared with ground_truth.py) -------------------------------------------


@dataclass(frozen=True)
class CsvTable:
    """A CSV read by :func:`read_csv_table`: header fields and data rows with their line numbers."""

    path: Path
    delimiter: str
    header: list[str]
    rows: list[tuple[int, list[str]]]  # (1-based line number in the file, fields); blank lines dropped


def _separator_name(sep: str) -> str:
    return SEPARATOR_NAMES.get(sep, repr(sep))


def _other_separators(text: str, delimiter: str) -> list[str]:
    return [s for s in CSV_SEPARATORS if s != delimiter and s in text]


def read_csv_table(csv_path: str | os.PathLike, what: str, expected: str) -> CsvTable:
    """Read a small CSV strictly: UTF-8 (BOM allowed), one header line, one separator for the file.

    The separator is the one the header uses — ``,``, ``;`` or tab (:data:`CSV_SEPARATORS`); a
    header with none of them (one column) or with several kinds is refused. Fields may be quoted
    with ``"`` (RFC 4180); a stray quote is an error. Blank lines are skipped. ``what`` ("pose file")
    and ``expected`` (the header that was expected) go into the error messages, which always name
    the file and, for a problem on a line, the line number.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise DatasetError(f"{what} {path} not found; expected a CSV with header {expected}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if len(data) > MAX_CSV_BYTES:
        raise DatasetError(f"{path}: {len(data)} bytes is larger than vprkit reads as a {what} ({MAX_CSV_BYTES} bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(
            f"{path}, line {line}: not valid UTF-8 (byte {data[exc.start]:#04x}); save the {what} as UTF-8"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DatasetError(f"{path}, line {line}: contains a NUL byte; this is not a text CSV")
    lines = text.splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is None:
        raise DatasetError(f"{path} is empty; expected a header {expected}")
    header_text = lines[first]
    found = [s for s in CSV_SEPARATORS if s in header_text]
    if not found:
        raise DatasetError(
            f"{path}, line {first + 1}: the header {header_text.strip()!r} has a single column; expected {expected} "
            f"with columns separated by ',', ';' or a tab"
        )
    if len(found) > 1:
        raise DatasetError(
            f"{path}, line {first + 1}: the header mixes separators ({', '.join(_separator_name(s) for s in found)}); "
            f"use one of ',', ';' or tab throughout. Expected {expected}"
        )
    delimiter = found[0]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    last = 0
    try:
        for row in reader:
            start, last = last + 1, reader.line_num
            if not any(c.strip() for c in row):
                continue
            if header is None:
                header = [h.strip() for h in row]
            else:
                rows.append((start, row))
    except csv.Error as exc:
        raise DatasetError(f"{path}, line {reader.line_num}: malformed CSV ({exc}); expected {expected}") from None
    if header is None:  # only separators, e.g. ",,"
        raise DatasetError(f"{path}, line {first + 1}: the header has no column names; expected {expected}")
    return CsvTable(path, delimiter, header, rows)


def _find_column(header: list[str], name: str, path: Path) -> int | None:
    lowered = [h.strip().lower() for h in header]
    hits = [i for i, h in enumerate(lowered) if h in COLUMN_ALIASES[name]]
    if len(hits) > 1:
        raise DatasetError(
            f"{path}, line 1: columns {', '.join(repr(header[i]) for i in hits)} all mean {name!r}; keep one"
        )
    return hits[0] if hits else None


def _parse_float(text: str, path: Path, line: int, column: str, allow_empty: bool = False, hint: str = "") -> float:
    text = text.strip()
    if allow_empty and text == "":
        return math.nan
    if not _NUMBER.fullmatch(text):
        why = "which is not a number"
        if text == "":
            why = "empty"
        elif _DECIMAL_COMMA.fullmatch(text):
            why = "a decimal comma; write a decimal point (12.5, not 12,5)"
        elif text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            why = "not finite; every value must be a finite number" + ("" if not allow_empty else " or left empty")
        raise DatasetError(f"{path}, line {line}: column {column!r} has {text!r}, {why}{hint}; fix or remove the row")
    value = float(text)
    if not math.isfinite(value):
        raise DatasetError(f"{path}, line {line}: column {column!r} is {text!r}, which overflows a 64-bit float")
    return value


def parse_timestamp(text: str, path: Path | str = "", line: int = 0, hint: str = "") -> float:
    """A pose file's ``timestamp`` as seconds since the Unix epoch (NaN when empty).

    A number is taken as epoch seconds as written; otherwise an ISO-8601 date-time
    (``2024-05-01T12:30:00Z``, ``2024-05-01 12:30:00.5+02:00``, ``2024-05-01``) is converted, a time
    without an offset being UTC. Anything else is one :class:`DatasetError` naming the file and line.
    """
    raw = text.strip()
    if raw == "" or _NUMBER.fullmatch(raw):
        return _parse_float(raw, Path(path), line, "timestamp", allow_empty=True, hint=hint)
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise DatasetError(
            f"{path}, line {line}: column 'timestamp' has {raw!r}, which is neither a number (seconds since "
            f"1970-01-01 UTC) nor an ISO-8601 date-time (2024-05-01T12:30:00Z){hint}; fix or remove the row"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def normalise_image_name(name: str) -> str:
    """How an image name in a CSV is compared with image keys: trimmed, ``\\`` → ``/``, no leading ``./``."""
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def read_poses(
    csv_path: str | os.PathLike, zone: int | None = None, northern: bool | None = None, frame: dict | None = None
) -> Poses:
    """Read a pose CSV (grammar in the module docstring) into :class:`Poses`.

    ``image,easting,northing`` (metres) or ``image,lat,lon`` (WGS84 degrees), optional ``heading``
    (degrees) and ``timestamp`` (epoch seconds or ISO-8601, see :func:`parse_timestamp`) columns.
    Lat/lon are projected to the UTM zone of the first row (see :func:`latlon_to_utm`), or into
    ``zone``/``northern`` when given (a map's frame, so a second run lands in the same metres; points
    too far from that zone's meridian are refused). Easting/northing must lie in ``frame``'s valid range
    (the frame they are stated in; None: local metres' bound) and timestamps in the documented range
    (:mod:`vprkit.datasets.pose_values`); headings are kept as written (a map stores them in [0, 360)).
    Every malformed input raises one :class:`DatasetError` naming the file and the line. Match the table
    to image keys with :func:`match_poses`.
    """
    table = read_csv_table(csv_path, "pose file", POSES_EXPECTED)
    cols, metric = _pose_columns(table)
    rows = _read_pose_rows(table, cols, metric)

    def at_line(i: int) -> str:  # the prefix of row i's error
        return f"{table.path}, line {rows.lines[i]}: "

    if rows.stamps is not None:
        check_timestamps(rows.stamps, at_line)
    if metric:
        xy = check_positions(np.stack([rows.a, rows.b], 1), frame if frame and frame.get("kind") else None, at_line)
        return Poses(rows.keys, xy, rows.headings, rows.stamps, source=str(table.path))
    return _project_latlon(rows, table.path, zone, northern)


def _pose_columns(table: CsvTable) -> tuple[dict[str, int | None], bool]:
    """Each pose column's index in the header (None when absent), and whether positions are metric.

    Refuses a header without ``image`` and a position pair, a nameless column among the used ones,
    and a table without rows.
    """
    path, header = table.path, table.header
    cols = {name: _find_column(header, name, path) for name in COLUMN_ALIASES}
    metric = cols["easting"] is not None and cols["northing"] is not None
    geographic = cols["lat"] is not None and cols["lon"] is not None
    if cols["image"] is None or not (metric or geographic):
        wanted = ["image"] + list(POSE_COLUMNS_METRIC)
        missing = [c for c in wanted if cols[c] is None]
        if not metric and (cols["lat"] is not None or cols["lon"] is not None):
            missing = [c for c in ("image", *POSE_COLUMNS_LATLON) if cols[c] is None]
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; the header has {', '.join(header)}. "
            f"Expected {POSES_EXPECTED}"
        )
    known = {c for c in cols.values() if c is not None}
    ignored = [h for i, h in enumerate(header) if i not in known and h]
    if ignored:
        log.info("%s: ignoring column(s) %s (not pose columns)", path, ", ".join(ignored))
    empty_named = [i + 1 for i, h in enumerate(header) if not h and i < max(known)]
    if empty_named:
        raise DatasetError(f"{path}, line 1: header column {empty_named[0]} has no name; expected {POSES_EXPECTED}")
    if not table.rows:
        raise DatasetError(f"{path}: the header is there but no pose rows follow; expected {POSES_EXPECTED}")
    return cols, metric


@dataclass
class _PoseRows:
    """A pose table's parsed rows: ``a``, ``b`` are easting/northing or lat/lon; ``lines`` their line numbers."""

    keys: list[str]
    lines: np.ndarray
    a: np.ndarray
    b: np.ndarray
    headings: np.ndarray | None
    stamps: np.ndarray | None


def _read_pose_rows(table: CsvTable, cols: dict[str, int | None], metric: bool) -> _PoseRows:
    """Parse every row: one image each, finite numbers, lat/lon on Earth and within UTM's range."""
    path, header, sep = table.path, table.header, table.delimiter
    xcol, ycol = (cols["easting"], cols["northing"]) if metric else (cols["lat"], cols["lon"])
    xname, yname = ("easting", "northing") if metric else ("lat", "lon")
    n = len(table.rows)
    rows = _PoseRows(
        [],
        np.empty(n, dtype=np.int64),
        np.empty(n),
        np.empty(n),
        np.full(n, np.nan) if cols["heading"] is not None else None,
        np.full(n, np.nan) if cols["timestamp"] is not None else None,
    )
    first_line: dict[str, int] = {}
    needed = max(c for c in (cols["image"], xcol, ycol) if c is not None) + 1
    for i, (line, row) in enumerate(table.rows):
        others = _other_separators(sep.join(row), sep)
        hint = (
            f" (the line contains {', '.join(_separator_name(s) for s in others)} but the header separates "
            f"columns with {_separator_name(sep)}: mixed separators?)"
            if others
            else ""
        )
        if len(row) < needed or len(row) > len(header):
            raise DatasetError(
                f"{path}, line {line}: {len(row)} field(s), expected {len(header)} ({', '.join(header)}){hint}"
            )
        key = normalise_image_name(row[cols["image"]])
        if not key:
            raise DatasetError(f"{path}, line {line}: empty image name")
        if key in first_line:
            raise DatasetError(f"{path}, line {line}: image {key!r} already appears on line {first_line[key]}")
        first_line[key] = line
        rows.keys.append(key)
        rows.lines[i] = line
        rows.a[i] = _parse_float(row[xcol], path, line, xname, hint=hint)
        rows.b[i] = _parse_float(row[ycol], path, line, yname, hint=hint)
        if rows.headings is not None and cols["heading"] < len(row):
            rows.headings[i] = _parse_float(row[cols["heading"]], path, line, "heading", allow_empty=True, hint=hint)
        if rows.stamps is not None and cols["timestamp"] < len(row):
            rows.stamps[i] = parse_timestamp(row[cols["timestamp"]], path, line, hint=hint)
        if not metric:
            _check_latlon(rows.a[i], rows.b[i], path, line)
    return rows


def _check_latlon(lat: float, lon: float, path: Path, line: int) -> None:
    if not -90.0 <= lat <= 90.0 or not -180.0 <= lon <= 180.0:
        raise DatasetError(
            f"{path}, line {line}: lat {lat:g}, lon {lon:g} is not a position on Earth "
            f"(lat −90…90, lon −180…180); are the columns swapped?"
        )
    if not UTM_MIN_LAT <= lat <= UTM_MAX_LAT:
        raise DatasetError(
            f"{path}, line {line}: lat {lat:g} is outside UTM's range ({UTM_MIN_LAT:g}…{UTM_MAX_LAT:g}°); "
            f"provide easting,northing in a polar projection instead"
        )


def _project_latlon(rows: _PoseRows, path: Path, zone: int | None, northern: bool | None) -> Poses:
    """Lat/lon rows in UTM metres: the first row's zone, or ``zone`` (a map's frame) when given."""
    chosen = f"chosen by line {rows.lines[0]}" if zone is None else "the map's frame"
    zone = utm_zone(float(rows.a[0]), float(rows.b[0])) if zone is None else int(zone)
    far = _far_from_central_meridian(rows.b, zone)
    if far is not None:
        i, dlon_i = far
        raise DatasetError(
            f"{path}, line {rows.lines[i]}: lon {rows.b[i]:g} is {dlon_i:.1f}° from the central meridian of UTM zone "
            f"{zone} ({chosen}; limit {MAX_DEGREES_FROM_CENTRAL_MERIDIAN:g}°): one metric frame "
            f"cannot cover these points; split the dataset by region or provide easting,northing"
        )
    try:
        xy, zone, northern = latlon_to_utm(rows.a, rows.b, zone, northern)
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    return Poses(rows.keys, xy, rows.headings, rows.stamps, utm_zone=zone, northern=northern, source=str(path))


# --- matching a pose table to image keys ---------------------------------------------------------


@dataclass
class PoseMatchReport:
    """How a pose table matched a list of image keys (for logs and the map's build summary).

    ``unmatched_poses`` / ``images_without_pose`` list the first :data:`MAX_NAMES_IN_REPORT` names;
    the ``n_…`` fields count all of them. ``hint`` says what probably went wrong (e.g. pose rows
    carry a folder prefix the keys do not have), or is empty.
    """

    source: str
    n_images: int
    n_poses: int
    n_matched: int
    n_unmatched_poses: int
    n_images_without_pose: int
    unmatched_poses: list[str] = field(default_factory=list)
    images_without_pose: list[str] = field(default_factory=list)
    hint: str = ""

    @property
    def complete(self) -> bool:
        """Every image has a pose and every pose row matched an image."""
        return self.n_unmatched_poses == 0 and self.n_images_without_pose == 0

    def message(self) -> str:
        """One line: counts, first names, hint."""
        text = f"{self.source}: {self.n_matched} of {self.n_images} image(s) have a pose"
        if self.n_images_without_pose:
            text += f"; {self.n_images_without_pose} without a pose ({_shown(self.images_without_pose, self.n_images_without_pose)})"
        if self.n_unmatched_poses:
            text += (
                f"; {self.n_unmatched_poses} of {self.n_poses} pose row(s) match no image "
                f"({_shown(self.unmatched_poses, self.n_unmatched_poses)})"
            )
        return text + (f". {self.hint}" if self.hint else "")

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "n_images": self.n_images,
            "n_poses": self.n_poses,
            "n_matched": self.n_matched,
            "n_unmatched_poses": self.n_unmatched_poses,
            "n_images_without_pose": self.n_images_without_pose,
            "unmatched_poses": list(self.unmatched_poses),
            "images_without_pose": list(self.images_without_pose),
            "hint": self.hint,
        }


def _shown(names: Sequence[str], total: int) -> str:
    return ", ".join(repr(n) for n in names) + (" …" if total > len(names) else "")


def _mismatch_hint(unmatched: Sequence[str], without: Sequence[str], prefix: str) -> str:
    """Guess why names do not match: a folder prefix on one side, or different case."""
    if not unmatched or not without:
        return ""
    keys = set(without)
    for name in unmatched:
        parts = name.split("/")
        for cut in range(1, len(parts)):
            if "/".join(parts[cut:]) in keys:
                extra = "/".join(parts[:cut])
                return (
                    f"Pose rows carry the folder prefix {extra + '/'!r} that the image keys do not have "
                    f"(e.g. {name!r} vs {'/'.join(parts[cut:])!r}); write names relative to the image folder"
                    + ("" if prefix else f" or pass prefix={extra!r}")
                )
    unmatched_set = set(unmatched)
    for key in without:
        parts = key.split("/")
        for cut in range(1, len(parts)):
            if "/".join(parts[cut:]) in unmatched_set:
                return (
                    f"Image keys have sub-folders that the pose rows lack (e.g. key {key!r} vs row "
                    f"{'/'.join(parts[cut:])!r}); write names relative to the image folder"
                )
    lower = {k.lower(): k for k in without}
    for name in unmatched:
        if name.lower() in lower:
            return f"Names differ only in case (e.g. {name!r} vs {lower[name.lower()]!r}); names are case-sensitive"
    return ""


def match_poses(
    poses: Poses,
    image_keys: Sequence[str],
    prefix: str = "",
    allow_no_match: bool = False,
    log_warnings: bool = True,
) -> tuple[Poses, PoseMatchReport]:
    """Match a pose table to image keys; return the matched poses and a report of what did not match.

    A row matches an image when its name (see :func:`normalise_image_name`) equals the key, or
    ``prefix/key`` when ``prefix`` is given (e.g. ``"database"`` for rows written relative to the
    dataset folder). Nothing else is guessed: a row ``db/img001.jpg`` does not match key
    ``img001.jpg`` without ``prefix="db"`` — the report's ``hint`` says so instead.

    - The returned :class:`Poses` holds, in ``image_keys`` order, the images that have a pose, keyed
      by image key (use ``.lookup(image_keys)`` for an N×2 array with NaN rows for the others).
    - No match at all (with pose rows and images on both sides) raises :class:`DatasetError` with
      the report's message, unless ``allow_no_match``.
    - A partial match is logged as one warning (``log_warnings``); the caller should record
      ``report.to_dict()`` (e.g. in the build summary).
    - Two rows for the same image (``key`` and ``prefix/key``) raise :class:`DatasetError`.
    """
    prefix = prefix.strip().strip("/")
    keys = list(image_keys)
    key_set = set(keys)
    if len(key_set) != len(keys):
        raise DatasetError("image keys must be unique to match poses")
    row_of: dict[str, int] = {}
    unmatched: list[str] = []
    for row, name in enumerate(poses.keys):
        key = name
        if key not in key_set and prefix and name.startswith(prefix + "/"):
            key = name[len(prefix) + 1 :]
        if key not in key_set:
            unmatched.append(name)
            continue
        if key in row_of:
            raise DatasetError(
                f"{poses.source or 'poses'}: image {key!r} has two pose rows ({poses.keys[row_of[key]]!r} and {name!r})"
            )
        row_of[key] = row
    matched_keys = [k for k in keys if k in row_of]
    without = [k for k in keys if k not in row_of]
    rows = np.asarray([row_of[k] for k in matched_keys], dtype=np.int64)
    report = PoseMatchReport(
        source=poses.source or "poses",
        n_images=len(keys),
        n_poses=len(poses),
        n_matched=len(matched_keys),
        n_unmatched_poses=len(unmatched),
        n_images_without_pose=len(without),
        unmatched_poses=unmatched[:MAX_NAMES_IN_REPORT],
        images_without_pose=without[:MAX_NAMES_IN_REPORT],
        hint=_mismatch_hint(unmatched, without, prefix),
    )
    if not matched_keys and keys and len(poses) and not allow_no_match:
        raise DatasetError(
            report.message() + ("" if report.hint else ". Check that names are relative to the image folder")
        )
    if not report.complete and log_warnings:
        log.warning("%s", report.message())
    matched = Poses(
        matched_keys,
        poses.xy[rows] if rows.size else np.zeros((0, 2)),
        poses.headings[rows] if poses.headings is not None else None,
        poses.timestamps[rows] if poses.timestamps is not None else None,
        utm_zone=poses.utm_zone,
        northern=poses.northern,
        source=poses.source,
    )
    return matched, report


# --- coordinates in file names -------------------------------------------------------------------


def parse_utm_filename(name: str) -> tuple[float, float] | None:
    """(easting, northing) from a VPR-methods-evaluation name ``@east@north@…@.jpg``, else None.

    Only the base name is looked at, so keys with sub-folders work.
    """
    base = name.rsplit("/", 1)[-1]
    parts = base.split("@")
    if len(parts) <= FILENAME_NORTH_FIELD or parts[0] != "":
        return None
    try:
        east, north = float(parts[FILENAME_EAST_FIELD]), float(parts[FILENAME_NORTH_FIELD])
    except ValueError:
        return None
    if not (math.isfinite(east) and math.isfinite(north)):
        return None
    return east, north


def poses_from_filenames(keys: Sequence[str]) -> np.ndarray:
    """N×2 UTM positions parsed from ``@east@north@…`` names; rows without coordinates are NaN."""
    out = np.full((len(keys), 2), np.nan)
    for i, key in enumerate(keys):
        parsed = parse_utm_filename(key)
        if parsed is not None:
            out[i] = parsed
    return out
