"""The service's sequence mode: frames of a client's stream localised together with the frames before them.

A client names its stream (``POST /localize?stream=ID``, optionally ``&sequence_length=L``, default
:data:`DEFAULT_SEQUENCE_LENGTH`) and sends its frames one request after another, in order; each answer is
the frame's sequence-matched places with an estimate (:mod:`vprkit.pipeline.sequence_frames`) and a
``stream`` block (frames in the window, whether the stream was created or restarted). The map's rows must
be in route order, as for ``vprkit localize --sequence-length``.

Bounded memory: a stream holds its matcher's window, ``(2 · 4 · L + 8) · N`` bytes for N places (10 frames
on a 10 000-place map: 0.9 MB), plus one copy of the map's global descriptors shared by all streams. The
table holds at most ``ServiceLimits.max_streams`` streams of at most ``max_sequence_length`` frames; a
stream unused for ``stream_ttl_s`` expires (its next frame starts a new one); a new stream beyond the cap
is a 503 (``DELETE /streams/{id}`` ends one at once). A stream whose map changed since its last frame (a
place added, removed or moved, or ``POST /admin/reload``) restarts: rows of two maps are never mixed.

Stream ids are the client's: anyone who knows one can send frames into that stream, so clients should use
unguessable ids (a UUID). A stream's frames are matched one at a time; send each after the previous answer
(frames of one stream sent at once are matched in the order their descriptors are ready).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConfigError, ImageReadError, VPRKitError
from ..pipeline.live import LiveMap
from ..pipeline.sequence_frames import LiveSequence, MapGlobals, describe_live
from ..retrieval.sequence import SequenceSettings
from .limits import ServiceLimits

# The usual sequence length of SeqSLAM and of `vprkit localize --sequence-length` examples.
DEFAULT_SEQUENCE_LENGTH = 10
# A stream id: letters, digits and . _ : - (a UUID fits), at most 64 characters; nothing that needs escaping.
STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


class TooManyStreamsError(VPRKitError):
    """Every stream slot is taken by a stream still in use (a 503: retry later, or end a stream)."""


@dataclass(eq=False)
class Stream:
    """One client stream: its sequence state, the lock that keeps its frames in order, and when it was last used."""

    id: str
    sequence: LiveSequence
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock)


def check_stream_id(stream_id: str) -> str:
    if not STREAM_ID.match(stream_id or ""):
        raise ConfigError(
            f"stream id {stream_id[:80]!r} is not valid: use 1–64 letters, digits and . _ : - (e.g. a UUID)"
        )
    return stream_id


class StreamTable:
    """The service's streams, bounded in number and length, expiring after ``limits.stream_ttl_s`` unused
    (``clock``: seconds, monotonic; a test passes a fake one)."""

    def __init__(self, limits: ServiceLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.globals = MapGlobals()  # the map's descriptors, shared by every stream
        self._streams: dict[str, Stream] = {}
        self._expired: set[str] = set()  # ids whose stream ended by inactivity (only to say so; bounded too)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def settings(self, sequence_length: int | None) -> SequenceSettings:
        """A stream's sequence settings (online: anchored at the newest frame), its length checked against the cap."""
        length = DEFAULT_SEQUENCE_LENGTH if sequence_length is None else int(sequence_length)
        if not 2 <= length <= self.limits.max_sequence_length:
            raise ConfigError(f"sequence_length must be 2…{self.limits.max_sequence_length} frames, got {length}")
        return SequenceSettings(length=length)

    def acquire(self, stream_id: str, sequence_length: int | None = None) -> tuple[Stream, str | None]:
        """The stream ``stream_id`` (created if new or expired; restarted if its length changed), and why it
        is new (``"created"``, ``"expired"``, ``"sequence length changed"``) or None."""
        check_stream_id(stream_id)
        settings = self.settings(sequence_length)
        now = self.clock()
        with self._lock:
            self._expire(now)
            stream = self._streams.get(stream_id)
            why = None
            if stream is None:
                why = "expired" if stream_id in self._expired else "created"
                if len(self._streams) >= self.limits.max_streams:
                    raise TooManyStreamsError(
                        f"{self.limits.max_streams} streams are in use; end one (DELETE /streams/ID) or retry "
                        f"after {self.limits.stream_ttl_s:g} s of inactivity has expired one"
                    )
            elif stream.sequence.settings != settings:
                why = "sequence length changed"
            if why is not None:
                stream = self._streams[stream_id] = Stream(stream_id, LiveSequence(settings), now)
                self._expired.discard(stream_id)
            stream.last_used = now
            return stream, why

    def end(self, stream_id: str) -> bool:
        """Forget the stream now; False when there was none."""
        with self._lock:
            return self._streams.pop(stream_id, None) is not None

    def expire(self) -> int:
        """Forget the streams unused for ``stream_ttl_s``; how many were."""
        with self._lock:
            return self._expire(self.clock())

    def _expire(self, now: float) -> int:
        old = [k for k, s in self._streams.items() if now - s.last_used > self.limits.stream_ttl_s]
        if old and len(self._expired) + len(old) > self.limits.max_streams:
            self._expired.clear()
        self._expired.update(old)
        for k in old:
            del self._streams[k]
        return len(old)


def localize_in_stream(
    table: StreamTable, live: Any, stream_id: str, sequence_length: int | None, name: str, picture: Any, top_k: int
) -> dict[str, Any]:
    """One frame of stream ``stream_id`` localised with the stream's earlier frames: the answer's JSON body."""
    current: LiveMap = getattr(live, "current", live)  # a served map's reload swaps the map between requests
    stream, why = table.acquire(stream_id, sequence_length)  # before the model: a full table costs no pass
    described = describe_live(current, {name: picture})[0]
    if described.descriptor is None:
        raise ImageReadError(described.error or f"{name}: not described")
    with stream.lock:
        result, restarted = stream.sequence.localize(current, name, described.descriptor, top_k, table.globals)
        stream.last_used = table.clock()
        frames = stream.sequence.matcher.seen
    out = result.to_dict()
    out["stream"] = {
        "id": stream_id,
        "sequence_length": stream.sequence.settings.length,
        "frames": frames,
        "window_frames": min(frames, stream.sequence.settings.length),
        "started": why if why is not None else (None if restarted is None else f"restarted: {restarted}"),
    }
    return out
