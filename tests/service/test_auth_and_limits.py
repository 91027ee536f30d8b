"""The key before the body, every body bounded, no credentials in URLs or logs, no paths without the key,
unknown fields refused, and every failure of a write a one-line JSON answer with the right status."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import psutil
import pytest

from vprkit.uploads import DecodeBusyError
from vprkit.errors import MapDamagedError, ReadOnlyMapError, StateNotPreparedError, StorageFullError
from vprkit.pipeline.live import LiveMap
from vprkit.service import BackgroundServer, ServiceLimits, create_app
from vprkit.service.app import error_status

API_KEY = "s3cret-key-value"
BIG_BODY = 50 * 1024 * 1024  # the 50 MB PATCH
PROMPT_S = 2.0  # an answer decided from the head alone comes well within this
MAX_GROWTH_MB = 100  # the server may not take the 50 MB body into memory (it took +580 MB)
MB = 1024 * 1024


def key(i: int) -> str:
    return f"{i:07d}.jpg"


@pytest.fixture(scope="module")
def live(built_map, tmp_path_factory) -> LiveMap:
    return LiveMap.open(shutil.copytree(built_map, tmp_path_factory.mktemp("auth") / "map"))


@contextmanager
def running(live: LiveMap, access_log: bool = False, **limits) -> Iterator[httpx.Client]:
    chosen = ServiceLimits(**limits)
    app = create_app(live, api_key=API_KEY, limits=chosen)
    with BackgroundServer(app, limits=chosen, access_log=access_log, log_level="info") as server:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            yield client


def raw_answer(client: httpx.Client, head: bytes, body: bytes = b"") -> tuple[bytes, float]:
    """The server's first answer to ``head`` (+ ``body``) on a raw socket, and how long it took."""
    url = client.base_url
    with socket.create_connection((url.host, url.port), timeout=10.0) as sock:
        start = time.monotonic()
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        head_part, _, rest = data.partition(b"\r\n\r\n")
        length = int(
            next(line.split(b":")[1] for line in head_part.split(b"\r\n") if line.lower().startswith(b"content-length"))
        )
        while len(rest) < length:
            rest += sock.recv(65536)
        return head_part + b"\r\n\r\n" + rest, time.monotonic() - start


