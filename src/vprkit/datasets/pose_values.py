"""Valid pose values: the one check every pose passes wherever it enters (HTTP, a poses CSV, ``map set-pose``, Python).

A pose value outside its range is refused with one :class:`PoseValueError` (a :class:`ConfigError`, 422 in the
service, and a :class:`DatasetError`, exit 2 in the CLI) naming the field, the value and the allowed range. NaN
means "unknown" in stored columns and is let through here; ±inf never is.

The ranges (inclusive) and why:

- ``lat`` −90 … 90°, ``lon`` −180 … 180° (the globe); lat/lon projected into UTM also −80 … 84° (UTM's own
  limits; the poles use UPS, which this project does not project into).
- UTM ``easting`` −510,000 … 1,510,000 m: a zone is 6° wide (eastings 166 … 834 km at the equator) and this
  project projects points up to :data:`~vprkit.datasets.poses.MAX_DEGREES_FROM_CENTRAL_MERIDIAN` (9°) from the
  zone's central meridian into it (a neighbouring zone's points keep one metric frame). The widest easting of such
  a point is on the equator, 500 km ± 1,005.6 km; the bound is that, rounded out to 10 km.
- UTM ``northing`` −8,900,000 … 9,340,000 m in a northern frame and 1,100,000 … 19,340,000 m in a southern one:
  the northings of latitudes −80 … 84° within 9° of the central meridian (−8,895 km … 9,336 km north of the
  equator), rounded out to 10 km. A map keeps one hemisphere's frame, so a northern map crossing the equator holds
  slightly negative northings, as UTM's formulas give them (the southern frame adds its false northing, 10,000 km).
- local metres (``easting``/``northing`` of any other metric frame): −100,000 … 100,000 km. That is 2.5 times
  the Earth's circumference, so every projected frame of the Earth fits (Web Mercator reaches ±20,037 km,
  zone-prefixed UTM eastings such as 32,512,345 m up to 61,000 km), while squared distances (≤ 8·10¹⁶ m²) and
  means over any number of rows stay far from float64's limit (1.8·10³⁰⁸) and metres are still resolved to 15 nm.
- ``heading``: any finite number of degrees, stored normalised into [0, 360) exactly (−1e-20 is 0.0, not 360.0).
- ``timestamp``: seconds since 1970-01-01 UTC, −2,208,988,800 … 4,102,444,800 (1900-01-01 … 2100-01-01): every
  photograph a map can hold, archival ones included; a value in milliseconds (1.7·10¹²) is refused, not stored as
  a date 54,000 years ahead.
- UTM zones 1 … 60, hemisphere ``N`` or ``S``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

UTM_MIN_LAT = -80.0  # UTM is defined from 80°S …
UTM_MAX_LAT = 84.0  # … to 84°N; beyond it UPS is used, so latitudes there are refused.
UTM_MIN_ZONE = 1
UTM_MAX_ZONE = 60
HEMISPHERES = ("N", "S")
FULL_TURN_DEG = 360.0
MILLISECONDS_PER_SECOND = 1000.0


class PoseValueError(ConfigError, DatasetError):
    """A pose value outside its valid range (a ConfigError for the service's 422, a DatasetError for pose files)."""


@dataclass(frozen=True)
class ValueRange:
    """An inclusive range of a pose field, its unit and what it means (quoted in the error)."""

    low: float
    high: float
    unit: str
    meaning: str

    def describe(self) -> str:
        unit = self.unit if self.unit == "°" else f" {self.unit}"
        return f"the allowed range {_number(self.low)} … {_number(self.high)}{unit} ({self.meaning})"


LATITUDE = ValueRange(-90.0, 90.0, "°", "a latitude on the globe")
LONGITUDE = ValueRange(-180.0, 180.0, "°", "a longitude on the globe")
UTM_LATITUDE = ValueRange(
    UTM_MIN_LAT, UTM_MAX_LAT, "°", "UTM's limits; give easting,northing of a polar frame beyond them"
)
UTM_EASTING = ValueRange(-510_000.0, 1_510_000.0, "m", "UTM: points within 9° of the zone's central meridian")
UTM_NORTHING_NORTH = ValueRange(-8_900_000.0, 9_340_000.0, "m", "UTM northern frame: latitudes 80°S … 84°N")
UTM_NORTHING_SOUTH = ValueRange(1_100_000.0, 19_340_000.0, "m", "UTM southern frame: latitudes 80°S … 84°N")
LOCAL_COORDINATE = ValueRange(-1e8, 1e8, "m", "local metres: ±100,000 km")
TIMESTAMP = ValueRange(-2_208_988_800.0, 4_102_444_800.0, "s", "seconds since 1970-01-01 UTC, 1900-01-01 … 2100-01-01")

Where = Callable[[int], str] | str  # the prefix of a message: fixed, or per row (e.g. "poses.csv, line 7: ")


def _number(value: float) -> str:
    """A bound as people read it: 1,510,000 rather than 1510000.0 or 1.51e+06."""
    return f"{int(value):,}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _prefix(where: Where, i: int) -> str:
    return where(i) if callable(where) else where


def inside(values: Any, valid: ValueRange) -> np.ndarray:
    """Which ``values`` lie in ``valid`` (NaN, "unknown", counts as inside; ±inf never does)."""
    v = np.asarray(values, np.float64)
    return np.isnan(v) | ((v >= valid.low) & (v <= valid.high))


def check_range(name: str, values: Any, valid: ValueRange, where: Where = "", hint: str = "") -> np.ndarray:
    """``values`` as float64 when every one is in ``valid`` (NaN allowed: unknown), else one :class:`PoseValueError`
    naming the first offender: ``"<where><name> <value> is outside <low> … <high> <unit> (<meaning>)"``."""
    v = np.asarray(values, np.float64)
    bad = np.flatnonzero(~inside(v, valid).reshape(-1))
    if bad.size:
        i = int(bad[0])
        value = float(v.reshape(-1)[i])
        raise PoseValueError(f"{_prefix(where, i)}{name} {value!r} is outside {valid.describe()}{hint}")
    return v


def utm_frame(crs: Mapping[str, Any] | None) -> tuple[int, bool] | None:
    """(zone, northern) of a UTM frame record (``map.json`` → ``crs``), None for local metres; a record with a zone
    outside 1 … 60 or a hemisphere other than N/S is a :class:`PoseValueError`."""
    if not crs or crs.get("kind") != "utm":
        return None
    return check_utm_zone(crs.get("zone"), crs.get("hemisphere", "N"))


def check_utm_zone(zone: Any, hemisphere: Any = "N") -> tuple[int, bool]:
    """``(zone, northern)`` when ``zone`` is an integer 1 … 60 and ``hemisphere`` N or S, else a :class:`PoseValueError`."""
    try:
        number = int(zone)
        whole = float(zone) == number
    except (TypeError, ValueError, OverflowError):
        number, whole = 0, False
    if not whole or not UTM_MIN_ZONE <= number <= UTM_MAX_ZONE:
        raise PoseValueError(f"UTM zone {zone!r} is outside {UTM_MIN_ZONE} … {UTM_MAX_ZONE} (UTM's zones)")
    side = str(hemisphere).strip().upper()
    if side not in HEMISPHERES:
        raise PoseValueError(f"UTM hemisphere {hemisphere!r} is not N or S")
    return number, side == "N"


def position_ranges(crs: Mapping[str, Any] | None) -> tuple[ValueRange, ValueRange]:
    """The valid (easting, northing) ranges of a frame: UTM's (by hemisphere) or local metres' (None: local)."""
    frame = utm_frame(crs)
    if frame is None:
        return LOCAL_COORDINATE, LOCAL_COORDINATE
    zone, northern = frame
    label = f"UTM zone {zone}{'N' if northern else 'S'}"
    north = UTM_NORTHING_NORTH if northern else UTM_NORTHING_SOUTH
    return (
        ValueRange(UTM_EASTING.low, UTM_EASTING.high, "m", f"{label}: points within 9° of its central meridian"),
        ValueRange(north.low, north.high, "m", f"{label}: latitudes 80°S … 84°N"),
    )


def check_positions(xy: Any, crs: Mapping[str, Any] | None, where: Where = "") -> np.ndarray:
    """N×2 (easting, northing) in ``crs`` as float64 when each is in the frame's range (NaN: unknown)."""
    arr = np.asarray(xy, np.float64).reshape(-1, 2)
    east, north = position_ranges(crs)
    check_range("easting", arr[:, 0], east, where)
    check_range("northing", arr[:, 1], north, where)
    return arr


def valid_positions(xy: Any, crs: Mapping[str, Any] | None) -> np.ndarray:
    """Rows of N×2 ``xy`` that are known (finite) and in the frame's range — what a stored map may use."""
    arr = np.asarray(xy, np.float64).reshape(-1, 2)
    east, north = position_ranges(crs)
    return np.isfinite(arr).all(axis=1) & inside(arr[:, 0], east) & inside(arr[:, 1], north)


def check_latlon(lat: Any, lon: Any, where: Where = "", utm: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes and longitudes on the globe (and within UTM's latitudes when ``utm``: they are to be projected)."""
    lat_arr = check_range("lat", lat, LATITUDE, where)
    lon_arr = check_range("lon", lon, LONGITUDE, where)
    if utm:
        check_range("lat", lat_arr, UTM_LATITUDE, where)
    return lat_arr, lon_arr


def normalise_headings(values: Any, where: Where = "") -> np.ndarray:
    """Headings (degrees, any finite number; NaN: unknown) normalised into [0, 360) exactly.

    ``fmod`` is exact; adding a turn to a tiny negative remainder can round up to 360.0 (−1e-20 + 360 == 360.0),
    which is the same direction as 0.0 and is stored as 0.0; −0.0 becomes 0.0.
    """
    v = np.asarray(values, np.float64)
    infinite = np.flatnonzero(np.isinf(v).reshape(-1))
    if infinite.size:
        i = int(infinite[0])
        raise PoseValueError(
            f"{_prefix(where, i)}heading {float(v.reshape(-1)[i])!r} is not a finite number of degrees"
        )
    turned = np.fmod(v, FULL_TURN_DEG)
    turned = np.where(turned < 0.0, turned + FULL_TURN_DEG, turned)
    return np.where(turned >= FULL_TURN_DEG, 0.0, turned) + 0.0


def normalise_heading(value: float, where: str = "") -> float:
    """One heading in [0, 360) (see :func:`normalise_headings`)."""
    return float(normalise_headings([value], where)[0])


def check_timestamps(values: Any, where: Where = "") -> np.ndarray:
    """Timestamps (epoch seconds; NaN: unknown) within :data:`TIMESTAMP`; a value in milliseconds is named so."""
    v = np.asarray(values, np.float64)
    bad = np.flatnonzero(~inside(v, TIMESTAMP).reshape(-1))
    if bad.size:
        value = float(v.reshape(-1)[int(bad[0])])
        in_ms = math.isfinite(value) and TIMESTAMP.low <= value / MILLISECONDS_PER_SECOND <= TIMESTAMP.high
        check_range("timestamp", v, TIMESTAMP, where, hint="; milliseconds? give seconds" if in_ms else "")
    return v


def check_timestamp(value: float, where: str = "") -> float:
    """One timestamp (see :func:`check_timestamps`)."""
    return float(check_timestamps([value], where)[0])


def valid_timestamps(values: Any) -> np.ndarray:
    """Which stored timestamps are known and in :data:`TIMESTAMP` (others are unknown or damaged)."""
    v = np.asarray(values, np.float64)
    return np.isfinite(v) & inside(v, TIMESTAMP)


def usable_pose_columns(
    xy: Any, headings: Any, timestamps: Any, crs: Mapping[str, Any] | None, source: str = "the map"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored pose columns as a map may use them, whatever an older vprkit (or a hand edit) left in them.

    Positions outside the frame's range and timestamps outside :data:`TIMESTAMP` become unknown (NaN) — an
    easting of 1e160 would otherwise overflow every distance and mean computed from it; headings are normalised
    into [0, 360) (non-finite ones: unknown). One warning counts what was set aside and names the fix.
    """
    arr = np.array(xy, np.float64).reshape(-1, 2)
    heads = np.array(headings, np.float64).reshape(-1)
    stamps = np.array(timestamps, np.float64).reshape(-1)
    bad_xy = ~np.isnan(arr).any(axis=1) & ~valid_positions(arr, crs)
    bad_t = ~np.isnan(stamps) & ~valid_timestamps(stamps)
    bad_h = np.isinf(heads)
    arr[bad_xy] = np.nan
    stamps[bad_t] = np.nan
    heads[bad_h] = np.nan
    heads = normalise_headings(heads)
    if bad_xy.any() or bad_t.any() or bad_h.any():
        logger.warning(
            "%s holds pose values outside their valid range, used as unknown: %d position(s), %d timestamp(s), "
            "%d heading(s); set them again with `vprkit map set-pose`",
            source,
            int(bad_xy.sum()),
            int(bad_t.sum()),
            int(bad_h.sum()),
        )
    return arr, heads, stamps
