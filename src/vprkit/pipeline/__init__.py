"""The composer: build a map, open it, localise queries, evaluate — by calling the stages, owning none of them.

The CLI and the service call these and nothing deeper. Each is usable from Python::

    from vprkit import pipeline
    pipeline.build_map("db_images/", "my_map", "effnet-vlad")
    m = pipeline.open_map("my_map")
    results = pipeline.localize(m, ["query.jpg", camera_frame], top_k=5)   # paths or decoded frames

Where the work happens: the extraction loop and feature cache in :mod:`vprkit.backbones.extract`,
vocabularies in :mod:`vprkit.aggregation.vocabulary` (domains in :mod:`~vprkit.aggregation.domains`),
the map's files in :mod:`vprkit.maps`, retrieval in :mod:`vprkit.retrieval`, re-ranking in
:mod:`vprkit.rerank`, SegVLAD in :mod:`vprkit.segments`, Recall@N in :mod:`vprkit.evaluation`.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from .. import __version__
from ..aggregation import Aggregator, Vocabulary
from ..aggregation.domains import analyse_dataset_domains as _analyse_domains
from ..aggregation.domains import build_domain_vocabulary as _build_domain_vocabulary
from ..aggregation.domains import pick_domain as _pick_domain
from ..aggregation.vocabulary import (build_vocabulary, descriptor_identity, make_aggregator,
                                     resolve_vocabulary_source, wants_vocabulary)
from ..backbones import Backbone, DenseFeatures, build_backbone
from ..backbones.extract import FeatureCache, extract, ignore_failures, memory_plan, sample_keys
from ..config import Config
from ..device import module_device, resolve_device
from ..errors import ConfigError, ImageReadError, MapError, VocabularyMismatchError
from ..evaluation.report import PeakMemory
from ..evaluation.run import RECALL_NS, Rankings, write_run
from ..io import atomic_write_json, clean_orphans
from ..images import Batch, FileImages, FolderImages, ImageInput, ImageSource, image_source
from ..maps import (FAILURES_FILE, INDEX_FILE, MAP_FILE, VOCAB_FILE, FaissIndex, MapData, MapStore, open_map_data,
                   read_json, read_map_info)
from ..maps.index import build_index
from ..maps.lock import map_write_lock
from ..maps.mapdir import BUILD_FILE, changed_entries, check_build_settings
from ..maps.extensions import EXTENSIONS, EXTENSIONS_DIR, MapExtension
from ..maps.store import PENDING_DIR
from ..presets import DEFAULT_PRESET, get_rerank_config, resolve
from ..retrieval import RETRIEVERS, QueryBatch, Retriever, SearchSpace, pad_topk

logger = logging.getLogger(__name__)

# Images per shard: big enough that a 100k-image map is a few hundred files, small enough that an
# interrupt loses at most a minute of work.
SHARD_IMAGES = 128
DEFAULT_FIT_IMAGES = 500

QueryImages = ImageSource | Sequence[ImageInput] | Mapping[str, ImageInput]


def _import_plugins() -> None:
    """Import the stages that register extensions and retrievers (re-ranking patches, SegVLAD)."""
    import importlib

    for mod in ("vprkit.rerank", "vprkit.segments"):
        importlib.import_module(mod)


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
    return backbone.to(resolve_device(getattr(config, "device", "auto")))


def _make_extensions(config: Config, backbone: Backbone, vocabulary: Vocabulary | None) -> dict[str, MapExtension]:
    if config.extensions:
        _import_plugins()
    return {g: EXTENSIONS.get(g)(opts, backbone, vocabulary) for g, opts in config.extensions.items()}


def needs_vocabulary(config: Config) -> bool:
    """Whether the aggregator or a map extension of ``config`` needs a vocabulary."""
    if config.extensions:
        _import_plugins()
    return wants_vocabulary(config) or any(getattr(EXTENSIONS.get(g), "needs_vocabulary", False) for g in config.extensions)


# ---- maps --------------------------------------------------------------------------------------
@dataclass
class Map:
    """An opened map and the models that read queries for it (what :func:`localize` needs)."""

    data: MapData
    backbone: Backbone
    aggregator: Aggregator
    extensions: dict[str, MapExtension] = field(default_factory=dict)

    # the map's data, for callers that read it directly
    dir = property(lambda self: self.data.dir)
    config = property(lambda self: self.data.config)
    info = property(lambda self: self.data.info)
    vocabulary = property(lambda self: self.data.vocabulary)
    store = property(lambda self: self.data.store)
    index = property(lambda self: self.data.index)
    keys = property(lambda self: self.data.keys)
    poses = property(lambda self: self.data.poses)
    images_root = property(lambda self: self.data.images_root)

    def search_space(self) -> SearchSpace:
        return SearchSpace(self.data.index, len(self.data.keys), self.data.store, self.extensions,
                           None if self.data.read_only else self.data.dir)

    def retriever(self) -> Retriever:
        return RETRIEVERS.get(self.config.retriever)(self.search_space(), self.config.retriever_options)


def open_map(map_dir: str | os.PathLike, read_only: bool = False, device: str | None = None) -> Map:
    """Load a built map with its models: settings, backbone, vocabulary, aggregator, keys, poses and index.

    ``read_only=True`` writes nothing to the map directory (a stale index is rebuilt in memory),
    so several processes can share one map. ``device`` runs the models elsewhere than the map's
    recorded setting (it does not change the map).
    """
    data = open_map_data(map_dir, read_only=read_only)
    if data.info.get("imported") and data.config.backbone == "hloc-import":
        raise MapError(f"{data.dir} holds descriptors imported from {data.info['imported'].get('from')} by a model vprkit does not "
                       f"run; query it with descriptors of that model (vprkit.maps.hloc.retrieve), or re-import it "
                       f"with --preset NAME if a vprkit preset produced them")
    if device is not None:
        data.config = data.config.replace(device=device)
    config = data.config
    backbone = load_backbone(config)
    aggregator = make_aggregator(config, backbone, data.vocabulary)
    aggregator = aggregator.to(module_device(backbone)) if isinstance(aggregator, torch.nn.Module) else aggregator
    extensions = _make_extensions(config, backbone, data.vocabulary)
    for ext in extensions.values():
        if ext.needs_fit and not ext.try_load_state(data.dir):
            raise MapError(f"{data.dir} lacks the fitted state of '{ext.group}'; rebuild the map")
    return Map(data, backbone, aggregator, extensions)


def _on_cpu(feats: DenseFeatures) -> DenseFeatures:
    """Features for the stages that work on the CPU (map extensions, re-ranking, SegVLAD)."""
    if feats.patches.device.type == "cpu":
        return feats
    g = None if feats.global_token is None else feats.global_token.cpu()
    return DenseFeatures(feats.patches.cpu(), feats.stride, feats.image_size, g)


def _features_on_cpu(batches: Iterable[tuple[Batch, DenseFeatures]]) -> Iterator[tuple[Batch, DenseFeatures]]:
    for batch, feats in batches:
        yield batch, _on_cpu(feats)


CHANGE_POLICIES = ("refuse", "reencode")


def build_map(
    images: ImageSource | str | os.PathLike,
    out: str | os.PathLike,
    preset: str | Config | None = None,
    poses: str | os.PathLike | np.ndarray | None = None,
    keys: Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    on_change: str = "refuse",
    _after_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Extract, aggregate and store descriptors of every image of ``images`` into ``out``.

    ``images`` is a folder (every image under it, or ``keys`` relative to it) or an image source
    (e.g. :class:`~vprkit.images.DecodedImages` of frames already in memory). ``poses`` is a poses
    CSV or an N×2 array aligned with the keys; given for a map that exists, it updates the poses of
    the images already in it. Returns the map's ``map.json`` content.

    What the map guarantees:

    - **One writer.** The build holds the map's exclusive lock (:mod:`vprkit.maps.lock`); a second build
      into the same folder is refused at once.
    - **One set of settings.** The resolved settings are written (``build.json``) before the first
      shard; a later build or a resumed one with other settings is refused, naming what differs.
    - **Resumable.** Images already in the map (or in shards of an interrupted build) are skipped;
      unreadable images are reported by name and listed in ``failures.json``.
    - **Content-true.** Each entry records its image's SHA-256, file size and time and the build run it
      came from. An image whose content changed since it was added is refused (``on_change="refuse"``,
      the default) or re-encoded in place of its old entry (``"reencode"``) — never kept silently.
    """
    started = time.perf_counter()
    if on_change not in CHANGE_POLICIES:
        raise ConfigError(f"on_change must be one of {CHANGE_POLICIES}, got {on_change!r}")
    config = resolve_config(preset)
    source = image_source(images, keys)
    keys = list(source.keys)
    if not keys:
        raise MapError(f"no images found in {source.describe()}")
    out = Path(out)
    with map_write_lock(out):
        info = _build_locked(config, source, keys, out, poses, progress, log, on_change, _after_shard)
    info["last_build"]["seconds"] = round(time.perf_counter() - started, 3)  # the whole build, as a user waits for it
    atomic_write_json(out / MAP_FILE, info, default=str)
    return info


