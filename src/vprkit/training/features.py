"""Backbone features computed once and kept on disk, so heads train without re-running the backbone.

A cache directory holds ``features.npy`` (``N×h×w×D``, float16 by default, written batch by batch
through :func:`numpy.lib.format.open_memmap`), ``global_tokens.npy`` (``N×D``, the same dtype) when the
backbone gives a global token (a ViT's CLS token: SALAD reads it, and the later blocks of a split ViT
attend to it), ``keys.json`` and ``meta.json`` (the backbone's identity, the image spec, the grid,
whether the global tokens are kept, and whether the build completed). A cache written before the
global tokens were kept (its meta does not say) still opens and serves every head that reads only
the patches; :meth:`CachedFeatures.missing_global_tokens` says why a head that needs them cannot
train on it. Opening a cache loads it into RAM only when it fits the given byte budget (the
feature-cache share of ``Config.memory_budget_mb``, see :meth:`vprkit.config.Config.memory_plan`);
otherwise it stays memory-mapped and a batch reads only its own rows. A rebuild with the same
settings whose keys are all in a complete cache reuses it (rows are addressed by key, see
:meth:`CachedFeatures.ids`).

:class:`ImageFeatures` has the same ``batch(ids)`` interface but re-reads the images and runs the
backbone with gradients — what training with unfrozen backbone blocks needs when the images change
from one reading to the next (augmentation). Without that, the frozen part of the backbone is a
fixed function of the image: :class:`SuffixFeatures` caches its output (a :class:`CachedFeatures`
of :meth:`Backbone.split`'s prefix) and runs only the unfrozen blocks, with gradients, on the cache —
the same features up to the cache's float16 rounding, many times faster.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..backbones.base import Backbone, DenseFeatures
from ..backbones.extract import extract
from ..config import Config
from ..errors import ConfigError
from ..images import ImageSource, iter_batches
from ..io import atomic_write_json

FEATURES_FILE = "features.npy"
GLOBAL_TOKENS_FILE = "global_tokens.npy"
GLOBAL_TOKENS_KEY = "global_tokens"  # meta.json: whether GLOBAL_TOKENS_FILE was written (absent: an older cache)
KEYS_FILE = "keys.json"
META_FILE = "meta.json"
CACHE_DTYPES = ("float16", "float32")
SAMPLE_CHUNK = 256  # images whose maps are read (or computed) at once when sampling descriptors: bounds the RAM


def _identity(backbone: Backbone, config: Config, dtype: str) -> dict:
    return {"backbone": backbone.identity(), "image": config.image.to_dict(), "dtype": dtype}


class CachedFeatures:
    """A feature cache on disk (see the module docstring); ``batch(ids)`` gives float32 :class:`DenseFeatures`."""

    def __init__(self, root: str | os.PathLike, max_ram_bytes: int | None = None):
        self.root = Path(root)
        meta_path = self.root / META_FILE
        if not meta_path.is_file():
            raise ConfigError(f"{self.root} is not a feature cache (no {META_FILE})")
        self.meta = json.loads(meta_path.read_text())
        if not self.meta.get("complete"):
            raise ConfigError(f"feature cache {self.root} is incomplete; build it again")
        self.keys: list[str] = json.loads((self.root / KEYS_FILE).read_text())
        mm = np.load(self.root / FEATURES_FILE, mmap_mode="r")
        tokens = np.load(self.root / GLOBAL_TOKENS_FILE, mmap_mode="r") if self.meta.get(GLOBAL_TOKENS_KEY) else None
        self.nbytes = int(mm.nbytes) + (0 if tokens is None else int(tokens.nbytes))
        self.in_memory = max_ram_bytes is None or self.nbytes <= max_ram_bytes
        self.array = np.array(mm) if self.in_memory else mm
        self.global_tokens = tokens if tokens is None or not self.in_memory else np.array(tokens)
        self.index = {k: i for i, k in enumerate(self.keys)}

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.array.shape[1]), int(self.array.shape[2])

    @property
    def dim(self) -> int:
        return int(self.array.shape[3])

    @property
    def stride(self) -> int:
        return int(self.meta["stride"])

    def ids(self, keys: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter((self.index[k] for k in keys), dtype=np.int64, count=len(keys))
        except KeyError as exc:
            raise ConfigError(f"{exc.args[0]!r} is not in the feature cache {self.root}") from None

    def missing_global_tokens(self) -> str | None:
        """Why this cache has no global tokens (one line), or None when it has them."""
        if self.global_tokens is not None:
            return None
        if GLOBAL_TOKENS_KEY not in self.meta:
            return (
                f"feature cache {self.root} was written before vprkit kept the backbone's global (CLS) tokens: "
                "delete it to rebuild it"
            )
        return f"the backbone of feature cache {self.root} gives no global (CLS) token (a ViT's token facet does)"

    def batch(self, ids: Sequence[int] | np.ndarray) -> DenseFeatures:
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")  # sorted reads of a memory map, then back in the asked order
        rows = np.empty((len(ids), *self.array.shape[1:]), dtype=np.float32)
        rows[order] = self.array[ids[order]]
        tokens = None
        if self.global_tokens is not None:
            tokens = np.empty((len(ids), self.global_tokens.shape[1]), dtype=np.float32)
            tokens[order] = self.global_tokens[ids[order]]
            tokens = torch.from_numpy(tokens)
        h, w = self.grid
        return DenseFeatures(torch.from_numpy(rows), self.stride, (h * self.stride, w * self.stride), tokens)

    def descriptor_sample(self, n: int, seed: int = 0, ids: Sequence[int] | None = None) -> np.ndarray:
        """``≤ n`` local descriptors (float32, ``n×D``) drawn uniformly from the cached maps of ``ids``."""
        return sample_descriptors(
            lambda chunk: np.asarray(self.array[chunk], np.float32), len(self), self.grid, n, seed, ids
        )

    @classmethod
    def build(
        cls,
        backbone: Backbone,
        config: Config,
        images: ImageSource,
        out: str | os.PathLike,
        keys: Sequence[str] | None = None,
        dtype: str = "float16",
        progress: bool | str = True,
        max_ram_bytes: int | None = None,
    ) -> "CachedFeatures":
        """Run ``backbone`` once over ``keys`` of ``images`` and write the cache to ``out`` (reused if complete)."""
        if dtype not in CACHE_DTYPES:
            raise ConfigError(f"feature cache dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
        out = Path(out)
        keys = list(images.keys if keys is None else keys)
        ident = _identity(backbone, config, dtype)
        meta_path = out / META_FILE
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            # A complete cache of the same backbone and image spec holding every asked key is reused
            # (rows are found by key), so runs over sub-ranges of one sequence share one cache.
            if (
                old.get("complete")
                and old.get("identity") == ident
                and set(keys) <= set(json.loads((out / KEYS_FILE).read_text()))
            ):
                return cls(out, max_ram_bytes)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_path, {"complete": False, "identity": ident})
        atomic_write_json(out / KEYS_FILE, keys)
        (out / GLOBAL_TOKENS_FILE).unlink(missing_ok=True)  # an earlier build's tokens are not this build's
        tokens = _write_rows(backbone, config, images, keys, out, dtype, progress)
        atomic_write_json(
            meta_path,
            {"complete": True, "identity": ident, "stride": backbone.stride, "n": len(keys), GLOBAL_TOKENS_KEY: tokens},
        )
        return cls(out, max_ram_bytes)


def _write_rows(
    backbone: Backbone,
    config: Config,
    images: ImageSource,
    keys: list[str],
    out: Path,
    dtype: str,
    progress: bool | str,
) -> bool:
    """Run ``backbone`` over ``keys`` and write each image's map (and global token, if the backbone gives
    one) to its row of the cache's arrays; returns whether global tokens were written."""
    row = {k: i for i, k in enumerate(keys)}
    arr = tokens = None
    for batch, feats in extract(
        backbone, config, images, keys, progress and (progress if isinstance(progress, str) else "cache")
    ):
        p = feats.patches.float().cpu().numpy()
        if arr is None:
            arr = np.lib.format.open_memmap(
                out / FEATURES_FILE, mode="w+", dtype=dtype, shape=(len(keys), *p.shape[1:])
            )
            if feats.global_token is not None:
                shape = (len(keys), int(feats.global_token.shape[-1]))
                tokens = np.lib.format.open_memmap(out / GLOBAL_TOKENS_FILE, mode="w+", dtype=dtype, shape=shape)
        if p.shape[1:] != arr.shape[1:]:
            raise ConfigError(
                f"images give feature grids of different sizes ({p.shape[1:3]} vs {arr.shape[1:3]}); "
                "use a fixed image size to cache features"
            )
        rows = [row[k] for k in batch.keys]
        arr[rows] = p.astype(dtype)
        if tokens is not None:
            tokens[rows] = feats.global_token.float().cpu().numpy().astype(dtype)
    if arr is None:
        raise ConfigError(f"no image of {images.describe()} could be read")
    for written in (arr, tokens):
        if written is not None:
            written.flush()
    return tokens is not None


