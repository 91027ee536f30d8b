"""The batched extraction loop: an image source → dense features, batch by batch, within a memory plan.

Decoding runs in a small thread pool ahead of the backbone; with a memory budget the images decoded
ahead are capped (:func:`decode_prefetch_images`). :class:`FeatureCache` keeps the features of one
pass (a vocabulary pass) for the next (the encoding pass), up to a byte budget, so small maps run
the backbone once. The backbone runs under ``torch.inference_mode`` here: freezing is the caller's
choice, and this is the inference caller.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..device import module_device
from ..config import (
    BUDGET_SHARE_DECODE_BUFFER,
    BUDGET_SHARE_VOCABULARY_POOL,
    MIB,
    MIN_MEMORY_BUDGET_MB,
    Config,
    MemoryPlan,
)
from ..errors import ConfigError, ImageReadError
from ..images import Batch, ImageSource, ImageSpec, image_source, iter_batches
from .base import Backbone, DenseFeatures

# Resize mode "none" keeps each file's size, unknown before reading: memory checks assume full-HD frames.
ASSUMED_ORIGINAL_SIZE = (1080, 1920)
RGB_CHANNELS = 3
FLOAT32_BYTES = 4

FailureHandler = Callable[[str, str], None]


def ignore_failures(key: str, message: str) -> None:
    """An ``on_failure`` handler for passes where a missing image only shrinks a sample."""


@dataclass(frozen=True)
class ExtractionOptions:
    """What the extraction loop reads of a configuration: how images are prepared and batched, and how
    many decoded images may wait for the backbone (the memory plan's decode share; ``None``: all).

    Stages that run the loop (the re-ranker computing a map's patches, the domain analysis, SegVLAD's
    explanations) hold one of these instead of the whole :class:`~vprkit.config.Config`.
    """

    image: ImageSpec = field(default_factory=ImageSpec)
    batch_size: int = 8
    workers: int = 2
    decode_buffer_bytes: int | None = None

    @classmethod
    def from_config(cls, config: Config) -> "ExtractionOptions":
        return cls(config.image, config.batch_size, config.workers, config.memory_plan().decode_buffer_bytes)


# ---- memory ------------------------------------------------------------------------------------
def prepared_size_bound(spec: ImageSpec) -> tuple[int, int]:
    """The largest (height, width) an image can have after preparation under ``spec``."""
    if spec.resize in ("fixed", "resize_crop"):
        return int(spec.size[0]), int(spec.size[1])
    if spec.resize in ("keep_aspect", "max_side"):
        side = int(max(spec.size))
        return side, side
    return ASSUMED_ORIGINAL_SIZE


def decoded_image_bytes(options: ExtractionOptions | Config) -> int:
    """Bytes of one decoded, prepared image waiting for the backbone (uint8 RGB)."""
    h, w = prepared_size_bound(options.image)
    return h * w * RGB_CHANNELS


def image_feature_bytes(config: Config, backbone: Backbone) -> int:
    """Bytes of one image's float32 patch descriptors on the backbone's grid."""
    h, w = prepared_size_bound(config.image)
    return max(1, h // backbone.stride) * max(1, w // backbone.stride) * backbone.dim * FLOAT32_BYTES


def memory_plan(config: Config, backbone: Backbone) -> MemoryPlan:
    """:meth:`Config.memory_plan`, after checking the budget can hold what one step needs.

    A budget must let the descriptor pool hold one image's patch descriptors and the decode
    buffer one batch of images; otherwise the error names the smallest budget that works.
    """
    plan = config.memory_plan()
    if plan.budget_bytes is None:
        return plan
    needs = {
        "one batch of decoded images": config.batch_size * decoded_image_bytes(config) / BUDGET_SHARE_DECODE_BUFFER
    }
    if config.vocabulary.max_bytes is None:
        needs["one image's patch descriptors"] = image_feature_bytes(config, backbone) / BUDGET_SHARE_VOCABULARY_POOL
    minimum_mb = max(MIN_MEMORY_BUDGET_MB, *(math.ceil(b / MIB) for b in needs.values()))
    if config.memory_budget_mb < minimum_mb:
        h, w = prepared_size_bound(config.image)
        raise ConfigError(
            f"memory budget {config.memory_budget_mb} MB is too small for {config.name} ({backbone.dim}-d, stride "
            f"{backbone.stride}, {w}×{h} images, batch_size {config.batch_size}): its shares must hold "
            f"{' and '.join(needs)}; the minimum is {minimum_mb} MB"
        )
    return plan


def decode_prefetch_images(options: ExtractionOptions | Config, plan: MemoryPlan) -> int | None:
    """How many decoded images may wait for the backbone (a multiple of ``batch_size``); None = all."""
    return _prefetch_images(options, plan.decode_buffer_bytes)


def _prefetch_images(options: ExtractionOptions | Config, decode_buffer_bytes: int | None) -> int | None:
    if decode_buffer_bytes is None:
        return None
    batches = decode_buffer_bytes // (decoded_image_bytes(options) * options.batch_size)
    return max(1, batches) * options.batch_size


# ---- the loop ----------------------------------------------------------------------------------
def extract(
    backbone: Backbone,
    options: ExtractionOptions | Config,
    images: ImageSource | str | os.PathLike,
    keys: Sequence[str] | None = None,
    progress: bool | str = False,
    on_failure: FailureHandler | None = None,
) -> Iterator[tuple[Batch, DenseFeatures]]:
    """Dense features of ``keys`` of ``images`` (a source, or a folder the keys are relative to), batch by batch.

    Unreadable images go to ``on_failure(key, message)``; without a handler the first one raises
    :class:`ImageReadError`. The decoder pool runs ahead of the backbone (decoding is much faster);
    with a memory budget the keys go to it in chunks of :func:`decode_prefetch_images`, so the images
    decoded ahead stay within the budget's decode share instead of growing with the number of images.
    Pixels go to the backbone's device; features come back on it. ``options`` may be a whole
    :class:`~vprkit.config.Config`, read through :meth:`ExtractionOptions.from_config`.
    """
    if isinstance(options, Config):
        options = ExtractionOptions.from_config(options)
    source = image_source(images, keys)
    keys = source.keys
    bar = tqdm(
        total=len(keys),
        desc=progress if isinstance(progress, str) else "extract",
        unit="img",
        disable=not progress,
        leave=False,
    )
    chunk = _prefetch_images(options, options.decode_buffer_bytes) or max(1, len(keys))
    batches = itertools.chain.from_iterable(
        iter_batches(
            source, keys[i : i + chunk], options.image, backbone.size_multiple, options.batch_size, options.workers
        )
        for i in range(0, len(keys), chunk)
    )
    device = module_device(backbone)
    try:
        for batch in batches:
            for key, msg in batch.failures:
                if on_failure is None:
                    raise ImageReadError(msg)
                on_failure(key, msg)
            bar.update(len(batch.keys) + len(batch.failures))
            if not batch.keys:
                continue
            with torch.inference_mode():
                feats = backbone(torch.from_numpy(batch.pixels).to(device))
            yield batch, feats
    finally:
        bar.close()


class FeatureCache:
    """Dense features kept from one pass for the next (vocabulary pass → encoding pass), up to a byte budget.

    On maps small enough to fit, this saves running the backbone twice over the same images.
    Features are kept on the CPU, pixels as uint8 (4× smaller than float, exact on the way back).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.batches: list[tuple[Batch, DenseFeatures]] = []

    def add(self, batch: Batch, feats: DenseFeatures) -> None:
        pixels = np.round(batch.pixels * 255).astype(np.uint8)
        size = feats.patches.numel() * feats.patches.element_size() + pixels.nbytes
        if self.nbytes + size <= self.max_bytes:
            g = None if feats.global_token is None else feats.global_token.cpu()
            self.batches.append(
                (
                    Batch(batch.keys, pixels, batch.geometries),
                    DenseFeatures(feats.patches.cpu(), feats.stride, feats.image_size, g),
                )
            )
            self.nbytes += size

    def keys(self) -> set[str]:
        return {k for b, _ in self.batches for k in b.keys}

    def take(self, wanted: set[str]) -> Iterator[tuple[Batch, DenseFeatures]]:
        """Cached batches restricted to ``wanted`` keys (the cache is emptied as it goes)."""
        while self.batches:
            batch, feats = self.batches.pop(0)
            batch = Batch(batch.keys, batch.pixels.astype(np.float32) / 255.0, batch.geometries)
            idx = [i for i, k in enumerate(batch.keys) if k in wanted]
            if not idx:
                continue
            if len(idx) < len(batch.keys):
                sel = torch.as_tensor(idx)
                batch = Batch([batch.keys[i] for i in idx], batch.pixels[idx], [batch.geometries[i] for i in idx])
                g = None if feats.global_token is None else feats.global_token[sel]
                feats = DenseFeatures(feats.patches[sel], feats.stride, feats.image_size, g)
            yield batch, feats
        self.nbytes = 0


def sample_keys(keys: Sequence[str], n: int, seed: int) -> list[str]:
    """At most ``n`` of ``keys``, drawn without replacement (seeded), in their original order."""
    if len(keys) <= n:
        return list(keys)
    rng = np.random.default_rng(seed)
    return [keys[i] for i in sorted(rng.choice(len(keys), n, replace=False))]
