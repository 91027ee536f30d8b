"""Harder query sets made from an existing dataset: rotated, zoomed and off-centre cropped queries.

Re-ranking is meant to help where the global descriptor is unsure — and must not hurt where the
views are simply transformed (an aerial camera turned, a longer lens, a framing shifted). These
functions build such query sets from any labelled :class:`~vprkit.datasets.Dataset` so a method can
be measured on them: each query image is transformed deterministically and written once into a
cache folder (PNG, lossless), and the returned dataset points at those files while keeping the
database and the ground truth (positives are per query *position*, and the queries keep their order).

Kinds (:data:`QUERY_TRANSFORMS`, ``amount`` in brackets):

- ``rotate`` (degrees, counter-clockwise): rotation about the image centre on the same canvas;
  corners the rotated picture leaves empty are black (what a turned camera that we then crop to
  the sensor frame cannot see). 90° on a non-square image keeps the canvas: the picture is then
  shrunk to fit, as a phone held sideways shows it.
- ``zoom`` (factor > 1): the centre ``1/amount`` of each side, resized back to the original size.
- ``crop`` (fraction of each side kept, 0 < amount < 1): an off-centre window, anchored at a corner
  chosen per query from its position (cycling through the four), resized back.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import ConfigError
from ..images import read_image
from ..io import atomic_write_bytes
from ..registry import Registry
from .base import Dataset

# Interpolation for every resampling here: area-preserving when shrinking, smooth when enlarging.
INTERPOLATION = cv2.INTER_LINEAR
# The four corners an off-centre crop anchors at, cycled through by query position: (x, y) in {0, 1}.
CROP_ANCHORS = ((0, 0), (1, 0), (1, 1), (0, 1))
# Bumped when a transform's output changes, so stale cache folders are not reused.
TRANSFORM_VERSION = 1
# zlib level of the cached PNGs: fast, and lossless whatever the level.
PNG_LEVEL = 1

Transform = Callable[[np.ndarray, float, int], np.ndarray]  # (RGB uint8 image, amount, query position) → image
QUERY_TRANSFORMS: Registry[Transform] = Registry("query transform")


def rotate(image: np.ndarray, degrees: float, position: int = 0) -> np.ndarray:
    """``image`` rotated by ``degrees`` counter-clockwise about its centre, scaled to fit the canvas
    only when a quarter turn would not fit (see module docs); uncovered corners black."""
    h, w = image.shape[:2]
    rad = math.radians(degrees)
    # the rotated frame's bounding box; shrink only if it overflows in both ways (portrait ↔ landscape)
    bw = abs(w * math.cos(rad)) + abs(h * math.sin(rad))
    bh = abs(w * math.sin(rad)) + abs(h * math.cos(rad))
    quarter_turn = abs(math.sin(rad)) > abs(math.cos(rad))
    scale = min(w / bw, h / bh) if quarter_turn else 1.0
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, scale)
    return cv2.warpAffine(image, m, (w, h), flags=INTERPOLATION, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def zoom(image: np.ndarray, factor: float, position: int = 0) -> np.ndarray:
    """The centre ``1/factor`` of each side, resized back to the image's size (a longer lens)."""
    if factor < 1:
        raise ConfigError(f"zoom factor must be ≥ 1, got {factor}")
    h, w = image.shape[:2]
    ch, cw = max(1, round(h / factor)), max(1, round(w / factor))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(image[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=INTERPOLATION)


def crop(image: np.ndarray, keep: float, position: int = 0) -> np.ndarray:
    """A window of ``keep`` × each side anchored at corner ``CROP_ANCHORS[position % 4]``, resized back."""
    if not 0 < keep < 1:
        raise ConfigError(f"crop keeps a fraction 0 < amount < 1 of each side, got {keep}")
    h, w = image.shape[:2]
    ch, cw = max(1, round(h * keep)), max(1, round(w * keep))
    ax, ay = CROP_ANCHORS[position % len(CROP_ANCHORS)]
    y0, x0 = ay * (h - ch), ax * (w - cw)
    return cv2.resize(image[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=INTERPOLATION)


QUERY_TRANSFORMS.register("rotate", rotate)
QUERY_TRANSFORMS.register("zoom", zoom)
QUERY_TRANSFORMS.register("crop", crop)


def transformed_name(dataset: Dataset, kind: str, amount: float) -> str:
    """``corridor+rotate30``: the dataset's name and the transform (also the cache sub-folder)."""
    return f"{dataset.name}+{kind}{amount:g}"


def transformed_queries(
    dataset: Dataset, kind: str, amount: float, out_dir: str | os.PathLike, progress: bool = False
) -> Dataset:
    """``dataset`` with every query transformed by ``kind``/``amount`` (see module docs).

    Images are written once into ``out_dir/<name>-v<version>/`` (PNG, atomically) and reused on later
    calls; the database, its poses and the ground truth are unchanged (queries keep their order).
    """
    if kind not in QUERY_TRANSFORMS:
        raise ConfigError(f"unknown query transform {kind!r}; available: {', '.join(QUERY_TRANSFORMS.names())}")
    if dataset.ground_truth is None:
        raise ConfigError(
            f"{dataset.name}: transformed query sets need a labelled dataset (its ground truth is reused)"
        )
    fn = QUERY_TRANSFORMS.get(kind)
    name = transformed_name(dataset, kind, amount)
    folder = Path(out_dir) / f"{name.replace(':', '_').replace('/', '_')}-v{TRANSFORM_VERSION}"
    keys = [str(Path(k).with_suffix(".png")) for k in dataset.query_images]
    for i, (src, dst) in enumerate(
        tqdm(list(zip(dataset.query_images, keys)), desc=f"queries {name}", disable=not progress, unit="img")
    ):
        target = folder / dst
        if target.exists():
            continue
        image = np.asarray(read_image(Path(dataset.queries_dir) / src))
        out = fn(image, float(amount), i)
        ok, png = cv2.imencode(".png", cv2.cvtColor(out, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
        if not ok:
            raise OSError(f"could not encode {target}")
        atomic_write_bytes(target, png.tobytes())
    return dataclasses.replace(
        dataset,
        name=name,
        queries_dir=folder,
        query_images=keys,
        description=(dataset.description + f"; queries {kind} {amount:g}").lstrip("; "),
        options={**dataset.options, "query_transform": {"kind": kind, "amount": float(amount)}},
    )
