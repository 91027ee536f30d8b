"""What re-ranking reads of a map's configuration, in one small record built by the composer.

:func:`~.reranker.make_reranker` takes a :class:`RerankOptions` instead of the whole
:class:`~vprkit.config.Config`: the re-ranking preset, the ``patches`` options it needs on this map,
how to run the extraction loop when a map stores no patches, and the seed of the sample the patch
state is fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..backbones.extract import ExtractionOptions
from ..config import Config, RerankConfig
from ..presets import get_rerank_config, patch_options


@dataclass(frozen=True)
class RerankOptions:
    """A re-ranking preset on one map.

    ``patches``: the ``patches`` extension options the preset needs (:func:`vprkit.presets.patch_options`:
    a global NetVLAD built from a trained checkpoint lends its layer); ``extraction``: how the map's
    images are read when its patches must be computed; ``seed``: the seed of the image sample the patch
    state is fitted on (the vocabulary's, so a map's own state and its re-ranking state agree).
    """

    settings: RerankConfig
    patches: Mapping[str, Any] = field(default_factory=dict)
    extraction: ExtractionOptions = field(default_factory=ExtractionOptions)
    seed: int = 0

    @classmethod
    def from_config(cls, config: Config, settings: RerankConfig | str) -> "RerankOptions":
        """Re-ranking preset ``settings`` (a name or a :class:`RerankConfig`) on a map built with ``config``."""
        settings = get_rerank_config(settings)
        return cls(
            settings, patch_options(settings, config), ExtractionOptions.from_config(config), config.vocabulary.seed
        )
