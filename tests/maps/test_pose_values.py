"""Pose values are checked wherever they enter (Python, a poses CSV, ``map set-pose``, ``map build --poses``):
out of range is one error naming the field, the value and the range; headings land in [0, 360) exactly; and
``map info`` never crashes on, nor prints NaN for, values a map stored before they were checked — its counts are
the store's and the index's, not ``map.json``'s (issue 26, item 1 and item 8's stale counts)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from vprkit import pipeline

from helpers import run_main as run, assert_one_line_error as one_line_error
from vprkit.datasets.pose_values import (
    LOCAL_COORDINATE,
    TIMESTAMP,
    UTM_EASTING,
    UTM_NORTHING_NORTH,
    UTM_NORTHING_SOUTH,
    PoseValueError,
    check_utm_zone,
    normalise_headings,
    usable_pose_columns,
)
from vprkit.datasets.poses import (
    MAX_DEGREES_FROM_CENTRAL_MERIDIAN,
    central_meridian,
    latlon_to_utm,
    parse_crs,
    project_pose,
    read_poses,
    utm_crs,
    utm_to_latlon,
)
from vprkit.errors import ConfigError, DatasetError
from vprkit.maps import parse_pose, pose_rows
from vprkit.presets import resolve

UTM32N = utm_crs(32, True)
LOCAL = {"kind": "local", "unit": "m"}
MAP_IMAGES = 6
SMALL = ["--preset", "effnet-gem", "--image-size", "64x64", "--quiet"]
ROUNDING_M = 10_000.0  # the UTM bounds are the extreme projected points rounded out to 10 km
# Corridor's first references placed near Milan (UTM 32N): a UTM map.
LAT0, LON0, STEP_DEG = 45.46, 9.19, 1e-5


def strict_json(text: str):
    """JSON as RFC 8259 has it: NaN / Infinity are not JSON."""

    def refuse(constant: str):
        raise AssertionError(f"{constant} in JSON output")

    return json.loads(text, parse_constant=refuse)


# ---- one validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [-1e-20, 720.0, -0.0, 360.0, -360.0, 1e-300, -5e-324])
def test_headings_normalise_into_zero_to_360_exactly(given):
    for heading in (parse_pose({"heading": given}).heading, project_pose({"heading": given}, None)[1]):
        assert 0.0 <= heading < 360.0 and math.copysign(1.0, heading) == 1.0, (given, heading)
    assert parse_pose({"heading": -1e-20}).heading == 0.0  # was 360.0: (-1e-20) % 360.0 rounds up to a full turn


def test_headings_keep_what_is_in_range_and_unknown():
    got = normalise_headings([359.99999999999994, -90.0, 725.0, np.nan])
    assert got[:3].tolist() == [359.99999999999994, 270.0, 5.0] and np.isnan(got[3])
    with pytest.raises(PoseValueError, match="heading inf"):
        normalise_headings([np.inf])


@pytest.mark.parametrize(
    "pose, crs, words",
    [
        ({"easting": 1e160, "northing": 0.0}, LOCAL, ["easting 1e+160", "100,000,000 m"]),
        ({"easting": 0.0, "northing": -1e9}, LOCAL, ["northing -1000000000.0"]),
        ({"easting": 2e6, "northing": 5e6}, UTM32N, ["easting 2000000.0", "UTM zone 32N", "1,510,000"]),
        ({"easting": 5e5, "northing": 1.2e7}, UTM32N, ["northing 12000000.0", "9,340,000"]),
        ({"timestamp": -1e12}, LOCAL, ["timestamp -1000000000000.0", "4,102,444,800"]),
        ({"timestamp": 1e308}, LOCAL, ["timestamp 1e+308", "2100-01-01"]),
        ({"timestamp": 1.7e12}, LOCAL, ["timestamp", "milliseconds"]),
        ({"lat": 91.0, "lon": 9.0}, UTM32N, ["lat 91.0", "-90 … 90°"]),
        ({"lat": 45.0, "lon": 181.0}, UTM32N, ["lon 181.0", "-180 … 180°"]),
        ({"lat": 85.0, "lon": 9.0}, UTM32N, ["lat 85.0", "-80 … 84°"]),
    ],
)
def test_out_of_range_values_are_one_error_naming_field_value_and_range(pose, crs, words):
    for parse in (lambda: parse_pose(pose, crs), lambda: project_pose(pose, crs)):
        with pytest.raises(PoseValueError) as caught:
            parse()
        message = str(caught.value)
        assert "\n" not in message and all(w in message for w in words), message
    assert issubclass(PoseValueError, ConfigError) and issubclass(PoseValueError, DatasetError)  # 422 / exit 2


def test_extreme_but_valid_values_are_kept():
    assert parse_pose({"easting": 1e8, "northing": -1e8}, LOCAL).xy == (1e8, -1e8)
    assert parse_pose({"easting": 1.5e6, "northing": -8.8e6}, UTM32N).xy == (1.5e6, -8.8e6)
    assert parse_pose({"timestamp": TIMESTAMP.high}).timestamp == 4_102_444_800.0
    assert parse_pose({"timestamp": TIMESTAMP.low}).timestamp == -2_208_988_800.0  # 1900-01-01: archival photos
    assert project_pose({"timestamp": "1900-01-01T00:00:00Z"}, None)[2] == TIMESTAMP.low


@pytest.mark.parametrize("zone", [0, 61, 99, -1, 32.5, "x", None])
def test_utm_zones_are_1_to_60(zone):
    for call in (
        lambda: check_utm_zone(zone),
        lambda: parse_crs({"kind": "utm", "zone": zone, "hemisphere": "N"}),
        lambda: utm_crs(zone, True),
        lambda: latlon_to_utm([45.0], [9.0], zone=zone, northern=True) if zone is not None else utm_crs(zone, True),
        lambda: utm_to_latlon(np.array([[5e5, 5e6]]), zone),
        lambda: parse_pose({"easting": 5e5, "northing": 5e6}, {"kind": "utm", "zone": zone, "hemisphere": "N"}),
    ):
        with pytest.raises(PoseValueError, match="UTM zone"):
            call()
    for spec in (f"utm:{zone}N", f"epsg:{32600 + 99}"):
        with pytest.raises(DatasetError):
            parse_crs(spec)
    with pytest.raises(PoseValueError, match="hemisphere"):
        parse_crs({"kind": "utm", "zone": 32, "hemisphere": "X"})
    assert check_utm_zone(1) == (1, True) and check_utm_zone(60, "s") == (60, False)


def test_utm_bounds_hold_every_point_this_project_projects_and_little_more():
    """The bounds are the extreme eastings/northings of points in UTM's latitudes within 9° of a zone's central
    meridian (what latlon_to_utm accepts), rounded out to 10 km: every such point is inside, none is far inside."""
    cm = central_meridian(32)
    lat = np.linspace(-80.0, 84.0, 3281)
    lons = (cm - MAX_DEGREES_FROM_CENTRAL_MERIDIAN, cm, cm + MAX_DEGREES_FROM_CENTRAL_MERIDIAN)
    east, north = [], []
    for lon in lons:
        xy, _, _ = latlon_to_utm(lat, np.full_like(lat, lon), zone=32, northern=True)
        east.append(xy[:, 0])
        north.append(xy[:, 1])
    east, north = np.concatenate(east), np.concatenate(north)
    assert UTM_EASTING.low <= east.min() < UTM_EASTING.low + ROUNDING_M
    assert UTM_EASTING.high - ROUNDING_M < east.max() <= UTM_EASTING.high
    assert UTM_NORTHING_NORTH.low <= north.min() < UTM_NORTHING_NORTH.low + ROUNDING_M
    assert UTM_NORTHING_NORTH.high - ROUNDING_M < north.max() <= UTM_NORTHING_NORTH.high
    south = north + 10_000_000.0  # the southern frame's false northing
    assert UTM_NORTHING_SOUTH.low <= south.min() and south.max() <= UTM_NORTHING_SOUTH.high
    # squares and means of local metres stay finite at the bound
    spread = np.array([LOCAL_COORDINATE.low, LOCAL_COORDINATE.high])
    assert np.isfinite(((spread - spread.mean()) ** 2).sum()) and np.isfinite(np.hypot(*spread))


def test_stored_values_out_of_range_are_used_as_unknown(caplog):
    """What a map opened from older files may use: a 1e160 easting or a 1e308 timestamp is unknown, not a number
    that overflows every distance; headings stored as 360.0 are 0.0."""
    xy = np.array([[1e160, 5e6], [5e5, 5e6], [np.inf, 0.0], [np.nan, np.nan]])
    heads = np.array([360.0, -1e-20, np.inf, np.nan])
    stamps = np.array([1e308, 1.7e9, -1e12, np.nan])
    with caplog.at_level("WARNING"):
        got_xy, got_h, got_t = usable_pose_columns(xy, heads, stamps, UTM32N, "map M")
    assert np.isnan(got_xy[[0, 2, 3]]).all() and got_xy[1].tolist() == [5e5, 5e6]
    assert got_h[:2].tolist() == [0.0, 0.0] and np.isnan(got_h[2:]).all()
    assert np.isnan(got_t[[0, 2, 3]]).all() and got_t[1] == 1.7e9
    assert "map M" in caplog.text and "2 position(s), 2 timestamp(s), 1 heading(s)" in caplog.text
    assert xy[0, 0] == 1e160  # the caller's arrays are left as they were


# ---- the CSV paths ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, words",
    [
        ("b.jpg,1e160,0", ["line 3", "easting 1e+160"]),
        ("b.jpg,0,inf", ["line 3", "northing", "not finite"]),
        ("b.jpg,0,0,10,-1e12", ["line 3", "timestamp -1000000000000.0", "2100-01-01"]),
        ("b.jpg,0,0,10,1e308", ["line 3", "timestamp 1e+308"]),
        ("b.jpg,0,0,10,9999-12-31T00:00:00Z", ["line 3", "timestamp 253402214400.0"]),
    ],
)
def test_pose_files_refuse_out_of_range_values_with_the_line(tmp_path, row, words):
    csv = tmp_path / "poses.csv"
    csv.write_text(f"image,easting,northing,heading,timestamp\na.jpg,1,2,3,4\n{row}\n")
    with pytest.raises(DatasetError) as caught:
        read_poses(csv)
    assert "\n" not in str(caught.value) and all(w in str(caught.value) for w in words), str(caught.value)


def test_pose_rows_check_the_frame_the_positions_are_in(tmp_path):
    csv = tmp_path / "poses.csv"
    csv.write_text("image,easting,northing,heading\na.jpg,2000000,5000000,-1e-20\nb.jpg,500000,5000000,720\n")
    assert pose_rows(csv, ["a.jpg", "b.jpg"], crs="local").xy[0, 0] == 2e6  # fine in local metres …
    with pytest.raises(DatasetError, match=r"line 2: easting 2000000.0 is outside .*UTM zone 32N"):
        pose_rows(csv, ["a.jpg", "b.jpg"], crs="utm:32N")  # … not in UTM
    csv.write_text("image,easting,northing,heading\na.jpg,600000,5000000,-1e-20\nb.jpg,500000,5000000,720\n")
    rows = pose_rows(csv, ["a.jpg", "b.jpg"], crs="utm:32N")
    assert rows.headings.tolist() == [0.0, 0.0]  # stored in [0, 360)
    with pytest.raises(PoseValueError, match=r"poses row 1 \('b.jpg'\): easting 1e\+160"):
        pose_rows(np.array([[1.0, 2.0], [1e160, 0.0]]), ["a.jpg", "b.jpg"])


# ---- through the CLI: map build --poses, map set-pose, map info -------------------------------------------------


@pytest.fixture(scope="module")
def utm_map(tmp_path_factory, shared_datasets: Path) -> Path:
    """Six Corridor references with lat/lon poses (a UTM 32N map), headings and timestamps."""
    root = tmp_path_factory.mktemp("utm-map")
    images = root / "images"
    images.mkdir()
    keys = [f"{i:07d}.jpg" for i in range(MAP_IMAGES)]
    for key in keys:
        shutil.copy(shared_datasets / "corridor" / "ref" / key, images / key)
    poses = root / "poses.csv"
    poses.write_text(
        "image,lat,lon,heading,timestamp\n"
        + "".join(f"{k},{LAT0 + i * STEP_DEG},{LON0},{10 * i},{1.7e9 + i}\n" for i, k in enumerate(keys))
    )
    out = root / "map"
    pipeline.build_map(images, out, resolve("effnet-gem", image_size=(64, 64)), poses=poses, progress=False)
    return out


@pytest.fixture
def map_copy(utm_map: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(utm_map, tmp_path / "map"))


@pytest.mark.parametrize(
    "row, words",
    [
        ("0000001.jpg,91,9.19", ["lat 91"]),
        ("0000001.jpg,45.46,9.19,10,1e308", ["timestamp 1e+308"]),
        ("0000001.jpg,45.46,9.19,10,-1e12", ["timestamp -1000000000000.0"]),
    ],
)
def test_set_pose_and_build_refuse_bad_values_with_one_line(
    utm_map, map_copy, tmp_path, monkeypatch, capsys, row, words
):
    csv = tmp_path / "bad.csv"
    csv.write_text(f"image,lat,lon,heading,timestamp\n0000000.jpg,45.46,9.19,0,1.7e9\n{row}\n")
    before = (map_copy / "store.h5").read_bytes()
    code, _, err = run(monkeypatch, capsys, "map", "set-pose", map_copy, "--poses", csv)
    one_line_error(code, err, "line 3", *words)
    assert (map_copy / "store.h5").read_bytes() == before  # nothing written
    images = utm_map.parent / "images"
    code, _, err = run(monkeypatch, capsys, "map", "build", images, "--out", tmp_path / "new", "--poses", csv, *SMALL)
    one_line_error(code, err, "line 3", *words)


def test_set_pose_refuses_metric_values_outside_the_maps_utm_frame(map_copy, tmp_path, monkeypatch, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("image,easting,northing\n0000000.jpg,1e160,5000000\n")
    code, _, err = run(monkeypatch, capsys, "map", "set-pose", map_copy, "--poses", csv)
    one_line_error(code, err, "line 2", "easting 1e+160", "UTM zone 32N")
    with pytest.raises(PoseValueError, match="easting 1e\\+160"):
        pipeline.update_place_poses(map_copy, {"0000000.jpg": {"easting": 1e160, "northing": 5e6}})
    with pytest.raises(PoseValueError, match="timestamp 1e\\+308"):
        pipeline.update_place_poses(map_copy, {"0000000.jpg": {"timestamp": 1e308}})
    done = pipeline.update_place_poses(map_copy, {"0000001.jpg": {"heading": -1e-20}})  # was 10
    assert done["updated"] == 1
    code, out, _ = run(monkeypatch, capsys, "map", "info", map_copy, "--json")
    assert code == 0 and strict_json(out)["poses"].get("out_of_range") is None  # 0.0 stored, not 360.0


def _store_raw(map_dir: Path, row: int, xy=None, heading=None, timestamp=None) -> None:
    """Write values into store.h5 as an older vprkit (or a hand edit) may have left them: unchecked."""
    with h5py.File(map_dir / "store.h5", "r+") as f:
        if xy is not None:
            f["poses"][row] = xy
        if heading is not None:
            f["headings"][row] = heading
        if timestamp is not None:
            f["timestamps"][row] = timestamp


def test_map_info_survives_values_stored_before_they_were_checked(map_copy, monkeypatch, capsys):
    _store_raw(map_copy, 0, xy=(1e160, 5e6), heading=360.0, timestamp=1e308)
    _store_raw(map_copy, 1, timestamp=-1e12)
    _store_raw(map_copy, 2, xy=(np.inf, 5e6))
    code, out, err = run(monkeypatch, capsys, "map", "info", map_copy, "--json")
    assert code == 0, err  # was exit 3: datetime.fromtimestamp(1e308) overflows
    poses = strict_json(out)["poses"]  # was "nan" lat/lon from the 1e160 easting
    assert poses["out_of_range"] == {"positions": 2, "headings": 1, "timestamps": 2}
    assert poses["with_pose"] == MAP_IMAGES and poses["with_timestamp"] == MAP_IMAGES  # stored, if damaged
    lat, lon = poses["extent_latlon"]["lat"], poses["extent_latlon"]["lon"]
    assert abs(lat[0] - (LAT0 + STEP_DEG)) < 1e-7 and abs(lat[1] - (LAT0 + 5 * STEP_DEG)) < 1e-7  # rows 0, 2 left out
    assert abs(lon[0] - LON0) < 1e-7 and abs(lon[1] - LON0) < 1e-7
    assert poses["extent"]["easting"][1] < 1e6 and poses["time_range"][0].startswith("2023-11-14")
    code, out, err = run(monkeypatch, capsys, "map", "info", map_copy)
    assert code == 0 and "nan" not in out and "outside the valid range" in out, out + err


def test_map_info_counts_come_from_the_store_not_a_stale_map_json(map_copy, monkeypatch, capsys):
    info = json.loads((map_copy / "map.json").read_text())
    info["counts"]["images"] = MAP_IMAGES - 1  # as left by a kill during the map.json write after an add
    info["index"]["ntotal"] = MAP_IMAGES + 7
    (map_copy / "map.json").write_text(json.dumps(info))
    code, out, err = run(monkeypatch, capsys, "map", "info", map_copy, "--json")
    got = strict_json(out)
    assert code == 0 and got["counts"]["images"] == MAP_IMAGES and got["index"]["ntotal"] == MAP_IMAGES, err
    assert got["stale_counts"] == {"images": MAP_IMAGES - 1, "ntotal": MAP_IMAGES + 7}
    code, out, _ = run(monkeypatch, capsys, "map", "info", map_copy)
    assert f"images: {MAP_IMAGES} " in out and "stale" in out


def test_localize_on_a_map_holding_values_stored_before_they_were_checked(utm_map, map_copy, monkeypatch, capsys):
    """Out-of-range stored values are unknown when a map opens (one warning), so no spread overflows to Infinity."""
    _store_raw(map_copy, 0, xy=(1e160, 5e6), timestamp=1e308)
    query = utm_map.parent / "images" / "0000001.jpg"
    code, out, err = run(monkeypatch, capsys, "localize", map_copy, query, "--json", "--top-k", "3")
    assert code == 0, err  # was: "spread_m": Infinity (invalid JSON), or exit 3 once JSON was strict
    (result,) = strict_json(out)
    assert result["matches"][0]["image"] == "0000001.jpg"
    assert all(m["image"] != "0000000.jpg" or m["position"] is None for m in result["matches"])
    assert "set-pose" in err
