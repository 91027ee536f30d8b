"""Uploaded image files → pictures: checked by their header before a pixel is decoded, within a memory budget.

A service receives images as bytes. :func:`decode_image` refuses one whose header announces more
pixels than the service decodes (a 20 MB PNG can hold hundreds of megapixels), or more decoded bytes
than one image may take (a 92 KB 16-bit PNG of 40 Mpx decodes to 80 MB), before decoding it. It
decodes at the reduced scale the map needs when that is known (JPEG's draft mode, every other format
reduced right after decoding), and reserves the decoded bytes from a process-wide
:class:`DecodeBudget` while it decodes, so parallel uploads cannot add up to more memory than the
budget: a request that finds it spent waits a bounded time, then is refused as busy
(:class:`DecodeBusyError`, which the service answers 503).
"""

from __future__ import annotations

import collections
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image

from .errors import ConfigError, ImageReadError
from .images import DRAFT_FORMATS, MAX_PIXELS, as_pil, decoded_size, read_image

# Pixels an uploaded image may have before it is decoded.
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
# PIL holds an 8-bit RGB or RGBA pixel in 4 bytes: the default per-image limit admits every 8-bit image
# the pixel limit admits (160 MB); 16-bit RGB (6 bytes a pixel in the file) up to 26.7 Mpx, 16-bit grey
# up to the pixel limit.
ADMITTED_BYTES_PER_PIXEL = 4
DEFAULT_MAX_DECODED_BYTES = DEFAULT_MAX_UPLOAD_PIXELS * ADMITTED_BYTES_PER_PIXEL
# Decoded bytes in flight in one process: two of the largest images at once (320 MB); uploads decoded at
# the map's reduced scale (a phone JPEG, any image reduced right after decoding) take far less, so
# many share it.
DEFAULT_DECODE_BUDGET_BYTES = 2 * DEFAULT_MAX_DECODED_BYTES
# Seconds an upload waits for the budget before it is refused as busy (decoding a 40 Mpx PNG takes 1–4 s
# on one core, so a few such decodes ahead of it finish within this).
DEFAULT_BUDGET_WAIT_S = 10.0
MEGABYTE = 1_000_000
# PIL format → file extension, for keys generated for uploads without a name.
FORMAT_EXTENSIONS = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tif",
    "GIF": ".gif",
    "PPM": ".ppm",
}
FALLBACK_FORMAT = "PNG"


class DecodeBusyError(ImageReadError):
    """The process's decode budget stayed spent for the whole bounded wait: nothing is wrong with the image,
    retry later (the service answers 503 with ``Retry-After``)."""


def _mb(nbytes: int | float) -> str:
    return f"{nbytes / MEGABYTE:,.1f} MB"


class DecodeBudget:
    """Bytes of decoded images in flight in this process, shared by every thread that decodes uploads.

    :meth:`reserve` holds an image's decoded bytes while it decodes. Reservations are served first come,
    first served (a large image is not starved by a stream of small ones); one that cannot start within
    ``wait_s`` seconds is a :class:`DecodeBusyError`, and an image that alone is larger than the budget
    is an :class:`ImageReadError` at once.
    """

    def __init__(self, limit_bytes: int, wait_s: float = DEFAULT_BUDGET_WAIT_S):
        if int(limit_bytes) < 1:
            raise ConfigError(f"decode budget must be at least 1 byte, got {limit_bytes}")
        if not wait_s >= 0:
            raise ConfigError(f"decode budget wait must be ≥ 0 seconds, got {wait_s}")
        self.limit_bytes = int(limit_bytes)
        self.wait_s = float(wait_s)
        self._in_use = 0
        self._queue: collections.deque[object] = collections.deque()
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        """Bytes reserved right now."""
        with self._changed:
            return self._in_use

    def acquire(self, nbytes: int, name: str = "image") -> None:
        """Reserve ``nbytes`` (wait in turn, at most ``wait_s``); pair with :meth:`release`."""
        if nbytes > self.limit_bytes:
            raise ImageReadError(
                f"{name}: decoding it takes {_mb(nbytes)}, more than this server's whole decode budget "
                f"({_mb(self.limit_bytes)}); downscale it first"
            )
        ticket = object()
        deadline = time.monotonic() + self.wait_s
        with self._changed:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._in_use + nbytes > self.limit_bytes:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DecodeBusyError(
                            f"{name}: server busy decoding other images ({_mb(self._in_use)} of its "
                            f"{_mb(self.limit_bytes)} decode budget in use, this one needs {_mb(nbytes)}, "
                            f"waited {self.wait_s:g} s); retry later"
                        )
                    self._changed.wait(remaining)
                self._in_use += nbytes
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now

    def release(self, nbytes: int) -> None:
        """Give back what :meth:`acquire` reserved."""
        with self._changed:
            self._in_use -= nbytes
            self._changed.notify_all()

    @contextmanager
    def reserve(self, nbytes: int, name: str = "image") -> Iterator[None]:
        """``with budget.reserve(n):`` — ``n`` bytes held for the block (see :meth:`acquire`)."""
        self.acquire(nbytes, name)
        try:
            yield
        finally:
            self.release(nbytes)


