"""The segmenter contract and the mask → patch-grid mapping.

A *segmenter* turns one prepared image (the pixels the backbone sees, ``H×W×3`` uint8, already
resized and centre-cropped) into binary masks ``S×H×W`` (bool) in those same pixels. Because the
masks live in prepared-image coordinates, the crop offset of :class:`~vprkit.images.Geometry` is
already applied; masks computed on the *original* file must go through :func:`masks_to_prepared`
first (tested with a crop offset in ``tests/segments/test_masks.py``).

Mapping to the backbone's grid (:func:`masks_to_patches`): cell (i, j) covers prepared pixels
``[i·s, (i+1)·s) × [j·s, (j+1)·s)`` for stride ``s``; a patch belongs to a segment if *any* mask
pixel falls in it, so segments overlap at their borders (SegVLAD's rule).

Cells covered by no segment (SAM leaves gaps; the feature-clustering segmenter drops tiny
components) are handled explicitly by ``uncovered``:

- ``"nearest"`` (default): each uncovered cell joins the segment(s) of the nearest covered cell
  (Euclidean distance on the grid), so every patch contributes to some SuperSegment;
- ``"rest"``: all uncovered cells form one extra segment (appended last), as a "background" region;
- ``"drop"``: uncovered cells belong to no segment.
If no cell is covered at all, the whole image becomes one segment.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from scipy import ndimage

from ..errors import ConfigError
from ..registry import Registry

UNCOVERED_MODES = ("nearest", "rest", "drop")


class Segmenter:
    """Base class: ``segment(image, features)`` → ``S×H×W`` bool masks in prepared-image pixels.

    ``image`` is ``H×W×3`` uint8; ``features`` is the image's dense feature grid ``h×w×D``
    (numpy, channels last) for segmenters that set ``needs_features``, else may be ``None``.
    """

    name: str = "segmenter"
    needs_features: bool = False

    def segment(
        self, image: np.ndarray, features: np.ndarray | None = None, stride: int | None = None
    ) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, image: np.ndarray, features: np.ndarray | None = None, stride: int | None = None) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ConfigError(f"{self.name} expects an H×W×3 image, got shape {image.shape}")
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        masks = np.asarray(self.segment(image, features, stride), dtype=bool)
        if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
            raise ConfigError(f"{self.name} returned masks of shape {masks.shape} for an image of {image.shape[:2]}")
        return masks[masks.any(axis=(1, 2))] if len(masks) else masks

    def identity(self) -> dict[str, Any]:
        return {"segmenter": self.name}


SEGMENTERS: Registry[Callable[..., Segmenter]] = Registry("segmenter")


def build_segmenter(name: str, **options: Any) -> Segmenter:
    try:
        return SEGMENTERS.get(name)(**options)
    except TypeError as exc:
        raise ConfigError(f"invalid options for segmenter {name!r}: {exc}") from None


def labels_to_masks(labels: np.ndarray) -> np.ndarray:
    """An ``H×W`` integer label image → ``S×H×W`` bool masks, one per distinct label ≥ 0 (ascending)."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids >= 0]
    return labels[None] == ids[:, None, None]


def grid_shape(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """The feature grid of an image of ``image_size`` pixels at ``stride`` (ceil, as padded convs give)."""
    return -(-image_size[0] // stride), -(-image_size[1] // stride)


def masks_to_patches(masks: np.ndarray, grid: tuple[int, int], stride: int) -> np.ndarray:
    """``S×H×W`` pixel masks → ``S×(h·w)`` bool: patch (i, j) is in a segment if any of its pixels is.

    Pixels beyond ``h·stride``/``w·stride`` are ignored; cells beyond the image are empty.
    """
    masks = np.asarray(masks, dtype=bool)
    s, H, W = masks.shape
    h, w = grid
    canvas = np.zeros((s, h * stride, w * stride), dtype=bool)
    hh, ww = min(H, h * stride), min(W, w * stride)
    canvas[:, :hh, :ww] = masks[:, :hh, :ww]
    return canvas.reshape(s, h, stride, w, stride).any(axis=(2, 4)).reshape(s, h * w)


def handle_uncovered(seg_patch: np.ndarray, grid: tuple[int, int], mode: str = "nearest") -> np.ndarray:
    """Give patches covered by no segment a home (see the module docstring). Returns ``S'×N`` bool."""
    if mode not in UNCOVERED_MODES:
        raise ConfigError(f"uncovered must be one of {UNCOVERED_MODES}, got {mode!r}")
    seg_patch = np.asarray(seg_patch, dtype=bool)
    n = grid[0] * grid[1]
    if seg_patch.shape[0] == 0 or not seg_patch.any():
        return np.ones((1, n), dtype=bool)
    covered = seg_patch.any(0)
    if covered.all() or mode == "drop":
        return seg_patch
    if mode == "rest":
        return np.concatenate([seg_patch, (~covered)[None]], 0)
    # nearest: indices of the nearest covered cell for every cell
    _, (iy, ix) = ndimage.distance_transform_edt(~covered.reshape(grid), return_indices=True)
    src = (iy * grid[1] + ix).reshape(-1)
    out = seg_patch.copy()
    out[:, ~covered] = seg_patch[:, src[~covered]]
    return out


def masks_to_prepared(masks: np.ndarray, geometry) -> np.ndarray:
    """Masks on the original file (``S×oh×ow``) → prepared-image masks (resize, then the crop offset).

    Uses the same transformation as :func:`vprkit.images.prepare_image`: scale by
    ``geometry.scale`` then remove ``geometry.crop`` (top, left), keeping ``geometry.size``.
    Nearest-neighbour sampling: prepared pixel (x, y) looks up original ``((x + left)/sx, (y + top)/sy)``.
    """
    masks = np.asarray(masks, dtype=bool)
    h, w = geometry.size
    top, left = geometry.crop
    sy, sx = geometry.scale
    ys = np.clip(((np.arange(h) + top + 0.5) / sy).astype(np.int64), 0, masks.shape[1] - 1)
    xs = np.clip(((np.arange(w) + left + 0.5) / sx).astype(np.int64), 0, masks.shape[2] - 1)
    return masks[:, ys][:, :, xs]


def mask_centroids(masks: np.ndarray) -> np.ndarray:
    """``S×2`` (x, y) pixel centroids of ``S×H×W`` masks (NaN for empty masks)."""
    masks = np.asarray(masks, dtype=bool)
    area = masks.sum(axis=(1, 2)).astype(np.float64)
    ys = np.arange(masks.shape[1], dtype=np.float64)
    xs = np.arange(masks.shape[2], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = (masks.sum(2) @ ys) / area
        cx = (masks.sum(1) @ xs) / area
    return np.stack([cx, cy], 1)


def patch_centroids(seg_patch: np.ndarray, grid: tuple[int, int], stride: int) -> np.ndarray:
    """``S×2`` (x, y) pixel centroids of segments given as ``S×(h·w)`` patch sets."""
    h, w = grid
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    centres = np.stack([(xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride], 1)
    m = np.asarray(seg_patch, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (m @ centres) / m.sum(1, keepdims=True)