def test_the_key_is_checked_before_the_body_is_read(live):
    """A junk PATCH without the key is 401 (it was a 400: parsed first); a 50 MB PATCH without the key is
    answered from its head (the body never sent here); with the key it is 413 from its declared size."""
    with running(live) as client:
        junk = client.patch(f"/places/{key(1)}", content=b"{{{ not json", headers={"content-type": "application/json"})
        assert junk.status_code == 401 and "X-API-Key" in junk.json()["detail"]
        keyed = client.patch(
            f"/places/{key(1)}",
            content=b"{{{ not json",
            headers={"content-type": "application/json", "X-API-Key": API_KEY},
        )
        assert keyed.status_code == 422

        head = (
            f"PATCH /places/{key(1)} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {BIG_BODY}\r\n"
        ).encode()
        answer, took = raw_answer(client, head + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 401") and took < PROMPT_S, answer
        answer, took = raw_answer(client, head + f"X-API-Key: {API_KEY}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 413") and took < PROMPT_S, answer
        assert b"65,536 bytes" in answer  # the documented JSON limit

        server = psutil.Process()
        before = server.memory_info().rss
        body = b"[" * BIG_BODY
        start = time.monotonic()
        sent = client.patch(f"/places/{key(1)}", content=body, headers={"content-type": "application/json"})
        assert sent.status_code == 401
        assert time.monotonic() - start < 10 * PROMPT_S
        del body
        assert (server.memory_info().rss - before) / MB < MAX_GROWTH_MB + BIG_BODY / MB  # the client's copy only
        assert client.get("/health").status_code == 200


def test_every_body_is_bounded(live):
    """A streamed (chunked) JSON body over 64 KiB is 413 as it passes the limit; a GET or DELETE declaring a
    body over it is 413 before reading; uploads keep their own limit."""
    with running(live) as client:
        chunks = iter([b" " * 16 * 1024] * 8)  # 128 KiB, no Content-Length
        streamed = client.patch(
            f"/places/{key(1)}", content=chunks, headers={"X-API-Key": API_KEY, "content-type": "application/json"}
        )
        assert streamed.status_code == 413, streamed.text
        assert client.request("GET", "/health", content=b"x" * (65 * 1024)).status_code == 413
        deleted = client.request(
            "DELETE", f"/places/{key(1)}", content=b"x" * (65 * 1024), headers={"X-API-Key": API_KEY}
        )
        assert deleted.status_code == 413
        assert client.get(f"/places/{key(1)}").status_code == 200  # not deleted
        moved = client.patch(f"/places/{key(1)}", json={"heading": 10}, headers={"X-API-Key": API_KEY})
        assert moved.status_code == 200 and moved.json()["heading"] == 10.0  # a small body passes


def test_unknown_fields_and_parameters_are_422_naming_them(live, corridor_dir):
    image = (corridor_dir / "query" / key(50)).read_bytes()
    with running(live) as client:
        typo = client.post(
            "/places",
            files={"image": ("q.jpg", image, "image/jpeg")},
            data={"key": "typo.jpg", "easting": "50", "northing": "0", "heding": "90"},
            headers={"X-API-Key": API_KEY},
        )
        assert typo.status_code == 422 and "'heding'" in typo.json()["detail"], typo.text
        query = client.post(
            "/places", content=image, params={"key": "t2.jpg", "heding": 90}, headers={"X-API-Key": API_KEY}
        )
        assert query.status_code == 422 and "'heding'" in query.json()["detail"]
        extra_file = client.post(
            "/places",
            files={"image": ("q.jpg", image, "image/jpeg"), "photo": ("p.jpg", image, "image/jpeg")},
            headers={"X-API-Key": API_KEY},
        )
        assert extra_file.status_code == 422 and "'photo'" in extra_file.json()["detail"]
        topk = client.post("/localize", content=image, params={"topk": 3})
        assert topk.status_code == 422 and "'topk'" in topk.json()["detail"]
        assert client.get("/places/typo.jpg").status_code == 404  # nothing was added
        assert client.get("/places/t2.jpg").status_code == 404


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_credentials_in_the_url_are_refused_and_never_logged(live, corridor_dir):
    """?api_key=, ?x-api-key=, ?token=, ?key= (where ``key`` is not a place id) and any parameter holding the
    key itself: 401 naming the header, the request not carried out, and the access log shows no secret."""
    image = (corridor_dir / "query" / key(51)).read_bytes()
    access = logging.getLogger("uvicorn.access")
    with running(live, access_log=True) as client:
        lines = Lines()
        access.addHandler(lines)
        try:
            refused = [
                client.get("/health", params={"api_key": API_KEY}),
                client.get("/map", params={"X-API-Key": API_KEY}),
                client.post("/localize", content=image, params={"key": API_KEY}),
                client.post("/localize", content=image, params={"token": "other-secret"}),
                client.delete(f"/places/{key(2)}", params={"apikey": API_KEY}),
                client.post("/places", content=image, params={"key": API_KEY}, headers={"X-API-Key": API_KEY}),
            ]
            allowed = client.post("/places", content=image, params={"key": "named.jpg"}, headers={"X-API-Key": API_KEY})
        finally:
            access.removeHandler(lines)
    for answer in refused:
        assert answer.status_code == 401 and "X-API-Key" in answer.json()["detail"], (answer.request.url, answer.text)
    assert allowed.status_code == 201  # ``key`` is a place id on POST /places
    assert live.place(key(2))["id"] == key(2)
    logged = "\n".join(lines.lines)
    assert len(lines.lines) >= len(refused) + 1, logged
    assert API_KEY not in logged and "other-secret" not in logged, logged
    assert "[redacted]" in logged and "named.jpg" in logged


def test_map_shows_no_paths_without_the_key(live):
    def strings(value) -> list[str]:
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    with running(live) as client:
        anonymous = client.get("/map").json()
        keyed = client.get("/map", headers={"X-API-Key": API_KEY}).json()
    assert "map_dir" not in anonymous and anonymous["places"] == keyed["places"]
    assert not [s for s in strings(anonymous) if os.path.isabs(s) or str(live.dir) in s]
    assert keyed["map_dir"] == str(live.dir)


@pytest.mark.parametrize(
    "failure, status",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/srv/secret/map/store.h5"), 507),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/srv/secret/map/store.h5"), 507),
        (OSError(errno.EROFS, "Read-only file system", "/srv/secret/map/live-images/x"), 409),
        (OSError(errno.ENAMETOOLONG, "File name too long", "/srv/secret/map/live-images/" + "字" * 90), 422),
        (OSError(errno.ENOTDIR, "Not a directory", "/srv/secret/map/live-images/a.jpg/b.jpg"), 409),
        (StorageFullError("the map's disk is full"), 507),
        (ReadOnlyMapError("the map's live-images folder is read-only"), 409),
        (MapDamagedError("descriptors.npy does not belong to this map"), 503),
        (StateNotPreparedError("run vprkit rerank prepare MAP --rerank NAME"), 409),
        (DecodeBusyError("upload.jpg: the server is busy decoding other images; retry later"), 503),
        (RuntimeError("an internal bug at /srv/secret/module.py line 3"), 500),
    ],
)
def test_a_failed_write_is_a_one_line_json_answer(live, corridor_dir, monkeypatch, failure, status):
    """Whatever escapes a write becomes its status with a one-line JSON detail: no traceback, no server path."""

    def failing_add(*args, **kwargs):
        raise failure

    monkeypatch.setattr(live, "add_place", failing_add)
    image = (corridor_dir / "query" / key(52)).read_bytes()
    with running(live) as client:
        answer = client.post("/places", content=image, params={"key": "x.jpg"}, headers={"X-API-Key": API_KEY})
        assert answer.status_code == status, answer.text
        detail = answer.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
        assert "/srv/secret" not in detail
        assert (answer.headers.get("retry-after") is not None) == (status == 503)  # a 503 says when to retry
        assert client.get("/health").status_code == 200