_defaults_lock = threading.Lock()
_default_budget = DecodeBudget(DEFAULT_DECODE_BUDGET_BYTES)
_default_max_decoded_bytes = DEFAULT_MAX_DECODED_BYTES


def default_budget() -> DecodeBudget:
    """The budget :func:`decode_image` uses when none is passed."""
    return _default_budget


def default_max_decoded_bytes() -> int:
    """The per-image limit :func:`decode_image` uses when none is passed."""
    return _default_max_decoded_bytes


def configure_decoding(
    budget_bytes: int | None = None, max_decoded_bytes: int | None = None, wait_s: float | None = None
) -> DecodeBudget:
    """Set the process's defaults (``vprkit serve``'s options): the decode budget, the per-image decoded-bytes
    limit and the wait for the budget; ``None`` keeps a setting. Returns the budget now in use (uploads
    decoding right now release into the one they reserved from)."""
    global _default_budget, _default_max_decoded_bytes
    with _defaults_lock:
        if max_decoded_bytes is not None:
            if int(max_decoded_bytes) < 1:
                raise ConfigError(f"the decoded-bytes limit must be at least 1 byte, got {max_decoded_bytes}")
            _default_max_decoded_bytes = int(max_decoded_bytes)
        if budget_bytes is not None or wait_s is not None:
            _default_budget = DecodeBudget(
                _default_budget.limit_bytes if budget_bytes is None else budget_bytes,
                _default_budget.wait_s if wait_s is None else wait_s,
            )
        return _default_budget


def decode_image(
    data: bytes,
    name: str = "upload",
    max_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
    size_hint: tuple[int, int] | None = None,
    *,
    max_decoded_bytes: int | None = None,
    budget: DecodeBudget | None = None,
) -> Image.Image:
    """An uploaded file's bytes → an RGB image, as :func:`vprkit.images.read_image` decodes files.

    The header is checked first, before any pixel is decoded: more than ``max_pixels`` pixels, or more than
    ``max_decoded_bytes`` decoded bytes (bit depth × channels × pixels, or what PIL holds if more — see
    :class:`vprkit.images.DecodedSize`), is an :class:`ImageReadError`. ``size_hint`` (height, width) is the
    size the map's backbone is fed: JPEGs decode at reduced scale (and are held to the library's pixel
    limit only), every other format is reduced toward it right after decoding. The decoded bytes are
    reserved from ``budget`` (default: :func:`default_budget`) while decoding; see :class:`DecodeBudget`.
    """
    if not data:
        raise ImageReadError(f"{name}: empty upload; send the image's bytes")
    data = bytes(data)
    size = decoded_size(data, target_size=size_hint, reduce_to=size_hint, name=name)
    drafted = size_hint is not None and size.format in DRAFT_FORMATS
    if drafted:
        max_pixels = max(max_pixels, MAX_PIXELS)  # decoded at reduced scale: a 48 Mpx phone photo costs little
    width, height = size.file_size
    if width * height > max_pixels:
        raise ImageReadError(
            f"{name}: {width}×{height} pixels is more than this service decodes ({max_pixels:,} pixels); "
            f"downscale it first"
        )
    limit = default_max_decoded_bytes() if max_decoded_bytes is None else max_decoded_bytes
    if size.nbytes > limit:
        raise ImageReadError(
            f"{name}: a {size.describe()} decodes to {_mb(size.nbytes)}, more than this service decodes per image "
            f"({_mb(limit)}); downscale it or reduce its bit depth first"
        )
    with (budget or default_budget()).reserve(size.nbytes, name):
        return read_image(data, target_size=size_hint, name=name, reduce_to=size_hint)


def _format(data: bytes) -> str | None:
    """The PIL format of a file's bytes, from its header; None when no decoder recognises it."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            return probe.format
    except Exception:  # noqa: BLE001 - the picture was decoded already; only the extension is chosen here
        return None


def kept_picture(
    image: bytes | bytearray | memoryview | np.ndarray | Image.Image, name: str, decode
) -> tuple[bytes, Image.Image, str]:
    """(bytes to keep, decoded picture, PIL format) of an image to store: a file's bytes are kept as they are
    (``decode`` turns them into the picture), a decoded frame is kept as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        raw = bytes(image)
        picture = decode(raw, name)
        return raw, picture, _format(raw) or FALLBACK_FORMAT
    picture = as_pil(image, name)
    buffer = io.BytesIO()
    picture.save(buffer, format=FALLBACK_FORMAT)
    return buffer.getvalue(), picture, FALLBACK_FORMAT
