"""Reading and resizing images safely, and batching them with a small worker pool.

Every image goes through :func:`prepare_image`, which returns the pixels a backbone sees plus the
:class:`Geometry` that maps them back to the original file (needed to put segment masks and
patch matches on the right pixels).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import ConfigError, ImageReadError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Largest image decoded at full size; bigger JPEGs are decoded at reduced scale (draft mode) and
# anything else that large is refused rather than allowed to exhaust memory.
MAX_PIXELS = 12_000 * 12_000
RESIZE_MODES = ("fixed", "keep_aspect", "resize_crop", "none")


@dataclass(frozen=True)
class ImageSpec:
    """How images are resized before the backbone.

    - ``fixed``: resize to exactly ``size`` = (height, width), ignoring aspect (VPR benchmarks do this).
    - ``keep_aspect``: scale so the longer side equals ``max(size)``, keeping the aspect ratio.
    - ``resize_crop``: resize to ``size`` then centre-crop to a multiple of the backbone's patch size
      (AnyLoc: 480×640 → 476×630 for ViT/14).
    - ``none``: keep the original size.
    In every mode the result is centre-cropped down to a multiple of the backbone's ``size_multiple``;
    the crop offset is recorded in :class:`Geometry`.
    """

    size: tuple[int, int] | None = (240, 320)
    resize: str = "fixed"

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize mode {self.resize!r} is not one of {RESIZE_MODES}")
        if self.resize != "none" and (self.size is None or min(self.size) <= 0):
            raise ConfigError(f"resize mode {self.resize!r} needs a positive size, got {self.size}")

    def to_dict(self) -> dict:
        return {"size": list(self.size) if self.size else None, "resize": self.resize}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        return cls(size=tuple(d["size"]) if d.get("size") else None, resize=d.get("resize", "fixed"))


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


def list_images(folder: str | os.PathLike) -> list[str]:
    """Relative paths (POSIX style, sorted) of every image under ``folder``, recursively."""
    root = Path(folder)
    if not root.is_dir():
        raise ImageReadError(f"image folder {root} does not exist or is not a folder")
    found = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    ]
    return sorted(found)


def read_image(path: str | os.PathLike, target_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image as RGB, with one clear error for every way it can fail.

    ``target_size`` (height, width) lets JPEGs decode at a reduced scale (draft mode), which is
    both faster and bounds memory for huge photographs.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            if target_size is not None and img.format == "JPEG":
                img.draft("RGB", (target_size[1], target_size[0]))
            if img.width * img.height > MAX_PIXELS:
                raise ImageReadError(
                    f"{path}: {img.width}×{img.height} pixels is larger than vprkit decodes "
                    f"({MAX_PIXELS} pixels); downscale it first"
                )
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            img.load()
            return img.convert("RGB")
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({exc}); re-export or remove the file") from None


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
    return max(1, round(h * s)), max(1, round(w * s))


def prepare_image(
    img: Image.Image, spec: ImageSpec, multiple: int = 1, original_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, Geometry]:
    """Resize per ``spec`` and centre-crop to ``multiple``; return HxWx3 uint8 and its geometry.

    ``original_size`` is the file's (height, width) when ``img`` was decoded at reduced scale.
    """
    oh, ow = original_size or (img.height, img.width)
    th, tw = target_size((oh, ow), spec)
    if (th, tw) != (oh, ow):
        img = img.resize((tw, th), Image.BILINEAR)
    top, left, nh, nw = _multiple_crop(th, tw, multiple)
    arr = np.asarray(img, dtype=np.uint8)[top : top + nh, left : left + nw]
    return np.ascontiguousarray(arr), Geometry((oh, ow), (th / oh, tw / ow), (top, left), (nh, nw))


def load_prepared(path: str | os.PathLike, spec: ImageSpec, multiple: int = 1) -> tuple[np.ndarray, Geometry]:
    """Read and prepare one image file. The original size in the geometry is the file's, even with draft decoding."""
    path = Path(path)
    try:
        with Image.open(path) as probe:
            full = (probe.height, probe.width)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({exc}); re-export or remove the file") from None
    img = read_image(path, target_size(full, spec) if spec.resize != "none" else None)
    return prepare_image(img, spec, multiple, original_size=full)


@dataclass
class Batch:
    """A batch of prepared images of one size. ``pixels`` is B×3×H×W float32 in [0, 1]."""

    keys: list[str]
    pixels: "np.ndarray"
    geometries: list[Geometry]
    failures: list[tuple[str, str]] = field(default_factory=list)


def _safe_load(root: Path, key: str, spec: ImageSpec, multiple: int):
    try:
        arr, geo = load_prepared(root / key, spec, multiple)
        return key, arr, geo, None
    except ImageReadError as exc:
        return key, None, None, str(exc)
    except Exception as exc:  # a decoder bug must not kill a 100k-image build
        return key, None, None, f"{root / key}: unexpected error while reading ({exc!r})"


def iter_batches(
    root: str | os.PathLike,
    keys: Sequence[str],
    spec: ImageSpec,
    multiple: int = 1,
    batch_size: int = 8,
    workers: int = 2,
) -> Iterator[Batch]:
    """Decode images in a thread pool (PIL releases the GIL) and yield same-size batches.

    Unreadable images are reported in ``Batch.failures`` instead of raising, so one bad file
    does not stop a map build. Order of ``keys`` is preserved.
    """
    root = Path(root)
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
        results = pool.map(lambda k: _safe_load(root, k, spec, multiple), keys)
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
