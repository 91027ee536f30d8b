"""Service life (issue 27 item 7): a page of places, and a request id and the server's time on every answer."""

from __future__ import annotations

import re
import shutil
from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient

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
