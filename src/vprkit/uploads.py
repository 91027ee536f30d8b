"""Uploaded image files → pictures: checked by their header before a pixel is decoded.

A service receives images as bytes. :func:`decode_image` refuses one whose header announces more
pixels than the service decodes (a 20 MB PNG can hold hundreds of megapixels) before decoding it,
and lets JPEGs decode at reduced scale when the size the map needs is known.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .errors import ImageReadError
from .images import MAX_PIXELS, as_pil, read_image

# Pixels an uploaded image may have before it is decoded.
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
# Formats PIL decodes at a reduced scale when the target size is known (JPEG's DCT scaling): for these
# only the library's own limit (vprkit.images.MAX_PIXELS) applies.
DRAFT_FORMATS = ("JPEG", "MPO")
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


def decode_image(
    data: bytes,
    name: str = "upload",
    max_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
    size_hint: tuple[int, int] | None = None,
) -> Image.Image:
    """An uploaded file's bytes → an RGB image, as :func:`vprkit.images.read_image` decodes files.

    The header is checked first: more than ``max_pixels`` pixels is an :class:`ImageReadError` before any
    pixel is decoded. ``size_hint`` (height, width) lets JPEGs decode at reduced scale (what the map's
    backbone is fed anyway); such JPEGs are held to the library's limit only.
    """
    if not data:
        raise ImageReadError(f"{name}: empty upload; send the image's bytes")
    width, height, fmt = _header(data)
    if size_hint is not None and fmt in DRAFT_FORMATS:
        max_pixels = max(max_pixels, MAX_PIXELS)  # decoded at reduced scale: a 48 Mpx phone photo costs little
    if width * height > max_pixels:
        raise ImageReadError(
            f"{name}: {width}×{height} pixels is more than this service decodes ({max_pixels:,} pixels); "
            f"downscale it first"
        )
    return read_image(bytes(data), target_size=size_hint, name=name)


def _header(data: bytes) -> tuple[int, int, str | None]:
    """(width, height, PIL format) from the header alone; zeros when no decoder recognises it."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            return probe.width, probe.height, probe.format
    except Exception:  # noqa: BLE001 - read_image gives the one-line reason for every decoder failure
        return 0, 0, None


def kept_picture(
    image: bytes | bytearray | memoryview | np.ndarray | Image.Image, name: str, decode
) -> tuple[bytes, Image.Image, str]:
    """(bytes to keep, decoded picture, PIL format) of an image to store: a file's bytes are kept as they are
    (``decode`` turns them into the picture), a decoded frame is kept as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        raw = bytes(image)
        picture = decode(raw, name)
        return raw, picture, _header(raw)[2] or FALLBACK_FORMAT
    picture = as_pil(image, name)
    buffer = io.BytesIO()
    picture.save(buffer, format=FALLBACK_FORMAT)
    return buffer.getvalue(), picture, FALLBACK_FORMAT