def test_error_status_table():
    assert error_status(MapDamagedError("x")) == 503
    assert error_status(StorageFullError("x")) == 507
    assert error_status(ReadOnlyMapError("x")) == 409
    assert error_status(StateNotPreparedError("x")) == 409
    assert error_status(DecodeBusyError("x")) == 503  # more specific than ImageReadError's 422


def test_limits_are_checked():
    for bad in ({"header_timeout_s": 0}, {"max_model_requests": -1}, {"body_timeout_s": float("nan")}):
        with pytest.raises(Exception, match="must be a positive number"):
            ServiceLimits(**bad)
    assert ServiceLimits(max_connections=0, max_connections_per_client=0).max_connections == 0  # 0: no cap
    json.dumps(ServiceLimits().__dict__)  # plain values (shown by the CLI's --help)


def test_library_errors_never_tell_a_client_where_the_map_lives(live, corridor_dir, monkeypatch):
    """A library message names files for the CLI user; over HTTP the map's folder reads MAP_DIR."""

    def failing_add(*args, **kwargs):
        raise ReadOnlyMapError(f"cannot write {live.dir.resolve()}/live-images/x.jpg (Read-only file system)")

    monkeypatch.setattr(live, "add_place", failing_add)
    image = (corridor_dir / "query" / key(52)).read_bytes()
    with running(live) as client:
        answer = client.post("/places", content=image, params={"key": "x.jpg"}, headers={"X-API-Key": API_KEY})
    assert answer.status_code == 409
    assert answer.json()["detail"] == "cannot write MAP_DIR/live-images/x.jpg (Read-only file system)"
