"""Bounded model concurrency with batching, for a map served to many clients at once.

The backbone runs at most ``slots`` passes at a time: PyTorch already spreads one pass over the
configured threads, and concurrent passes on a small CPU only multiply threads and stretch every
request's latency. Requests that arrive while the model is busy queue up, and the next one to get
the model takes every queued request with the same settings (up to a batch of images), so under
load the CPU per image drops while an idle service answers each request at once.

The model's slots are handed out in arrival order (:class:`FairSlots`): a thread that just finished a
pass and asks again goes behind those already waiting, so no client — reader or writer computing an
added place's descriptor — is starved by a faster-looping one.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping

from ..errors import ConfigError

# One forward pass at a time: on a 2-core CPU a second concurrent pass only doubles both latencies.
DEFAULT_INFERENCE_SLOTS = 1


class FairSlots:
    """A semaphore of ``slots`` handed out first come, first served (``with slots:`` holds one).

    :class:`threading.Semaphore` lets the releasing thread take a slot straight back, ahead of threads
    that waited the whole time; measured with three clients looping on one map, one got 49 answers and
    the others one each in 6 s. Here a slot goes to the longest-waiting thread.
    """

    def __init__(self, slots: int) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._free = slots
        self._waiting: deque[object] = deque()

    def __enter__(self) -> "FairSlots":
        me = object()
        with self._cond:
            self._waiting.append(me)
            try:
                while self._waiting[0] is not me or not self._free:
                    self._cond.wait()
            except BaseException:
                self._waiting.remove(me)
                self._cond.notify_all()
                raise
            self._waiting.popleft()
            self._free -= 1
            self._cond.notify_all()  # the next in line may take another free slot
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._free += 1
            self._cond.notify_all()


@dataclass(eq=False)
class _Request:
    """One call waiting for the model, or done (results or error)."""

    frames: dict[str, Any]
    settings: Hashable  # requests batch together only with equal settings
    results: list | None = None
    error: BaseException | None = None
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)


# Runs one batch: (frames named "<i>/<key>", settings) → one result per frame, in order, each with a ``query``.
BatchRunner = Callable[[dict[str, Any], Hashable], list]


class RequestBatcher:
    """Queues requests for a model with ``slots`` concurrent passes and runs them in batches of ``batch_images``."""

    def __init__(self, slots: int = DEFAULT_INFERENCE_SLOTS, batch_images: int = 1) -> None:
        if slots < 1:
            raise ConfigError(f"inference_slots must be at least 1, got {slots}")
        self.inference = FairSlots(slots)  # also held by other model work (adding a place)
        self.batch_images = batch_images
        self._queue: list[_Request] = []
        self._queue_lock = threading.Lock()

    def run(self, frames: Mapping[str, Any], settings: Hashable, runner: BatchRunner) -> list:
        """The results of ``frames`` (in their order, named by their keys), computed alone or in a batch."""
        request = _Request(dict(frames), settings)
        with self._queue_lock:
            self._queue.append(request)
        with self.inference:
            batch = self._claim(request)
            if batch:
                self._run_batch(batch, runner)
        request.finished.wait()  # at once when this call ran the batch; else until the batch that took it ends
        if request.error is not None:
            raise request.error
        assert request.results is not None
        return request.results

    def _claim(self, leader: _Request) -> list[_Request]:
        """``leader`` and the queued requests with its settings (up to the batch size in images), taken off the
        queue; empty when a batch already took ``leader``."""
        with self._queue_lock:
            if leader not in self._queue:
                return []
            batch, budget = [], max(self.batch_images, len(leader.frames))
            for request in [leader] + [r for r in self._queue if r is not leader]:
                if request.settings == leader.settings and (request is leader or len(request.frames) <= budget):
                    batch.append(request)
                    budget -= len(request.frames)
            self._queue = [r for r in self._queue if all(r is not b for b in batch)]
            return batch

    @staticmethod
    def _run_batch(batch: list[_Request], runner: BatchRunner) -> None:
        """Run the frames of ``batch`` in one call and hand each request its results (or the error)."""
        named = {f"{i}/{key}": frame for i, request in enumerate(batch) for key, frame in request.frames.items()}
        try:
            results = runner(named, batch[0].settings)
            start = 0
            for request in batch:
                mine = results[start : start + len(request.frames)]
                request.results = [dataclasses.replace(r, query=key) for r, key in zip(mine, request.frames)]
                start += len(request.frames)
        except BaseException as exc:  # every request of the batch gets the error (it is not about one frame)
            for request in batch:
                request.error = exc
        finally:
            for request in batch:
                request.finished.set()
