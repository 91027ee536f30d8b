"""Map maintenance: live appends, removals and pose edits that are durable and atomic; poses that keep
heading, timestamp and their frame; duplicate names in a new folder that are never skipped silently."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import make_images, run_cli
from vprkit import pipeline
from vprkit.datasets.poses import latlon_to_utm, parse_timestamp, utm_to_latlon
from vprkit.errors import DatasetError, MapError
from vprkit.images import ImageSpec
from vprkit.maps import MapStore, open_map_data, register_run
from vprkit.maps.store import LIVE_DIR, STORE_FILE
from vprkit.presets import resolve

DIM = 6
MICRO_DEGREE = 1e-6


def _store(tmp_path: Path, n: int = 4) -> MapStore:
    """A consolidated store of ``n`` rows k0…, descriptor row i = i, pose (i, 10 i), extras x = [i]."""
    s = MapStore(tmp_path)
    s.write_shard(
        [f"k{i}" for i in range(n)],
        np.arange(n)[:, None] * np.ones((n, DIM)),
        np.stack([np.arange(n), 10 * np.arange(n)], 1).astype(float),
        extras=[{"p": {"x": np.array([float(i)])}} for i in range(n)],
    )
    s.consolidate()
    return s


def _append(s: MapStore, keys: list[str], first: float) -> None:
    n = len(keys)
    s.append(
        keys,
        (first + np.arange(n))[:, None] * np.ones((n, DIM)),
        np.full((n, 2), first),
        np.full(n, 90.0),
        np.full(n, 1.7e9),
        {"run": np.full(n, 7)},
        [{"p": {"x": np.array([first + i])}} for i in range(n)],
    )


def _extra(s: MapStore, row: int) -> float:
    with s.open_extras() as r:
        return float(r.extras("p", row)["x"][0])


# ---- the store --------------------------------------------------------------------------------------
def test_append_is_durable_at_the_end_and_earlier_readers_keep_their_snapshot(tmp_path):
    s = _store(tmp_path)
    before = MapStore(tmp_path).pin()  # a reader that opened earlier
    _append(s, ["new0", "new1"], 100.0)
    fresh = MapStore(tmp_path)
    for view in (s, fresh):
        assert view.keys() == ["k0", "k1", "k2", "k3", "new0", "new1"] and len(view) == 6
        assert np.allclose(view.read_global()[4:, 0], [100, 101]) and np.allclose(
            view.read_global([5, 0])[:, 0], [101, 0]
        )
        assert np.allclose(view.read_poses()[4], [100, 100])
        assert np.isnan(view.read_headings()[:4]).all() and np.allclose(view.read_headings()[4:], 90)
        assert np.allclose(view.read_timestamps()[4:], 1.7e9) and view.read_entries()["run"].tolist() == [-1] * 4 + [
            7,
            7,
        ]
        assert _extra(view, 5) == 101.0 and _extra(view, 2) == 2.0
    assert before.keys() == ["k0", "k1", "k2", "k3"] and before.read_global().shape == (4, DIM)
    assert not before.is_current() and s.pin().is_current()
    with pytest.raises(MapError, match="already in the map.*'new0'"):
        _append(s, ["zz", "new0"], 5.0)
    with pytest.raises(MapError, match="6-d"):
        s.append(["odd"], np.ones((1, DIM + 1)))
    assert fresh.keys()[-1] == "new1" and len(list((tmp_path / LIVE_DIR).iterdir())) == 1  # nothing written
    assert s.consolidate() == 6 and not list((tmp_path / LIVE_DIR).iterdir())  # folded in, same rows
    assert MapStore(tmp_path).keys() == fresh.keys() and np.allclose(MapStore(tmp_path).read_headings()[4:], 90)
    assert _extra(MapStore(tmp_path), 4) == 100.0


def test_remove_renumbers_rows_atomically_and_earlier_readers_keep_theirs(tmp_path):
    s = _store(tmp_path, 5)
    _append(s, ["a"], 100.0)
    _append(s, ["b"], 200.0)
    before = MapStore(tmp_path).pin()
    assert s.remove(["k1"]).tolist() == [1]  # rows of one file: that file is replaced
    assert s.keys() == ["k0", "k2", "k3", "k4", "a", "b"] and _extra(s, 1) == 2.0 and _extra(s, 4) == 100.0
    assert s.remove(["b", "k4", "k0"]).tolist() == [0, 3, 5]  # rows of several files: one new store
    fresh = MapStore(tmp_path)
    assert fresh.keys() == ["k2", "k3", "a"] and np.allclose(fresh.read_global()[:, 0], [2, 3, 100])
    assert np.allclose(fresh.read_poses()[:, 0], [2, 3, 100]) and _extra(fresh, 2) == 100.0
    assert np.isnan(fresh.read_headings()[:2]).all() and fresh.read_headings()[2] == 90
    with pytest.raises(MapError, match="not in the map: 'nope'"):
        s.remove(["k2", "nope"])
    assert fresh.keys() == ["k2", "k3", "a"]
    # the reader opened before every change still reads its own rows, descriptors and extras
    assert before.keys()[1] == "k1" and _extra(before, 1) == 1.0 and before.read_global().shape == (7, DIM)


def test_set_pose_keeps_what_is_not_given_and_old_stores_read_nan(tmp_path):
    s = _store(tmp_path)
    with h5py.File(tmp_path / STORE_FILE, "r+") as f:  # a store written before headings/timestamps existed
        del f["headings"], f["timestamps"]
    assert np.isnan(s.read_headings()).all() and np.isnan(s.read_timestamps()).all()
    assert s.set_pose("k2", (5.0, 6.0), heading=45.0) == 2
    _append(s, ["a"], 100.0)
    assert s.set_pose("a", None, timestamp=1.0) == 4
    fresh = MapStore(tmp_path)
    assert np.allclose(fresh.read_poses()[2], [5, 6]) and fresh.read_headings()[2] == 45.0
    assert np.isnan(fresh.read_timestamps()[2]) and np.allclose(fresh.read_poses()[4], [100, 100])
    assert fresh.read_headings()[4] == 90.0 and fresh.read_timestamps()[4] == 1.0
    s.set_pose("k2", (np.nan, np.nan))
    assert np.isnan(MapStore(tmp_path).read_poses()[2]).all()
    with pytest.raises(MapError, match="'zz' is not in the map"):
        s.set_pose("zz", (1.0, 2.0))


CRASH = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from vprkit.maps import MapStore

    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)  # the temporary file is complete; the rename never happens

    s = MapStore(sys.argv[1])
    os.replace = die
    if sys.argv[2] == "append":
        s.append(["crash"], np.ones((1, {dim})))
    elif sys.argv[2] == "remove":
        s.remove(["k0"])
    else:
        s.set_pose("k1", (9.0, 9.0))
""").format(dim=DIM)