class ImageFeatures:
    """``batch(ids)`` by reading the images and running ``backbone`` with gradients (unfrozen training)."""

    def __init__(self, backbone: Backbone, config: Config, images: ImageSource, keys: Sequence[str]):
        self.backbone, self.config, self.images, self.keys = backbone, config, images, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def missing_global_tokens(self) -> str | None:
        """Why these features have no global (CLS) token, or None when the backbone gives one."""
        return None if self.backbone.has_global_token else f"{self.backbone.name} gives no global (CLS) token"

    def batch(self, ids: Sequence[int] | np.ndarray) -> DenseFeatures:
        keys = [self.keys[int(i)] for i in ids]
        pixels = []
        for b in iter_batches(
            self.images, keys, self.config.image, self.backbone.size_multiple, len(keys), self.config.workers
        ):
            if b.failures:
                raise ConfigError(f"cannot read {b.failures[0][0]}: {b.failures[0][1]}")
            pixels.append(torch.from_numpy(b.pixels))
        return self.backbone(torch.cat(pixels))


class SuffixFeatures:
    """``batch(ids)`` = the unfrozen blocks (``suffix``) run on cached prefix features, with gradients when enabled.

    ``cache`` holds the output of the backbone's frozen prefix (see :meth:`Backbone.split`); the
    suffix is the trainable rest, sharing the backbone's modules. Ids and keys are the cache's.
    The suffix runs in whatever mode it is in (eval for frozen BatchNorm statistics, as training
    unfrozen blocks does here); under ``torch.no_grad()`` (validation) it is a plain forward.
    """

    def __init__(self, cache: CachedFeatures, suffix: torch.nn.Module):
        self.cache, self.suffix = cache, suffix
        self._grid: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.cache)

    @property
    def keys(self) -> list[str]:
        return self.cache.keys

    def ids(self, keys: Sequence[str]) -> np.ndarray:
        return self.cache.ids(keys)

    def missing_global_tokens(self) -> str | None:
        """The cache's reason: a split ViT's last blocks restart from the cached CLS token."""
        return self.cache.missing_global_tokens()

    @property
    def dim(self) -> int:
        return int(self.suffix.dim)

    @property
    def stride(self) -> int:
        return int(self.suffix.stride)

    @property
    def grid(self) -> tuple[int, int]:
        """The suffix's output grid (run once on one cached row: blocks may change the resolution)."""
        if self._grid is None:
            with torch.no_grad():
                self._grid = self.batch([0]).grid
        return self._grid

    def batch(self, ids: Sequence[int] | np.ndarray) -> DenseFeatures:
        return self.suffix(self.cache.batch(ids))

    def descriptor_sample(self, n: int, seed: int = 0, ids: Sequence[int] | None = None) -> np.ndarray:
        """``≤ n`` local descriptors of the suffix's output (initial weights), drawn like :meth:`CachedFeatures.descriptor_sample`."""

        def maps(chunk: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return self.batch(chunk).patches.float().numpy()

        return sample_descriptors(maps, len(self), self.grid, n, seed, ids)


def sample_descriptors(
    maps: Callable[[np.ndarray], np.ndarray],
    count: int,
    grid: tuple[int, int],
    n: int,
    seed: int = 0,
    ids: Sequence[int] | None = None,
) -> np.ndarray:
    """``≤ n`` local descriptors (float32, ``n×D``): ``⌈n / images⌉`` random cells from each of up to ``n``
    random images among ``ids`` (default all ``count``); ``maps(sorted ids)`` gives their ``B×h×w×D``
    maps, asked for :data:`SAMPLE_CHUNK` images at a time so the sample never holds every map."""
    rng = np.random.default_rng(seed)
    pool = np.arange(count) if ids is None else np.asarray(ids)
    h, w = grid
    per = max(1, int(np.ceil(n / max(1, len(pool)))))
    take = np.sort(rng.choice(pool, size=min(len(pool), max(1, n // per)), replace=False))
    out = []
    for start in range(0, len(take), SAMPLE_CHUNK):
        chunk = take[start : start + SAMPLE_CHUNK]
        for m in maps(chunk).reshape(len(chunk), h * w, -1):
            cells = rng.choice(h * w, size=min(per, h * w), replace=False)
            out.append(m[cells].astype(np.float32))
    return np.concatenate(out)[:n]
