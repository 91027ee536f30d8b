"""What is checked before a route sees a request: credentials, body sizes, the model queue (an ASGI middleware).

FastAPI reads and parses a request body before it resolves a route's dependencies, so a key check
written as a dependency ran after a 50 MB body had been read and parsed on the event loop. This
middleware decides from the request line and headers alone, before a byte of the body is read:

1. **No credentials in URLs.** A query parameter named like a credential (``api_key``, ``x-api-key``,
   ``token`` …; ``key`` everywhere except ``POST /places``, where it is the new place's id), or whose
   value is the service's key, is refused with 401 naming the header to use instead. The query string
   is redacted before the access log sees it, and :class:`RedactCredentials` redacts such parameters
   in uvicorn's access log in any case.
2. **The key before the body.** A write (any method but GET/HEAD/OPTIONS, except ``POST /localize``)
   without the service's key is a 401 at once; the body, if any, is never read by the app.
3. **Every body bounded.** A declared ``Content-Length`` over the route's limit is a 413 before reading;
   a streamed body is counted as it arrives and answered 413 when it passes the limit. Uploads
   (``POST /localize``, ``POST /places``) may carry ``max_upload_bytes``, everything else
   ``max_json_bytes``.
4. **A bounded model queue.** Model and write requests take one of ``max_model_requests`` slots when
   their body has fully arrived (a slow upload holds none) and give it back with their answer; none
   free: 503 with ``Retry-After``. Cheap reads (``/health``, ``/map``, ``GET /places/…``, the docs) take
   no slot and never wait for the model.
5. **No internals in answers.** An exception no handler of the app turned into an answer is logged with
   its traceback and answered with a one-line 500; the connection stays usable.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from typing import Any, Awaitable, Callable, MutableMapping
from urllib.parse import parse_qsl, quote

from starlette.requests import ClientDisconnect

from .limits import ServiceLimits

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_KEY_HEADER = "X-API-Key"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_WRITES = frozenset({("POST", "/localize")})  # work that needs no key: localising changes nothing
UPLOAD_ROUTES = frozenset({("POST", "/localize"), ("POST", "/places")})
BODY_METHODS = frozenset({"PATCH"})  # besides the uploads, the routes that read their body (PATCH /places/{id})
PLACE_KEY_ROUTES = frozenset({("POST", "/places")})  # where ``key`` is a place's id, not a credential
# Query parameter names (lower case, letters and digits only) that carry credentials.
CREDENTIAL_NAMES = frozenset(
    {"apikey", "xapikey", "token", "accesstoken", "authtoken", "auth", "authorization", "password", "secret"}
)
PLACE_KEY_PARAM = "key"
REDACTED = "[redacted]"
ACCESS_LOGGER = "uvicorn.access"
ACCESS_LOG_PATH_ARG = 2  # uvicorn's access log record args: (client, method, path?query, http version, status)
DISCONNECT: Message = {"type": "http.disconnect"}
INTERNAL_ERROR = "internal error: the server failed on this request (not the request's fault)"


KEY_REQUIRED = f"this service needs its API key for writes (header {API_KEY_HEADER})"


def is_api_key(given: str | bytes | None, api_key: str | None) -> bool:
    """Whether ``given`` is the service's key, compared in constant time; never true for a service without one."""
    if given is None or api_key is None:
        return False
    return hmac.compare_digest(given if isinstance(given, bytes) else given.encode(), api_key.encode())


def route_of(method: str, path: str) -> tuple[str, str]:
    """(method, path without a trailing slash): how the tables above name a route."""
    return method.upper(), path.rstrip("/") or "/"


def credential_params(method: str, path: str, query: str, api_key: str | None = None) -> list[str]:
    """Names of the query parameters of ``query`` that carry a credential (see the module docstring)."""
    found = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        plain = re.sub(r"[^a-z0-9]", "", name.lower())
        is_key_param = plain == PLACE_KEY_PARAM and route_of(method, path) not in PLACE_KEY_ROUTES
        holds_key = is_api_key(value, api_key)
        if plain in CREDENTIAL_NAMES or is_key_param or holds_key:
            found.append(name)
    return found


def redact_query(query: str, names: list[str]) -> str:
    """``query`` with the values of ``names`` replaced by ``[redacted]`` (other parameters kept)."""
    hidden = set(names)
    return "&".join(
        f"{quote(n, safe='')}={REDACTED if n in hidden else quote(v, safe='')}"
        for n, v in parse_qsl(query, keep_blank_values=True)
    )


