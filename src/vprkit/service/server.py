"""Running the app: ``serve`` (what ``vprkit serve`` calls) and :class:`BackgroundServer` (tests, benchmarks, notebooks).

One uvicorn worker: the map and its models are loaded once, in this process, and shared by every
request (a second worker would load a second copy and could not see the first one's writes).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import uvicorn
from fastapi import FastAPI

from ..errors import VPRKitError
from ..pipeline.live import LiveMap
from .app import DEFAULT_MAX_UPLOAD_BYTES, create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# Requests handled at once before uvicorn answers 503: bounds the memory of uploads held in flight.
DEFAULT_CONCURRENCY_LIMIT = 32
STARTUP_TIMEOUT_S = 30.0
POLL_S = 0.01


def base_url(host: str, port: int) -> str:
    """``http://host:port`` (IPv6 hosts in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(
    map_dir: str | os.PathLike,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    device: str | None = None,
    access_log: bool = True,
    concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``map_dir`` over HTTP until interrupted. ``on_ready(url)`` is called once the map and models are loaded."""
    live = LiveMap.open(map_dir, device=device)
    app = create_app(live, api_key=api_key, max_upload_bytes=max_upload_bytes)
    if on_ready is not None:
        on_ready(base_url(host, port))
    uvicorn.run(
        app,
        host=host,
        port=port,
        workers=1,
        access_log=access_log,
        limit_concurrency=concurrency_limit,
        log_level="info",
    )


class BackgroundServer:
    """A uvicorn server for ``app`` in a thread of this process, on a free port of ``host`` (loopback by default).

    Use as a context manager; ``url`` is set once it listens. ``stop()`` ends it (requests in flight finish).
    """

    def __init__(
        self,
        app: FastAPI,
        host: str = DEFAULT_HOST,
        port: int = 0,
        access_log: bool = False,
        concurrency_limit: int = DEFAULT_CONCURRENCY_LIMIT,
    ):
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            access_log=access_log,
            log_level="warning",
            limit_concurrency=concurrency_limit,
            lifespan="off",
        )
        self.server = uvicorn.Server(config)
        self.host = host
        self.url = ""
        self._thread = threading.Thread(target=self.server.run, name="vprkit-serve", daemon=True)

    def start(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise VPRKitError(f"the server on {self.host} did not start (port taken or bind refused)")
            time.sleep(POLL_S)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = base_url(self.host, port)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(STARTUP_TIMEOUT_S)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
