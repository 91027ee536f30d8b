"""Slow, idle and greedy clients on loopback (raw sockets): none of them locks out /health or the model.

Every test bounds its clients (a few dozen sockets, timeouts of a second or less) and starts its own
server with small limits over one LiveMap opened for the module.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator

import httpx
import pytest

from vprkit.pipeline.live import LiveMap
from vprkit.service import BackgroundServer, ServiceLimits, create_app

IDLE_CONNECTIONS = 40  # more than uvicorn's old limit_concurrency (32), which counted connections
SHORT_S = 0.5  # the head and body timeouts of these tests
SLACK_S = 2.0  # how much later than its timeout a connection may close on a loaded 2-core machine
ANOTHER_ADDRESS = "127.0.0.2"  # Linux routes all of 127/8 to loopback: a second client address


def key(i: int) -> str:
    return f"{i:07d}.jpg"


@pytest.fixture(scope="module")
def live(built_map, tmp_path_factory) -> LiveMap:
    """One live map for the module (these tests only read it)."""
    return LiveMap.open(shutil.copytree(built_map, tmp_path_factory.mktemp("slow") / "map"))


@contextmanager
def running(live: LiveMap, api_key: str | None = None, **limits) -> Iterator[tuple[str, int]]:
    """(host, port) of a server over ``live`` with ``ServiceLimits(**limits)``."""
    chosen = ServiceLimits(**limits)
    with BackgroundServer(create_app(live, api_key=api_key, limits=chosen), limits=chosen) as server:
        url = httpx.URL(server.url)
        yield url.host, url.port


def connect(address: tuple[str, int], source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(address, timeout=5.0, source_address=(source, 0))
    return sock


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or ``limit_s`` passes: then the connection is still open)."""
    start, data = time.monotonic(), b""
    sock.settimeout(0.05)
    while time.monotonic() - start < limit_s:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - start
        if not chunk:
            return data, time.monotonic() - start
        data += chunk
    raise AssertionError(f"still open after {limit_s} s; received {data[:200]!r}")


