"""Ground truth from every source, poses CSV reading and the lat/lon → UTM projection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vprkit.datasets import GroundTruth, latlon_to_utm, parse_utm_filename, read_poses, utm_zone
from vprkit.errors import DatasetError

# Reference projections computed with PROJ (pyproj 3, proj=utm, ellps=WGS84): lat, lon, zone,
# northern, easting, northing. PROJ's extended transverse Mercator is accurate to ~mm.
UTM_REFERENCES = [
    (43.6426, -79.3871, 17, True, 630087.375, 4833442.312),  # CN Tower, Toronto
    (48.8583, 2.2945, 31, True, 448251.898, 5411943.794),  # Eiffel Tower
    (-33.8568, 151.2153, 56, False, 334900.570, 6252288.753),  # Sydney Opera House
    (67.28, 14.40, 33, True, 474140.073, 7462719.171),  # Bodø (Nordland line)
    (-77.85, 166.67, 58, False, 539232.452, 1357811.413),  # McMurdo, far from the equator
]
UTM_TOLERANCE_M = 1.0
# Published: meridian arc to 45° on WGS84 is 4,984,944.378 m; ×0.9996 on the central meridian.
CENTRAL_MERIDIAN_45N = 4_982_950.400


@pytest.mark.parametrize("lat, lon, zone, northern, east, north", UTM_REFERENCES)
def test_utm_matches_reference(lat, lon, zone, northern, east, north):
    xy, z, n = latlon_to_utm([lat], [lon])
    assert (z, n) == (zone, northern)
    assert np.hypot(xy[0, 0] - east, xy[0, 1] - north) < UTM_TOLERANCE_M


def test_utm_identities_and_zone_rules():
    xy, zone, _ = latlon_to_utm([0.0, 45.0], [3.0, 3.0])
    assert zone == 31
    np.testing.assert_allclose(xy[0], [500_000.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(xy[1], [500_000.0, CENTRAL_MERIDIAN_45N], atol=1e-3)
    assert utm_zone(60.0, 5.0) == 32  # Norway exception (32V)
    assert utm_zone(78.0, 15.0) == 33  # Svalbard
    assert utm_zone(40.0, -74.0) == 18


def test_utm_rejects_far_apart_zones_and_bad_latitudes():
    with pytest.raises(DatasetError, match="several UTM zones"):
        latlon_to_utm([48.85, 40.71], [2.29, -74.0])
    with pytest.raises(DatasetError, match="outside UTM"):
        latlon_to_utm([95.0], [0.0])
    # A neighbouring zone is fine: projected in the first point's (extended) zone.
    xy, zone, _ = latlon_to_utm([48.0, 48.0], [5.9, 6.1])
    assert zone == 31 and np.isfinite(xy).all()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_poses_metric_and_latlon(tmp_path):
    p = read_poses(_write(tmp_path / "m.csv", "image,easting,northing,heading\na.jpg,10,20,90\nb.jpg,13,24,\n"))
    assert p.keys == ["a.jpg", "b.jpg"] and p.utm_zone is None
    np.testing.assert_allclose(p.xy, [[10, 20], [13, 24]])
    assert p.headings[0] == 90 and np.isnan(p.headings[1])
    looked = p.lookup(["b.jpg", "zzz.jpg", "a.jpg"])
    np.testing.assert_allclose(looked[[0, 2]], [[13, 24], [10, 20]])
    assert np.isnan(looked[1]).all()

    g = read_poses(_write(tmp_path / "g.csv", "image,lat,lon,timestamp\nq.jpg,48.8583,2.2945,17.5\n"))
    assert g.utm_zone == 31 and g.timestamps[0] == 17.5
    assert abs(g.xy[0, 0] - UTM_REFERENCES[1][4]) < UTM_TOLERANCE_M


def test_read_poses_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_poses(tmp_path / "missing.csv")
    with pytest.raises(DatasetError, match=r"missing column\(s\) northing.*header has image, easting, z"):
        read_poses(_write(tmp_path / "c.csv", "image,easting,z\na.jpg,1,2\n"))
    with pytest.raises(DatasetError, match=r"line 3: column 'northing' has 'abc'"):
        read_poses(_write(tmp_path / "n.csv", "image,easting,northing\na.jpg,1,2\nb.jpg,1,abc\n"))
    with pytest.raises(DatasetError, match=r"line 3: image 'a.jpg' already appears on line 2"):
        read_poses(_write(tmp_path / "d.csv", "image,easting,northing\na.jpg,1,2\na.jpg,1,2\n"))
    with pytest.raises(DatasetError, match="empty"):
        read_poses(_write(tmp_path / "e.csv", ""))


def test_utm_filenames():
    assert parse_utm_filename("sub/@0543256.96@4178906.70@10@S@037.75@-122.50@x@@@@@@@.jpg") == (543256.96, 4178906.70)
    assert parse_utm_filename("db1.jpg") is None
    assert parse_utm_filename("@abc@def@.jpg") is None


def test_from_radius_metric_and_soft():
    db = np.array([[0.0, 0.0], [10.0, 0.0], [30.0, 0.0], [np.nan, np.nan]])
    q = np.array([[1.0, 0.0], [100.0, 0.0], [np.nan, 0.0]])
    gt = GroundTruth.from_radius(q, db, radius=25.0, soft_radius=40.0)
    assert [p.tolist() for p in gt.positives] == [[0, 1], [], []]
    assert [p.tolist() for p in gt.soft_positives] == [[0, 1, 2], [], []]
    assert gt.n_database == 4 and gt.no_positive_queries.tolist() == [1, 2]


def test_from_radius_heading_filter():
    db = np.zeros((3, 2))
    gt = GroundTruth.from_radius(
        np.zeros((1, 2)),
        db,
        radius=10.0,
        query_headings=np.array([350.0]),
        db_headings=np.array([5.0, 40.0, np.nan]),
        max_heading_diff=20.0,
    )
    assert gt.positives[0].tolist() == [0]  # 15° across north counts; 50° and unknown do not


def test_from_radius_latlon():
    # Points ~11 m apart along a meridian (1e-4° of latitude ≈ 11.1 m) and one ~1.1 km away.
    db = np.array([[48.8583, 2.2945], [48.8584, 2.2945], [48.8683, 2.2945]])
    q = np.array([[48.85835, 2.2945]])
    gt = GroundTruth.from_radius_latlon(q, db, radius=25.0)
    assert gt.positives[0].tolist() == [0, 1]


def test_from_frames_names_and_numbers():
    db = [f"f{i:03d}.png" for i in range(6)]
    queries = ["f000.png", "f003.png", "f005.png", "other.png"]
    gt1 = GroundTruth.from_frames(queries, db[::-1], tolerance=1)  # db order must not matter
    rev = {name: i for i, name in enumerate(db[::-1])}
    expected = [[0, 1], [2, 3, 4], [4, 5], []]
    assert [sorted(db[::-1][j] for j in p) for p in gt1.positives] == [[db[i] for i in e] for e in expected]
    assert gt1.positives[1].tolist() == sorted(rev[db[i]] for i in (2, 3, 4))
    gt0 = GroundTruth.from_frames(queries, db, tolerance=0)
    assert [p.tolist() for p in gt0.positives] == [[0], [3], [5], []]
    gtn = GroundTruth.from_frames(np.array([10, 40]), np.array([0, 10, 20, 30, 40]), tolerance=10)
    assert [p.tolist() for p in gtn.positives] == [[0, 1, 2], [3, 4]]


def test_matrix_round_trip_and_subset():
    m = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=bool)
    gt = GroundTruth.from_matrix(m)
    assert [p.tolist() for p in gt.positives] == [[0, 2], [], [1, 2, 3]]
    np.testing.assert_array_equal(gt.to_matrix(), m)
    sub = gt.subset([0, 2], [2, 3])
    np.testing.assert_array_equal(sub.to_matrix(), m[np.ix_([0, 2], [2, 3])])
    with pytest.raises(DatasetError):
        GroundTruth([np.array([5])], n_database=3)


def test_from_list(tmp_path):
    q, db = ["a.jpg", "b.jpg", "c.jpg"], ["r0.jpg", "r1.jpg", "r2.jpg"]
    csv_path = _write(tmp_path / "gt.csv", "query,positives\nquery/a.jpg,ref/r0.jpg r1.jpg\nb.jpg,\n")
    gt = GroundTruth.from_list(csv_path, q, db, query_prefix="query", db_prefix="ref")
    assert [p.tolist() for p in gt.positives] == [[0, 1], [], []]
    with pytest.raises(DatasetError, match=r"unknown database image\(s\) 'ref/r9.jpg \(line 2\)'"):
        GroundTruth.from_list(
            _write(tmp_path / "bad.csv", "query,positives\na.jpg,ref/r9.jpg\n"), q, db, db_prefix="ref"
        )
    with pytest.raises(DatasetError, match=r"unknown query image"):
        GroundTruth.from_list(_write(tmp_path / "bq.csv", "query,positives\nzz.jpg,r0.jpg\n"), q, db)
    with pytest.raises(DatasetError, match=r"missing column\(s\) positives"):
        GroundTruth.from_list(_write(tmp_path / "mc.csv", "query,refs\na.jpg,r0.jpg\n"), q, db)
    with pytest.raises(DatasetError, match="not found"):
        GroundTruth.from_list(tmp_path / "nope.csv", q, db)
