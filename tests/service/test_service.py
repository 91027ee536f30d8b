"""`vprkit serve` through a real HTTP client against uvicorn on 127.0.0.1: reads, writes, bad input, concurrency, restarts."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from vprkit.pipeline.live import LIVE_IMAGES_DIR, LiveMap

from helpers import assert_loopback_only, listening_sockets

MAP_IMAGES = 20  # as built by conftest.built_map: Corridor references 0…19 at easting i m
GT_TOLERANCE = 2  # Corridor's ground truth: a query's positives are the references within ±2 frames
MUTATED_UPLOADS = 12
MUTATED_BYTES = 8


def key(i: int) -> str:
    return f"{i:07d}.jpg"


def jpeg(path: Path) -> bytes:
    return path.read_bytes()


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["matches"]]


def test_health_map_and_schema(map_dir, serve):
    s = serve(map_dir)
    port = httpx.URL(s.server.url).port
    served = [x for x in assert_loopback_only(listening_sockets()) if x.port == port]  # every listener of this process
    assert [x.ip for x in served] == ["127.0.0.1"], served
    health = s.client.get("/health").json()
    assert health["status"] == "ok" and health["places"] == MAP_IMAGES
    info = s.client.get("/map").json()
    assert info["places"] == MAP_IMAGES and info["preset"] == "effnet2-vlad-ma4"
    assert info["index"]["ntotal"] == MAP_IMAGES and info["places_with_position"] == MAP_IMAGES
    schema = s.client.get("/openapi.json").json()
    assert {"/localize", "/places", "/places/{key}", "/health", "/map"} <= set(schema["paths"])
    assert {"LocalizeOut", "MatchOut", "PlaceOut", "PoseIn"} <= set(schema["components"]["schemas"])
    upload = schema["paths"]["/localize"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/octet-stream"} <= set(upload)


def test_localize_upload_and_raw_bytes(map_dir, serve, corridor_dir):
    s = serve(map_dir)
    own = jpeg(corridor_dir / "ref" / key(7))
    multipart = s.client.post("/localize", files={"image": ("frame.jpg", own, "image/jpeg")}, params={"top_k": 3})
    raw = s.client.post("/localize", content=own, headers={"content-type": "image/jpeg"}, params={"top_k": 3})
    assert ids(multipart)[0] == key(7) and ids(raw)[0] == key(7)  # a map image finds itself first
    assert len(ids(raw)) == 3
    best = raw.json()["matches"][0]
    assert best["score"] >= max(m["score"] for m in raw.json()["matches"])  # higher is better, best first
    assert best["position"] in ([7.0, 0.0], {"easting": 7.0, "northing": 0.0})
    estimate = raw.json()["estimate"]  # the library's position estimate flows through unchanged
    assert np.allclose(estimate["position"], [7.0, 0.0], atol=1.0) and estimate["unknown"] is False
    assert estimate["confidence"] is None or 0.0 <= estimate["confidence"] <= 1.0  # None: map too small to calibrate
    query = s.client.post("/localize", content=jpeg(corridor_dir / "query" / key(10)), params={"top_k": 1})
    assert abs(int(ids(query)[0][:7]) - 10) <= GT_TOLERANCE  # the revisit is localised within the ground truth


def test_bad_input_is_4xx_and_the_server_lives_on(map_dir, serve, corridor_dir):
    s = serve(map_dir, max_upload_bytes=64 * 1024)
    own = jpeg(corridor_dir / "ref" / key(3))
    cases = {
        "garbage": s.client.post("/localize", content=b"this is not an image"),
        "truncated": s.client.post("/localize", content=own[: len(own) // 3], headers={"content-type": "image/jpeg"}),
        "empty": s.client.post("/localize", content=b""),
        "oversize": s.client.post("/localize", content=os.urandom(65 * 1024)),
        "oversize streamed": s.client.post(
            "/localize", content=iter([os.urandom(16 * 1024)] * 5)
        ),  # chunked, no length
        "json": s.client.post("/localize", json={"image": "x"}),
        "no image field": s.client.post("/localize", files={"photo": ("a.jpg", own, "image/jpeg")}),
        "top_k 0": s.client.post("/localize", content=own, params={"top_k": 0}),
        "unknown rerank": s.client.post("/localize", content=own, params={"rerank": "no-such-preset"}),
    }
    expected = {
        "garbage": 422,
        "truncated": 422,
        "empty": 422,
        "oversize": 413,
        "oversize streamed": 413,
        "json": 415,
        "no image field": 422,
        "top_k 0": 422,
        "unknown rerank": 422,
    }
    assert {k: r.status_code for k, r in cases.items()} == expected
    assert "not an image" in cases["garbage"].json()["detail"]
    assert "larger than" in cases["oversize"].json()["detail"]
    rng = np.random.default_rng(0)
    for _ in range(MUTATED_UPLOADS):  # damaged JPEGs: answered (200) or refused (4xx), never a server error
        damaged = np.frombuffer(own, np.uint8).copy()
        spots = rng.integers(0, len(damaged), MUTATED_BYTES)
        damaged[spots] = rng.integers(0, 256, MUTATED_BYTES)
        assert s.client.post("/localize", content=damaged.tobytes()).status_code in (200, 422)
    assert s.client.get("/health").status_code == 200
    assert ids(s.client.post("/localize", content=own))[0] == key(3)  # the worker still answers


def test_writes_need_the_key(map_dir, serve, corridor_dir):
    s = serve(map_dir)
    img = jpeg(corridor_dir / "query" / key(0))
    for headers in ({}, {"X-API-Key": "wrong"}):
        assert s.client.post("/places", content=img, headers=headers).status_code == 401
        assert (
            s.client.patch(f"/places/{key(1)}", json={"easting": 1, "northing": 1}, headers=headers).status_code == 401
        )
        assert s.client.delete(f"/places/{key(1)}", headers=headers).status_code == 401
    assert s.client.get("/health").json()["places"] == MAP_IMAGES  # nothing changed
    assert s.client.post("/localize", content=img).status_code == 200  # reads are open


def test_add_update_delete_survive_a_restart(map_dir, serve, corridor_dir):
    s = serve(map_dir)
    new = jpeg(corridor_dir / "query" / key(60))  # a place beyond the map (references 0…19)
    added = s.client.post(
        "/places",
        files={"image": ("q.jpg", new, "image/jpeg")},
        data={"key": "walk/q60.jpg", "easting": "60", "northing": "1.5", "heading": "-90"},
        headers=s.headers,
    )
    assert added.status_code == 201, added.text
    assert added.json() == {
        "id": "walk/q60.jpg",
        "row": MAP_IMAGES,
        "position": {"easting": 60.0, "northing": 1.5},
        "heading": 270.0,
        "timestamp": None,
    }
    assert ids(s.client.post("/localize", content=new))[0] == "walk/q60.jpg"  # localisable at once
    assert s.client.post("/places", content=new, params={"key": "walk/q60.jpg"}, headers=s.headers).status_code == 409
    assert s.client.post("/places", content=new, params={"key": "../x.jpg"}, headers=s.headers).status_code == 422

    moved = s.client.patch(
        "/places/walk/q60.jpg", json={"easting": 61, "northing": 2, "timestamp": 1.7e9}, headers=s.headers
    )
    assert moved.status_code == 200 and moved.json()["position"] == {"easting": 61.0, "northing": 2.0}
    assert moved.json()["heading"] == 270.0 and moved.json()["timestamp"] == 1.7e9  # fields left out stay
    assert (
        s.client.patch("/places/nowhere.jpg", json={"easting": 1, "northing": 1}, headers=s.headers).status_code == 404
    )

    gone = s.client.delete(f"/places/{key(5)}", headers=s.headers)
    assert gone.status_code == 200 and gone.json()["places"] == MAP_IMAGES
    assert s.client.delete(f"/places/{key(5)}", headers=s.headers).status_code == 404
    assert key(5) not in ids(
        s.client.post("/localize", content=jpeg(corridor_dir / "ref" / key(5)), params={"top_k": 30})
    )
    # rows after the deleted one moved down, and still answer with their own image
    assert s.client.get("/places/walk/q60.jpg").json()["row"] == MAP_IMAGES - 1
    assert ids(s.client.post("/localize", content=jpeg(corridor_dir / "ref" / key(12))))[0] == key(12)
    s.stop()

    again = serve(map_dir)  # a new process-worth of state: everything from disk
    assert again.client.get("/health").json()["places"] == MAP_IMAGES
    place = again.client.get("/places/walk/q60.jpg").json()
    assert place["position"] == {"easting": 61.0, "northing": 2.0} and place["heading"] == 270.0
    assert ids(again.client.post("/localize", content=new))[0] == "walk/q60.jpg"
    assert key(5) not in ids(
        again.client.post("/localize", content=jpeg(corridor_dir / "ref" / key(5)), params={"top_k": 30})
    )
    assert (map_dir / LIVE_IMAGES_DIR / "walk" / "q60.jpg").read_bytes() == new  # the map keeps the uploaded file


def test_concurrent_localise_and_add_lose_nothing(map_dir, serve, corridor_dir):
    s = serve(map_dir)
    adds = [jpeg(corridor_dir / "query" / key(i)) for i in range(40, 46)]
    probe = jpeg(corridor_dir / "ref" / key(9))
    errors: list[str] = []
    stop = threading.Event()
    localised = [0]

    def reader() -> None:
        with httpx.Client(base_url=s.server.url, timeout=60.0) as c:
            while not stop.is_set():
                r = c.post("/localize", content=probe, params={"top_k": 5})
                if r.status_code != 200 or r.json()["matches"][0]["id"] != key(9):
                    errors.append(f"localize {r.status_code} {r.text[:200]}")
                localised[0] += 1

    def writer() -> None:
        with httpx.Client(base_url=s.server.url, timeout=60.0) as c:
            for i, img in enumerate(adds):
                r = c.post(
                    "/places",
                    content=img,
                    params={"key": f"added/{i}.jpg", "easting": 40 + i, "northing": 0},
                    headers=s.headers,
                )
                if r.status_code != 201:
                    errors.append(f"add {r.status_code} {r.text[:200]}")

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    w = threading.Thread(target=writer)
    w.start()
    w.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == [] and localised[0] > 0
    assert s.client.get("/health").json()["places"] == MAP_IMAGES + len(adds)
    for i, img in enumerate(adds):
        assert ids(s.client.post("/localize", content=img, params={"top_k": 1})) == [f"added/{i}.jpg"]
    s.stop()
    reopened = LiveMap.open(map_dir)
    assert len(reopened) == MAP_IMAGES + len(adds)
    assert [reopened.place(f"added/{i}.jpg")["position"]["easting"] for i in range(len(adds))] == [
        40.0 + i for i in range(len(adds))
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_kill_right_after_the_answer_loses_nothing(map_dir, corridor_dir, tmp_path):
    """`vprkit serve` in its own process, SIGKILLed the moment it acknowledges an add: the place is on disk."""
    port = _free_port()
    keyfile = tmp_path / "key.txt"
    keyfile.write_text("secret\n")
    vprkit = Path(sys.executable).with_name("vprkit")  # the console script installed beside this interpreter
    log = (tmp_path / "serve.log").open("wb")  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(
        [str(vprkit), "serve", str(map_dir), "--port", str(port), "--api-key-file", str(keyfile), "--no-access-log"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VPRKIT_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text(errors="replace")
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        listeners = assert_loopback_only(listening_sockets(proc.pid))  # `vprkit serve`'s default host: loopback
        assert port in {s.port for s in listeners}, listeners
        frame = np.asarray(Image.open(corridor_dir / "query" / key(70)))
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        r = httpx.post(
            f"{url}/places",
            content=buf.getvalue(),
            params={"key": "killed.png", "easting": 70, "northing": 0},
            headers={"X-API-Key": "secret", "content-type": "image/png"},
            timeout=60.0,
        )
        proc.send_signal(signal.SIGKILL)
        assert r.status_code == 201, r.text
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert "/docs" in (tmp_path / "serve.log").read_text(errors="replace")  # it printed where its API docs are
    live = LiveMap.open(map_dir)
    assert live.place("killed.png")["position"] == {"easting": 70.0, "northing": 0.0}
    assert live.localize({"q": frame}, top_k=1)[0].matches[0].key == "killed.png"


def test_writes_stop_once_another_process_changed_the_map(map_dir, serve, corridor_dir):
    """A `vprkit map remove` beside the service: reads go on from the map as opened, writes are refused (409)."""
    from vprkit import pipeline

    s = serve(map_dir)
    pipeline.remove_places(map_dir, [key(2)])
    refused = s.client.post(
        "/places", content=jpeg(corridor_dir / "query" / key(80)), params={"key": "late.jpg"}, headers=s.headers
    )
    assert refused.status_code == 409 and "restart" in refused.json()["detail"]
    assert ids(s.client.post("/localize", content=jpeg(corridor_dir / "ref" / key(4))))[0] == key(4)
    s.stop()
    again = serve(map_dir)  # a restart serves the map as it now is, and takes writes again
    assert again.client.get("/health").json()["places"] == MAP_IMAGES - 1
    assert (
        again.client.post(
            "/places", content=jpeg(corridor_dir / "query" / key(80)), params={"key": "late.jpg"}, headers=again.headers
        ).status_code
        == 201
    )


def test_verify_checks_the_answer_and_a_place_added_is_confidently_itself(map_dir, serve, corridor_dir):
    """Issue 27: ``verify=N`` checks the top answers geometrically; a place just added, queried with its own
    image, is confidently itself (it came back ``confidence 0.0, unknown true`` before the margin over places)."""
    s = serve(map_dir)
    query = jpeg(corridor_dir / "query" / key(10))
    checked = s.client.post("/localize", content=query, params={"top_k": 3, "verify": 2})
    assert checked.status_code == 200, checked.text
    estimate = checked.json()["estimate"]
    assert estimate["evidence"]["model"] == "verified" and estimate["verification"]["answer"]["inliers"] >= 20
    assert len(estimate["verification"]["checked"]) == 2
    assert s.client.post("/localize", content=query, params={"verify": 11}).status_code == 422
    assert s.client.post("/localize", content=query, params={"verify": 1, "stream": "cam0"}).status_code == 422
    new = jpeg(corridor_dir / "ref" / key(60))  # a place beyond the map (references 0…19)
    added = s.client.post(
        "/places",
        files={"image": ("r60.jpg", new, "image/jpeg")},
        data={"key": "walk/r60.jpg", "easting": "60", "northing": "0"},
        headers=s.headers,
    )
    assert added.status_code == 201, added.text
    again = s.client.post("/localize", content=new, params={"top_k": 3}).json()
    assert again["matches"][0]["id"] == "walk/r60.jpg" and again["matches"][0]["cosine"] > 0.999
    assert again["estimate"]["confidence"] >= 0.9 and again["estimate"]["unknown"] is False
