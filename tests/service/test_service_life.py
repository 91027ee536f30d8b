"""Service life (issue 27 item 7): a page of places, and a request id and the server's time on every answer."""

from __future__ import annotations

import re
import shutil
from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient

from vprkit.errors import MapDamagedError
from vprkit.pipeline.live import LiveMap
from vprkit.service import create_app

from conftest import API_KEY, MAP_IMAGES, corridor_key


@pytest.fixture(scope="module")
def client(built_map, tmp_path_factory):
    live = LiveMap.open(shutil.copytree(built_map, tmp_path_factory.mktemp("life") / "map"))
    with TestClient(create_app(live, api_key=API_KEY)) as c:
        yield c


def test_places_are_listed_a_page_at_a_time_in_row_order(client):
    whole = client.get("/places", params={"limit": 1000}).json()
    assert whole["total"] == MAP_IMAGES and [p["id"] for p in whole["places"]] == [
        corridor_key(i) for i in range(MAP_IMAGES)
    ]
    page = client.get("/places", params={"offset": 5, "limit": 3}).json()
    assert page == {"total": MAP_IMAGES, "offset": 5, "limit": 3, "places": whole["places"][5:8]}
    assert page["places"][0] == client.get(f"/places/{corridor_key(5)}").json()  # as GET /places/{id} gives it
    assert client.get("/places", params={"offset": MAP_IMAGES + 3}).json()["places"] == []
    for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"ofset": 2}):
        assert client.get("/places", params=bad).status_code == 422, bad


def test_every_answer_carries_a_request_id_and_the_server_time(client, corridor_dir):
    now = datetime.now(timezone.utc)
    before = now.replace(microsecond=now.microsecond // 1000 * 1000)  # the stamp keeps milliseconds
    answers = [client.get("/health"), client.get("/places/nope.jpg"), client.patch("/places/x", content=b"{")]
    image = (corridor_dir / "query" / corridor_key(3)).read_bytes()
    answers.append(client.post("/localize", content=image, headers={"X-Request-ID": "robot-7.frame-42"}))
    ids = [a.headers["x-request-id"] for a in answers]
    assert [a.status_code for a in answers] == [200, 404, 401, 200]  # errors and the guard's answers too
    assert ids[-1] == "robot-7.frame-42" and len(set(ids)) == 4  # the client's id echoed, others generated
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids[:3])
    for a in answers:
        stamp = datetime.fromisoformat(a.headers["x-server-time"].replace("Z", "+00:00"))
        assert before <= stamp <= datetime.now(timezone.utc)
    body = answers[-1].json()
    assert body["request_id"] == "robot-7.frame-42" and body["server_time"] == answers[-1].headers["x-server-time"]
    unusable = client.get("/health", headers={"X-Request-ID": "x" * 500})
    assert re.fullmatch(r"[0-9a-f]{32}", unusable.headers["x-request-id"])  # never echoed into logs as given


def test_a_map_rebuilt_on_disk_is_reported_stale_and_reloaded_without_a_restart(built_map, corridor_dir, tmp_path):
    from vprkit import pipeline

    folder = shutil.copytree(built_map, tmp_path / "map")
    with TestClient(create_app(LiveMap.open(folder), api_key=API_KEY)) as client:
        assert client.get("/health").json()["status"] == "ok" and not client.get("/map").json()["changed_on_disk"]
        more = [corridor_key(i) for i in range(MAP_IMAGES + 2)]  # a `vprkit map build` adds two images
        pipeline.build_map(corridor_dir / "ref", folder, keys=more, progress=False)
        health = client.get("/health").json()
        assert health["status"] == "stale" and health["changed_on_disk"] and health["places"] == MAP_IMAGES
        assert "POST /admin/reload" in client.get("/map").json()["hint"]
        image = (corridor_dir / "query" / corridor_key(40)).read_bytes()
        add = {"content": image, "params": {"key": "new.jpg"}, "headers": {"X-API-Key": API_KEY}}
        assert client.post("/places", **add).status_code == 409  # the rows held no longer match the disk
        assert client.post("/admin/reload").status_code == 401  # the key is needed
        done = client.post("/admin/reload", headers={"X-API-Key": API_KEY})
        assert done.status_code == 200, done.text
        assert done.json()["places_before"] == MAP_IMAGES and done.json()["places"] == MAP_IMAGES + 2
        health = client.get("/health").json()
        assert health == {**health, "status": "ok", "changed_on_disk": False, "places": MAP_IMAGES + 2}
        assert client.get(f"/places/{more[-1]}").status_code == 200
        assert client.post("/places", **add).status_code == 201  # writes work again on the reloaded map
        assert client.get("/map").json()["reloads"] == 1


def test_a_reload_that_fails_keeps_the_old_map_serving(built_map, tmp_path):
    folder = shutil.copytree(built_map, tmp_path / "map")
    live = LiveMap.open(folder)

    def broken():
        raise MapDamagedError("store.h5 belongs to another map")

    with TestClient(create_app(live, api_key=API_KEY, reopen=broken)) as client:
        answer = client.post("/admin/reload", headers={"X-API-Key": API_KEY})
        assert answer.status_code == 503 and "another map" in answer.json()["detail"]
        assert client.get("/health").json()["places"] == MAP_IMAGES
        assert client.get(f"/places/{corridor_key(0)}").status_code == 200
