"""Camera positions for ground truth: CSV reading, WGS84 → UTM, and coordinates in file names.

Ground truth by distance (``GroundTruth.from_radius``) needs positions in metres. Datasets ship
them either as projected coordinates (``image,easting,northing``), as GPS (``image,lat,lon``) or
inside the file names (``@UTM_east@UTM_north@…@.jpg``, the layout of VPR-methods-evaluation).

The lat/lon → UTM conversion is Krüger's series for the transverse Mercator projection to sixth
order in the third flattening (Karney 2011, "Transverse Mercator with an accuracy of a few
nanometers"), in plain numpy. It is accurate to well under a millimetre within a UTM zone, so
pyproj is not needed and results do not depend on whether it happens to be installed.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DatasetError

# --- WGS84 and UTM constants (from the standards, not tunables) --------------------------------
WGS84_A = 6_378_137.0  # semi-major axis, metres
WGS84_F = 1.0 / 298.257_223_563  # flattening
UTM_K0 = 0.9996  # scale on the central meridian
UTM_FALSE_EASTING = 500_000.0
UTM_FALSE_NORTHING_SOUTH = 10_000_000.0
UTM_ZONE_WIDTH_DEG = 6.0
UTM_MAX_LAT = 84.0  # UTM is defined up to 84°N / 80°S; beyond it the error is still small but
UTM_MIN_LAT = -80.0  # the zones are not standard (UPS is used there), so we refuse.

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
    if northern is None:
        northern = bool(lat[0] >= 0.0)
    dlon = (lon - central_meridian(zone) + 180.0) % 360.0 - 180.0
    far = np.flatnonzero(np.abs(dlon) > MAX_DEGREES_FROM_CENTRAL_MERIDIAN)
    if far.size:
        i = int(far[0])
        raise DatasetError(
            f"points span several UTM zones far apart: point {i} (lat {lat[i]:.5f}, lon {lon[i]:.5f}) is "
            f"{abs(dlon[i]):.1f}° from the central meridian of zone {zone} (limit "
            f"{MAX_DEGREES_FROM_CENTRAL_MERIDIAN}°); split the dataset by region or provide easting/northing"
        )
    phi = np.radians(lat)
    lam = np.radians(dlon)
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

    def lookup_headings(self, keys: Sequence[str]) -> np.ndarray | None:
        """Headings aligned to ``keys`` (NaN for missing), or None when the file had no headings."""
        if self.headings is None:
            return None
        idx = self.indices(keys)
        out = np.full(len(keys), np.nan)
        found = idx >= 0
        out[found] = self.headings[idx[found]]
        return out


def _find_column(header: list[str], name: str) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for alias in COLUMN_ALIASES[name]:
        if alias in lowered:
            return lowered.index(alias)
    return None


def _parse_float(text: str, path: Path, line: int, column: str, allow_empty: bool = False) -> float:
    text = text.strip()
    if allow_empty and text == "":
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(
            f"{path}, line {line}: column {column!r} has {text!r}, which is not a number; fix or remove the row"
        ) from None
    if not math.isfinite(value) and not allow_empty:
        raise DatasetError(f"{path}, line {line}: column {column!r} is {text!r}; positions must be finite")
    return value


def read_poses(csv_path: str | os.PathLike) -> Poses:
    """Read ``image,easting,northing`` (metres) or ``image,lat,lon`` (WGS84 degrees) from a CSV.

    Optional ``heading`` (degrees) and ``timestamp`` columns are kept. Lat/lon are projected to the
    UTM zone of the first row (see :func:`latlon_to_utm`). Every malformed input raises one
    :class:`DatasetError` naming the file, and the line where applicable.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise DatasetError(f"pose file {path} not found; expected a CSV with header image,easting,northing or image,lat,lon")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read as a UTF-8 CSV ({exc})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DatasetError(f"{path} is empty; expected a header image,easting,northing or image,lat,lon")
    header = rows[0]
    cols = {name: _find_column(header, name) for name in COLUMN_ALIASES}
    metric = cols["easting"] is not None and cols["northing"] is not None
    geographic = cols["lat"] is not None and cols["lon"] is not None
    if cols["image"] is None or not (metric or geographic):
        wanted = ["image"] + list(POSE_COLUMNS_METRIC)
        missing = [c for c in wanted if cols[c] is None]
        if not metric and (cols["lat"] is not None or cols["lon"] is not None):
            missing = [c for c in ("image", *POSE_COLUMNS_LATLON) if cols[c] is None]
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; the header has {', '.join(h.strip() for h in header)}. "
            f"Expected image,easting,northing (metres) or image,lat,lon (degrees)"
        )
    xcol, ycol = (cols["easting"], cols["northing"]) if metric else (cols["lat"], cols["lon"])
    xname, yname = ("easting", "northing") if metric else ("lat", "lon")
    keys: list[str] = []
    first_line: dict[str, int] = {}
    a = np.empty(len(rows) - 1)
    b = np.empty(len(rows) - 1)
    headings = np.full(len(rows) - 1, np.nan) if cols["heading"] is not None else None
    stamps = np.full(len(rows) - 1, np.nan) if cols["timestamp"] is not None else None
    needed = max(c for c in (cols["image"], xcol, ycol) if c is not None)
    for i, row in enumerate(rows[1:]):
        line = i + 2  # 1-based, after the header
        if len(row) <= needed:
            raise DatasetError(f"{path}, line {line}: {len(row)} fields, expected at least {needed + 1}")
        key = row[cols["image"]].strip().replace("\\", "/")
        if not key:
            raise DatasetError(f"{path}, line {line}: empty image name")
        if key in first_line:
            raise DatasetError(f"{path}, line {line}: image {key!r} already appears on line {first_line[key]}")
        first_line[key] = line
        keys.append(key)
        a[i] = _parse_float(row[xcol], path, line, xname)
        b[i] = _parse_float(row[ycol], path, line, yname)
        if headings is not None and cols["heading"] < len(row):
            headings[i] = _parse_float(row[cols["heading"]], path, line, "heading", allow_empty=True)
        if stamps is not None and cols["timestamp"] < len(row):
            stamps[i] = _parse_float(row[cols["timestamp"]], path, line, "timestamp", allow_empty=True)
    if metric:
        return Poses(keys, np.stack([a, b], 1), headings, stamps, source=str(path))
    try:
        xy, zone, northern = latlon_to_utm(a, b)
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    return Poses(keys, xy, headings, stamps, utm_zone=zone, northern=northern, source=str(path))


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
