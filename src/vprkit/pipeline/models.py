"""The models a map is built and queried with: the backbone, the map extensions, and features moved to the CPU.

Map extensions (re-ranking patches, SuperSegments) and retrievers (SegVLAD's) register themselves in
:data:`vprkit.maps.extensions.EXTENSIONS` and :data:`vprkit.retrieval.RETRIEVERS` when their stage
package is imported; the composer imports those stages here, once, and then only reads the registries.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .. import rerank as _rerank_stage  # noqa: F401 - registers the "patches" map extension
from .. import segments as _segments_stage  # noqa: F401 - registers the "segments" extension and "segvlad" retriever
from ..aggregation import Vocabulary
from ..aggregation.options import AggregationOptions
from ..aggregation.vocabulary import wants_vocabulary
from ..backbones import Backbone, DenseFeatures, build_backbone
from ..config import Config
from ..device import resolve_device
from ..images import Batch
from ..maps import EXTENSIONS, MapExtension
from ..presets import resolve


def resolve_config(preset: str | Config | None) -> Config:
    """A preset name (default: the default preset) or a Config → a validated Config (see :func:`vprkit.presets.resolve`)."""
    return resolve(preset)


def set_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def load_backbone(config: Config) -> Backbone:
    """The configured backbone, in eval mode, on the configured device."""
    set_threads(config.threads)
    backbone = build_backbone(config.backbone, **dict(config.backbone_options))
    return backbone.to(resolve_device(config.device))


def make_extensions(config: Config, backbone: Backbone, vocabulary: Vocabulary | None) -> dict[str, MapExtension]:
    """The map extensions ``config`` asks for, built (not yet fitted) from the registry."""
    return {g: EXTENSIONS.get(g)(opts, backbone, vocabulary) for g, opts in config.extensions.items()}


def needs_vocabulary(config: Config) -> bool:
    """Whether the aggregator or a map extension of ``config`` needs a vocabulary."""
    return wants_vocabulary(AggregationOptions.from_config(config)) or any(
        getattr(EXTENSIONS.get(g), "needs_vocabulary", False) for g in config.extensions
    )


def on_cpu(feats: DenseFeatures) -> DenseFeatures:
    """Features for the stages that work on the CPU (map extensions, re-ranking, SegVLAD)."""
    if feats.patches.device.type == "cpu":
        return feats
    g = None if feats.global_token is None else feats.global_token.cpu()
    return DenseFeatures(feats.patches.cpu(), feats.stride, feats.image_size, g)


def features_on_cpu(batches: Iterable[tuple[Batch, DenseFeatures]]) -> Iterator[tuple[Batch, DenseFeatures]]:
    for batch, feats in batches:
        yield batch, on_cpu(feats)
