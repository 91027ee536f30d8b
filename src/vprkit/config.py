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


@dataclass(frozen=True)
class VocabularyConfig:
    """How a VLAD vocabulary is obtained.

    ``source``: ``"map"`` (k-means on this map's images), ``"domain:NAME"`` (a shared domain
    vocabulary built with ``vprkit vocab build``) or a path to a ``.npz`` vocabulary.
    ``max_bytes`` bounds the descriptor pool held in RAM while clustering, whatever the map size.
    """

    source: str = "map"
    k: int = 32
    max_bytes: int = 256 * 2**20
    large_map_images: int = ANYLOC_LARGE_MAP_IMAGES
    large_map_fraction: float = ANYLOC_LARGE_MAP_FRACTION
    large_map_patch_step: int = ANYLOC_LARGE_MAP_PATCH_STEP
    seed: int = 0

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"vocabulary size K must be ≥ 1, got {self.k}")
        if not 0 < self.large_map_fraction <= 1:
            raise ConfigError("vocabulary large_map_fraction must be in (0, 1]")


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

    def __post_init__(self):
        if self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"store_dtype must be one of {STORE_DTYPES}, got {self.store_dtype!r}")
        if self.batch_size < 1 or self.workers < 1 or self.threads < 1:
            raise ConfigError("batch_size, workers and threads must be ≥ 1")

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