@pytest.mark.parametrize("op", ["append", "remove", "set_pose"])
def test_a_crash_between_the_temporary_write_and_the_rename_leaves_the_store_as_it_was(tmp_path, op):
    s = _store(tmp_path)
    _append(s, ["a"], 100.0)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH, str(tmp_path), op],
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert any(p.name.endswith(".tmp") for p in [*tmp_path.iterdir(), *(tmp_path / LIVE_DIR).iterdir()])
    fresh = MapStore(tmp_path)
    assert fresh.keys() == ["k0", "k1", "k2", "k3", "a"] and fresh.read_global().shape == (5, DIM)
    assert np.allclose(fresh.read_poses()[1], [1, 10])
    _append(fresh, ["after"], 7.0)  # and it keeps working
    assert MapStore(tmp_path).keys()[-1] == "after"


def test_register_run_appends_a_record_and_images_follow_it(tmp_path):
    _store(tmp_path, 2)
    (tmp_path / "map.json").write_text(
        json.dumps({"config": resolve("effnet-gem").to_dict(), "runs": [{"run": 0, "images_root": "/data/a"}]})
    )
    live = tmp_path / "live-images"
    assert register_run(tmp_path, str(live), "live additions") == 1
    assert register_run(tmp_path, None, "decoded") == 2
    runs = json.loads((tmp_path / "map.json").read_text())["runs"]
    assert [r["run"] for r in runs] == [0, 1, 2] and runs[1]["note"] == "live additions"
    m = open_map_data(tmp_path)
    m.store.append(["cam/p1.jpg"], np.ones((1, DIM)), entries={"run": np.array([1])})
    m.keys.append("cam/p1.jpg")
    assert m.images.path("cam/p1.jpg") == live / "cam" / "p1.jpg"


