"""Reading and resizing images safely, and batching them with a small worker pool.

Every image goes through :func:`prepare_image`, which returns the pixels a backbone sees plus the
:class:`Geometry` that maps them back to the original file (needed to put segment masks and
patch matches on the right pixels).
"""

from __future__ import annotations

import io
import logging
import hashlib
import math
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageMode, UnidentifiedImageError

# ImageSpec (how images are resized) is configuration: it lives in the pure-data config module so
# resolving a preset does not import PIL or numpy; images are prepared to it here.
from .config import MAX_ASPECT_RATIO, MAX_PREPARED_PIXELS, ImageSpec
from .errors import ConfigError, ImageReadError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
# Image formats read_image opens, whatever the extension says (PIL's other plugins — EPS, which
# runs Ghostscript, PSD, ICO, … — are never tried on untrusted files).
DECODE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "DIB", "TIFF", "WEBP", "PPM", "GIF")
# Largest image decoded at full size; bigger JPEGs are decoded at reduced scale (draft mode) and
# anything else that large is refused rather than allowed to exhaust memory.
MAX_PIXELS = 12_000 * 12_000
# Largest image handed to a backbone after resizing (and largest --image-size), and the largest
# aspect ratio of --image-size, live in vprkit.config (MAX_PREPARED_PIXELS, MAX_ASPECT_RATIO).
# Transparent pixels are composited on white, as an image viewer on a light page shows them.
ALPHA_BACKGROUND = (255, 255, 255)
# Single-channel modes with more than 8 bits: scaled to 0…255 by the image's own min…max.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
EXIF_ORIENTATION_TAG = 0x0112
# Pixels of a 16-bit or float image converted to float64 at once when it is scaled to 8 bits (8 MB).
SCALE_STRIP_PIXELS = 1 << 20
# Formats whose decoder itself decodes at a reduced scale (JPEG's DCT scaling, PIL's draft mode).
DRAFT_FORMATS = ("JPEG", "MPO")
# Bytes PIL holds per pixel of a multi-band mode (RGB, RGBA, LA, CMYK … are stored 4 bytes a pixel).
MULTI_BAND_BYTES_PER_PIXEL = 4
# Modes whose values cannot be averaged as they are (palette indices, 1-bit, colours under straight
# alpha): converted, in this order, to modes that can before an image is reduced — full-size copies,
# counted by decoded_size. Premultiplied alpha is averaged so hidden colours do not bleed, then undone.
_REDUCE_VIA = {"1": ("L",), "P": ("RGB",), "PA": ("RGBa",), "RGBA": ("RGBa",), "LA": ("La",)}
_REDUCE_VIA_TRANSPARENT = {"P": ("RGBA", "RGBa")}
_UNPREMULTIPLIED = {"RGBa": "RGBA", "La": "LA"}
# Bytes per pixel the conversion to RGB holds at full size when an image is not reduced (beyond the
# decoded pixels): alpha is composited through an RGBA copy, a white background and the composite;
# 16-bit and float images through an 8-bit array and its RGB copy; everything else through one RGB copy.
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
ALPHA_CONVERSION_BYTES_PER_PIXEL = 3 * MULTI_BAND_BYTES_PER_PIXEL
HIGH_BIT_DEPTH_CONVERSION_BYTES_PER_PIXEL = 1 + MULTI_BAND_BYTES_PER_PIXEL
# PNG colour type → samples per pixel (grey, RGB, palette index, grey + alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLES_PER_PIXEL = 258, 277
# EXIF orientation → transpose that shows the image upright (as PIL.ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_SWAPS_AXES = (5, 6, 7, 8)
# What PIL's decoders raise on malformed files (besides UnidentifiedImageError and bombs). Beyond
# the documented OSError/SyntaxError/ValueError, fuzzing Pillow 13 (scripts/fuzz_inputs.py) found
# IndexError (GIF _seek), TypeError (TIFF "Missing dimensions") and struct.error (short headers);
# KeyError, ZeroDivisionError and OverflowError are in Pillow's history of malformed-file bugs.
DECODER_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
    struct.error,
)
# list_images logs this many skipped entries one by one, then a count.
MAX_LISTING_WARNINGS = 20


@dataclass(frozen=True)
class Geometry:
    """Maps prepared-image pixels back to the original: ``orig = (prep + crop) / scale``."""

    original_size: tuple[int, int]  # (height, width) of the file
    scale: tuple[float, float]  # (sy, sx) from original to resized
    crop: tuple[int, int]  # (top, left) removed after resizing
    size: tuple[int, int]  # (height, width) the backbone sees

    def to_original(self, xy: np.ndarray) -> np.ndarray:
        """Prepared-image (x, y) pixel coordinates → original-file coordinates."""
        xy = np.asarray(xy, dtype=np.float64)
        return np.stack([(xy[..., 0] + self.crop[1]) / self.scale[1], (xy[..., 1] + self.crop[0]) / self.scale[0]], -1)


@dataclass(frozen=True)
class ListingProblem:
    """Something :func:`scan_images` skipped: ``path`` is relative to the listed folder.

    ``kind``: ``unreadable_folder`` (its images are missing from the list), ``unreadable_entry``,
    ``broken_link``, ``not_a_file`` (an image name that is not a regular file), ``hidden_file``
    (``.name.jpg``, e.g. macOS ``._`` files) or ``folder_loop`` (a symlink back to a listed folder).
    """

    path: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "reason": self.reason}


