"""The aggregation stage's own settings, read off a :class:`~vprkit.config.Config` once by the composer.

The stage's functions (:func:`~.vocabulary.make_aggregator`, :func:`~.vocabulary.build_vocabulary`,
the domain analysis of :mod:`.domains`) take these small frozen records instead of the whole
configuration, so what each depends on is visible in its signature and a test can build one
without a preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..backbones.base import Backbone
from ..backbones.extract import ExtractionOptions, memory_plan
from ..config import DEFAULT_VOCABULARY_MAX_BYTES, Config, ImageSpec, VocabularyConfig


@dataclass(frozen=True)
class AggregationOptions:
    """Which aggregator, with which options, on images prepared by ``image``.

    ``image`` is the image side of a descriptor's identity, which a vocabulary must match
    (:func:`~.vocabulary.descriptor_identity`).
    """

    aggregator: str = "vlad"
    aggregator_options: Mapping[str, Any] = field(default_factory=dict)
    image: ImageSpec = field(default_factory=ImageSpec)

    @classmethod
    def from_config(cls, config: Config) -> "AggregationOptions":
        return cls(config.aggregator, dict(config.aggregator_options), config.image)


@dataclass(frozen=True)
class VocabularyOptions:
    """What clustering a vocabulary reads: the vocabulary settings, the extraction pass that feeds it,
    the RAM cap of its descriptor pool, and the centre sets and kind the aggregator needs.

    ``sets`` and ``centres`` are the aggregator's requirement where it states one (a ``vlad``
    aggregator with ``vocabularies = 3`` needs three centre sets; ``centres = "raw"`` wins over the
    vocabulary's own setting), else the vocabulary's.
    """

    vocabulary: VocabularyConfig = field(default_factory=VocabularyConfig)
    extraction: ExtractionOptions = field(default_factory=ExtractionOptions)
    pool_bytes: int = DEFAULT_VOCABULARY_MAX_BYTES
    sets: int = 1
    centres: str = "unit"

    @property
    def image(self) -> ImageSpec:
        """The image side of the vocabulary's descriptor identity."""
        return self.extraction.image

    @classmethod
    def from_config(cls, config: Config, backbone: Backbone) -> "VocabularyOptions":
        """The vocabulary pass of ``config`` on ``backbone`` (the memory budget is checked against its feature size)."""
        vc = config.vocabulary
        aggregator = dict(config.aggregator_options)
        return cls(
            vc,
            ExtractionOptions.from_config(config),
            memory_plan(config, backbone).vocabulary_pool_bytes,
            sets=max(vc.sets, int(aggregator.get("vocabularies", 1))),
            centres=aggregator.get("centres") or vc.centres,
        )
