"""The frozen configuration a preset resolves to; saved with every map and run so results can be reproduced.

This module is pure data (standard library only): resolving a preset never imports torch, numpy,
PIL or a stage package. :class:`Config` holds every setting of a run; its component options
(``backbone_options``, ``aggregator_options``, …) are checked against the typed schemas of
:mod:`vprkit.options` by :meth:`Config.validate`, which :func:`vprkit.presets.resolve` calls.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .options import did_you_mean, validate_config, validate_options

STORE_DTYPES = ("float16", "float32")
RESIZE_MODES = ("fixed", "keep_aspect", "max_side", "resize_crop", "none")
INTERPOLATIONS = ("bilinear", "bicubic")  # PIL's (antialiased when shrinking, as torchvision's Resize on PIL images)
TO_MULTIPLE = ("crop", "resize")
# Where the networks run: "auto" = CUDA, then Apple MPS, then the CPU; or an explicit device.
DEVICE_AUTO = "auto"
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"
# Settings that change how a run uses the machine, not what a map holds: two maps whose settings
# differ only in these are the same map (a build may resume with other values, e.g. a smaller
# budget on a smaller machine or another device). ``rerank`` is a query-time setting: what a map
# stores for re-ranking is its ``extensions["patches"]``. See :meth:`Config.map_settings`.
RUNTIME_SETTINGS = ("memory_budget_mb", "device", "threads", "workers", "batch_size", "rerank")
RUNTIME_VOCABULARY_SETTINGS = ("max_bytes",)
# How a map is searched, not what it holds: the index is derived from the stored descriptors and can
# be replaced (``vprkit map compress``) without re-encoding a single image, so a later build that
# adds images is not refused over it (the map keeps the index it was compressed with).
SERVING_SETTINGS = ("index", "index_backend", "index_options")
# Re-ranking: spatial scorers, stored patch dtypes, and the defaults of Patch-NetVLAD's presets.
RERANK_SCORERS = ("ransac", "usac", "rapid", "similarity", "affine")
RERANK_DTYPES = ("float16", "float32", "int8")
DEFAULT_RERANK_SHORTLIST = 100
# Weight of the global score in the final ranking; the patch evidence gets the rest.
DEFAULT_RERANK_GLOBAL_WEIGHT = 0.5
# AnyLoc's sampling rule for large maps: above this many images, sample a fraction of them and
# every ``patch_step``-th patch in each direction.
ANYLOC_LARGE_MAP_IMAGES = 2000
ANYLOC_LARGE_MAP_FRACTION = 0.3
ANYLOC_LARGE_MAP_PATCH_STEP = 2

MIB = 2**20
# Working-memory defaults when no ``Config.memory_budget_mb`` is given (the behaviour before budgets).
DEFAULT_VOCABULARY_MAX_BYTES = 256 * MIB
DEFAULT_FEATURE_CACHE_BYTES = 512 * MIB
# How a memory budget is split (fractions of the budget; they sum to 1). The descriptor pool gets
# the largest share because its size sets the quality of the k-means sample; the feature cache only
# saves time (a second backbone pass), and the decode buffer only has to keep the backbone fed.
BUDGET_SHARE_VOCABULARY_POOL = 0.5
BUDGET_SHARE_FEATURE_CACHE = 0.25
BUDGET_SHARE_DECODE_BUFFER = 0.25
# Below this no useful vocabulary can be clustered (the pool share would hold only a few
# thousand descriptors); the pipeline also checks the budget against one image's features.
MIN_MEMORY_BUDGET_MB = 4


# Bounds of a resize target: a backbone input larger than this is a typo, not a request (and would
# exhaust memory), as is a strip thinner than 1:20.
MAX_PREPARED_PIXELS = 8192 * 8192
MAX_ASPECT_RATIO = 20


@dataclass(frozen=True)
class ImageSpec:
    """How images are resized before the backbone.

    - ``fixed``: resize to exactly ``size`` = (height, width), ignoring aspect (VPR benchmarks do this).
    - ``keep_aspect``: scale so the longer side equals ``max(size)``, keeping the aspect ratio.
    - ``max_side``: as ``keep_aspect``, but only ever shrinking (hloc's ``resize_max``: smaller images stay).
    - ``resize_crop``: resize to ``size`` then centre-crop to a multiple of the backbone's patch size
      (AnyLoc: 480×640 → 476×630 for ViT/14).
    - ``none``: keep the original size.

    ``to_multiple``: how the result is brought to a multiple of the backbone's ``size_multiple``:
    ``crop`` (centre-crop down; the offset is recorded in :class:`vprkit.images.Geometry`) or ``resize``
    (resize to the nearest multiple on each side, as MegaLoc does inside its model).
    ``interpolation``: the resampling filter, ``bilinear`` or ``bicubic`` (BoQ's evaluation).
    """

    size: tuple[int, int] | None = (240, 320)
    resize: str = "fixed"
    interpolation: str = "bilinear"
    to_multiple: str = "crop"

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"resize mode {self.resize!r} is not one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.to_multiple not in TO_MULTIPLE:
            raise ConfigError(f"to_multiple {self.to_multiple!r} is not one of {TO_MULTIPLE}")
        if self.size is not None:
            if (
                not isinstance(self.size, (tuple, list))
                or len(self.size) != 2
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in self.size)
            ):
                raise ConfigError(f"image size must be (height, width) in pixels, got {self.size!r}")
            object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        if self.resize != "none" and (self.size is None or min(self.size) <= 0):
            raise ConfigError(f"resize mode {self.resize!r} needs a positive size, got {self.size}")
        if self.size is not None and self.resize in (
            "fixed",
            "resize_crop",
        ):  # keep_aspect, max_side: checked per image
            h, w = self.size
            if h * w > MAX_PREPARED_PIXELS:
                raise ConfigError(
                    f"image size {w}×{h} is {h * w:,} pixels, more than vprkit feeds a backbone "
                    f"({MAX_PREPARED_PIXELS:,})"
                )
            if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
                raise ConfigError(
                    f"image size {w}×{h} has an aspect ratio above {MAX_ASPECT_RATIO}:1; "
                    f"give WIDTHxHEIGHT, e.g. 320x240"
                )

    def to_dict(self) -> dict:
        """The fields, the two later ones only when not their defaults (older maps' settings read the same)."""
        d = {"size": list(self.size) if self.size else None, "resize": self.resize}
        if self.interpolation != "bilinear":
            d["interpolation"] = self.interpolation
        if self.to_multiple != "crop":
            d["to_multiple"] = self.to_multiple
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        return cls(
            size=tuple(d["size"]) if d.get("size") else None,
            resize=d.get("resize", "fixed"),
            interpolation=d.get("interpolation", "bilinear"),
            to_multiple=d.get("to_multiple", "crop"),
        )


def _known_fields(cls: type, d: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``d`` as a dict, refusing keys that are not fields of the dataclass ``cls`` (a typo or a newer file)."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown {what} keys {sorted(unknown)}; known: {sorted(known)}")
    return d


@dataclass(frozen=True)
class RerankConfig:
    """How a global shortlist is re-ranked with multi-scale patch matching (Patch-NetVLAD).

    ``scales``: (patch size, stride) pairs in feature-map cells, one ``weights`` entry each (the
    per-scale scores are z-normalised and summed with these weights); ``scorer``: ``ransac`` or
    ``rapid`` spatial scoring; ``pca_dim``: patch descriptor dimension after PCA (0 = none; capped
    at what the backbone gives), stored as ``dtype`` (float16, float32 or int8), optionally
    ``whiten``-ed; ``shortlist``: how many global candidates are re-scored; ``global_weight``: the
    share of the z-normalised global similarity in the final score (0 = the original's patch-only
    ranking); ``backbone``: ``None`` = the map's backbone, or a local-feature backbone (``xfeat``,
    ``disk``) with its ``backbone_options``; ``global_gap``: re-rank only the candidates whose
    global similarity is within this many standard deviations (z-units over the shortlist) of the
    global top-1 — a global top-1 that stands out by more is kept, and fewer candidates are matched
    (``None``: every shortlist candidate, the original); ``verify``: run the spatial scorer on only this
    many of the matched candidates, those with the most mutual nearest neighbours (a cascade, see
    :mod:`vprkit.rerank.cascade`; ``None``: all, the original); ``prescorer``: with ``verify``, a fast
    spatial scorer (``affine``, ``similarity``, ``usac``) that scores every candidate first and picks those ``verify`` by geometry
    instead of by mutual-match counts (``None``: the counts); ``same_place``: the global top-1's
    route neighbours within this many map rows on each side (by position when the map has poses) are
    its place, where the global order stands — the patches choose between places, not between
    neighbouring views of one (:mod:`vprkit.rerank.places`; ``"auto"``: as far as consecutive map images
    look alike, :func:`vprkit.rerank.places.place_radius`; ``None``: off, the original);
    ``fine_budget``: with a ``prescorer``, how many patch similarities (query patches × candidate
    patches, summed over candidates) the finest scale — the most patches, the most expensive to match —
    may compute per query: it matches as many candidates as fit, those the coarser scales' first pass
    ranks best (at least ``verify``), and the others take that scale's lowest first-pass score
    (:func:`vprkit.rerank.cascade.cascade_scores`; ``None``: every candidate at every scale);
    ``min_agreement``: reorder a shortlist only when its best matched candidate reaches this share of a
    perfect alignment (every query patch matched and in agreement; weighted over the scales,
    :func:`vprkit.rerank.fusion.best_agreement`) — below it the patches found nothing, and the global
    order stands (``None``: no check, the original). Named
    presets: :func:`vprkit.presets.get_rerank_config`.
    """

    name: str = "custom"
    description: str = ""
    scales: tuple[tuple[int, int], ...] = ((5, 1),)
    weights: tuple[float, ...] = (1.0,)
    scorer: str = "rapid"
    pca_dim: int = 512
    dtype: str = "float16"
    whiten: bool = False
    shortlist: int = DEFAULT_RERANK_SHORTLIST
    global_weight: float = DEFAULT_RERANK_GLOBAL_WEIGHT
    backbone: str | None = None
    backbone_options: Mapping[str, Any] = field(default_factory=dict)
    global_gap: float | None = None
    verify: int | None = None
    prescorer: str | None = None
    same_place: int | str | None = None
    fine_budget: int | None = None
    min_agreement: float | None = None

    def __post_init__(self):
        where = f"re-ranking preset {self.name!r}"
        self._check_shortlist_rules(where)
        self._check_scales(where)
        self._check_cascade(where)
        self._check_patches(where)

    def _check_shortlist_rules(self, where: str) -> None:
        """same_place, verify and global_gap: which candidates are re-ranked at all."""
        if (
            self.same_place is not None
            and self.same_place != "auto"
            and (isinstance(self.same_place, bool) or not isinstance(self.same_place, int) or self.same_place < 1)
        ):
            raise ConfigError(
                f'{where}: same_place must be a number of neighbouring map rows ≥ 1, "auto" (read off '
                f"the map) or None (off), got {self.same_place!r}"
            )
        if self.verify is not None and (
            isinstance(self.verify, bool) or not isinstance(self.verify, int) or self.verify < 1
        ):
            raise ConfigError(
                f"{where}: verify must be a number of candidates ≥ 1 (or None for all), got {self.verify!r}"
            )
        if self.global_gap is not None and (
            isinstance(self.global_gap, bool)
            or not isinstance(self.global_gap, (int, float))
            or not 0 < float(self.global_gap) < float("inf")
        ):
            raise ConfigError(
                f"{where}: global_gap must be a positive number of standard deviations (or None), "
                f"got {self.global_gap!r}"
            )

    def _check_scales(self, where: str) -> None:
        """Scales as (patch size, stride) pairs of ints, one non-negative weight each (normalised in place)."""
        try:
            scales = tuple((int(s[0]), int(s[1]) if len(s) > 1 else 1) for s in self.scales)
            weights = tuple(float(w) for w in self.weights)
        except (TypeError, ValueError, IndexError):
            raise ConfigError(
                f"{where}: scales must be (patch size, stride) pairs and weights numbers; "
                f"got scales={self.scales!r}, weights={self.weights!r}"
            ) from None
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "weights", weights)
        if not scales:
            raise ConfigError(f"{where}: re-ranking needs at least one patch scale")
        if any(size < 1 or stride < 1 for size, stride in scales):
            raise ConfigError(f"{where}: patch sizes and strides must be ≥ 1, got {[list(s) for s in scales]}")
        if len(scales) != len(weights):
            raise ConfigError(
                f"{where}: {len(scales)} patch scales but {len(weights)} weights "
                f"(one weight per scale: scales={[list(s) for s in scales]}, weights={list(weights)})"
            )
        if any(w < 0 for w in weights):
            raise ConfigError(f"{where}: scale weights must be ≥ 0, got {list(weights)}")

    def _check_cascade(self, where: str) -> None:
        """prescorer, fine_budget and min_agreement: the cascade's rules and what they need."""
        scales = self.scales
        if self.prescorer is not None:
            if self.prescorer not in RERANK_SCORERS:
                raise ConfigError(
                    f"{where}: unknown pre-scorer {self.prescorer!r}"
                    f"{did_you_mean(self.prescorer, RERANK_SCORERS)}; allowed: {', '.join(RERANK_SCORERS)}"
                )
            if self.verify is None:
                raise ConfigError(
                    f"{where}: prescorer {self.prescorer!r} picks the candidates to verify; set verify "
                    "(how many the exact scorer re-scores) or drop the prescorer"
                )
            if self.prescorer == self.scorer:
                raise ConfigError(
                    f"{where}: prescorer and scorer are both {self.scorer!r}; a pre-pass with the same "
                    "scorer only repeats it (drop prescorer, or verify every candidate)"
                )
        if self.fine_budget is not None:
            if isinstance(self.fine_budget, bool) or not isinstance(self.fine_budget, int) or self.fine_budget < 1:
                raise ConfigError(
                    f"{where}: fine_budget must be a number of patch similarities ≥ 1 (or None for no "
                    f"limit), got {self.fine_budget!r}"
                )
            if self.prescorer is None:
                raise ConfigError(
                    f"{where}: fine_budget picks candidates by the coarser scales' first pass; set "
                    "prescorer (and verify), or drop fine_budget"
                )
            if len(scales) < 2:
                raise ConfigError(
                    f"{where}: fine_budget needs at least two patch scales (a coarser one to pick "
                    f"by), got {[list(x) for x in scales]}"
                )
        if self.min_agreement is not None and (
            isinstance(self.min_agreement, bool)
            or not isinstance(self.min_agreement, (int, float))
            or not 0.0 < float(self.min_agreement) <= 1.0
        ):
            raise ConfigError(
                f"{where}: min_agreement must be a share of a perfect alignment in (0, 1] (or None "
                f"for no check), got {self.min_agreement!r}"
            )

    def _check_patches(self, where: str) -> None:
        """The spatial scorer and what the patches are stored as (dtype, PCA, whitening, backbone)."""
        if self.scorer not in RERANK_SCORERS:
            raise ConfigError(
                f"{where}: unknown spatial scorer {self.scorer!r}"
                f"{did_you_mean(self.scorer, RERANK_SCORERS)}; allowed: {', '.join(RERANK_SCORERS)}"
            )
        if self.dtype not in RERANK_DTYPES:
            raise ConfigError(f"{where}: patch dtype {self.dtype!r} is not one of {', '.join(RERANK_DTYPES)}")
        if not isinstance(self.pca_dim, int) or isinstance(self.pca_dim, bool) or self.pca_dim < 0:
            raise ConfigError(f"{where}: pca_dim must be an integer ≥ 0 (0 = no PCA), got {self.pca_dim!r}")
        if not isinstance(self.whiten, bool):
            raise ConfigError(f"{where}: whiten must be true or false, got {self.whiten!r}")
        if not isinstance(self.shortlist, int) or isinstance(self.shortlist, bool) or self.shortlist < 2:
            raise ConfigError(f"{where}: a shortlist needs at least 2 candidates, got {self.shortlist!r}")
        if not 0.0 <= float(self.global_weight) <= 1.0:
            raise ConfigError(f"{where}: global_weight must be in [0, 1], got {self.global_weight!r}")
        if self.backbone is not None:
            validate_options("backbone", self.backbone, self.backbone_options, where=f"{where}: patch backbone")
        elif self.backbone_options:
            raise ConfigError(
                f"{where}: backbone_options {dict(self.backbone_options)} need a patch backbone "
                "(backbone=None uses the map's own backbone and options)"
            )

    def extension_options(self) -> dict[str, Any]:
        """What the map must store for these settings (the ``patches`` extension's options)."""
        return {
            "scales": [list(s) for s in self.scales],
            "pca_dim": self.pca_dim,
            "whiten": self.whiten,
            "dtype": self.dtype,
            "backbone": self.backbone,
            "backbone_options": dict(self.backbone_options),
        }

    def replace(self, **changes: Any) -> "RerankConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone_options"] = dict(self.backbone_options)
        return json.loads(json.dumps(d, default=_jsonable))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RerankConfig":
        return cls(**_known_fields(cls, d, "re-ranking"))


def _jsonable(value: Any) -> Any:
    """Paths given as options (``weights=Path(...)``) serialise as strings."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} {value!r} cannot be saved in a configuration (use plain JSON values)")


def check_device(device: Any) -> str:
    """``device`` if it names a device vprkit can run on (syntax only: no torch import), else ConfigError."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        hint = (
            " (did you mean 'cuda'?)"
            if str(device).lower() in ("gpu", "cuda0", "nvidia")
            else did_you_mean(str(device).lower(), ("auto", "cpu", "cuda", "mps"))
        )
        raise ConfigError(f"device {device!r} is not one of {DEVICE_CHOICES}{hint}")
    return device


