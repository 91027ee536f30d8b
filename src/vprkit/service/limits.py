"""What the service allows one client and all clients together: each limit, its default, and why.

A served map has one model and one CPU budget; what must stay bounded is what a client can hold
without doing useful work (a socket, a half-sent request, a queued model request). Two layers:

**Connections** (:mod:`.protocol`, uvicorn's h11 protocol with timers and caps):

- ``header_timeout_s`` = 10 s: a connection must deliver a complete request head (request line and
  headers) within this time of opening, or of the first byte of its next request; otherwise it is
  closed (a 408 first when it had sent part of a head). A slowloris client, which sends a header line
  every few seconds, holds a socket for at most this long. Real clients send a head in one packet.
- ``body_timeout_s`` = 15 s: the longest silence allowed between two pieces of a request body; longer:
  408 and the connection closed. A trickled body cannot hold a connection (and the upload memory it
  has sent) indefinitely, while a slow but moving upload still arrives. Time the service itself stops
  reading (its buffer is full while the app is busy) is not counted against the client.
- ``min_body_rate`` = 1024 bytes/s: after a grace of ``body_timeout_s``, a body must arrive at this
  average rate (the deadline moves by one second per KiB received, as Apache's mod_reqtimeout MinRate):
  a body trickled a byte every few seconds never pauses for ``body_timeout_s`` but is cut by this.
  A 20 MiB upload may take up to about 5.7 hours at this rate; a phone on a poor link sends 10× faster.
- ``keep_alive_timeout_s`` = 5 s: an idle connection between requests is closed after this (uvicorn's
  ``timeout_keep_alive``; its default). Clients reconnect transparently.
- ``max_connections`` = 256: connections open at once. When full, a new connection takes the place of
  the longest-idle one (no request in progress: between requests or not yet a complete head), as
  nginx reuses keep-alive connections; only when every connection is handling a request is the new one
  refused (a 503 and closed). So idle or slowloris connections never lock out ``/health``. 256 keeps
  well inside a default 1024 file-descriptor limit.
- ``max_connections_per_client`` = 16: the same cap per client address (the peer IP), enforced first:
  one address cannot take more than this many of the ``max_connections``; beyond it its own longest-idle
  connection makes room, or the new one is refused. Other addresses are unaffected. Behind a reverse
  proxy every connection comes from the proxy: raise this to ``max_connections`` (or 0: off) and let
  the proxy limit per client.
- ``max_header_bytes`` = 16 KiB: the largest request head (h11's ``max_incomplete_event_size``); larger:
  400 and closed.

**Requests** (:mod:`.guard`, an ASGI middleware in front of the routes):

- ``max_model_requests`` = 16: model and write requests (``POST /localize``, ``POST``/``PATCH``/``DELETE
  /places``) in progress at once, counted from the moment their body has arrived (a slow upload holds no
  slot) until their answer. Beyond it: 503 with ``Retry-After`` at once, never an unbounded queue.
  Sixteen keeps the model busy with batches (see ``LiveMap``) while a waiting request is answered
  within roughly 16 model passes. ``GET /health``, ``GET /map``, ``GET /places/{id}`` and the docs are
  outside this queue: they never wait for the model.
- ``max_json_bytes`` = 64 KiB: the largest JSON body (``PATCH /places/{id}``: a pose is under 200 bytes)
  and the largest body of any request that is not an upload; larger: 413 before it is read.
- ``retry_after_s`` = 1: the ``Retry-After`` of a 503.

**Streams** (:mod:`.sequences`, the sequence mode of ``POST /localize?stream=ID``):

- ``max_streams`` = 32: client streams held at once. Each holds its sequence window, ``(2·4·L + 8)·N`` bytes
  for L frames and N places (L = 10 on a 10 000-place map: 0.9 MB; 32 such streams: 29 MB); a new stream
  beyond the cap is a 503 with ``Retry-After`` (streams in use are never evicted by a newcomer).
- ``stream_ttl_s`` = 300 s: a stream unused this long is forgotten (a robot paused for five minutes has
  moved; its next frame starts a new window). Streams expire as other requests arrive.
- ``max_sequence_length`` = 50 frames: the longest window a stream may ask for (``sequence_length``); it
  bounds a stream's memory (worst case 50 frames on 100 000 places: 40 MB) and its cost per frame.

Uploads keep their own limit (``max_upload_bytes``, 20 MiB by default; 413). Raw bodies being received
are bounded by ``max_connections × max_upload_bytes`` in all and ``max_connections_per_client ×
max_upload_bytes`` per address.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..errors import ConfigError

KIB = 1024
# Caps where 0 means "no cap"; every other limit must be positive.
OPTIONAL_CAPS = ("max_connections", "max_connections_per_client")


@dataclass(frozen=True)
class ServiceLimits:
    """The limits described in this module's docstring (0 for a connection cap means no cap)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 15.0
    min_body_rate: float = 1024.0
    keep_alive_timeout_s: float = 5.0
    max_connections: int = 256
    max_connections_per_client: int = 16
    max_header_bytes: int = 16 * KIB
    max_model_requests: int = 16
    max_json_bytes: int = 64 * KIB
    retry_after_s: int = 1
    max_streams: int = 32
    stream_ttl_s: float = 300.0
    max_sequence_length: int = 50

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not numeric or value < 0 or (value == 0 and field.name not in OPTIONAL_CAPS):
                raise ConfigError(f"service limit {field.name} must be a positive number, got {value!r}")


DEFAULT_LIMITS = ServiceLimits()
