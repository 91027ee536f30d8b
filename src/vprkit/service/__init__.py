"""The HTTP face over a live map (``vprkit serve``): FastAPI routes in :mod:`.app`, running them in :mod:`.server`.

The work is :class:`vprkit.pipeline.live.LiveMap`'s; this package parses requests and formats answers.
"""

from .app import API_KEY_HEADER, DEFAULT_MAX_UPLOAD_BYTES, create_app
from .server import BackgroundServer, base_url, serve

__all__ = ["API_KEY_HEADER", "BackgroundServer", "DEFAULT_MAX_UPLOAD_BYTES", "base_url", "create_app", "serve"]
