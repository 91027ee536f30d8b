"""The map a service serves, replaceable while it runs: a ``vprkit map build`` into the served folder is picked
up by ``POST /admin/reload`` instead of a restart.

:class:`ServedMap` stands for the current :class:`~vprkit.pipeline.live.LiveMap` (the routes call it as they
would the map itself). A reload opens the folder again — models included, which takes as long as a start —
*beside* the map being served, then swaps it in: requests keep being answered throughout, those in flight
finish on the old map, and a reload that fails (a damaged build, say) leaves the old map serving and says why.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from ..errors import MapError
from ..pipeline.live import LiveMap


class ServedMap:
    """The served :class:`LiveMap`, and ``reopen`` (a fresh one of the same folder and options) for reloads."""

    def __init__(self, live: LiveMap, reopen: Callable[[], LiveMap] | None = None):
        self._live = live
        self._reopen = reopen or (lambda: LiveMap.open(live.dir))
        self._reloading = threading.Lock()  # one reload at a time; requests never wait for it
        self.reloads = 0

    @property
    def current(self) -> LiveMap:
        return self._live

    def __getattr__(self, name: str) -> Any:  # the routes' calls go to the map served now
        return getattr(self._live, name)

    def __len__(self) -> int:
        return len(self._live)

    def status(self) -> dict[str, Any]:
        """What ``/health`` and ``/map`` say of the map's freshness."""
        changed = self._live.changed_on_disk
        return {
            "changed_on_disk": changed,
            **({"hint": "the map folder was rebuilt or changed; POST /admin/reload serves it"} if changed else {}),
            "reloads": self.reloads,
        }

    def reload(self) -> dict[str, Any]:
        """Open the folder again and serve it (the old map until then); a :class:`MapError` if one is under way."""
        if not self._reloading.acquire(blocking=False):
            raise MapError("a reload is already under way; wait for it to finish")
        try:
            started, before = time.perf_counter(), len(self._live)
            fresh = self._reopen()  # may raise (a damaged build): the old map keeps serving
            self._live = fresh
            self.reloads += 1
            return {
                "reloaded": True,
                "places_before": before,
                "places": len(fresh),
                "seconds": round(time.perf_counter() - started, 3),
            }
        finally:
            self._reloading.release()
