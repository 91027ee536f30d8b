"""Re-ranking presets, by their older names: the declarations live in :mod:`vprkit.presets` (plain data).

``RerankSettings`` is :class:`vprkit.config.RerankConfig`; ``get_rerank_settings`` is
:func:`vprkit.presets.get_rerank_config`; ``patch_options`` / ``map_extensions_for`` (which
``patches`` extension options a re-ranking preset needs stored, a NetVLAD checkpoint lending its
layer) are :mod:`vprkit.presets`' light functions. New code should import from :mod:`vprkit.presets`.
"""

from __future__ import annotations

from ..config import RerankConfig
from ..presets import (DEFAULT_GLOBAL_WEIGHT, DEFAULT_SHORTLIST, PERFORMANCE, PERFORMANCE_REFERENCE, RERANK_PRESETS,
                       SPEED, STORAGE,
                       get_rerank_config, list_rerank_configs, map_extensions_for, patch_options,
                       register_rerank_preset)

RerankSettings = RerankConfig
get_rerank_settings = get_rerank_config

__all__ = [
    "DEFAULT_GLOBAL_WEIGHT", "DEFAULT_SHORTLIST", "PERFORMANCE", "PERFORMANCE_REFERENCE", "RERANK_PRESETS", "SPEED", "STORAGE", "RerankSettings",
    "get_rerank_config", "get_rerank_settings", "list_rerank_configs", "map_extensions_for", "patch_options",
    "register_rerank_preset",
]
