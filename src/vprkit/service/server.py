"""Running the app: ``serve`` (what ``vprkit serve`` calls) and :class:`BackgroundServer` (tests, benchmarks, notebooks).

One uvicorn worker: the map and its models are loaded once, in this process, and shared by every
request (a second worker would load a second copy and could not see the first one's writes).

Both run uvicorn with :func:`server_config`: the h11 protocol of :mod:`.protocol` (head and body
timeouts, connection caps by :class:`~.limits.ServiceLimits`), uvicorn's keep-alive timeout and
head-size limit from the same limits, and no ``limit_concurrency`` (it counts connections, so idle
sockets turned every request into a 503; the model queue is bounded per request by :mod:`.guard`).
The access log redacts credentials in query strings (:class:`~.guard.RedactCredentials`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Callable, Sequence

import uvicorn
from fastapi import FastAPI

from ..errors import ConfigError, VPRKitError
from ..pipeline.live import LiveMap
from .app import DEFAULT_MAX_UPLOAD_BYTES, create_app
from .guard import install_access_log_redaction
from .limits import DEFAULT_LIMITS, ServiceLimits
from .protocol import guarded_protocol

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
STARTUP_TIMEOUT_S = 30.0
POLL_S = 0.01


def base_url(host: str, port: int) -> str:
    """``http://host:port`` (IPv6 hosts in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def server_config(
    app: FastAPI,
    host: str,
    port: int,
    limits: ServiceLimits = DEFAULT_LIMITS,
    access_log: bool = True,
    log_level: str = "info",
    lifespan: str = "auto",
) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` with the connection ``limits`` (see the module docstring)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        workers=1,
        http=guarded_protocol(limits),
        timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works (call_later)
        h11_max_incomplete_event_size=limits.max_header_bytes,
        limit_concurrency=None,
        access_log=access_log,
        log_level=log_level,
        lifespan=lifespan,
    )
    install_access_log_redaction()  # after uvicorn's logging setup, which the config has just run
    return config


def serve(
    map_dir: str | os.PathLike,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    device: str | None = None,
    access_log: bool = True,
    limits: ServiceLimits = DEFAULT_LIMITS,
    prepare_rerank: Sequence[str] = (),
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``map_dir`` over HTTP until interrupted. ``on_ready(url)`` is called once the map and models are loaded.

    ``prepare_rerank``: re-ranking presets whose state is prepared at start-up when missing (see
    :class:`LiveMap`), so that ``?rerank=NAME`` never builds it during a request. A map that cannot be
    opened (damaged, of another preset, unreadable) raises before anything listens.
    """
    listening = listening_socket(host, port)  # a busy port is one error before minutes of loading, not after
    try:
        options = {"prepare_rerank": tuple(prepare_rerank)} if prepare_rerank else {}

        def reopen() -> LiveMap:  # POST /admin/reload opens the folder as this start did
            return LiveMap.open(map_dir, device=device, **options)

        app = create_app(reopen(), api_key=api_key, max_upload_bytes=max_upload_bytes, limits=limits, reopen=reopen)
        bound_port = listening.getsockname()[1]
        if on_ready is not None:
            on_ready(base_url(host, bound_port))
        uvicorn.Server(server_config(app, host, bound_port, limits, access_log=access_log)).run(sockets=[listening])
    finally:
        listening.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: a free port), or a :class:`ConfigError` naming what holds it back
    (port taken, address not on this machine, privileged port) — uvicorn would print its own error and exit 1."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse the port at once
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or stop what holds it"
        ) from None
    return sock


class BackgroundServer:
    """A uvicorn server for ``app`` in a thread of this process, on a free port of ``host`` (loopback by default).

    Use as a context manager; ``url`` is set once it listens. ``stop()`` ends it (requests in flight finish).
    ``limits``: the connection limits (the request limits are the app's, given to :func:`create_app`).
    """

    def __init__(
        self,
        app: FastAPI,
        host: str = DEFAULT_HOST,
        port: int = 0,
        access_log: bool = False,
        limits: ServiceLimits = DEFAULT_LIMITS,
        log_level: str = "warning",
    ):
        config = server_config(app, host, port, limits, access_log=access_log, log_level=log_level, lifespan="off")
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
