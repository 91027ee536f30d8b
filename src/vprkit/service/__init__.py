"""The HTTP face over a live map (``vprkit serve``): FastAPI routes in :mod:`.app`, running them in :mod:`.server`.

The work is :class:`vprkit.pipeline.live.LiveMap`'s; this package parses requests and formats answers,
and keeps clients within :class:`~.limits.ServiceLimits` (:mod:`.guard` per request, :mod:`.protocol`
per connection).
"""

from .app import API_KEY_HEADER, DEFAULT_MAX_UPLOAD_BYTES, create_app
from .limits import DEFAULT_LIMITS, ServiceLimits
from .server import BackgroundServer, base_url, serve

__all__ = [
    "API_KEY_HEADER",
    "BackgroundServer",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "ServiceLimits",
    "base_url",
    "create_app",
    "serve",
]
