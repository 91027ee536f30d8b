"""Pose values over HTTP (issue 26, item 1): ``POST /places`` and ``PATCH`` refuse values out of range with a 422
naming the field (``easting=1e160`` made 78 of 111 localisations answer 500 before), headings land in [0, 360)
exactly, and every route answers strict JSON — also after a place with an extreme but valid pose was added."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from vprkit.datasets.pose_values import LOCAL_COORDINATE, TIMESTAMP
from vprkit.datasets.poses import utm_crs

MAP_IMAGES = 20  # conftest.built_map: Corridor references 0…19 at easting i m, northing 0, local metres
TOP_K = 5


def key(i: int) -> str:
    return f"{i:07d}.jpg"


def strict(response: httpx.Response):
    """The body as strict JSON (NaN / Infinity refused), serialisable again with ``allow_nan=False``."""

    def refuse(constant: str):
        raise AssertionError(f"{constant} in the answer to {response.request.method} {response.request.url}")

    data = json.loads(response.text, parse_constant=refuse)
    json.dumps(data, allow_nan=False)
    return data


def add(s, image: bytes, place: str, **pose) -> httpx.Response:
    fields = {"key": place, **{k: repr(float(v)) for k, v in pose.items()}}
    return s.client.post("/places", files={"image": (place, image, "image/jpeg")}, data=fields, headers=s.headers)


def refused(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 422, response.text
    detail = strict(response)["detail"]
    assert isinstance(detail, str) and "\n" not in detail and all(w in detail for w in words), detail


def test_out_of_range_poses_are_422_and_the_service_keeps_answering(map_dir: Path, corridor_dir: Path, serve):
    s = serve(map_dir)
    image = (corridor_dir / "query" / key(30)).read_bytes()
    refused(add(s, image, "far.jpg", easting=1e160, northing=0.0), "easting 1e+160", "100,000,000")
    refused(add(s, image, "old.jpg", timestamp=-1e12), "timestamp -1000000000000.0", "2100-01-01")
    refused(add(s, image, "late.jpg", timestamp=1e308), "timestamp 1e+308")
    assert strict(s.client.get("/health"))["places"] == MAP_IMAGES  # nothing of them was stored
    assert s.client.get("/places/far.jpg").status_code == 404
    for i in range(MAP_IMAGES):  # every map image still localises (78 of 111 answered 500 after easting=1e160)
        answer = s.client.post("/localize", content=(corridor_dir / "ref" / key(i)).read_bytes())
        assert answer.status_code == 200 and strict(answer)["matches"][0]["id"] == key(i), answer.text

    placed = add(s, image, "turn.jpg", easting=1.0, northing=2.0, heading=-1e-20)
    assert placed.status_code == 201 and strict(placed)["heading"] == 0.0  # was 360.0
    for heading in (720.0, -0.0, -1e-20):
        moved = s.client.patch("/places/turn.jpg", json={"heading": heading}, headers=s.headers)
        got = strict(moved)["heading"]
        assert moved.status_code == 200 and got == 0.0 and math.copysign(1.0, got) == 1.0, (heading, moved.text)
    refused(s.client.patch("/places/turn.jpg", json={"easting": 1e160, "northing": 0}, headers=s.headers), "easting")
    refused(s.client.patch("/places/turn.jpg", json={"timestamp": 1e308}, headers=s.headers), "timestamp")
    assert strict(s.client.get("/places/turn.jpg"))["position"] == {"easting": 1.0, "northing": 2.0}  # unchanged


def test_every_route_answers_strict_json_after_an_extreme_valid_pose(map_dir: Path, corridor_dir: Path, serve):
    s = serve(map_dir)
    edge = (corridor_dir / "query" / key(40)).read_bytes()
    placed = add(s, edge, "edge.jpg", easting=LOCAL_COORDINATE.high, northing=LOCAL_COORDINATE.low,
                 heading=359.99999999999994, timestamp=TIMESTAMP.high)  # fmt: skip
    assert placed.status_code == 201, placed.text
    assert strict(placed)["position"] == {"easting": 1e8, "northing": -1e8}
    images = [(corridor_dir / "ref" / key(i)).read_bytes() for i in range(0, MAP_IMAGES, 4)] + [edge]
    for image in images:
        answer = s.client.post("/localize", content=image, params={"top_k": TOP_K})
        result = strict(answer)
        assert answer.status_code == 200, answer.text
        spread = result["estimate"].get("spread_m")
        assert spread is None or math.isfinite(spread)
    for path in ("/health", "/map", "/places/edge.jpg", "/places/nowhere.jpg"):
        strict(s.client.get(path))
    strict(s.client.patch("/places/edge.jpg", json={"timestamp": TIMESTAMP.low}, headers=s.headers))
    gone = s.client.delete("/places/edge.jpg", headers=s.headers)
    assert gone.status_code == 200 and strict(gone)["places"] == MAP_IMAGES


def test_geographic_poses_are_on_the_globe_and_in_the_maps_utm_range(map_dir: Path, corridor_dir: Path, serve):
    info = json.loads((map_dir / "map.json").read_text())
    (map_dir / "map.json").write_text(json.dumps({**info, "crs": utm_crs(32, True)}))  # as lat/lon poses record
    s = serve(map_dir)
    image = (corridor_dir / "query" / key(50)).read_bytes()
    refused(add(s, image, "north.jpg", lat=91.0, lon=9.0), "lat 91.0", "-90 … 90°")
    refused(add(s, image, "polar.jpg", lat=85.0, lon=9.0), "lat 85.0", "-80 … 84°")
    refused(add(s, image, "wide.jpg", easting=2e6, northing=5e6), "easting 2000000.0", "UTM zone 32N")
    placed = add(s, image, "milan.jpg", lat=45.0, lon=9.0)
    assert placed.status_code == 201 and 4.9e6 < strict(placed)["position"]["northing"] < 5.0e6


@pytest.mark.parametrize("body", ['{"easting": Infinity, "northing": 0}', '{"heading": NaN}'])
def test_non_finite_json_numbers_are_refused(map_dir: Path, serve, body: str):
    s = serve(map_dir)
    answer = s.client.patch(
        f"/places/{key(1)}", content=body, headers={**s.headers, "content-type": "application/json"}
    )
    assert answer.status_code == 422, answer.text
    strict(answer)