VOCABULARY_CENTRE_KINDS = ("unit", "raw")


@dataclass(frozen=True)
class VocabularyConfig:
    """How a VLAD vocabulary is obtained.

    ``source``: ``"map"`` (k-means on this map's images), ``"domain:NAME"`` (a shared domain
    vocabulary built with ``vprkit vocab build``) or a path to a ``.npz`` vocabulary.
    ``max_bytes`` bounds the descriptor pool held in RAM while clustering, whatever the map size.
    ``None`` (the default) derives it from :attr:`Config.memory_budget_mb`, or uses
    ``DEFAULT_VOCABULARY_MAX_BYTES`` (256 MiB) without a budget; an explicit value always wins.
    """

    source: str = "map"
    k: int = 32
    max_bytes: int | None = None
    large_map_images: int = ANYLOC_LARGE_MAP_IMAGES
    large_map_fraction: float = ANYLOC_LARGE_MAP_FRACTION
    large_map_patch_step: int = ANYLOC_LARGE_MAP_PATCH_STEP
    seed: int = 0
    # Centre sets clustered from the sample (k-means seeds seed, seed+1, …) for multi-vocabulary
    # VLAD; a map builds at least as many as its ``vlad`` aggregator's ``vocabularies`` option asks.
    sets: int = 1
    # "unit": spherical k-means centres (unit vectors); "raw": AnyLoc's centres, the plain mean of the
    # normalised descriptors of each cluster (norm < 1). Assignment is by cosine either way; residuals
    # are taken against the stored centres (see vprkit.aggregation.vlad).
    centres: str = "unit"

    def __post_init__(self):
        if self.centres not in VOCABULARY_CENTRE_KINDS:
            raise ConfigError(f"vocabulary centres must be one of {VOCABULARY_CENTRE_KINDS}, got {self.centres!r}")
        if self.sets < 1:
            raise ConfigError(f"vocabulary sets must be ≥ 1, got {self.sets}")
        if self.k < 1:
            raise ConfigError(f"vocabulary size K must be ≥ 1, got {self.k}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ConfigError(f"vocabulary seed must be a whole number ≥ 0, got {self.seed!r}")
        if not 0 < self.large_map_fraction <= 1:
            raise ConfigError("vocabulary large_map_fraction must be in (0, 1]")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ConfigError(f"vocabulary max_bytes must be ≥ 1 (or None to derive it), got {self.max_bytes}")


@dataclass(frozen=True)
class MemoryPlan:
    """The byte caps of the large buffers of a vocabulary or map build, resolved from a :class:`Config`.

    - ``vocabulary_pool_bytes``: the reservoir of local descriptors k-means clusters
      (:class:`~vprkit.aggregation.vlad.DescriptorSampler`).
    - ``feature_cache_bytes``: dense features (and uint8 pixels) kept from the vocabulary pass so
      the encoding pass need not run the backbone again on them (a speed-up only).
    - ``decode_buffer_bytes``: decoded images queued ahead of the backbone; ``None`` = unbounded
      (every image of the pass may be decoded ahead: the behaviour without a budget).

    None of these grows with the number of images once capped. Not covered: the backbone's
    activations for one batch (set by ``batch_size`` and the image size) and the map's own
    global descriptors (N × descriptor dim, which a flat index holds in RAM at query time anyway).
    """

    budget_bytes: int | None
    vocabulary_pool_bytes: int
    feature_cache_bytes: int
    decode_buffer_bytes: int | None

    def to_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Config:
    """Every setting of a pipeline run. Build one from a preset with :func:`vprkit.presets.resolve`.

    ``rerank``: the re-ranking applied after retrieval (``None`` = none); ``device``: where the
    networks run (``auto`` = CUDA, then Apple MPS, then CPU; ``cpu``, ``cuda``, ``cuda:N``, ``mps``).
    Neither, nor ``memory_budget_mb``, changes what a map holds (:meth:`map_settings`).
    """

    name: str = "custom"
    description: str = ""
    backbone: str = "efficientnet-lite0"
    backbone_options: Mapping[str, Any] = field(default_factory=dict)
    image: ImageSpec = field(default_factory=ImageSpec)
    aggregator: str = "vlad"
    aggregator_options: Mapping[str, Any] = field(default_factory=dict)
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    # The global index: a FAISS index-factory string for the "faiss" backend; another backend
    # (vprkit.maps.index.INDEX_BACKENDS) reads ``index`` and ``index_options`` its own way.
    index: str = "Flat"
    index_backend: str = "faiss"
    index_options: Mapping[str, Any] = field(default_factory=dict)
    store_dtype: str = "float32"
    retriever: str = "global"
    retriever_options: Mapping[str, Any] = field(default_factory=dict)
    # per-image payloads stored in the map (e.g. {"patches": {...}} for re-ranking, {"segments": {...}})
    extensions: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    batch_size: int = 8
    workers: int = 2
    threads: int = 2
    # One RAM setting for vocabulary and map builds (MB = MiB); see memory_plan() for the split.
    memory_budget_mb: int | None = None
    # Re-ranking of the shortlist (None: the global ranking is final).
    rerank: RerankConfig | None = None
    # Where the networks run; not part of the map's content (see RUNTIME_SETTINGS).
    device: str = DEVICE_AUTO

    def __post_init__(self):
        check_device(self.device)
        if self.rerank is not None and not isinstance(self.rerank, RerankConfig):
            raise ConfigError(
                f"Config.rerank must be a RerankConfig (see vprkit.presets.get_rerank_config), got {self.rerank!r}"
            )
        if self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"store_dtype must be one of {STORE_DTYPES}, got {self.store_dtype!r}")
        if self.batch_size < 1 or self.workers < 1 or self.threads < 1:
            raise ConfigError("batch_size, workers and threads must be ≥ 1")
        if self.memory_budget_mb is not None and self.memory_budget_mb < MIN_MEMORY_BUDGET_MB:
            raise ConfigError(
                f"memory budget {self.memory_budget_mb} MB is too small: the minimum is {MIN_MEMORY_BUDGET_MB} MB "
                f"(and enough for one batch of images and one image's patch descriptors)"
            )

    def memory_plan(self) -> MemoryPlan:
        """Split ``memory_budget_mb`` into the caps of the large buffers of a build.

        With a budget B: the vocabulary descriptor pool gets ``BUDGET_SHARE_VOCABULARY_POOL`` (½ B),
        the feature cache ``BUDGET_SHARE_FEATURE_CACHE`` (¼ B) and the decode-ahead buffer
        ``BUDGET_SHARE_DECODE_BUFFER`` (¼ B). All three are alive at once during the vocabulary
        pass (the cache and the decode buffer during the encoding pass), so the shares sum to the
        budget rather than each getting all of it. An explicit
        ``vocabulary.max_bytes`` wins over its share (the other shares are unchanged). Without a
        budget the defaults of earlier versions apply: a 256 MiB pool, a 512 MiB cache and an
        unbounded decode buffer.
        """
        explicit_pool = self.vocabulary.max_bytes
        if self.memory_budget_mb is None:
            pool = explicit_pool if explicit_pool is not None else DEFAULT_VOCABULARY_MAX_BYTES
            return MemoryPlan(None, pool, DEFAULT_FEATURE_CACHE_BYTES, None)
        budget = int(self.memory_budget_mb * MIB)
        return MemoryPlan(
            budget_bytes=budget,
            vocabulary_pool_bytes=explicit_pool
            if explicit_pool is not None
            else int(budget * BUDGET_SHARE_VOCABULARY_POOL),
            feature_cache_bytes=int(budget * BUDGET_SHARE_FEATURE_CACHE),
            decode_buffer_bytes=int(budget * BUDGET_SHARE_DECODE_BUFFER),
        )

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image"] = self.image.to_dict()
        return json.loads(json.dumps(d, default=_jsonable))  # plain JSON types (tuples → lists, paths → str)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        d = _known_fields(cls, d, "config")
        if "image" in d:
            d["image"] = ImageSpec.from_dict(d["image"])
        if "vocabulary" in d:
            d["vocabulary"] = VocabularyConfig(**d["vocabulary"])
        if d.get("rerank") is not None:
            d["rerank"] = RerankConfig.from_dict(d["rerank"])
        return cls(**d)

    def validate(self) -> "Config":
        """Check every component option against its schema (:mod:`vprkit.options`) and their combinations.

        Raises :class:`ConfigError` naming the component, the option, what was given and what is
        allowed. Returns ``self`` so a call can be chained.
        """
        validate_config(self)
        return self

    def map_settings(self) -> dict[str, Any]:
        """:meth:`to_dict` without the runtime and serving settings (:data:`RUNTIME_SETTINGS`,
        :data:`SERVING_SETTINGS`): what makes two maps different.

        Two builds with equal ``map_settings()`` produce the same map, so one may resume the other.
        """
        d = self.to_dict()
        for key in RUNTIME_SETTINGS + SERVING_SETTINGS:
            d.pop(key, None)
        for key in RUNTIME_VOCABULARY_SETTINGS:
            d.get("vocabulary", {}).pop(key, None)
        return d
