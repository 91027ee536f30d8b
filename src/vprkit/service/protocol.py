"""uvicorn's h11 protocol with the connection limits of :mod:`.limits`: head and body timeouts, connection caps.

uvicorn alone bounds neither: it arms its keep-alive timer only after a first response (a connection
that never sends a byte, or sends a head one header at a time, stays forever), never times out a body,
and its ``limit_concurrency`` counts *connections*, so a handful of idle sockets made every request a
503, ``/health`` included. :func:`guarded_protocol` returns a subclass of uvicorn's ``H11Protocol``
(given to ``uvicorn.Config(http=...)``) that adds, per connection, one timer whose meaning follows
h11's view of the client:

- waiting for a request head (h11 ``IDLE``): a deadline ``header_timeout_s`` after the connection opened
  or the first byte of the head arrived; not extended by further bytes;
- receiving a body (``SEND_BODY``): ``body_timeout_s`` after the last byte, and also (a body trickled a
  byte every few seconds never pauses that long) when less than ``min_body_rate`` bytes/s have arrived on
  average after a grace of ``body_timeout_s`` (:class:`BodyClock`, as Apache's mod_reqtimeout MinRate);
  time the service has paused reading (the app has not taken the buffered body yet) is not the client's;
- otherwise (request complete, answer pending) no timer: the answer is the service's to give, and
  between requests uvicorn's own keep-alive timer runs.

The caps are kept by a :class:`ConnectionRegistry` per server (every connection of the server shares
it; all of it runs on the event loop thread, so it needs no lock). uvicorn's internals used here
(``conn``, ``cycle``, ``flow``, ``transport``, ``on_response_complete``) are those of its h11
implementation since 0.2x; the service selects this protocol explicitly, also when httptools is
installed.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .limits import ServiceLimits

logger = logging.getLogger(__name__)

TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
REFUSED_ANSWER = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
HEAD_TIMEOUT = "header"
BODY_TIMEOUT = "body"


def _answer(start: bytes, text: str, extra_headers: bytes = b"") -> bytes:
    """A complete HTTP/1.1 answer written straight to the socket (no h11 state: the connection closes after it)."""
    body = text.encode()
    return start + extra_headers + f"content-length: {len(body)}\r\n\r\n".encode() + body


class ConnectionRegistry:
    """The open connections of one server by client address, in opening order: the caps and who makes room."""

    def __init__(self, limits: ServiceLimits):
        self.limits = limits
        self.by_client: dict[str, dict["GuardedH11Protocol", None]] = {}
        self.count = 0

    def admit(self, conn: "GuardedH11Protocol") -> bool:
        """Register ``conn``, closing the longest-idle connection of a full group to make room; False: refuse it."""
        group = self.by_client.setdefault(conn.address, {})
        per_client, total = self.limits.max_connections_per_client, self.limits.max_connections
        if per_client and len(group) >= per_client and not self._evict(group):
            return False
        if total and self.count >= total and not self._evict(c for g in self.by_client.values() for c in g):
            return False
        group[conn] = None
        self.count += 1
        return True

    def release(self, conn: "GuardedH11Protocol") -> None:
        group = self.by_client.get(conn.address, {})
        if conn in group:
            del group[conn]
            self.count -= 1
        if not group:
            self.by_client.pop(conn.address, None)

    @staticmethod
    def _evict(candidates) -> bool:
        """Close the candidate idle the longest (no request in progress); False when every one is busy."""
        idle = [c for c in candidates if c.is_idle and not c.transport.is_closing()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        logger.info("%s: connection idle for %.1f s closed to make room", oldest.address, oldest.idle_for())
        oldest.close_now()
        return True


class BodyClock:
    """When a request body must have arrived: within ``body_timeout_s`` of its last byte, and by
    ``start + body_timeout_s + received / min_body_rate`` (a minimum average rate after a grace period)."""

    def __init__(self, limits: ServiceLimits, now: float):
        self.limits = limits
        self.started = self.last = now
        self.received = 0

    def got(self, size: int, now: float) -> None:
        self.received += size
        self.last = now

    def credit(self, seconds: float) -> None:
        """Time the service itself did not read: not counted against the client."""
        self.started += seconds
        self.last += seconds

    def deadline(self) -> tuple[float, str]:
        """(when, why) the body is late: the nearer of the silence and the rate deadlines."""
        silence = self.last + self.limits.body_timeout_s
        rate = self.started + self.limits.body_timeout_s + self.received / self.limits.min_body_rate
        if silence <= rate:
            return silence, f"no part of the request body arrived for {self.limits.body_timeout_s:g} s"
        return rate, f"the request body arrived slower than {self.limits.min_body_rate:g} bytes/s"


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` with the timers and caps of the module docstring (subclassed per server by
    :func:`guarded_protocol`, which sets ``limits`` and ``registry``)."""

    limits: ClassVar[ServiceLimits]
    registry: ClassVar[ConnectionRegistry]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.idle_since = time.monotonic()
        self.address = ""
        self._admitted = False
        self._timer = None
        self._timer_kind: str | None = None
        self._head_started = False
        self._body: BodyClock | None = None

    # ---- connection life --------------------------------------------------------------------
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.address = self.client[0] if self.client else ""
        if not self.registry.admit(self):
            logger.warning("%s: connection refused (connection limit reached, every connection busy)", self.address)
            transport.write(
                _answer(
                    REFUSED_ANSWER, "too many connections", f"retry-after: {self.limits.retry_after_s}\r\n".encode()
                )
            )
            transport.close()
            return
        self._admitted = True
        self._follow_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._admitted:
            self.registry.release(self)
            self._admitted = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self.conn.their_state
        if before is h11.IDLE:
            self._head_started = True
        super().data_received(data)
        if before is h11.SEND_BODY and self._body is not None:
            self._body.got(len(data), time.monotonic())
        self._follow_client()

    def on_response_complete(self) -> None:
        self.idle_since = time.monotonic()
        self._head_started = False
        super().on_response_complete()
        self._follow_client()  # a pipelined request may have begun without new data

    @property
    def is_idle(self) -> bool:
        """No request in progress: before a complete head, or after the answer to the last one."""
        return self.cycle is None or self.cycle.response_complete

    def idle_for(self) -> float:
        return time.monotonic() - self.idle_since

    def close_now(self) -> None:
        """Close the connection at once (an idle one making room, or a timed-out one)."""
        self._cancel_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's reads now see a disconnect, its writes are dropped
            self.cycle.message_event.set()
        self.transport.close()

    # ---- timers -----------------------------------------------------------------------------
    def _follow_client(self) -> None:
        """Arm the timer h11's view of the client calls for (see the module docstring)."""
        if self.transport.is_closing():
            self._cancel_timer()
            return
        state = self.conn.their_state
        if state is not h11.SEND_BODY:
            self._body = None
        elif self._body is None:
            self._body = BodyClock(self.limits, time.monotonic())
        if state is h11.IDLE and (self._head_started or self.cycle is None):
            if self._timer_kind != HEAD_TIMEOUT:
                self._arm(HEAD_TIMEOUT, self.limits.header_timeout_s)
        elif self._body is not None:
            self._arm(BODY_TIMEOUT, max(0.0, self._body.deadline()[0] - time.monotonic()))
        else:
            self._cancel_timer()

    def _arm(self, kind: str, seconds: float) -> None:
        self._cancel_timer()
        self._timer_kind = kind
        self._timer = self.loop.call_later(seconds, self._timed_out, kind)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_kind = None, None

    def _timed_out(self, kind: str) -> None:
        self._timer, self._timer_kind = None, None
        if self.transport.is_closing():
            return
        if kind == BODY_TIMEOUT:
            if self._body is None:
                return
            now = time.monotonic()
            if self.flow.read_paused:  # the service stopped reading: not the client's delay
                self._body.credit(now - self._body.last)
                self._follow_client()
                return
            deadline, why = self._body.deadline()
            if now < deadline:
                self._follow_client()
                return
        else:
            why = f"the request head did not arrive within {self.limits.header_timeout_s:g} s"
        unanswered = self.cycle is not None and not self.cycle.response_started and not self.cycle.disconnected
        if (kind == HEAD_TIMEOUT and self._head_started) or (kind == BODY_TIMEOUT and unanswered):
            # closing cuts the app off (its reads see a disconnect, its writes are dropped): this is the answer
            self.transport.write(_answer(TIMEOUT_ANSWER, why))
        logger.info("%s: %s: 408, connection closed", self.address, why)
        self.close_now()


def guarded_protocol(limits: ServiceLimits) -> type[GuardedH11Protocol]:
    """A protocol class for one server: its ``limits`` and a fresh :class:`ConnectionRegistry`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "registry": ConnectionRegistry(limits)})
