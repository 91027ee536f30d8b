"""Composer functions for large maps: compressing a map's index and reporting what serving it costs.

``compress_map`` replaces a map's index with a compressed one (any FAISS factory string) trained on
a bounded, seeded sample of the map's descriptors, under the map's write lock. The new files are
written under temporary names and the index manifest is swapped last, so a process serving the
old index keeps answering, and a failed training leaves the old index in place.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, MapError
from ..maps import (
    MAP_FILE,
    check_index_option,
    describe_options,
    faiss_options,
    FaissIndex,
    IndexSection,
    map_write_lock,
    MapStore,
    read_manifest,
    RowSource,
    serving_footprint,
    write_manifest,
)

logger = logging.getLogger(__name__)

__all__ = ["compress_map", "describe_options"]


def compress_map(
    map_dir: str | os.PathLike, factory: str, *, log: Callable[[str], None] = logger.info, **options: Any
) -> dict[str, Any]:
    """Train ``factory`` (e.g. ``"PCA1024,OPQ64,IVF1024,PQ64"``) on the map's descriptors and swap it in.

    ``options`` are FAISS index options by their one name (:mod:`vprkit.maps.index_options`:
    ``train_sample``, ``seed``, ``nprobe``, ``ef_search``, ``rescore``, ``shard_rows``,
    ``descriptors_dtype``); None means not given. An option not given takes its documented default —
    not what an earlier compress recorded (``rescore`` left out is 0, off); ``seed`` defaults to the
    map's vocabulary seed. Returns the index section written to ``map.json`` with the map's serving
    footprint (:func:`vprkit.maps.index.serving_footprint`).
    """
    given = {name: check_index_option(name, value) for name, value in options.items() if value is not None}
    d = Path(map_dir)
    with map_write_lock(d):
        manifest = read_manifest(d)
        config = manifest.settings(d / MAP_FILE)
        if config.index_backend != "faiss":
            raise ConfigError(
                f"{d} is served by the {config.index_backend!r} backend; `map compress` trains FAISS "
                f"indexes (set the backend's own index options instead)"
            )
        applied = faiss_options(given, seed=config.vocabulary.seed)
        log(describe_options(applied))
        store = MapStore(d, config.store_dtype)
        n = len(store)
        if n == 0:
            raise MapError(f"{d} holds no descriptors to compress")
        dim = int(manifest.descriptor_dim or store.read_global(rows=[0]).shape[1])
        started = time.perf_counter()
        index = FaissIndex.build(RowSource(store.read_global, n, dim), factory, seed=applied["seed"], options=applied)
        built_s = time.perf_counter() - started
        index.save_to_map(d)  # new files first, the manifest last: the swap
        manifest.index = IndexSection(
            factory=factory,
            ntotal=index.ntotal,
            options=dict(index.options),
            trained_on=dict(index.trained_on),
            build_seconds=round(built_s, 3),
        )
        manifest.config = {**manifest.config, "index": factory, "index_options": dict(index.options)}
        write_manifest(d, manifest)
        footprint = serving_footprint(d)
        log(
            f"{d}: index {factory} over {n} places in {built_s:.1f} s; "
            f"{footprint['disk_bytes_per_place']['index_codes']} bytes per place in the index"
        )
        return {**manifest.index.to_dict(), "footprint": footprint}
