"""The service's sequence mode (issue 27 item 4): a client's stream of frames, each localised with the ones before,
with an estimate; bounded streams that expire (a fake clock) and restart when the map changes."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from vprkit.errors import ConfigError
from vprkit.pipeline.live import LiveMap
from vprkit.service import ServiceLimits, create_app
from vprkit.service.sequences import StreamTable, TooManyStreamsError

from conftest import API_KEY, MAP_IMAGES, corridor_key

TTL_S = 60.0
LENGTH = 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def served(built_map, tmp_path_factory):
    """A copy of the Corridor map served with two stream slots and a fake clock: (client, clock)."""
    live = LiveMap.open(shutil.copytree(built_map, tmp_path_factory.mktemp("streams") / "map"))
    clock = FakeClock()
    app = create_app(live, api_key=API_KEY, limits=ServiceLimits(max_streams=2, stream_ttl_s=TTL_S), stream_clock=clock)
    with TestClient(app) as client:
        yield client, clock


def _frame(client, corridor_dir, i: int, stream: str, **params):
    image = (corridor_dir / "query" / corridor_key(i)).read_bytes()
    return client.post(
        "/localize", content=image, params={"stream": stream, "sequence_length": LENGTH, "top_k": 3, **params}
    )


def test_stream_table_bounds_expires_and_restarts_with_a_fake_clock():
    clock = FakeClock()
    table = StreamTable(ServiceLimits(max_streams=2, stream_ttl_s=TTL_S, max_sequence_length=20), clock=clock)
    a, why = table.acquire("robot-a", 5)
    assert why == "created" and a.sequence.settings.length == 5
    assert table.acquire("robot-a", 5) == (a, None)  # the same stream, not restarted
    table.acquire("robot-b")
    with pytest.raises(TooManyStreamsError, match="2 streams are in use"):
        table.acquire("robot-c")
    clock.now += TTL_S / 2
    table.acquire("robot-a", 5)  # used: its clock restarts
    clock.now += TTL_S / 2 + 1  # robot-b unused for longer than the ttl, robot-a not
    c, why = table.acquire("robot-c")
    assert why == "created" and len(table) == 2
    assert table.end("robot-c")
    b, why = table.acquire("robot-b")
    assert why == "expired" and b.sequence.matcher.seen == 0
    assert table.acquire("robot-a", 7)[1] == "sequence length changed"
    assert table.end("robot-a") and not table.end("robot-a")
    with pytest.raises(ConfigError, match="stream id"):
        table.acquire("../etc/passwd")
    with pytest.raises(ConfigError, match="sequence_length must be 2…20"):
        table.acquire("robot-d", 21)


def test_frames_of_a_stream_are_localised_together_with_an_estimate_each(served, corridor_dir):
    client, _ = served
    answers = [_frame(client, corridor_dir, i, "walk-1") for i in range(4, 10)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    bodies = [a.json() for a in answers]
    assert [b["stream"]["frames"] for b in bodies] == [1, 2, 3, 4, 5, 6]
    assert [b["stream"]["window_frames"] for b in bodies] == [1, 2, 3, 3, 3, 3]
    assert bodies[0]["stream"]["started"] == "created" and all(b["stream"]["started"] is None for b in bodies[1:])
    for b in bodies:
        est = b["estimate"]
        assert "confidence" in est and est["unknown"] in (True, False, None)
        assert est["confidence"] is not None or est["unknown"] is None  # never "known" without a confidence
        assert est["evidence"]["sequence"]["length"] == LENGTH
        assert 0.0 <= est["evidence"]["sequence"]["support"] <= 1.0
        assert b["matches"][0]["score_kind"] == "sequence_mean_cosine" and -1 <= b["matches"][0]["score"] <= 1
    # once the window is full, the best trajectory ends within two rows of the frame's own place (±2: Corridor's truth)
    assert all(abs(int(b["matches"][0]["image"][:7]) - i) <= 2 for b, i in zip(bodies[2:], range(6, 10)))
    assert client.delete("/streams/walk-1").status_code == 401  # ending a stream is a write: the key
    assert client.delete("/streams/walk-1", headers={"X-API-Key": API_KEY}).json()["ended"] == "walk-1"
    assert client.delete("/streams/walk-1", headers={"X-API-Key": API_KEY}).status_code == 404
    assert _frame(client, corridor_dir, 10, "walk-1").json()["stream"]["started"] == "created"
    client.delete("/streams/walk-1", headers={"X-API-Key": API_KEY})


def test_streams_are_capped_expire_and_bad_requests_are_422(served, corridor_dir):
    client, clock = served
    assert _frame(client, corridor_dir, 1, "s-1").status_code == 200
    assert _frame(client, corridor_dir, 1, "s-2").status_code == 200
    full = _frame(client, corridor_dir, 1, "s-3")
    assert full.status_code == 503 and "streams are in use" in full.json()["detail"] and full.headers["retry-after"]
    clock.now += TTL_S + 1
    later = _frame(client, corridor_dir, 2, "s-3")
    assert later.status_code == 200 and later.json()["stream"]["started"] == "created"
    assert _frame(client, corridor_dir, 2, "s-1").json()["stream"]["started"] == "expired"
    image = (corridor_dir / "query" / corridor_key(1)).read_bytes()
    for params in (
        {"stream": "x y"},
        {"stream": "ok", "sequence_length": 1},
        {"sequence_length": 5},
        {"stream": "ok", "rerank": "speed"},
    ):
        assert client.post("/localize", content=image, params=params).status_code == 422, params
    for stream in ("s-1", "s-3"):
        client.delete(f"/streams/{stream}", headers={"X-API-Key": API_KEY})


def test_a_stream_restarts_when_the_map_changes_or_is_reloaded(served, corridor_dir):
    client, _ = served
    for i in range(3):
        assert _frame(client, corridor_dir, i, "moving").status_code == 200
    added = client.post(
        "/places",
        files={"image": ("q.jpg", (corridor_dir / "query" / corridor_key(60)).read_bytes(), "image/jpeg")},
        data={"key": "q60.jpg", "easting": "60", "northing": "0"},
        headers={"X-API-Key": API_KEY},
    )
    assert added.status_code == 201, added.text
    after = _frame(client, corridor_dir, 3, "moving")
    assert after.status_code == 200, after.text
    body = after.json()
    assert body["stream"]["started"].startswith("restarted: the map changed") and body["stream"]["frames"] == 1
    assert client.get("/health").json()["places"] == MAP_IMAGES + 1
    assert _frame(client, corridor_dir, 4, "moving").json()["stream"]["frames"] == 2
    assert client.post("/admin/reload", headers={"X-API-Key": API_KEY}).status_code == 200  # a new map object
    reloaded = _frame(client, corridor_dir, 5, "moving").json()["stream"]
    assert reloaded["started"].startswith("restarted") and reloaded["frames"] == 1
    client.delete("/streams/moving", headers={"X-API-Key": API_KEY})
