"""The composer: build a map, open it, localise queries, evaluate — by calling the stages, owning none of them.

The CLI and the service call these and nothing deeper. Each is usable from Python::

    from vprkit import pipeline
    pipeline.build_map("db_images/", "my_map", "effnet-vlad")
    m = pipeline.open_map("my_map")
    results = pipeline.localize(m, ["query.jpg", camera_frame], top_k=5)   # paths or decoded frames

One module per verb: :mod:`.build` (``build_map``), :mod:`.open` (``open_map``, the :class:`Map`),
:mod:`.localization` (``localize``, re-ranking's one carrier), :mod:`.benchmarking` (``evaluate``,
``compare``), :mod:`.maintain` (``map_info``, ``remove_places``, ``update_place_poses``),
:mod:`.vocabularies` (which vocabulary a map uses; domain vocabularies), :mod:`.inspection`
(``explain``, ``match_two``), :mod:`.interop` (hloc), :mod:`.recipes` (``train``); :mod:`.models` loads the models
and the stages that register map extensions. Beside them: :mod:`.sequences` (streams, loop closure),
:mod:`.live` (the live map a service serves), :mod:`.distributed` (Ray), :mod:`.scale` (compression).

Where the work happens: the extraction loop and feature cache in :mod:`vprkit.backbones.extract`,
vocabularies in :mod:`vprkit.aggregation.vocabulary` (domains in :mod:`~vprkit.aggregation.domains`),
the map's files in :mod:`vprkit.maps`, retrieval in :mod:`vprkit.retrieval`, re-ranking in
:mod:`vprkit.rerank`, SegVLAD in :mod:`vprkit.segments`, Recall@N in :mod:`vprkit.evaluation`.
"""

from __future__ import annotations

from ..evaluation.run import RECALL_NS
from .build import build_map
from .benchmarking import compare, evaluate
from .inspection import explain, match_two
from .interop import export_hloc, import_hloc
from .localization import (
    RERANK_OFF,
    Match,
    QueryImages,
    QueryResult,
    get_reranker,
    localize,
    query_batches,
    query_source,
    rerank_settings,
    search,
)
from .maintain import map_info, remove_places, update_place_poses
from .models import load_backbone, needs_vocabulary, resolve_config
from .open import Map, open_map
from .recipes import add_pca, train
from .verify import VerifySettings
from .vocabularies import analyse_dataset_domains, build_domain_vocabulary, pick_domain

__all__ = [
    "Map",
    "Match",
    "QueryImages",
    "QueryResult",
    "RECALL_NS",
    "RERANK_OFF",
    "VerifySettings",
    "add_pca",
    "analyse_dataset_domains",
    "build_domain_vocabulary",
    "build_map",
    "compare",
    "evaluate",
    "explain",
    "export_hloc",
    "get_reranker",
    "import_hloc",
    "load_backbone",
    "localize",
    "map_info",
    "match_two",
    "needs_vocabulary",
    "open_map",
    "pick_domain",
    "query_batches",
    "query_source",
    "remove_places",
    "rerank_settings",
    "resolve_config",
    "search",
    "train",
    "update_place_poses",
]
