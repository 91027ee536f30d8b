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
from ..io import atomic_write_json
from ..maps.index import FaissIndex, faiss_options, read_index_manifest, serving_footprint
from ..maps.lock import map_write_lock
from ..maps.mapdir import MAP_FILE, map_config, read_map_info
from ..maps.store import MapStore
from ..maps.vectors import RowSource

logger = logging.getLogger(__name__)


def compress_map(map_dir: str | os.PathLike, factory: str, *, sample: int | None = None, seed: int | None = None,
                 rescore: int | None = None, nprobe: int | None = None, ef_search: int | None = None,
                 shard_rows: int | None = None, log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Train ``factory`` (e.g. ``"PCA1024,OPQ64,IVF1024,PQ64"``) on the map's descriptors and swap it in.

    ``sample``: training rows (seeded with ``seed``, default the map's vocabulary seed); ``rescore``:
    shortlist re-scored exactly from the full-precision copy kept on disk (0 = off); ``nprobe`` /
    ``ef_search``: IVF / HNSW query breadth; ``shard_rows``: rows per index file (0 = one file).
    Unset options keep the map's recorded ones. Returns the index section written to ``map.json``
    with the map's serving footprint (:func:`vprkit.maps.index.serving_footprint`).
    """
    d = Path(map_dir)
    with map_write_lock(d):
        info = read_map_info(d)
        config = map_config(info, d / MAP_FILE)
        if config.index_backend != "faiss":
            raise ConfigError(f"{d} is served by the {config.index_backend!r} backend; `map compress` trains FAISS "
                              f"indexes (set the backend's own index options instead)")
        recorded = (read_index_manifest(d) or {}).get("options", {})
        given = {"train_sample": sample, "seed": seed, "rescore": rescore, "nprobe": nprobe, "efSearch": ef_search,
                 "shard_rows": shard_rows}
        options = faiss_options({**dict(config.index_options), **recorded,
                                 **{k: v for k, v in given.items() if v is not None}}, config)
        store = MapStore(d, config.store_dtype)
        n = len(store)
        if n == 0:
            raise MapError(f"{d} holds no descriptors to compress")
        dim = int(info.get("descriptor_dim") or store.read_global(rows=[0]).shape[1])
        started = time.perf_counter()
        index = FaissIndex.build(RowSource(store.read_global, n, dim), factory, seed=options["seed"], options=options)
        built_s = time.perf_counter() - started
        index.save_to_map(d)  # new files first, the manifest last: the swap
        section = {"factory": factory, "ntotal": index.ntotal, "options": index.options, "trained_on": index.trained_on,
                   "build_seconds": round(built_s, 3)}
        info["index"] = section
        info["config"] = {**info["config"], "index": factory, "index_options": index.options}
        atomic_write_json(d / MAP_FILE, info, default=str)
        footprint = serving_footprint(d)
        log(f"{d}: index {factory} over {n} places in {built_s:.1f} s; "
            f"{footprint['disk_bytes_per_place']['index_codes']} bytes per place in the index")
        return {**section, "footprint": footprint}
