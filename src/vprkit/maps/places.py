"""Places of a map served live: the keys that name them, their poses, and the errors a place can raise.

A live place's key names its row and its file under ``MAP_DIR/live-images/``, so keys are relative
paths of plain characters. A pose arrives as a dict (HTTP, Python) and is parsed once, into the
map's frame, with every field checked (a typo is an error, not a silently missing heading).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..datasets.pose_values import check_latlon, check_positions, check_timestamp, normalise_heading, utm_frame
from ..datasets.poses import latlon_to_utm
from ..errors import ConfigError, MapError

# Keys name files under the live images folder: relative paths of plain characters, no '.'/'..' components.
KEY_PATTERN = re.compile(r"[\w\-.]+(/[\w\-.]+)*")
MAX_KEY_CHARS = 200
# File names are at most 255 bytes on common file systems (ext4, XFS, APFS; NTFS counts UTF-16 units), and a
# place's image is first written as ``.<name>.XXXXXXXX.tmp`` (vprkit.io.atomic_path): 14 bytes more than its name.
# So each '/'-separated part of a key is at most 241 bytes in UTF-8 (80 CJK characters, 241 ASCII ones).
FILE_NAME_MAX_BYTES = 255
TEMP_NAME_EXTRA_BYTES = len(".") + len(".XXXXXXXX") + len(".tmp")
MAX_KEY_PART_BYTES = FILE_NAME_MAX_BYTES - TEMP_NAME_EXTRA_BYTES


class UnknownPlaceError(MapError):
    """No place of the map has this key."""


class PlaceExistsError(MapError):
    """A place with this key is already in the map."""


class MapChangedError(MapError):
    """Another process changed the map on disk since it was opened (its in-memory rows would be wrong)."""


@dataclass(frozen=True)
class Pose:
    """A place's pose in the map's frame: position (easting, northing in metres), heading (degrees), timestamp (s).

    ``None`` means "not given": unknown for a new place, unchanged for an update.
    """

    xy: tuple[float, float] | None = None
    heading: float | None = None
    timestamp: float | None = None


def _finite(pose: Mapping[str, Any], name: str) -> float | None:
    value = pose.get(name)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"pose field {name!r} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"pose field {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"pose field {name!r} must be finite, got {value!r}")
    return number


def parse_pose(pose: Mapping[str, Any] | None, crs: Any = None) -> Pose:
    """A pose dict → :class:`Pose` in the map's frame.

    ``{"easting", "northing"}`` (metres) or ``{"lat", "lon"}`` (WGS84 degrees, projected into the map's
    UTM zone — a map without a geographic frame refuses them), plus optional ``heading`` (degrees,
    normalised to [0, 360)) and ``timestamp`` (seconds). Any other field is an error, so a typo is not
    silently ignored. Every value must lie in its valid range (:mod:`vprkit.datasets.pose_values`: the map
    frame's easting/northing, lat/lon on the globe and in UTM's latitudes, timestamps 1900 … 2100); one out of
    range is a :class:`ConfigError` naming the field, the value and the range.
    """
    if not pose:
        return Pose()
    known = {"easting", "northing", "lat", "lon", "heading", "timestamp"}
    unknown = sorted(set(pose) - known)
    if unknown:
        raise ConfigError(
            f"unknown pose field(s) {', '.join(unknown)}; use easting+northing or lat+lon, heading, timestamp"
        )
    e, n, lat, lon = (_finite(pose, k) for k in ("easting", "northing", "lat", "lon"))
    metric, geographic = (e, n) != (None, None), (lat, lon) != (None, None)
    if metric and geographic:
        raise ConfigError("give a position as easting+northing or as lat+lon, not both")
    frame = crs if isinstance(crs, Mapping) else None
    xy: tuple[float, float] | None = None
    if metric:
        if e is None or n is None:
            raise ConfigError("a metric position needs both easting and northing")
        checked = check_positions([(e, n)], frame)[0]
        xy = (float(checked[0]), float(checked[1]))
    elif geographic:
        if lat is None or lon is None:
            raise ConfigError("a geographic position needs both lat and lon")
        utm = utm_frame(frame)
        if utm is None:
            raise ConfigError("this map records no geographic frame (its poses are metric); give easting+northing")
        check_latlon(lat, lon)
        projected, _, _ = latlon_to_utm([lat], [lon], zone=utm[0], northern=utm[1])
        xy = (float(projected[0, 0]), float(projected[0, 1]))
    heading, stamp = _finite(pose, "heading"), _finite(pose, "timestamp")
    return Pose(
        xy,
        None if heading is None else normalise_heading(heading),
        None if stamp is None else check_timestamp(stamp),
    )


def check_key(key: str) -> str:
    """``key`` if it can name a place (and its file under ``live-images/``), else a :class:`ConfigError`."""
    if (
        not isinstance(key, str)
        or not key
        or len(key) > MAX_KEY_CHARS
        or not KEY_PATTERN.fullmatch(key)
        or any(part in (".", "..") for part in key.split("/"))
    ):
        raise ConfigError(
            f"place id {key!r} is not usable: 1–{MAX_KEY_CHARS} characters of letters, digits, '_', '-', "
            f"'.', with '/' between non-empty parts (no '.' or '..' parts)"
        )
    longest = max(key.split("/"), key=lambda part: len(part.encode()))
    if len(longest.encode()) > MAX_KEY_PART_BYTES:
        raise ConfigError(
            f"place id part {longest[:20]!r}… is {len(longest.encode())} bytes in UTF-8; file names allow "
            f"{MAX_KEY_PART_BYTES} per '/'-separated part of an id"
        )
    return key