def _build_locked(config: Config, source: ImageSource, keys: list[str], out: Path, poses, progress, log,
                  on_change: str, _after_shard) -> dict[str, Any]:
    info_path = out / MAP_FILE
    for folder in (out, out / PENDING_DIR, out / EXTENSIONS_DIR):  # we hold the lock: leftovers are a dead build's
        clean_orphans(folder, older_than_s=0)
    check_build_settings(out, config)
    previous = read_json(info_path) if info_path.exists() else {}
    runs = list(previous.get("runs", []))
    run = {"run": len(runs), "images_root": str(source.root.resolve()) if isinstance(source, FolderImages) else None,
           "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    xy, pose_report = _pose_rows(poses, keys)
    store = MapStore(out, config.store_dtype)
    stored = store.entry_table(include_pending=True)
    changed = changed_entries(source, [k for k in keys if k in stored], stored, runs, run["images_root"], log)
    if changed and on_change == "refuse":
        raise MapError(
            f"{len(changed)} image(s) in {source.describe()} differ from what {out} holds under the same name "
            f"(e.g. {', '.join(changed[:3])}); build into another --out, or re-encode them with --on-change reencode")
    todo = [(i, k) for i, k in enumerate(keys) if k not in stored or k in set(changed)]
    if changed:
        log(f"re-encoding {len(changed)} changed image(s) (e.g. {', '.join(changed[:3])})")
    backbone = load_backbone(config)
    build_record = read_json(out / BUILD_FILE) if (out / BUILD_FILE).exists() else {}
    atomic_write_json(out / BUILD_FILE, {**build_record, "config": config.to_dict(), "vprkit_version": __version__},
                      default=str)

    plan = memory_plan(config, backbone)
    cache = FeatureCache(plan.feature_cache_bytes)  # features of the vocabulary pass, kept for the encoding pass
    vocabulary = _obtain_vocabulary(config, backbone, source, out, progress, log, cache)
    if vocabulary is not None:  # recorded before the first shard: a resume must encode with this very vocabulary
        _record_build_vocabulary(out / BUILD_FILE, vocabulary)
    aggregator = make_aggregator(config, backbone, vocabulary)
    aggregator = aggregator.to(module_device(backbone)) if isinstance(aggregator, torch.nn.Module) else aggregator
    extensions = _make_extensions(config, backbone, vocabulary)
    for ext in extensions.values():
        if ext.needs_fit and not ext.try_load_state(out):
            fit_keys = sample_keys(keys, int(ext.options.get("fit_images", DEFAULT_FIT_IMAGES)), config.vocabulary.seed)
            ext.fit(_features_on_cpu(extract(backbone, config, source, fit_keys, progress and f"fit {ext.group}",
                                             on_failure=ignore_failures)))
            ext.save_state(out)

    failures: dict[str, str] = {}
    listing = getattr(source, "listing", None)
    if listing is not None:  # skipped entries and unreadable folders of the image folder: recorded, not lost
        failures.update({p.path: f"{p.kind}: {p.reason}" for p in listing.problems})
    fail_path = out / FAILURES_FILE
    row_of = {k: i for i, k in todo}
    t0 = time.perf_counter()
    pending: list[tuple[list[str], np.ndarray, list[dict]]] = []
    pending_n = 0
    shard_count = 0

    def flush() -> None:
        nonlocal pending, pending_n, shard_count
        if not pending:
            return
        ks = [k for p in pending for k in p[0]]
        vec = np.concatenate([p[1] for p in pending])
        extras = [e for p in pending for e in p[2]]
        prints = [source.fingerprint(k) for k in ks]
        entries = {"content_sha256": np.array([f.sha256.encode() for f in prints]),
                   "file_size": np.array([f.size for f in prints]), "file_mtime": np.array([f.mtime for f in prints]),
                   "run": np.full(len(ks), run["run"])}
        store.write_shard(ks, vec, xy[[row_of[k] for k in ks]], extras if extensions else None, entries)
        pending, pending_n = [], 0
        shard_count += 1
        if _after_shard is not None:
            _after_shard(shard_count)

    def on_failure(key: str, msg: str) -> None:
        failures[key] = msg
        log(f"skipped unreadable image: {msg}")

    todo_keys = {k for _, k in todo}
    cached = cache.keys() & todo_keys
    encoded = itertools.chain(
        cache.take(todo_keys),
        extract(backbone, config, source, [k for _, k in todo if k not in cached], progress and "map", on_failure),
    )
    for batch, feats in encoded:
        with torch.inference_mode():
            vec = aggregator(feats).float().cpu().numpy()
        per_image: list[dict] = [{} for _ in batch.keys]
        for g, ext in extensions.items():
            for d, payload in zip(per_image, ext.encode(batch, _on_cpu(feats))):
                d[g] = payload
        pending.append((batch.keys, vec, per_image))
        pending_n += len(batch.keys)
        if pending_n >= SHARD_IMAGES:
            flush()
    flush()
    encode_s = time.perf_counter() - t0
    n = store.consolidate()
    if n == 0:
        raise MapError(f"none of the {len(keys)} images in {source.describe()} could be read; see the messages above")
    updated_poses = store.update_poses(keys, xy, skip=todo_keys) if poses is not None else 0
    if updated_poses:
        log(f"updated the poses of {updated_poses} image(s) already in the map")
    vectors = store.read_global()
    index = build_index(vectors, config, out)
    index.save_to_map(out)
    if failures or fail_path.exists():
        atomic_write_json(fail_path, failures, default=str)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    skipped = len(listing.problems) if listing is not None else 0
    run["new_images"] = len(todo) - (len(failures) - skipped)
    info = {
        "vprkit_version": __version__,
        "config": config.to_dict(),
        "images_root": run["images_root"] if run["images_root"] else previous.get("images_root"),
        "runs": runs + [run],
        "backbone": backbone.identity(),
        "aggregator": aggregator.identity(),
        "descriptor_dim": int(vectors.shape[1]),
        "vocabulary": None if vocabulary is None else {
            "checksum": vocabulary.checksum, "source": config.vocabulary.source, "k": vocabulary.k},
        "counts": {"images": n, "failed": len(failures),
                   **({"ignored_files_by_extension": listing.ignored} if listing is not None and listing.ignored else {})},
        "index": {"factory": config.index, "ntotal": index.ntotal},
        "extensions": sorted(extensions),
        "environment": _recorded_environment(),
        "created": previous.get("created") or now,
        "updated": now,
        "last_build": {"new_images": run["new_images"], "reencoded": len(changed),
                       "poses_updated": updated_poses, "encode_seconds": round(encode_s, 3),
                       **({"poses": pose_report} if pose_report is not None else {})},
    }
    atomic_write_json(info_path, info, default=str)
    for ext in extensions.values():
        ext.finalize(store, out)
    return info


def _recorded_environment() -> dict[str, str]:
    from ..environment import recorded_environment

    return recorded_environment()


def _pose_rows(poses, keys: Sequence[str]) -> tuple[np.ndarray, dict[str, Any] | None]:
    """N×2 positions aligned with ``keys`` (NaN where unknown) and, for a poses CSV, what matched."""
    if poses is None:
        return np.full((len(keys), 2), np.nan), None
    if isinstance(poses, np.ndarray):
        if poses.shape != (len(keys), 2):
            raise MapError(f"poses array must be {len(keys)}×2, got {poses.shape}")
        return poses.astype(np.float64), None
    from ..datasets.poses import match_poses, read_poses

    matched, report = match_poses(read_poses(poses), list(keys))
    return matched.lookup(list(keys)), report.to_dict()


def _obtain_vocabulary(config: Config, backbone: Backbone, source: ImageSource, out: Path, progress, log,
                       cache: FeatureCache | None = None) -> Vocabulary | None:
    """The map's vocabulary: the one already in ``out``, a domain/file vocabulary, or one built from ``source``."""
    if not needs_vocabulary(config):
        return None
    path = out / VOCAB_FILE
    if path.exists():  # an earlier (perhaps interrupted) build's: it must fit these settings too
        voc = Vocabulary.load(path)
        _check_vocabulary(voc, config, backbone, path)
        return voc
    spec = config.vocabulary.source
    if spec == "auto":
        domain, dists = _pick_domain(backbone, config, source)
        log(f"vocabulary: nearest domain is {domain!r} (distances {', '.join(f'{k} {v:.3f}' for k, v in dists.items())})")
        spec = f"domain:{domain}"
    src = resolve_vocabulary_source(spec)
    if src is None:
        log(f"building vocabulary (K={config.vocabulary.k}) from {min(len(source.keys), config.vocabulary.large_map_images)}+ images of the map")
        voc = build_vocabulary(backbone, config, [source], name=f"map:{out.name}", progress=progress, cache=cache)
    else:
        voc = Vocabulary.load(src)
    _check_vocabulary(voc, config, backbone, src or "built from the map")
    voc.save(path)
    return voc


def _record_build_vocabulary(path: Path, vocabulary: Vocabulary) -> None:
    """Add the vocabulary's K and checksum to ``build.json``; refuse one that differs from what the shards used."""
    record = read_json(path)
    before = record.get("vocabulary")
    now = {"k": vocabulary.k, "checksum": vocabulary.checksum}
    if before and before.get("checksum") != now["checksum"]:
        raise VocabularyMismatchError(
            f"{path.parent} was being built with vocabulary {before.get('checksum')} (K={before.get('k')}) but now holds "
            f"{now['checksum']} (K={now['k']}); the shards already written used the other one — build into another --out")
    if before != now:
        atomic_write_json(path, {**record, "vocabulary": now}, default=str)


def _check_vocabulary(voc: Vocabulary, config: Config, backbone: Backbone, where) -> None:
    """The vocabulary encodes these descriptors (backbone, layer, size) with the preset's K and centre kind."""
    voc.check_compatible(descriptor_identity(config, backbone), source=f"preset {config.name}")
    if voc.k != config.vocabulary.k:
        raise VocabularyMismatchError(f"vocabulary {where} has K={voc.k}, the preset asks for K={config.vocabulary.k}")


# ---- localisation ------------------------------------------------------------------------------
@dataclass
class Match:
    key: str
    row: int
    score: float
    position: tuple[float, float] | None


@dataclass
class QueryResult:
    query: str
    matches: list[Match]
    seconds: float = 0.0
    error: str | None = None  # why the query could not be localised (unreadable image); matches are then empty

    def to_dict(self) -> dict[str, Any]:
        out = {"query": self.query, "seconds": round(self.seconds, 4),
               "matches": [{"image": m.key, "row": m.row, "score": round(m.score, 6), "position": m.position}
                           for m in self.matches]}
        return out if self.error is None else {**out, "error": self.error}


def query_batches(map: Map, images: ImageSource | str | os.PathLike, keys: Sequence[str] | None = None,
                  progress: bool = False, on_failure: Callable[[str, str], None] | None = None) -> Iterator[QueryBatch]:
    """Queries of ``images`` through the map's backbone and aggregator, batch by batch."""
    for batch, feats in extract(map.backbone, map.config, images, keys, progress and "queries", on_failure):
        with torch.inference_mode():
            g = map.aggregator(feats).float().cpu().numpy()
        yield QueryBatch(batch, _on_cpu(feats), g)


def search(map: Map, query: QueryBatch, top_k: int, reranker=None) -> tuple[np.ndarray, np.ndarray]:
    """Retrieve (and optionally re-rank) a query batch → rows and scores, Q×top_k, best first."""
    retriever = map.retriever()
    k = max(top_k, reranker.shortlist if reranker is not None else 0)
    rows, scores = retriever.search(query, k)
    rows, scores = pad_topk(rows, scores, k)
    if reranker is not None:
        rows, scores = reranker.rerank(query, rows, scores)
    return pad_topk(rows, scores, top_k)


def get_reranker(map: Map, name, log: Callable[[str], None] = logger.info):
    """The re-ranker ``name`` (a re-ranking preset name or settings) for ``map``.

    It reads the map's stored patches when they match the settings, else computes them on the fly.
    """
    if not name:
        return None
    _import_plugins()
    from ..rerank import make_reranker

    settings = get_rerank_config(name) if isinstance(name, str) else name

    try:
        images = map.data.images
    except MapError:
        if "patches" not in map.extensions:
            raise MapError(f"re-ranking needs the map's images or stored patches; {map.dir} was built from decoded "
                           f"frames without --rerank, so neither is available") from None
        images = None
    return make_reranker(settings, config=map.config, backbone=map.backbone,
                         vocabulary=map.vocabulary, stored=map.extensions.get("patches"), store=map.store,
                         keys=map.keys, images=images, log=log)


def query_source(queries: QueryImages, check_files: bool = True) -> ImageSource:
    """Query images as given (paths, decoded frames, a mapping name → image, or a source).

    With ``check_files``, a path that is not a file is an :class:`ImageReadError` before any work.
    """
    source = image_source(queries)
    if check_files and isinstance(source, FileImages):
        for key in source.keys:
            if not Path(key).is_file():
                raise ImageReadError(f"{key}: query image not found")
    return source


def localize(
    map: Map | str | os.PathLike, queries: QueryImages, top_k: int = 10,
    rerank: str | None = None, progress: bool = False, device: str | None = None, unreadable: str = "raise",
) -> list[QueryResult]:
    """Top-``top_k`` places for each query: image paths, decoded frames (arrays / PIL images), or both.

    Results are in the order of ``queries`` and named as given (paths) or ``frame-000000`` … by
    position (frames; pass a mapping name → frame to name them). An unreadable query raises
    :class:`ImageReadError` (``unreadable="raise"``) or gets a result with its ``error`` and no
    matches while the others are localised (``"report"``). ``device`` applies when ``map`` is a
    path (an opened map keeps its models).
    """
    if unreadable not in ("raise", "report"):
        raise ConfigError(f"unreadable must be 'raise' or 'report', got {unreadable!r}")
    m = map if isinstance(map, Map) else open_map(map, read_only=True, device=device)
    source = query_source(queries, check_files=unreadable == "raise")
    reranker = get_reranker(m, rerank)
    failed: dict[str, str] = {}
    done: dict[str, QueryResult] = {}
    t0 = time.perf_counter()
    on_failure = None if unreadable == "raise" else failed.__setitem__
    for qb in query_batches(m, source, progress=progress, on_failure=on_failure):
        rows, scores = search(m, qb, top_k, reranker)
        dt = (time.perf_counter() - t0) / len(qb.keys)  # extraction + search, per query
        for key, r, s in zip(qb.keys, rows, scores):
            done[key] = QueryResult(key, [_match(m, int(i), float(v)) for i, v in zip(r, s) if i >= 0], dt)
        t0 = time.perf_counter()
    if reranker is not None and not isinstance(map, Map):
        reranker.close()
    return [done[k] if k in done else QueryResult(k, [], 0.0, failed.get(k, "not localised")) for k in source.keys]


def _match(m: Map, row: int, score: float) -> Match:
    pos = m.poses[row]
    return Match(m.keys[row], row, score, None if np.isnan(pos).any() else (float(pos[0]), float(pos[1])))


# ---- evaluation --------------------------------------------------------------------------------
def evaluate(
    dataset,
    preset: str | Config | None = None,
    out: str | os.PathLike | None = None,
    rerank: str | None = None,
    ns: Sequence[int] = RECALL_NS,
    no_positive: str = "fail",
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    save_predictions: int = 0,
) -> dict[str, Any]:
    """Build a map of ``dataset``'s database, localise every query, and measure Recall@N.

    ``dataset`` is a :class:`vprkit.datasets.Dataset` or a spec for :func:`vprkit.datasets.load_dataset`.
    With ``out``, the map lives in ``out/map`` (reused if it exists with the same settings) and the
    per-query CSV, the JSON summary and the resolved config are written there; otherwise a
    temporary map is used. Queries without any positive count as failures (``no_positive="fail"``,
    the VPR-methods-evaluation convention) or are left out (``"skip"``, SegVLAD's).
    """
    from ..datasets import load_dataset

    ds = load_dataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    if ds.ground_truth is None:
        raise ConfigError(f"dataset {ds.name} has no ground truth; use `vprkit map build` and `vprkit localize` instead")
    config = resolve_config(preset)
    rerank = rerank if rerank is not None else (config.rerank.name if config.rerank is not None else None)
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="vprkit-eval-")
        map_dir = Path(tmp.name) / "map"
    else:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        map_dir = out / "map"
    try:
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            build_map(FolderImages(ds.database_dir, ds.database_images), map_dir, config, poses=ds.database_poses,
                      progress=progress, log=log)
            build_s = time.perf_counter() - t0
            m = open_map(map_dir)
            reranker = get_reranker(m, rerank, log)
            rankings = Rankings(ds.query_images, ds.database_images, m.keys, max(max(ns), 1))
            t1 = time.perf_counter()
            search_s = 0.0
            for qb in query_batches(m, FolderImages(ds.queries_dir, ds.query_images), progress=progress,
                                    on_failure=rankings.fail):
                ts = time.perf_counter()
                rows, sc = search(m, qb, rankings.k, reranker)
                search_s += time.perf_counter() - ts
                rankings.add(qb.keys, rows, sc)
            query_s = time.perf_counter() - t1
        for key, msg in rankings.failed.items():
            log(f"query not evaluated (counts as a failure): {msg}")
        n_db, n_q = len(m.keys), len(ds.query_images)
        summary = {
            "dataset": ds.name,
            "preset": config.name,
            "rerank": rerank,
            "recall": rankings.recall(ds.ground_truth, ns, no_positive),
            "timing": {
                "map_build_s": round(build_s, 3),
                "map_images_per_s": round(n_db / build_s, 2) if build_s else None,
                "query_total_s": round(query_s, 3),
                "ms_per_query": round(1000 * query_s / max(1, n_q), 2),
                "search_ms_per_query": round(1000 * search_s / max(1, n_q), 2),
            },
            "peak_rss_mb": round(mem.peak_mb, 1),
            "counts": {"database": n_db, "queries": n_q, "queries_unreadable": len(rankings.failed)},
            "config": config.to_dict(),
            "environment": _recorded_environment(),
        }
        if out is not None:
            write_run(out, summary, rankings, ds.ground_truth, dataset=ds, save_predictions=save_predictions, log=log)
        if reranker is not None:
            reranker.close()
        return summary
    finally:
        if tmp is not None:
            tmp.cleanup()