class RedactCredentials(logging.Filter):
    """Redacts credential query parameters from uvicorn's access log lines (the logged path is args[2])."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) > ACCESS_LOG_PATH_ARG and isinstance(args[1], str):
            target = args[ACCESS_LOG_PATH_ARG]
            if isinstance(target, str) and "?" in target:
                path, _, query = target.partition("?")
                names = credential_params(args[1], path, query)
                if names:
                    record.args = (*args[:ACCESS_LOG_PATH_ARG], f"{path}?{redact_query(query, names)}", *args[3:])
        return True


def install_access_log_redaction() -> None:
    """Add :class:`RedactCredentials` to uvicorn's access logger (once; uvicorn's logging setup keeps filters)."""
    access = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactCredentials) for f in access.filters):
        access.addFilter(RedactCredentials())


def header(scope: Scope, name: bytes) -> bytes | None:
    """The value of request header ``name`` (lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


async def send_json(send: Send, status: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """A complete ``{"detail": ...}`` answer."""
    body = json.dumps({"detail": detail}).encode()
    start_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """The ASGI middleware of the module docstring, in front of the app."""

    def __init__(self, app: ASGIApp, api_key: str | None, limits: ServiceLimits, max_upload_bytes: int):
        self.app = app
        self.api_key = api_key
        self.limits = limits
        self.max_upload_bytes = max_upload_bytes
        self.in_flight = 0  # model slots taken (only touched on the event loop)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_of(scope["method"], scope["path"])
        refusal = self._refusal(scope, route)
        if refusal is not None:
            await send_json(send, *refusal)
            return
        # The slot is taken once the body is in, for routes that read one; at once for every other write
        # (a DELETE carrying a body it never reads must not slip past the queue).
        slot_after_body = _has_body(scope) and (route in UPLOAD_ROUTES or route[0] in BODY_METHODS)
        exchange = _Exchange(self, receive, send, route, slot_after_body)
        try:
            if exchange.wants_slot and not exchange.slot_after_body and not exchange.take_slot():
                await exchange.answer_busy()
                return
            await self.app(scope, exchange.receive, exchange.send)
        except ClientDisconnect:
            logger.debug("%s %s: the client left before its request was read", *route)
        except Exception:
            if exchange.answered:
                logger.debug("%s %s: the app failed after the guard had answered", *route, exc_info=True)
            elif exchange.started:
                raise  # half an answer sent: uvicorn closes the connection
            else:  # the last resort: the traceback to the server log, one line to the client, the connection kept
                logger.exception("%s %s: internal error", *route)
                await send_json(send, 500, INTERNAL_ERROR)
        finally:
            exchange.release()

    def _refusal(self, scope: Scope, route: tuple[str, str]) -> tuple[int, str, tuple] | None:
        """(status, detail, headers) when the request line and headers already decide, else None."""
        query = scope.get("query_string", b"").decode("latin-1")
        names = credential_params(*route, query, self.api_key)
        challenge = ((b"www-authenticate", API_KEY_HEADER.encode()),)
        if names:
            scope["query_string"] = redact_query(query, names).encode()  # what the access log will show
            listed = ", ".join(repr(n) for n in names)
            return (
                401,
                f"credentials are not accepted in the URL ({listed}): send the key in the {API_KEY_HEADER} header",
                challenge,
            )
        if self.api_key is not None and route[0] not in SAFE_METHODS and route not in OPEN_WRITES:
            given = header(scope, API_KEY_HEADER.lower().encode())
            if not is_api_key(given, self.api_key):
                return 401, KEY_REQUIRED, challenge
        declared = header(scope, b"content-length")
        limit = self.body_limit(route)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return 413, f"a body of {int(declared):,} bytes is larger than this route accepts ({limit:,} bytes)", ()
        return None

    def body_limit(self, route: tuple[str, str]) -> int:
        return self.max_upload_bytes if route in UPLOAD_ROUTES else self.limits.max_json_bytes


def _has_body(scope: Scope) -> bool:
    declared = header(scope, b"content-length")
    return header(scope, b"transfer-encoding") is not None or (declared is not None and declared not in (b"", b"0"))


class _Exchange:
    """One request through the guard: counts its body, holds its model slot, answers for it when the guard must."""

    def __init__(
        self, guard: RequestGuard, receive: Receive, send: Send, route: tuple[str, str], slot_after_body: bool
    ):
        self.guard = guard
        self._receive = receive
        self._send = send
        self.route = route
        self.slot_after_body = slot_after_body  # else the slot is taken before the app runs
        self.limit = guard.body_limit(route)
        self.wants_slot = route[0] not in SAFE_METHODS
        self.received = 0
        self.holds_slot = False
        self.started = False  # the app began its answer
        self.answered = False  # the guard answered: the app's reads see a disconnect, its writes are dropped

    async def receive(self) -> Message:
        if self.answered:
            return DISCONNECT
        message = await self._receive()
        if message["type"] != "http.request":
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.limit:
            await self.answer(413, f"the body is larger than this route accepts ({self.limit:,} bytes)")
            return DISCONNECT
        if self.wants_slot and not message.get("more_body", False) and not self.holds_slot and not self.take_slot():
            await self.answer_busy()
            return DISCONNECT
        return message

    async def send(self, message: Message) -> None:
        if not self.answered:
            self.started = True
            await self._send(message)

    async def answer(self, status: int, detail: str, headers: tuple = ()) -> None:
        """Answer for the app (unless it has begun its own answer) and cut it off."""
        if not self.started:
            await send_json(self._send, status, detail, headers)
        self.answered = True

    async def answer_busy(self) -> None:
        retry = self.guard.limits.retry_after_s
        await self.answer(
            503,
            f"the service is busy ({self.guard.in_flight} model requests in progress); retry in {retry} s",
            ((b"retry-after", str(retry).encode()),),
        )

    def take_slot(self) -> bool:
        if self.guard.in_flight >= self.guard.limits.max_model_requests:
            logger.warning("%s %s: 503, every model slot is taken", *self.route)
            return False
        self.guard.in_flight += 1
        self.holds_slot = True
        return True

    def release(self) -> None:
        if self.holds_slot:
            self.guard.in_flight -= 1
            self.holds_slot = False