# ---- poses ------------------------------------------------------------------------------------------
def test_utm_inverse_returns_the_degrees_it_was_given():
    rng = np.random.default_rng(0)
    for lat0, lon0 in ((59.9, 10.7), (-33.9, 151.2), (0.5, -78.5), (78.2, 15.6)):
        lat, lon = lat0 + rng.uniform(-0.5, 0.5, 200), lon0 + rng.uniform(-3, 3, 200)
        xy, zone, northern = latlon_to_utm(lat, lon)
        back_lat, back_lon = utm_to_latlon(xy, zone, northern)
        assert np.abs(back_lat - lat).max() < 1e-9 and np.abs(back_lon - lon).max() < 1e-9
    # on the central meridian the easting is the false easting exactly, at the equator the northing is 0
    xy, zone, _ = latlon_to_utm([0.0], [9.0])
    assert zone == 32 and np.allclose(xy, [[500_000.0, 0.0]], atol=1e-6)
    assert utm_to_latlon(np.array([[500_000.0, 0.0]]), 32)[1][0] == pytest.approx(9.0, abs=1e-12)


def test_timestamps_are_epoch_seconds_from_numbers_or_iso_8601():
    assert parse_timestamp("1714566600") == parse_timestamp("2024-05-01T12:30:00Z") == 1714566600.0
    assert parse_timestamp("2024-05-01 14:30:00+02:00") == 1714566600.0 and np.isnan(parse_timestamp(""))
    with pytest.raises(DatasetError, match="neither a number.*ISO-8601"):
        parse_timestamp("yesterday", "poses.csv", 3)


@pytest.fixture(scope="module")
def config():
    return resolve("effnet-gem").replace(image=ImageSpec((64, 64), "fixed"), batch_size=8)


def _quiet(**kw):
    return dict(progress=False, log=lambda _: None, **kw)


