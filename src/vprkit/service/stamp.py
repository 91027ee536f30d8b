"""Every answer says which request it answers and when: ``X-Request-ID`` and ``X-Server-Time`` headers.

A robot that logs its localisations, or an operator reading the service's log beside a client's, pairs
them by the request id: the client's own ``X-Request-ID`` when it sends a usable one (echoed as is), else
one generated here. ``X-Server-Time`` is the server's clock when the request arrived (UTC, ISO 8601 with
milliseconds), so a client can tell a stale answer and measure its clock's offset. Routes read both from
the ASGI scope (:func:`request_id`, :func:`request_time`) to put them in JSON bodies too.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, MutableMapping

REQUEST_ID_HEADER = "X-Request-ID"
SERVER_TIME_HEADER = "X-Server-Time"
SCOPE_KEY = "vprkit.request_id"
TIME_KEY = "vprkit.request_time"
# A client's id is echoed only when it is short and plain (it lands in logs and headers).
USABLE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


def server_time() -> str:
    """Now, UTC, ISO 8601 with milliseconds (``2026-12-07T20:15:03.125Z``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_id(scope: Scope) -> str | None:
    """The id :class:`RequestStamp` gave this request (None outside it)."""
    return scope.get(SCOPE_KEY)


def request_time(scope: Scope) -> str | None:
    """When this request arrived, as :class:`RequestStamp` stamped it (None outside it)."""
    return scope.get(TIME_KEY)


class RequestStamp:
    """ASGI middleware: an id per HTTP request (the client's if usable) and the server time on every answer."""

    def __init__(self, app: Callable[..., Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        rid = given if USABLE_ID.fullmatch(given) else uuid.uuid4().hex
        scope[SCOPE_KEY] = rid
        scope[TIME_KEY] = arrived = server_time()

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers += [
                    (REQUEST_ID_HEADER.lower().encode(), rid.encode()),
                    (SERVER_TIME_HEADER.lower().encode(), arrived.encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, stamped)
