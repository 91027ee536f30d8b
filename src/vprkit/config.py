"""The frozen configuration a preset resolves to; saved with every map and run so results can be reproduced."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .images import ImageSpec

STORE_DTYPES = ("float16", "float32")
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

    def __post_init__(self):
        if self.sets < 1:
            raise ConfigError(f"vocabulary sets must be ≥ 1, got {self.sets}")
        if self.k < 1:
            raise ConfigError(f"vocabulary size K must be ≥ 1, got {self.k}")
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
    """Every setting of a pipeline run. Build one from a preset with :func:`vprkit.presets.get_preset`."""

    name: str = "custom"
    description: str = ""
    backbone: str = "efficientnet-lite0"
    backbone_options: Mapping[str, Any] = field(default_factory=dict)
    image: ImageSpec = field(default_factory=ImageSpec)
    aggregator: str = "vlad"
    aggregator_options: Mapping[str, Any] = field(default_factory=dict)
    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    index: str = "Flat"
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

    def __post_init__(self):
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
            vocabulary_pool_bytes=explicit_pool if explicit_pool is not None else int(budget * BUDGET_SHARE_VOCABULARY_POOL),
            feature_cache_bytes=int(budget * BUDGET_SHARE_FEATURE_CACHE),
            decode_buffer_bytes=int(budget * BUDGET_SHARE_DECODE_BUFFER),
        )

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image"] = self.image.to_dict()
        return json.loads(json.dumps(d))  # plain JSON types (tuples → lists)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        if "image" in d:
            d["image"] = ImageSpec.from_dict(d["image"])
        if "vocabulary" in d:
            d["vocabulary"] = VocabularyConfig(**d["vocabulary"])
        return cls(**d)

    def descriptor_identity(self) -> dict[str, Any]:
        """The image side of a descriptor's identity (the backbone adds its own)."""
        return {"image": self.image.to_dict()}