def _latlon_csv(path: Path, names: list[str], lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    rows = ["image,lat,lon,heading,timestamp"]
    rows += [
        f"{n},{a:.9f},{b:.9f},{10 * i},2024-05-01T12:30:0{i % 10}Z" for i, (n, a, b) in enumerate(zip(names, lat, lon))
    ]
    path.write_text("\n".join(rows) + "\n")
    return np.stack([lat, lon], 1)


@pytest.fixture(scope="module")
def built(tmp_path_factory, config):
    """Folder a (6 images, lat/lon poses in UTM zone 32 near its eastern edge) built into a map."""
    root = tmp_path_factory.mktemp("maint")
    names = make_images(root / "a", 6, seed=0)
    latlon = _latlon_csv(root / "a.csv", names, 60.0 + 1e-4 * np.arange(6), 11.9 + 1e-4 * np.arange(6))
    pipeline.build_map(root / "a", root / "map", config, poses=root / "a.csv", **_quiet())
    return root, names, latlon


def _copy_map(built, tmp_path) -> Path:
    shutil.copytree(built[0] / "map", tmp_path / "map")
    return tmp_path / "map"


def test_heading_timestamp_and_crs_round_trip(built):
    root, names, latlon = built
    info = json.loads((root / "map" / "map.json").read_text())
    assert info["crs"] == {"kind": "utm", "zone": 32, "hemisphere": "N", "epsg": 32632}
    m = open_map_data(root / "map")
    order = [m.keys.index(n) for n in names]
    assert np.allclose(m.headings[order], 10 * np.arange(6))
    assert np.allclose(m.timestamps[order], parse_timestamp("2024-05-01T12:30:00Z") + np.arange(6))
    assert m.crs["zone"] == 32 and np.abs(m.latlon(order) - latlon).max() < MICRO_DEGREE


def test_a_second_run_in_another_zone_is_projected_into_the_maps_zone_or_refused(built, config, tmp_path):
    out = _copy_map(built, tmp_path)
    lat, lon = np.full(2, 60.0), np.array([12.1, 12.2])  # UTM zone 33, beside the map's zone 32
    pd = tmp_path / "b"
    make_images(pd, 2, seed=5)
    (pd / "img000.png").rename(pd / "east0.png"), (pd / "img001.png").rename(pd / "east1.png")
    _latlon_csv(tmp_path / "b.csv", ["east0.png", "east1.png"], lat, lon)
    pipeline.build_map(pd, out, config, poses=tmp_path / "b.csv", **_quiet())
    m = open_map_data(out)
    rows = [m.keys.index("east0.png"), m.keys.index("east1.png")]
    assert m.crs["zone"] == 32 and np.allclose(m.poses[rows], latlon_to_utm(lat, lon, 32, True)[0])
    assert np.abs(m.latlon(rows) - np.stack([lat, lon], 1)).max() < MICRO_DEGREE
    _latlon_csv(tmp_path / "far.csv", ["east0.png"], np.array([60.0]), np.array([30.0]))
    with pytest.raises(DatasetError, match="central meridian of UTM zone 32"):
        pipeline.update_place_poses(out, tmp_path / "far.csv")
    (tmp_path / "local.csv").write_text("image,easting,northing\neast0.png,1,2\n")
    with pytest.raises(MapError, match="local m"):
        pipeline.build_map(pd, out, config, poses=tmp_path / "local.csv", crs="local", **_quiet())


def test_a_duplicate_name_from_another_folder_is_an_error_a_new_place_or_a_replacement(
    built, config, tmp_path, monkeypatch
):
    root, names, _ = built
    make_images(tmp_path / "b", 3, seed=9)  # img000…img002 again, other pictures
    out = _copy_map(built, tmp_path)
    with pytest.raises(MapError, match=r"3 image.*differ.*another folder.*--on-duplicate new-place.*'run1/<name>'"):
        pipeline.build_map(tmp_path / "b", out, config, **_quiet())
    monkeypatch.setattr(pipeline.build, "SHARD_IMAGES", 2)

    def interrupt(n):
        raise KeyboardInterrupt

    small = config.replace(batch_size=2)
    with pytest.raises(KeyboardInterrupt):  # killed after its first shard (2 images); the re-run resumes it
        pipeline.build_map(tmp_path / "b", out, small, on_duplicate="new-place", _after_shard=interrupt, **_quiet())
    info = pipeline.build_map(tmp_path / "b", out, small, on_duplicate="new-place", **_quiet())
    assert info["last_build"]["new_images"] == 1
    keys = MapStore(out).keys()
    assert info["counts"]["images"] == 9 and info["last_build"]["new_places"] == 1  # the other two: first attempt
    assert {"run1/img000.png", "img000.png"} <= set(keys)
    m = open_map_data(out)
    assert m.images.path("run1/img001.png") == tmp_path / "b" / "img001.png"
    assert m.images.path("img001.png") == root / "a" / "img001.png"
    res = pipeline.localize(out, [tmp_path / "b" / "img002.png"], top_k=1)
    assert res[0].matches[0].key == "run1/img002.png"
    again = pipeline.build_map(tmp_path / "b", out, config, on_duplicate="new-place", **_quiet())
    assert again["counts"]["images"] == 9 and again["last_build"]["new_images"] == 0  # the same folder resumes

    out2 = tmp_path / "map2"
    shutil.copytree(root / "map", out2)
    info = pipeline.build_map(tmp_path / "b", out2, config, on_duplicate="replace", **_quiet())
    assert info["counts"]["images"] == 6 and info["last_build"]["reencoded"] == 3
    assert open_map_data(out2).images.path("img000.png") == tmp_path / "b" / "img000.png"


def test_a_new_pose_for_an_image_in_the_map_is_applied(built, config, tmp_path):
    root, names, _ = built
    out = _copy_map(built, tmp_path)
    shutil.copytree(root / "a", tmp_path / "copy")  # identical copies in another folder
    (tmp_path / "p.csv").write_text("image,lat,lon,heading\nimg001.png,60.001,11.95,270\n")
    info = pipeline.build_map(tmp_path / "copy", out, config, poses=tmp_path / "p.csv", **_quiet())
    assert info["last_build"]["copies"] == 6 and info["last_build"]["poses_updated"] == 1
    m = open_map_data(out)
    row = m.keys.index("img001.png")
    assert np.abs(m.latlon([row])[0] - [60.001, 11.95]).max() < MICRO_DEGREE and m.headings[row] == 270
    done = pipeline.update_place_poses(out, {"img002.png": {"easting": 1.0, "northing": 2.0, "timestamp": 5.0}})
    m = open_map_data(out)
    row2 = m.keys.index("img002.png")
    assert done["updated"] == 1 and np.allclose(m.poses[row2], [1, 2]) and m.timestamps[row2] == 5.0
    assert m.headings[row2] == 20.0  # not given: kept
    pipeline.update_place_poses(out, {"img003.png": {"lat": 60.0, "lon": 12.1}})  # lat/lon: into the map's zone
    m = open_map_data(out)
    assert np.allclose(m.poses[m.keys.index("img003.png")], latlon_to_utm([60.0], [12.1], 32, True)[0][0])
    with pytest.raises(MapError, match="not in the map: 'zz.png'"):
        pipeline.update_place_poses(out, {"zz.png": (1.0, 2.0)})


def test_removed_places_are_never_returned_and_the_cli_maintains_the_map(built, tmp_path):
    root, names, _ = built
    out = _copy_map(built, tmp_path)
    r = run_cli(["map", "info", out])
    assert r.exit_code == 0, r.output
    assert "poses: 6 of 6 images, CRS UTM zone 32N (EPSG:32632)" in r.output
    assert "lat 60.000000 … 60.000500°" in r.output and "with heading: 6   with timestamp: 6" in r.output
    assert f"0: 6 images from {(root / 'a').resolve()}" in r.output
    (tmp_path / "gone.txt").write_text("# keys\nimg003.png\n")
    r = run_cli(["map", "remove", out, "img001.png", "--from-file", tmp_path / "gone.txt"])
    assert r.exit_code == 0 and "removed 2 image(s), 4 left" in r.output
    res = pipeline.localize(out, [root / "a" / n for n in names], top_k=6)
    returned = {m.key for q in res for m in q.matches}
    assert returned == {"img000.png", "img002.png", "img004.png", "img005.png"}
    assert res[4].matches[0].key == "img004.png" and res[4].matches[0].score == pytest.approx(1.0, abs=1e-3)
    (tmp_path / "e.csv").write_text(
        "image,easting,northing,heading\nimg004.png,500000,6650000,12.5\nnothere.png,1,1,1\n"
    )
    r = run_cli(["map", "set-pose", out, "--poses", tmp_path / "e.csv"])
    assert r.exit_code == 0 and "1 pose(s) changed (1 of 2 row(s) matched" in r.output
    info = json.loads(run_cli(["map", "info", out, "--json"]).stdout)
    assert info["poses"]["with_pose"] == 4 and info["counts"]["images"] == 4 and info["index"]["ntotal"] == 4
    assert info["last_change"]["poses_updated"] == 1
    with pytest.raises(MapError, match="not in the map: 'img001.png'"):
        pipeline.remove_places(out, ["img001.png"])