@dataclass
class ImageListing:
    """What :func:`scan_images` found: image ``keys`` (sorted POSIX paths relative to ``root``),
    ``problems`` (every skipped image-like entry and unreadable folder) and ``ignored`` (count of
    files with other extensions, by extension — not images, so not problems)."""

    root: Path
    keys: list[str]
    problems: list[ListingProblem] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)

    @property
    def unreadable_folders(self) -> list[str]:
        return [p.path for p in self.problems if p.kind == "unreadable_folder"]

    def to_dict(self) -> dict:
        """For a build summary / failures.json."""
        return {
            "root": str(self.root),
            "n_images": len(self.keys),
            "problems": [p.to_dict() for p in self.problems],
            "ignored_files_by_extension": dict(self.ignored),
        }


def _listing_reason(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def scan_images(folder: str | os.PathLike) -> ImageListing:
    """Every image under ``folder`` (recursively) and every problem.

    Symlinked folders are followed after all real ones, and a folder reached twice (a link back up,
    or a second link to the same folder) is listed once and reported as ``folder_loop``.

    Images are files whose extension (any case) is in :data:`IMAGE_EXTENSIONS` and whose name does
    not start with ``.``. The folder itself being unreadable raises :class:`ImageReadError`; an
    unreadable sub-folder does not stop the listing but is one :class:`ListingProblem`.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ImageReadError(f"image folder {root} does not exist or is not a folder")
    keys: list[str] = []
    problems: list[ListingProblem] = []
    ignored: dict[str, int] = {}
    seen_dirs: set[tuple[int, int]] = set()
    stack: list[tuple[str, str]] = [(os.fspath(root), "")]
    linked: list[tuple[str, str]] = []  # symlinked folders, listed after all real ones
    while stack or linked:
        dir_path, rel = stack.pop() if stack else linked.pop(0)
        shown = rel or "."
        try:
            st = os.stat(dir_path)
            ident = (st.st_dev, st.st_ino)
            if ident in seen_dirs:
                problems.append(
                    ListingProblem(shown, "folder_loop", "folder already listed (symlink loop or second link); skipped")
                )
                continue
            seen_dirs.add(ident)
            with os.scandir(dir_path) as it:
                entries = list(it)
        except OSError as exc:
            if not rel:
                raise ImageReadError(f"image folder {root}: cannot list it ({_listing_reason(exc)})") from None
            problems.append(
                ListingProblem(
                    shown, "unreadable_folder", f"cannot list folder ({_listing_reason(exc)}); its images are skipped"
                )
            )
            continue
        for entry in sorted(entries, key=lambda e: e.name, reverse=True):
            child = f"{rel}/{entry.name}" if rel else entry.name
            ext = os.path.splitext(entry.name)[1].lower()
            try:
                if entry.is_dir():  # follows symlinks; a folder reached twice is caught by seen_dirs
                    (linked if entry.is_symlink() else stack).append((entry.path, child))
                    continue
                is_file = entry.is_file()
            except OSError as exc:
                problems.append(ListingProblem(child, "unreadable_entry", f"cannot stat ({_listing_reason(exc)})"))
                continue
            if ext not in IMAGE_EXTENSIONS:
                if is_file:
                    ignored[ext or "(none)"] = ignored.get(ext or "(none)", 0) + 1
                continue
            if not is_file:
                if entry.is_symlink():
                    problems.append(ListingProblem(child, "broken_link", "symbolic link to nothing; skipped"))
                else:
                    problems.append(
                        ListingProblem(child, "not_a_file", "has an image extension but is not a regular file; skipped")
                    )
                continue
            if entry.name.startswith("."):
                problems.append(ListingProblem(child, "hidden_file", "hidden file (name starts with '.'); skipped"))
                continue
            keys.append(child)
    problems.sort(key=lambda p: p.path)
    return ImageListing(root, sorted(keys), problems, dict(sorted(ignored.items())))


def list_images(folder: str | os.PathLike, on_error: Callable[[ListingProblem], None] | None = None) -> list[str]:
    """Relative paths (POSIX style, sorted) of every image under ``folder``, recursively.

    Every skipped entry and unreadable sub-folder (see :func:`scan_images`) is logged as a warning
    (the first :data:`MAX_LISTING_WARNINGS`, then a count) and passed to ``on_error`` if given;
    call :func:`scan_images` to get them as a list.
    """
    listing = scan_images(folder)
    for i, problem in enumerate(listing.problems):
        if i < MAX_LISTING_WARNINGS:
            log.warning("%s: %s", listing.root, problem)
        if on_error is not None:
            on_error(problem)
    if len(listing.problems) > MAX_LISTING_WARNINGS:
        log.warning("%s: %d more skipped entries", listing.root, len(listing.problems) - MAX_LISTING_WARNINGS)
    return listing.keys


def check_image_size(size: Sequence[int] | None, multiple: int = 1) -> None:
    """Refuse a resize target (height, width) that cannot work, with one :class:`ConfigError` line.

    For ``ImageSpec``/``--image-size`` validation: each side ≥ ``multiple`` (the backbone's patch
    size), at most :data:`MAX_PREPARED_PIXELS` pixels and an aspect ratio of at most
    :data:`MAX_ASPECT_RATIO`.
    """
    if size is None:
        return
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ConfigError(f"image size must be two integers (height, width), got {size!r}") from None
    if min(h, w) < max(1, multiple):
        raise ConfigError(f"image size {h}×{w} has a side smaller than the backbone's patch size {max(1, multiple)}")
    if h * w > MAX_PREPARED_PIXELS:
        raise ConfigError(
            f"image size {h}×{w} is {h * w} pixels, more than vprkit feeds a backbone ({MAX_PREPARED_PIXELS})"
        )
    if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
        raise ConfigError(
            f"image size {h}×{w} has an aspect ratio above {MAX_ASPECT_RATIO}:1; give height×width, e.g. 240x320"
        )


@dataclass(frozen=True)
class DecodeNote:
    """Something :func:`read_image` did that changes pixels compared with a naive decode.

    ``kind``: ``animated`` (first of ``n`` frames used), ``reduced`` (reduced right after decoding, see
    :func:`read_image`'s ``reduce_to``), ``bit_depth`` (16-bit/float scaled by its
    real range), ``alpha`` (transparency composited on :data:`ALPHA_BACKGROUND`), ``orientation``
    (EXIF rotation applied), ``exif`` (EXIF unreadable, used as stored), ``colour`` (CMYK conversion).
    ``warning`` is True when information was dropped or guessed (animated, exif).
    """

    path: str
    kind: str
    message: str
    warning: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "message": self.message, "warning": self.warning}


def _formats() -> tuple[str, ...]:
    """:data:`DECODE_FORMATS` that this PIL build can open (registers every plugin once)."""
    Image.init()
    return tuple(f for f in DECODE_FORMATS if f in Image.OPEN)


def _exif_orientation(img: Image.Image) -> int:
    """EXIF orientation 1…8 (1 when absent); raises what PIL raises on a malformed EXIF block."""
    value = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and value in _ORIENTATION_TRANSPOSE else 1


def _strips(img: Image.Image) -> list[tuple[int, int]]:
    """Row ranges of about :data:`SCALE_STRIP_PIXELS` pixels: a 16-bit or float image is scaled strip by strip."""
    rows = max(1, SCALE_STRIP_PIXELS // max(1, img.width))
    return [(top, min(top + rows, img.height)) for top in range(0, img.height, rows)]


def _strip_values(img: Image.Image, rows: tuple[int, int], name: str) -> np.ndarray:
    """The pixels of rows ``rows`` as float64 (exact for 16-bit, 32-bit integer and float32 pixels)."""
    arr = np.asarray(img.crop((0, rows[0], img.width, rows[1])), dtype=np.float64)
    if arr.ndim != 2:
        raise ImageReadError(f"{name}: unexpected {img.mode} image of shape {arr.shape}")
    return arr


def _scaled_to_8bit(img: Image.Image, name: str, notes: list[DecodeNote]) -> Image.Image:
    """A 16-bit, 32-bit or float single-band image scaled by its own finite min…max to 0…255, as RGB.

    Worked through in strips so that no full-size float64 copy (8 bytes a pixel, four times a 16-bit
    image's own size) is ever made: a 6300×6300 16-bit PNG used to cost a gigabyte here. The pixels are
    the same as scaling the whole array at once (the same float64 operations, element by element).
    """
    strips = _strips(img)
    lo, hi = np.inf, -np.inf
    for rows in strips:
        arr = _strip_values(img, rows, name)
        finite = arr[np.isfinite(arr)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if lo > hi:  # no finite pixel at all
        lo = hi = 0.0
    out = np.zeros((img.height, img.width), dtype=np.uint8)
    if hi > lo:
        scale = 255.0 / (hi - lo)
        for top, bottom in strips:
            arr = _strip_values(img, (top, bottom), name)
            finite = np.isfinite(arr)
            out[top:bottom][finite] = np.round((arr[finite] - lo) * scale).astype(np.uint8)
    notes.append(DecodeNote(name, "bit_depth", f"{img.mode} image scaled from its range {lo:g}…{hi:g} to 0…255"))
    return Image.fromarray(out, "L").convert("RGB")


def _composited(img: Image.Image, name: str, notes: list[DecodeNote]) -> Image.Image:
    rgba = img.convert("RGBA")
    lo, _ = rgba.getchannel("A").getextrema()
    if lo == 255:
        return rgba.convert("RGB")
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    notes.append(DecodeNote(name, "alpha", f"transparent pixels composited on {ALPHA_BACKGROUND}"))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _cmyk_to_rgb(img: Image.Image, name: str, notes: list[DecodeNote]) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            srgb = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(img, io.BytesIO(icc), srgb, outputMode="RGB")
            if out is not None:
                return out
        except Exception as exc:  # a broken embedded profile: fall back to the plain formula
            notes.append(
                DecodeNote(name, "colour", f"embedded CMYK profile unusable ({exc}); converted without it", True)
            )
            return img.convert("RGB")
    notes.append(DecodeNote(name, "colour", "CMYK without a colour profile converted with the plain formula"))
    return img.convert("RGB")


def _to_rgb(img: Image.Image, name: str, notes: list[DecodeNote]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("1", "L"):
        return img.convert("RGB")
    if mode in HIGH_BIT_DEPTH_MODES or mode.startswith(("I;", "F;")):
        return _scaled_to_8bit(img, name, notes)
    if mode == "P":
        return _composited(img, name, notes) if "transparency" in img.info else img.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa", "RGBX"):
        return _composited(img, name, notes) if mode != "RGBX" else img.convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img, name, notes)
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageReadError(f"{name}: colour mode {mode} cannot be converted to RGB ({exc})") from None


def _emit(notes: list[DecodeNote], sink: list[DecodeNote] | None) -> None:
    if sink is not None:
        sink.extend(notes)
        return
    for note in notes:
        (log.warning if note.warning else log.debug)("%s", note)


def _first_frame(img: Image.Image, label: str, found: list[DecodeNote]) -> None:
    """Seek an animated or multi-page image (GIF, APNG, WebP, TIFF, MPO) to its first frame, noting what was dropped."""
    try:
        frames = getattr(img, "n_frames", 1)  # scans the frames
    except DECODER_ERRORS as exc:  # a corrupt later frame must not lose the first one
        frames = 0
        reason = f"{exc.__class__.__name__}: {exc}"
        found.append(
            DecodeNote(
                label,
                "animated",
                f"{img.format}: frames after the first unreadable ({reason}); the first frame is used",
                True,
            )
        )
    if frames != 1:
        img.seek(0)
    if frames > 1:
        found.append(DecodeNote(label, "animated", f"{img.format} with {frames} frames: the first frame is used", True))


@dataclass(frozen=True)
class DecodedSize:
    """What decoding an image holds in memory, read from its header alone (no pixel decoded).

    ``width``×``height`` is what the decoder produces (a JPEG's reduced scale when a target size lets it
    draft), before EXIF orientation; ``mode`` is PIL's mode for it. ``channels`` × ``bits_per_sample`` is
    how the file stores a pixel (a 16-bit RGB PNG: 3 × 16), ``memory_bytes_per_pixel`` what PIL holds
    for one (an 8-bit RGB pixel takes 4 bytes, a 16-bit grey one 2). ``reduce_factor`` > 1: the image is
    reduced by it right after decoding (see :func:`read_image`'s ``reduce_to``);
    ``conversion_bytes_per_pixel`` counts the full-size copies made before that reduction or, when the
    image is not reduced, the conversion to RGB.
    """

    width: int
    height: int
    format: str
    mode: str
    channels: int
    bits_per_sample: int
    memory_bytes_per_pixel: int
    reduce_factor: int = 1
    conversion_bytes_per_pixel: float = 0.0
    file_size: tuple[int, int] = (0, 0)  # (width, height) the header announces, before drafting

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def nbytes(self) -> int:
        """Bytes decoding holds at once: the decoded pixels — the larger of the file's samples (bit depth ×
        channels) and PIL's copy of them — plus the full-size conversions (see the class docstring)."""
        file_bytes = self.channels * self.bits_per_sample / 8
        per_pixel = max(file_bytes, self.memory_bytes_per_pixel) + self.conversion_bytes_per_pixel
        return math.ceil(self.pixels * per_pixel)

    def describe(self) -> str:
        """E.g. ``6300×6300 PNG of 3 × 16-bit samples``."""
        return f"{self.width}×{self.height} {self.format} of {self.channels} × {self.bits_per_sample}-bit samples"


def memory_bytes_per_pixel(mode: str) -> int:
    """Bytes PIL stores per pixel of ``mode``: one for 8-bit single-band modes (L, P, 1), the sample's size
    for other single-band modes (I;16: 2, I and F: 4), four for every multi-band mode."""
    try:
        info = ImageMode.getmode(mode)
    except KeyError:
        return MULTI_BAND_BYTES_PER_PIXEL
    return int(info.typestr[-1]) if len(info.bands) == 1 else MULTI_BAND_BYTES_PER_PIXEL


def _png_samples(img: Image.Image) -> tuple[int, int] | None:
    """(channels, bits per sample) from a PNG's IHDR chunk (PIL's mode hides 16-bit RGB: it decodes it to 8)."""
    position = img.fp.tell()
    try:
        img.fp.seek(0)
        head = img.fp.read(len(_PNG_SIGNATURE) + 18)
    finally:
        img.fp.seek(position)
    if not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR" or len(head) < 26:
        return None
    bits, colour_type = head[24], head[25]
    return (_PNG_CHANNELS[colour_type], bits) if colour_type in _PNG_CHANNELS else None


def _tiff_samples(img: Image.Image) -> tuple[int, int] | None:
    """(channels, bits per sample) from a TIFF's tags."""
    tags = getattr(img, "tag_v2", {})
    bits = tags.get(_TIFF_BITS_PER_SAMPLE)
    channels = int(tags.get(_TIFF_SAMPLES_PER_PIXEL, 1))
    if bits is None:
        return None
    bits = max(bits) if isinstance(bits, tuple) else bits
    return max(1, channels), int(bits)


# Formats whose header tells the stored samples better than PIL's mode does.
_FILE_SAMPLES = {"PNG": _png_samples, "TIFF": _tiff_samples}


def _file_samples(img: Image.Image) -> tuple[int, int]:
    """(channels, bits per sample) as the file stores them: its header's when it tells (and is readable), else
    PIL's mode's — a malformed tag must not refuse a file that read_image decodes."""
    try:
        samples = _FILE_SAMPLES.get(str(img.format), lambda _: None)(img)
    except DECODER_ERRORS:
        samples = None
    return samples or _mode_samples(img.mode)


def _mode_samples(mode: str) -> tuple[int, int]:
    """(channels, bits per sample) of PIL's ``mode`` (for formats stored as they decode)."""
    if mode == "1":
        return 1, 1
    try:
        info = ImageMode.getmode(mode)
    except KeyError:
        return MULTI_BAND_BYTES_PER_PIXEL, 8
    return len(info.bands), 8 * int(info.typestr[-1])


def _reduce_modes(img: Image.Image) -> tuple[str, ...]:
    """The modes an image is converted through before it can be reduced by averaging (see :data:`_REDUCE_VIA`)."""
    via = _REDUCE_VIA_TRANSPARENT if "transparency" in img.info else {}
    return via.get(img.mode) or _REDUCE_VIA.get(img.mode, ())


def _reduce_factor(width: int, height: int, reduce_to: tuple[int, int] | None, swap: bool) -> int:
    """The largest integer factor that keeps a ``width``×``height`` image at least ``reduce_to`` (height, width
    after orientation) in both directions — as JPEG's draft mode chooses its scale; 1 when none does."""
    if reduce_to is None:
        return 1
    th, tw = reduce_to
    if swap:
        th, tw = tw, th
    return max(1, min(width // max(1, tw), height // max(1, th)))


def _conversion_bytes(img: Image.Image, factor: int) -> float:
    """Bytes per (decoded) pixel of the copies :func:`read_image` makes beside the decoded pixels."""
    if factor > 1:
        via = _reduce_modes(img)
        averaged = memory_bytes_per_pixel(via[-1] if via else img.mode)
        return sum(memory_bytes_per_pixel(mode) for mode in via) + averaged / factor**2
    transparent = img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)
    if transparent:
        return ALPHA_CONVERSION_BYTES_PER_PIXEL
    if img.mode in HIGH_BIT_DEPTH_MODES or img.mode.startswith(("I;", "F;")):
        return HIGH_BIT_DEPTH_CONVERSION_BYTES_PER_PIXEL
    return 0 if img.mode == "RGB" else MULTI_BAND_BYTES_PER_PIXEL


def _header_orientation(img: Image.Image) -> int:
    """EXIF orientation as far as the header tells: PIL's PNG reader decodes the whole image to look for an
    eXIf chunk after the pixels, so a PNG without one before them counts as upright here."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    return _exif_orientation(img)


def decoded_size(
    path: str | os.PathLike | bytes,
    target_size: tuple[int, int] | None = None,
    reduce_to: tuple[int, int] | None = None,
    name: str | None = None,
) -> DecodedSize:
    """What :func:`read_image` with the same arguments will hold in memory, from the header alone.

    Nothing is decoded: a service refuses or queues an upload by this before allocating its pixels.
    An unreadable header is the same :class:`ImageReadError` as :func:`read_image` gives.
    """
    label = name or ("<bytes>" if isinstance(path, (bytes, bytearray)) else str(path))
    try:
        source = io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else Path(path)
        with Image.open(source, formats=_formats()) as img:
            try:
                swap = _header_orientation(img) in _ORIENTATION_SWAPS_AXES
            except Exception:  # read_image uses such a file unrotated
                swap = False
            file_size = img.size
            drafted = target_size is not None and img.format in DRAFT_FORMATS
            if drafted:
                th, tw = target_size
                img.draft("RGB", (th, tw) if swap else (tw, th))
            samples = _file_samples(img)
            factor = 1 if drafted else _reduce_factor(img.width, img.height, reduce_to, swap)
            return DecodedSize(
                img.width,
                img.height,
                str(img.format),
                img.mode,
                *samples,
                memory_bytes_per_pixel(img.mode),
                factor,
                _conversion_bytes(img, factor),
                file_size,
            )
    except (
        FileNotFoundError,
        IsADirectoryError,
        Image.DecompressionBombError,
        UnidentifiedImageError,
        *DECODER_ERRORS,
    ) as exc:
        raise _decode_error(label, exc) from None


def _reduced(img: Image.Image, factor: int, name: str, notes: list[DecodeNote]) -> Image.Image:
    """``img`` reduced by ``factor`` (box average), freeing the full-size pixels as soon as they are not needed.

    Palette and 1-bit images are averaged as colours and grey, alpha images premultiplied (see
    :data:`_REDUCE_VIA`); 16-bit grey, which ``Image.reduce`` does not take, through the same box filter.
    """
    full_size = (img.width, img.height)
    current = img
    for mode in _reduce_modes(img):
        converted = current.convert(mode)
        current.close()  # frees the full-size pixels of the previous mode
        current = converted
    try:
        small = current.reduce(factor)
    except ValueError:  # a mode reduce does not average (I;16 …)
        small = current.resize((-(-current.width // factor), -(-current.height // factor)), Image.BOX)
    current.close()
    if small.mode in _UNPREMULTIPLIED:
        small = small.convert(_UNPREMULTIPLIED[small.mode])
    notes.append(
        DecodeNote(
            name,
            "reduced",
            f"decoded {full_size[0]}×{full_size[1]} reduced by {factor} to {small.width}×{small.height} "
            "right after decoding (the size the map needs)",
        )
    )
    return small


def read_image(
    path: str | os.PathLike | bytes,
    target_size: tuple[int, int] | None = None,
    notes: list[DecodeNote] | None = None,
    name: str | None = None,
    reduce_to: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode an image as a viewer shows it, as RGB, with one clear error for every way it can fail.

    - EXIF orientation is applied (the same transposes as ``PIL.ImageOps.exif_transpose``).
    - 16-bit (``I;16``, ``I``) and float (``F``) images are scaled to 8 bits by their own min…max
      (a constant image becomes black; NaN pixels black).
    - Animated or multi-page files (GIF, APNG, WebP, TIFF, MPO) give their first frame.
    - Palette, ``LA``, ``RGBA`` …: transparency is composited on :data:`ALPHA_BACKGROUND` (white,
      as a viewer on a light page shows it); CMYK goes through its embedded ICC profile if any.
    - Only :data:`DECODE_FORMATS` are opened; images over :data:`MAX_PIXELS` are refused.

    Each of these is a :class:`DecodeNote`: appended to ``notes`` when a list is given (the caller
    records them), otherwise logged (warnings for lost information, debug for the rest).
    ``target_size`` (height, width, after orientation) lets JPEGs decode at a reduced scale (draft
    mode), which is faster and bounds memory. ``path`` may also be the file's bytes (then ``name``
    is used in messages). Every failure is an :class:`ImageReadError`.

    ``reduce_to`` (height, width, after orientation) does for every other format what drafting does for
    JPEGs: an image at least twice that size in both directions is reduced right after decoding by the
    largest integer factor that keeps it at least that large (a box average), before any conversion, so
    no full-size copy of a 16-bit, palette or alpha image is made. Smaller images decode exactly as
    without it. :func:`decoded_size` tells from the header what this holds in memory.
    """
    label = name or ("<bytes>" if isinstance(path, (bytes, bytearray)) else str(path))
    found: list[DecodeNote] = []
    try:
        source = io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else Path(path)
        with Image.open(source, formats=_formats()) as img:
            try:
                orientation = _exif_orientation(img)
            except Exception as exc:  # malformed EXIF must not lose the picture
                orientation = 1
                found.append(
                    DecodeNote(
                        label, "exif", f"EXIF unreadable ({exc.__class__.__name__}); orientation not applied", True
                    )
                )
            swap = orientation in _ORIENTATION_SWAPS_AXES
            drafted = target_size is not None and img.format in DRAFT_FORMATS
            if drafted:
                th, tw = target_size
                img.draft("RGB", (th, tw) if swap else (tw, th))
            if img.width * img.height > MAX_PIXELS:
                raise ImageReadError(
                    f"{label}: {img.width}×{img.height} pixels is larger than vprkit decodes "
                    f"({MAX_PIXELS} pixels); downscale it first"
                )
            _first_frame(img, label, found)
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            img.load()
            factor = 1 if drafted else _reduce_factor(img.width, img.height, reduce_to, swap)
            rgb = _to_rgb(_reduced(img, factor, label, found) if factor > 1 else img, label, found)
            if orientation in _ORIENTATION_TRANSPOSE:
                rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[orientation])
                found.append(DecodeNote(label, "orientation", f"EXIF orientation {orientation} applied"))
            if rgb.mode != "RGB":  # pragma: no cover - _to_rgb always returns RGB
                rgb = rgb.convert("RGB")
            rgb.load()
    except (
        ImageReadError,
        FileNotFoundError,
        IsADirectoryError,
        Image.DecompressionBombError,
        UnidentifiedImageError,
        MemoryError,
        *DECODER_ERRORS,
    ) as exc:
        raise _decode_error(label, exc) from None
    _emit(found, notes)
    return rgb


RESAMPLING = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _multiple_crop(h: int, w: int, multiple: int) -> tuple[int, int, int, int]:
    nh, nw = (h // multiple) * multiple, (w // multiple) * multiple
    if nh == 0 or nw == 0:
        raise ImageReadError(f"image of {h}×{w} pixels is smaller than the backbone's patch size {multiple}")
    return (h - nh) // 2, (w - nw) // 2, nh, nw


def target_size(original: tuple[int, int], spec: ImageSpec) -> tuple[int, int]:
    """The (height, width) an image of ``original`` size is resized to under ``spec`` (before cropping)."""
    h, w = original
    if spec.resize == "none":
        return h, w
    if spec.resize in ("fixed", "resize_crop"):
        return tuple(spec.size)  # type: ignore[return-value]
    long_side = max(spec.size)
    s = long_side / max(h, w)
    if spec.resize == "max_side" and s >= 1:
        return h, w
    return max(1, round(h * s)), max(1, round(w * s))


def prepare_image(
    img: Image.Image, spec: ImageSpec, multiple: int = 1, original_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, Geometry]:
    """Resize per ``spec`` and centre-crop to ``multiple``; return HxWx3 uint8 and its geometry.

    ``original_size`` is the file's (height, width) when ``img`` was decoded at reduced scale.
    """
    oh, ow = original_size or (img.height, img.width)
    th, tw = target_size((oh, ow), spec)
    if spec.to_multiple == "resize" and multiple > 1:
        th, tw = (max(multiple, round(v / multiple) * multiple) for v in (th, tw))
    if (th, tw) != (oh, ow) or (img.height, img.width) != (th, tw):
        img = img.resize((tw, th), RESAMPLING[spec.interpolation])
    top, left, nh, nw = _multiple_crop(th, tw, multiple)
    arr = np.asarray(img, dtype=np.uint8)[top : top + nh, left : left + nw]
    return np.ascontiguousarray(arr), Geometry((oh, ow), (th / oh, tw / ow), (top, left), (nh, nw))


def _decode_error(label, exc: BaseException) -> ImageReadError:
    """The one-line error for every way decoding ``label`` can fail (the exception types PIL and the OS raise)."""
    if isinstance(exc, ImageReadError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return ImageReadError(f"{label}: file not found")
    if isinstance(exc, IsADirectoryError):
        return ImageReadError(f"{label}: is a folder, not an image")
    if isinstance(exc, Image.DecompressionBombError):
        return ImageReadError(f"{label}: refused as a decompression bomb ({exc})")
    if isinstance(exc, UnidentifiedImageError):
        return ImageReadError(
            f"{label}: not an image vprkit reads (formats: {', '.join(DECODE_FORMATS)}); re-export or remove the file"
        )
    if isinstance(exc, MemoryError):
        return ImageReadError(f"{label}: not enough memory to decode this image; downscale it first")
    return ImageReadError(
        f"{label}: cannot decode image ({exc.__class__.__name__}: {exc}); re-export or remove the file"
    )


def load_prepared(
    path: str | os.PathLike, spec: ImageSpec, multiple: int = 1, notes: list[DecodeNote] | None = None
) -> tuple[np.ndarray, Geometry]:
    """Read and prepare one image file. The original size in the geometry is the file's (after EXIF
    orientation), even with draft decoding. Decode notes go to ``notes`` (see :func:`read_image`).
    A resize target over :data:`MAX_PREPARED_PIXELS` is an :class:`ImageReadError`, not a MemoryError.
    """
    path = Path(path)
    try:
        with Image.open(path, formats=_formats()) as probe:
            full = (probe.height, probe.width)
            try:
                if _exif_orientation(probe) in _ORIENTATION_SWAPS_AXES:
                    full = (probe.width, probe.height)
            except Exception:  # read_image reports unreadable EXIF
                pass
    except (FileNotFoundError, Image.DecompressionBombError, UnidentifiedImageError, *DECODER_ERRORS) as exc:
        raise _decode_error(path, exc) from None
    target = target_size(full, spec)
    if target[0] * target[1] > MAX_PREPARED_PIXELS or min(target) < 1:
        raise ImageReadError(
            f"{path}: resizing {full[0]}×{full[1]} to {target[0]}×{target[1]} ({spec.resize}) is outside what vprkit "
            f"feeds a backbone (1…{MAX_PREPARED_PIXELS} pixels); choose a smaller image size"
        )
    img = read_image(path, target if spec.resize != "none" else None, notes=notes)
    if (img.height, img.width) != full and spec.resize == "none":  # pragma: no cover - defensive
        full = (img.height, img.width)
    return prepare_image(img, spec, multiple, original_size=full)


@dataclass
class Batch:
    """A batch of prepared images of one size. ``pixels`` is B×3×H×W float32 in [0, 1]."""

    keys: list[str]
    pixels: "np.ndarray"
    geometries: list[Geometry]
    failures: list[tuple[str, str]] = field(default_factory=list)


# ---- image sources: files under a folder, files anywhere, or frames already decoded ----------------
ImageInput = Union[str, os.PathLike, np.ndarray, Image.Image]


def as_pil(image: np.ndarray | Image.Image, name: str = "image") -> Image.Image:
    """A decoded frame (``H×W``, ``H×W×3`` or ``H×W×4`` array, or a PIL image) as an RGB PIL image.

    uint8 arrays are taken as they are; other integer types are scaled by their dtype's range and
    float arrays are taken as [0, 1] (what OpenCV, imageio and torchvision hand out), so a camera
    loop can pass its frames without writing them to disk. Channel order is RGB.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or min(arr.shape[:2]) < 1:
        raise ImageReadError(f"{name}: a decoded image must be H×W, H×W×3 or H×W×4, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype.kind in "ui":
        arr = np.round(arr.astype(np.float64) / np.iinfo(arr.dtype).max * 255).astype(np.uint8)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageReadError(f"{name}: a float image must be finite")
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    else:
        raise ImageReadError(f"{name}: cannot use an image of dtype {arr.dtype}")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise ImageReadError(
            f"{name}: {arr.shape[1]}×{arr.shape[0]} pixels is larger than vprkit decodes ({MAX_PIXELS} pixels)"
        )
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")


@dataclass(frozen=True)
class Fingerprint:
    """What an image is: the SHA-256 of its file's bytes (or of a decoded frame's pixels), size and time."""

    sha256: str
    size: int = -1  # bytes of the file; −1 for a decoded frame
    mtime: float = float("nan")  # the file's modification time; NaN for a decoded frame


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> Fingerprint:
    """SHA-256, size and modification time of the file at ``path`` (read in chunks)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        st = path.stat()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                digest.update(block)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    return Fingerprint(digest.hexdigest(), int(st.st_size), float(st.st_mtime))


def frame_fingerprint(image: np.ndarray | Image.Image) -> Fingerprint:
    """SHA-256 of a decoded frame's pixels, shape and dtype."""
    arr = np.ascontiguousarray(np.asarray(image))
    digest = hashlib.sha256(f"{arr.shape}{arr.dtype}".encode())
    digest.update(arr.tobytes())
    return Fingerprint(digest.hexdigest())


class ImageSource:
    """Where a stage gets images from, by key: files or decoded frames behind one interface.

    Stages ask a source for ``keys``, a key's prepared pixels and its :class:`Fingerprint`; they
    never open files themselves, so a server or a camera loop can hand over frames it already decoded.
    """

    keys: list[str]

    def fingerprint(self, key: str) -> Fingerprint:  # pragma: no cover
        """What the image of ``key`` is (content hash, and for files their size and time)."""
        raise NotImplementedError

    def stat(self, key: str) -> tuple[int, float] | None:
        """(size, modification time) of a file-backed key without reading it; None for frames."""
        return None

    def prepare(self, key: str, spec: ImageSpec, multiple: int = 1) -> tuple[np.ndarray, Geometry]:  # pragma: no cover
        """Prepared ``H×W×3`` uint8 pixels of ``key`` and their geometry; raises :class:`ImageReadError`."""
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.keys)


class FolderImages(ImageSource):
    """Image files under ``root``, keyed by their path relative to it (all images found, or ``keys``)."""

    def __init__(self, root: str | os.PathLike, keys: Sequence[str] | None = None):
        self.root = Path(root)
        self.listing: ImageListing | None = None  # what a scan of the folder skipped (None when keys are given)
        if keys is None:
            self.listing = scan_images(self.root)
            for problem in self.listing.problems[:MAX_LISTING_WARNINGS]:
                log.warning("skipped %s", problem)
            self.keys = list(self.listing.keys)
        else:
            self.keys = list(keys)

    def prepare(self, key: str, spec: ImageSpec, multiple: int = 1) -> tuple[np.ndarray, Geometry]:
        return load_prepared(self.root / key, spec, multiple)

    def path(self, key: str) -> Path:
        return self.root / key

    def fingerprint(self, key: str) -> Fingerprint:
        return file_fingerprint(self.root / key)

    def stat(self, key: str) -> tuple[int, float] | None:
        try:
            st = (self.root / key).stat()
        except OSError:
            return None
        return int(st.st_size), float(st.st_mtime)

    def describe(self) -> str:
        return str(self.root)


class FileImages(ImageSource):
    """Image files anywhere, keyed by the path as given (queries from several folders)."""

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.keys = [str(p) for p in paths]

    def prepare(self, key: str, spec: ImageSpec, multiple: int = 1) -> tuple[np.ndarray, Geometry]:
        return load_prepared(Path(key), spec, multiple)

    def fingerprint(self, key: str) -> Fingerprint:
        return file_fingerprint(key)

    def describe(self) -> str:
        return "files"


class MappedFiles(ImageSource):
    """Image files keyed by name, each at its own path (a map whose images came from several folders)."""

    def __init__(self, paths: Mapping[str, str | os.PathLike]):
        self.paths = {k: Path(v) for k, v in paths.items()}
        self.keys = list(self.paths)

    def prepare(self, key: str, spec: ImageSpec, multiple: int = 1) -> tuple[np.ndarray, Geometry]:
        return load_prepared(self.paths[key], spec, multiple)

    def path(self, key: str) -> Path:
        return self.paths[key]

    def fingerprint(self, key: str) -> Fingerprint:
        return file_fingerprint(self.paths[key])

    def describe(self) -> str:
        return "the map's image folders"


class DecodedImages(ImageSource):
    """Frames already in memory (NumPy arrays or PIL images), keyed by name."""

    def __init__(self, images: Mapping[str, np.ndarray | Image.Image]):
        self.images = dict(images)
        self.keys = list(self.images)

    def prepare(self, key: str, spec: ImageSpec, multiple: int = 1) -> tuple[np.ndarray, Geometry]:
        img = as_pil(self.images[key], key)
        return prepare_image(img, spec, multiple)

    def fingerprint(self, key: str) -> Fingerprint:
        return frame_fingerprint(self.images[key])

    def describe(self) -> str:
        return "decoded images"


class MixedImages(ImageSource):
    """Some keys are files, some decoded frames (a query list mixing both)."""

    def __init__(self, parts: Sequence[tuple[str, ImageInput]]):
        self.items = dict(parts)
        if len(self.items) != len(parts):
            raise ImageReadError("two images in one call share a name; give each a distinct name")
        self.keys = [k for k, _ in parts]

    def prepare(self, key: str, spec: ImageSpec, multiple: int = 1) -> tuple[np.ndarray, Geometry]:
        item = self.items[key]
        if isinstance(item, (str, os.PathLike)):
            return load_prepared(Path(item), spec, multiple)
        return prepare_image(as_pil(item, key), spec, multiple)

    def fingerprint(self, key: str) -> Fingerprint:
        item = self.items[key]
        return file_fingerprint(item) if isinstance(item, (str, os.PathLike)) else frame_fingerprint(item)

    def describe(self) -> str:
        return "images"


def image_source(
    images: "ImageSource | str | os.PathLike | Mapping[str, ImageInput] | Sequence[ImageInput]",
    keys: Sequence[str] | None = None,
) -> ImageSource:
    """Whatever a caller holds → an :class:`ImageSource`.

    A folder path → :class:`FolderImages` (``keys`` relative to it, or every image found); a mapping
    name → frame or path; a sequence of paths and/or frames (frames are named ``frame-000000`` …
    by position, paths by the path as given). A source is returned as it is (restricted to ``keys``).
    """
    if isinstance(images, ImageSource):
        if keys is None:
            return images
        return _Subset(images, keys)
    if isinstance(images, (str, os.PathLike)):
        return FolderImages(images, keys)
    if isinstance(images, Mapping):
        items = list(images.items())
    else:
        items = [(str(x) if isinstance(x, (str, os.PathLike)) else f"frame-{i:06d}", x) for i, x in enumerate(images)]
    if all(isinstance(x, (str, os.PathLike)) for _, x in items) and all(k == str(x) for k, x in items):
        return FileImages([x for _, x in items])
    return MixedImages(items)


class _Subset(ImageSource):
    def __init__(self, source: ImageSource, keys: Sequence[str]):
        self.source, self.keys = source, list(keys)

    def prepare(self, key: str, spec: ImageSpec, multiple: int = 1) -> tuple[np.ndarray, Geometry]:
        return self.source.prepare(key, spec, multiple)

    def fingerprint(self, key: str) -> Fingerprint:
        return self.source.fingerprint(key)

    def stat(self, key: str) -> tuple[int, float] | None:
        return self.source.stat(key)

    def describe(self) -> str:
        return self.source.describe()


def _safe_load(source: ImageSource, key: str, spec: ImageSpec, multiple: int):
    try:
        arr, geo = source.prepare(key, spec, multiple)
        return key, arr, geo, None
    except ImageReadError as exc:
        return key, None, None, str(exc)
    except Exception as exc:  # a decoder bug must not kill a 100k-image build
        return key, None, None, f"{key}: unexpected error while reading from {source.describe()} ({exc!r})"


def iter_batches(
    source: "ImageSource | str | os.PathLike",
    keys: Sequence[str] | None,
    spec: ImageSpec,
    multiple: int = 1,
    batch_size: int = 8,
    workers: int = 2,
) -> Iterator[Batch]:
    """Decode images in a thread pool (PIL releases the GIL) and yield same-size batches.

    ``source`` is an :class:`ImageSource` (or a folder path, with ``keys`` relative to it).
    Unreadable images are reported in ``Batch.failures`` instead of raising, so one bad file
    does not stop a map build. Order of ``keys`` is preserved.
    """
    source = image_source(source, keys)
    keys = source.keys
    pending: list[tuple[str, np.ndarray, Geometry]] = []
    failures: list[tuple[str, str]] = []

    def flush():
        nonlocal pending, failures
        if not pending and not failures:
            return None
        if pending:
            pix = np.stack([a for _, a, _ in pending]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        else:
            pix = np.zeros((0, 3, 1, 1), np.float32)
        b = Batch([k for k, _, _ in pending], pix, [g for _, _, g in pending], failures)
        pending, failures = [], []
        return b

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda k: _safe_load(source, k, spec, multiple), keys)
        for key, arr, geo, err in results:
            if err is not None:
                failures.append((key, err))
                continue
            if pending and pending[0][1].shape != arr.shape:
                b = flush()
                if b is not None:
                    yield b
            pending.append((key, arr, geo))
            if len(pending) >= batch_size:
                b = flush()
                if b is not None:
                    yield b
        b = flush()
        if b is not None:
            yield b


def chunked(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