def is_open(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock`` open (whatever it had sent and was not read yet is consumed)."""
    sock.settimeout(0.1)
    try:
        while sock.recv(65536):
            pass
        return False
    except socket.timeout:
        return True
    except ConnectionResetError:
        return False


def http_get(address: tuple[str, int], path: str, source: str = "127.0.0.1") -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, base_url=f"http://{address[0]}:{address[1]}", timeout=10.0) as client:
        return client.get(path)


def test_idle_connections_leave_health_and_localize_answering(live, corridor_dir):
    """40 connected sockets that never send a byte: /health and /localize still answer (they made every request
    a 503 when uvicorn's limit_concurrency counted connections); the idle ones make room, oldest first."""
    with running(live) as address, ExitStack() as stack:
        idle = [stack.enter_context(connect(address)) for _ in range(IDLE_CONNECTIONS)]
        time.sleep(0.2)
        with httpx.Client(base_url=f"http://{address[0]}:{address[1]}", timeout=30.0) as client:
            assert client.get("/health").status_code == 200
            found = client.post("/localize", content=(corridor_dir / "ref" / key(4)).read_bytes())
            assert found.status_code == 200, found.text
            assert found.json()["matches"][0]["id"] == key(4)
        still_open = [s for s in idle if is_open(s)]
        # the per-address cap (16) holds: the newest idle sockets stay, the oldest were closed for the newcomers
        assert len(still_open) <= ServiceLimits().max_connections_per_client
        assert not is_open(idle[0]) and is_open(idle[-1])


def test_slowloris_head_and_silent_connections_are_closed(live):
    """A head sent one header line at a time is cut at the head timeout (408), however busy the trickle;
    a connection that sends nothing is closed at the same deadline."""
    with running(live, header_timeout_s=SHORT_S) as address:
        silent = connect(address)
        slow = connect(address)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        received, start = b"", time.monotonic()
        slow.settimeout(0.1)
        while time.monotonic() - start < SHORT_S + SLACK_S:
            try:
                slow.sendall(b"X-Pad: y\r\n")
                chunk = slow.recv(65536)
                if not chunk:
                    break
                received += chunk
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        elapsed = time.monotonic() - start
        assert SHORT_S * 0.8 <= elapsed < SHORT_S + SLACK_S, elapsed
        assert received.startswith(b"HTTP/1.1 408"), received
        data, waited = read_until_closed(silent, SLACK_S)
        assert data == b"" and waited < SLACK_S
        assert http_get(address, "/health").status_code == 200  # a prompt client is served as ever


def test_a_stalled_body_is_408_and_a_flowing_one_is_not(live):
    """A chunked body that stops is answered 408 and closed after the body timeout; one that keeps coming
    (longer in all than the timeout, never silent that long) is read to its end."""
    head = b"POST /localize HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
    with running(live, body_timeout_s=SHORT_S, min_body_rate=1.0) as address:
        stalled = connect(address)
        stalled.sendall(head + b"4\r\nabcd\r\n")
        data, waited = read_until_closed(stalled, SHORT_S + SLACK_S)
        assert data.startswith(b"HTTP/1.1 408"), data
        assert SHORT_S * 0.8 <= waited

        flowing = connect(address)
        flowing.sendall(head)
        for _ in range(6):  # 6 × SHORT_S/3 = twice the timeout in all
            time.sleep(SHORT_S / 3)
            flowing.sendall(b"4\r\nabcd\r\n")
        flowing.sendall(b"0\r\n\r\n")
        flowing.settimeout(10.0)
        answer = flowing.recv(65536)
        assert answer.startswith(b"HTTP/1.1 422"), answer  # read in full, then refused as not an image

        pipelined = connect(address)  # a request queued behind another (pipelining), its body then stalled
        pipelined.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + head + b"4\r\nabcd\r\n")
        data, waited = read_until_closed(pipelined, SHORT_S + SLACK_S)
        assert data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in data, data


def test_a_body_trickled_without_pauses_is_cut_by_the_minimum_rate(live):
    """A byte every 0.1 s never leaves the body silent for the timeout, but is far under the minimum average
    rate: 408 once the grace period and the rate allowance are used up (0.5 s + 60 B/s ÷ 100 B/s: ~1.25 s)."""
    head = b"POST /localize HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
    with running(live, body_timeout_s=SHORT_S, min_body_rate=100.0) as address:
        sock = connect(address)
        sock.sendall(head)
        received, pieces, start = b"", 0, time.monotonic()
        sock.settimeout(0.1)
        while time.monotonic() - start < 10 * SHORT_S:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                try:
                    sock.sendall(b"1\r\nA\r\n")
                    pieces += 1
                except (BrokenPipeError, ConnectionResetError):
                    break
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        elapsed = time.monotonic() - start
        assert received.startswith(b"HTTP/1.1 408") and b"slower than 100 bytes/s" in received, received
        assert 2 * SHORT_S <= elapsed < 2 * SHORT_S + SLACK_S and pieces >= 10, (elapsed, pieces)


def busy_connection(address: tuple[str, int], source: str = "127.0.0.1") -> socket.socket:
    """A connection with a request in progress: its head sent, its body not yet."""
    sock = connect(address, source)
    sock.sendall(b"POST /localize HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n")
    return sock


def test_connections_per_address_and_in_all_are_capped(live):
    """Per address: beyond the cap a new connection is refused (503, closed at once) when every one of that
    address's connections is busy, and takes the longest-idle one's place otherwise; other addresses are
    served meanwhile. In all: the same, across addresses."""
    with running(live, max_connections_per_client=3, max_connections=5) as address, ExitStack() as stack:
        busy = [stack.enter_context(busy_connection(address)) for _ in range(3)]
        time.sleep(0.2)
        refused = stack.enter_context(connect(address))
        data, waited = read_until_closed(refused, SLACK_S)
        assert data.startswith(b"HTTP/1.1 503") and b"retry-after" in data.lower() and waited < 1.0, data
        assert all(is_open(s) for s in busy)
        assert http_get(address, "/health", source=ANOTHER_ADDRESS).status_code == 200  # others unaffected

        for s in busy:  # finish their requests: the connections become idle (kept alive)
            s.sendall(b"x" * 1000)
            s.settimeout(10.0)
            assert s.recv(65536).startswith(b"HTTP/1.1 422")
        assert http_get(address, "/health").status_code == 200  # takes the longest-idle one's place
        assert not is_open(busy[0]) and is_open(busy[2])

        for s in busy:
            s.close()
        others = [stack.enter_context(busy_connection(address, source=f"127.0.0.{i}")) for i in range(3, 8)]
        time.sleep(0.2)  # 5 busy connections in all, from 5 addresses: the total cap, every one busy
        refused = stack.enter_context(connect(address, source="127.0.0.8"))
        data, _ = read_until_closed(refused, SLACK_S)
        assert data.startswith(b"HTTP/1.1 503"), data
        assert all(is_open(s) for s in others)


def test_model_requests_beyond_the_limit_are_503_while_health_answers(live, corridor_dir, monkeypatch):
    """Two model slots, both held by localisations waiting on the model: a third /localize and an add get
    503 with Retry-After at once; /health, /map and GET /places answer; the two held ones then finish."""
    release, entered = threading.Event(), threading.Semaphore(0)
    real_localize = live.localize

    def held_localize(*args, **kwargs):
        entered.release()
        assert release.wait(30.0)
        return real_localize(*args, **kwargs)

    monkeypatch.setattr(live, "localize", held_localize)
    image = (corridor_dir / "ref" / key(6)).read_bytes()
    with running(live, api_key="k", max_model_requests=2) as address:
        base = f"http://{address[0]}:{address[1]}"
        answers: list[httpx.Response] = []

        def localise() -> None:
            answers.append(httpx.post(f"{base}/localize", content=image, timeout=60.0))

        holders = [threading.Thread(target=localise) for _ in range(2)]
        for t in holders:
            t.start()
        for _ in holders:
            assert entered.acquire(timeout=30.0)
        with httpx.Client(base_url=base, timeout=10.0) as client:
            busy = client.post("/localize", content=image)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1", busy.text
            assert "busy" in busy.json()["detail"]
            add = client.post("/places", content=image, params={"key": "new.jpg"}, headers={"X-API-Key": "k"})
            assert add.status_code == 503
            # a write that never reads its body takes its slot at once (a body must not slip it past the queue)
            delete = client.request("DELETE", f"/places/{key(6)}", content=b"x", headers={"X-API-Key": "k"})
            assert delete.status_code == 503
            assert client.get("/health").status_code == 200
            assert client.get("/map").status_code == 200
            assert client.get(f"/places/{key(6)}").status_code == 200
            release.set()
            for t in holders:
                t.join(60.0)
            assert [a.status_code for a in answers] == [200, 200]
            again = client.post("/localize", content=image)  # the slots were given back
            assert again.status_code == 200 and again.json()["matches"][0]["id"] == key(6)