def map_info(map_dir: str | os.PathLike) -> dict[str, Any]:
    """``map.json`` plus bytes per image of the global descriptor and of each stored extra."""
    d = Path(map_dir)
    info = read_map_info(d)
    info["bytes_per_image"] = MapStore(d, info["config"].get("store_dtype", "float32")).extra_bytes()
    return info


# ---- domain vocabularies -----------------------------------------------------------------------
def _database_sources(datasets: Sequence) -> dict[str, ImageSource]:
    from ..datasets import load_dataset

    loaded = [load_dataset(d) if isinstance(d, (str, os.PathLike)) else d for d in datasets]
    return {d.name: FolderImages(d.database_dir, d.database_images) for d in loaded}


def build_domain_vocabulary(
    name: str, datasets: Sequence, preset: str | Config | None = None, out: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Pool sub-sampled database descriptors of several datasets into one vocabulary ``name``."""
    config = resolve_config(preset)
    return _build_domain_vocabulary(load_backbone(config), config, _database_sources(datasets), name, out, progress)


def analyse_dataset_domains(datasets: Sequence, preset: str | Config | None = None,
                            plot: str | os.PathLike | None = None, progress: bool = True):
    """GeM descriptors per dataset → PCA → suggested domains (+ scatter PNG). Saves the PCA for picking."""
    config = resolve_config(preset)
    return _analyse_domains(load_backbone(config), config, _database_sources(datasets), plot, progress)


def pick_domain(images_dir: str | os.PathLike, preset: str | Config | None = None,
                keys: Sequence[str] | None = None) -> tuple[str, dict[str, float]]:
    """The domain vocabulary nearest to the images of a new map."""
    config = resolve_config(preset)
    return _pick_domain(load_backbone(config), config, image_source(images_dir, keys))


# ---- looking at one result: SegVLAD explanations, patch matches ----------------------------------
def explain(map: Map | str | os.PathLike, query: ImageInput, out: str | os.PathLike | None = None,
            top: int = 5, rank: int = 0):
    """Why ``query`` (a path or a decoded frame) matched its ``rank``-th map image (0 = best): SuperSegment pairs.

    Draws the pairs to ``out`` (PNG) if given. The map must store SuperSegments (a ``segvlad-*`` preset).
    """
    from ..segments.explain import draw, explain_pair, segment_sets, stored_segment_set

    m = map if isinstance(map, Map) else open_map(map, read_only=True)
    ext = m.extensions.get("segments")
    if ext is None:
        raise MapError(f"map {m.dir} has no SuperSegments ('segments' extension); explain needs a segvlad map")
    source = query_source([query])
    res = localize(m, source, top_k=rank + 1)[0]
    if len(res.matches) <= rank:
        raise MapError("the map returned no match for this query")
    match = res.matches[rank]
    (qset,), (qimg,) = segment_sets(m.backbone, m.config, ext, source)
    try:
        match_path = m.data.images.path(match.key)
    except (MapError, KeyError):
        match_path = None
    if match_path is not None and match_path.is_file():
        (mset,), (mimg,) = segment_sets(m.backbone, m.config, ext, FileImages([match_path]))
    else:  # image moved (or the map was built from frames): the stored SuperSegments on a grey canvas
        mset, mimg = stored_segment_set(m.store, match.row, m.backbone.stride), np.full_like(qimg, 128)
    exp = explain_pair(res.query, qset, match.key, match.row, match.score, mset, top)
    if out is not None:
        draw(exp, qimg, qset, mimg, mset, out)
        exp.figure_path = str(out)
    return exp


def match_two(image_a: ImageInput, image_b: ImageInput, rerank: str = "performance",
              preset: str | Config | None = None, map_dir: str | os.PathLike | None = None,
              out: str | os.PathLike | None = None):
    """Match ``image_a`` (as query) against ``image_b`` with re-ranking preset ``rerank``; draw to ``out``.

    With ``map_dir`` the map's backbone, image size and fitted patch state are used, so the score is
    the one re-ranking computes; otherwise ``preset`` (default: the default preset) gives backbone and
    image size and the patch vocabulary is fitted on the two images.
    """
    from ..rerank.draw import match_pair

    settings = get_rerank_config(rerank)
    if map_dir is not None:
        m = open_map(map_dir, read_only=True)
        reranker = get_reranker(m, rerank, log=lambda _: None)
        return match_pair(image_a, image_b, settings, m.config, m.backbone, reranker.extension, out)
    config = resolve_config(preset)
    return match_pair(image_a, image_b, settings, config, load_backbone(config), None, out)


# ---- comparing methods; hloc interoperability (appended by the evaluation helper) ----------------
def _run_folder_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)


def compare(
    datasets: Sequence,
    presets: Sequence[str | Config],
    reranks: Sequence[str | None] = (None,),
    out: str | os.PathLike | None = None,
    baseline: str | None = None,
    n: int = 1,
    ns: Sequence[int] = RECALL_NS,
    no_positive: str = "fail",
    resolve_options: Mapping[str, Any] | None = None,
    save_predictions: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Evaluate every preset × re-ranking mode on every dataset; one table and per-query fixes/breaks.

    ``reranks``: re-ranking presets, ``None`` (or ``"none"``) for global retrieval only. Each run is
    :func:`evaluate` into ``out/<dataset>/<preset>[+<rerank>]`` (so a rerun reuses the maps), then
    :mod:`vprkit.evaluation.compare` writes ``comparison.{md,csv,html,json}`` and ``changes.csv`` to
    ``out``: Recall@N, bytes per place, time per query, and which queries each method fixes or breaks
    within the top ``n`` against ``baseline`` (a method label, default the first). ``resolve_options``
    go to :func:`vprkit.presets.resolve` for every preset (``image_size``, ``float16``, …).
    Returns ``{"rows", "changes", "runs" (folders), "files"}``.
    """
    from ..datasets import load_dataset
    from ..evaluation import compare as cmp
    from ..presets import resolve

    if not datasets or not presets:
        raise ConfigError("compare needs at least one dataset and one preset")
    modes = [None if r in (None, "", "none") else r for r in (reranks or (None,))]
    tmp = tempfile.TemporaryDirectory(prefix="vprkit-compare-") if out is None else None
    root = Path(tmp.name) if tmp is not None else Path(out)
    try:
        records = []
        for spec in datasets:
            ds = load_dataset(spec) if isinstance(spec, (str, os.PathLike)) else spec
            for preset in presets:
                for mode in modes:
                    config = resolve(preset, rerank=mode, **dict(resolve_options or {}))
                    label = config.name + (f"+{mode}" if mode else "")
                    run_dir = root / _run_folder_name(ds.name) / _run_folder_name(label)
                    log(f"compare: {ds.name} · {config.name}" + (f" + {mode}" if mode else "") + f" → {run_dir}")
                    evaluate(ds, config, out=run_dir, rerank=mode, ns=ns, no_positive=no_positive,
                             progress=progress, log=log, save_predictions=save_predictions)
                    records.append(cmp.load_run(run_dir, map_info(run_dir / "map")["bytes_per_image"]))
        changes = cmp.pairwise_changes(records, baseline, n)
        files = [] if tmp is not None else [str(p) for p in cmp.write_comparison(root, records, changes, ns)]
        return {"rows": cmp.comparison_rows(records, ns), "changes": changes,
                "runs": [r.folder for r in records] if tmp is None else [], "files": files,
                "markdown": cmp.render_markdown(records, changes, ns, list_queries=False)}
    finally:
        if tmp is not None:
            tmp.cleanup()


def export_hloc(map_dir: str | os.PathLike, out: str | os.PathLike, pairs: str | os.PathLike | None = None,
                queries: str | os.PathLike | None = None, top_k: int = 20, db_prefix: str = "",
                query_prefix: str = "", progress: bool = False) -> dict[str, Any]:
    """A map's global descriptors as hloc ``global-feats`` HDF5, plus (with ``pairs`` and ``queries``) retrieval pairs.

    ``queries`` is a folder of query images: their descriptors (the map's own model) are added to the
    same HDF5 file, named ``query_prefix + relative path``, and each query's top ``top_k`` database
    images go to ``pairs`` as hloc's ``pairs_from_retrieval`` writes them. Database images are named
    ``db_prefix + map key``. Names must be unique across both.
    """
    from ..maps import hloc

    result = hloc.export_map(map_dir, out, prefix=db_prefix)
    if pairs is None and queries is None:
        return result
    if pairs is None or queries is None:
        raise ConfigError("retrieval pairs need both --pairs and --queries")
    m = open_map(map_dir, read_only=True)
    source = FolderImages(Path(queries))
    names, descs = [], []
    for qb in query_batches(m, source, progress=progress):
        names += [query_prefix + k for k in qb.keys]
        descs.append(qb.global_descriptors)
    if not names:
        raise ImageReadError(f"no readable query images in {queries}")
    db_names = [db_prefix + k for k in m.keys]
    clash = set(names) & set(db_names)
    if clash:
        raise ConfigError(f"{len(clash)} query names are also database names (e.g. {sorted(clash)[0]!r}); "
                          f"give --query-prefix or --db-prefix")
    q = np.concatenate(descs)
    hloc.write_global_features(out, names, q, append=True)
    pair_list = hloc.retrieval_pairs(names, q, db_names, m.store.read_global(), top_k)
    hloc.write_pairs(pairs, pair_list)
    result.update(queries=len(names), pairs=len(pair_list), pairs_path=str(pairs), top_k=top_k)
    return result


def import_hloc(features: str | os.PathLike, out: str | os.PathLike, preset: str | Config | None = None,
                normalize: bool = False, prefix: str | Sequence[str] | None = None) -> dict[str, Any]:
    """A vprkit map from an hloc global-features HDF5 (keys and descriptors; ``map.json`` records the source).

    Without ``preset`` the map is for retrieval by descriptors given as arrays
    (:func:`vprkit.maps.hloc.retrieve`); with the preset that produced the descriptors it is a normal map.
    """
    from ..maps import hloc

    config = None if preset is None else resolve_config(preset).to_dict()
    return hloc.import_features(features, out, config=config, prefix=prefix, normalize=normalize)


# ---- training ----------------------------------------------------------------------------------
def train(recipe, resume: bool = True, progress: bool = True, log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Train what a recipe (TOML/YAML path or dict) describes; the summary's ``checkpoint`` (RUN/best.ckpt) is a preset."""
    from ..training.recipe import run_recipe

    return run_recipe(recipe, resume=resume, progress=progress, log=log)


def add_pca(checkpoint, images, dim: int, whiten: bool = False, sample: int = 2000, out=None,
            progress: bool = True) -> Path:
    """Append a PCA (``whiten``: whitened) layer fitted on ≤ ``sample`` of ``images`` to a checkpoint; returns the new .ckpt."""
    from ..training.checkpoint import add_pca as _add_pca

    return _add_pca(checkpoint, images, dim, whiten=whiten, sample=sample, out=out, progress=progress)
