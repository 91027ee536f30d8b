"""The stage functions that compose vprkit: build a map, open it, localise queries, evaluate.

The CLI and the service call these and nothing deeper. Each is usable from Python::

    from vprkit import pipeline
    pipeline.build_map("db_images/", "my_map", "effnet-vlad")
    m = pipeline.open_map("my_map")
    results = pipeline.localize(m, ["query.jpg"], top_k=5)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .aggregation import AGGREGATORS, Aggregator, DescriptorSampler, Vocabulary, fit_vocabulary
from .backbones import Backbone, DenseFeatures, build_backbone
from .config import (BUDGET_SHARE_DECODE_BUFFER, BUDGET_SHARE_VOCABULARY_POOL, MIB,
                     MIN_MEMORY_BUDGET_MB, Config, MemoryPlan)
from .errors import ConfigError, ImageReadError, MapError, VocabularyMismatchError
from .images import Batch, ImageSpec, iter_batches, list_images
from .maps import INDEX_FILE, FaissIndex, MapStore
from .maps.extensions import EXTENSIONS, MapExtension
from .presets import DEFAULT_PRESET, get_preset
from .retrieval import RETRIEVERS, QueryBatch, Retriever, pad_topk

MAP_FILE = "map.json"
VOCAB_FILE = "vocabulary.npz"
FAILURES_FILE = "failures.json"
# Images per shard: big enough that a 100k-image map is a few hundred files, small enough that an
# interrupt loses at most a minute of work.
SHARD_IMAGES = 128
DEFAULT_FIT_IMAGES = 500
# Resize mode "none" keeps each file's size, unknown before reading: memory checks assume full-HD frames.
ASSUMED_ORIGINAL_SIZE = (1080, 1920)
RGB_CHANNELS = 3
FLOAT32_BYTES = 4
# Settings that only bound working memory: they do not change a map whose vocabulary exists, so a
# build may resume with other values (e.g. a smaller budget on a smaller machine).
MEMORY_ONLY_SETTINGS = ("memory_budget_mb",)
MEMORY_ONLY_VOCABULARY_SETTINGS = ("max_bytes",)


def _import_plugins() -> None:
    """Import the packages that register extensions, retrievers and re-rankers."""
    import importlib

    for mod in ("vprkit.rerank", "vprkit.segments"):
        importlib.import_module(mod)


def resolve_config(preset: str | Config | None) -> Config:
    if isinstance(preset, Config):
        return preset
    return get_preset(preset or DEFAULT_PRESET)


def set_threads(n: int) -> None:
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def load_backbone(config: Config) -> Backbone:
    set_threads(config.threads)
    return build_backbone(config.backbone, **dict(config.backbone_options))


def descriptor_identity(config: Config, backbone: Backbone) -> dict[str, Any]:
    return {**backbone.identity(), **config.descriptor_identity()}


# ---- memory ------------------------------------------------------------------------------------
def prepared_size_bound(spec: ImageSpec) -> tuple[int, int]:
    """The largest (height, width) an image can have after preparation under ``spec``."""
    if spec.resize in ("fixed", "resize_crop"):
        return int(spec.size[0]), int(spec.size[1])
    if spec.resize == "keep_aspect":
        side = int(max(spec.size))
        return side, side
    return ASSUMED_ORIGINAL_SIZE


def decoded_image_bytes(config: Config) -> int:
    """Bytes of one decoded, prepared image waiting for the backbone (uint8 RGB)."""
    h, w = prepared_size_bound(config.image)
    return h * w * RGB_CHANNELS


def image_feature_bytes(config: Config, backbone: Backbone) -> int:
    """Bytes of one image's float32 patch descriptors on the backbone's grid."""
    h, w = prepared_size_bound(config.image)
    return max(1, h // backbone.stride) * max(1, w // backbone.stride) * backbone.dim * FLOAT32_BYTES


def memory_plan(config: Config, backbone: Backbone) -> MemoryPlan:
    """:meth:`Config.memory_plan`, after checking the budget can hold what one step needs.

    A budget must let the descriptor pool hold one image's patch descriptors and the decode
    buffer one batch of images; otherwise the error names the smallest budget that works.
    """
    plan = config.memory_plan()
    if plan.budget_bytes is None:
        return plan
    needs = {"one batch of decoded images": config.batch_size * decoded_image_bytes(config) / BUDGET_SHARE_DECODE_BUFFER}
    if config.vocabulary.max_bytes is None:
        needs["one image's patch descriptors"] = image_feature_bytes(config, backbone) / BUDGET_SHARE_VOCABULARY_POOL
    minimum_mb = max(MIN_MEMORY_BUDGET_MB, *(math.ceil(b / MIB) for b in needs.values()))
    if config.memory_budget_mb < minimum_mb:
        h, w = prepared_size_bound(config.image)
        raise ConfigError(
            f"memory budget {config.memory_budget_mb} MB is too small for {config.name} ({backbone.dim}-d, stride "
            f"{backbone.stride}, {w}×{h} images, batch_size {config.batch_size}): its shares must hold "
            f"{' and '.join(needs)}; the minimum is {minimum_mb} MB"
        )
    return plan


def decode_prefetch_images(config: Config, plan: MemoryPlan) -> int | None:
    """How many decoded images may wait for the backbone (a multiple of ``batch_size``); None = all."""
    if plan.decode_buffer_bytes is None:
        return None
    batches = plan.decode_buffer_bytes // (decoded_image_bytes(config) * config.batch_size)
    return max(1, batches) * config.batch_size


def extract(
    backbone: Backbone, config: Config, root: str | os.PathLike, keys: Sequence[str],
    progress: bool | str = False, on_failure: Callable[[str, str], None] | None = None,
) -> Iterator[tuple[Batch, DenseFeatures]]:
    """Dense features of ``keys`` (relative to ``root``), batch by batch; failures go to ``on_failure``.

    The decoder pool runs ahead of the backbone (decoding is much faster); with a memory budget
    the keys go to it in chunks of :func:`decode_prefetch_images`, so the images decoded ahead stay
    within the budget's decode share instead of growing with the number of images.
    """
    bar = tqdm(total=len(keys), desc=progress if isinstance(progress, str) else "extract", unit="img",
               disable=not progress, leave=False)
    chunk = decode_prefetch_images(config, config.memory_plan()) or max(1, len(keys))
    batches = itertools.chain.from_iterable(
        iter_batches(root, keys[i : i + chunk], config.image, backbone.size_multiple, config.batch_size, config.workers)
        for i in range(0, len(keys), chunk)
    )
    try:
        for batch in batches:
            for key, msg in batch.failures:
                if on_failure is None:
                    raise ImageReadError(msg)
                on_failure(key, msg)
            bar.update(len(batch.keys) + len(batch.failures))
            if not batch.keys:
                continue
            with torch.inference_mode():
                feats = backbone(torch.from_numpy(batch.pixels))
            yield batch, feats
    finally:
        bar.close()


# ---- vocabularies ------------------------------------------------------------------------------
def vocabulary_sample(keys: Sequence[str], config: Config) -> tuple[list[str], int]:
    """Which images (and patch step) feed the vocabulary: AnyLoc's rule for maps above 2,000 images."""
    vc = config.vocabulary
    if len(keys) <= vc.large_map_images:
        return list(keys), 1
    rng = np.random.default_rng(vc.seed)
    n = max(vc.k, int(round(len(keys) * vc.large_map_fraction)))
    picked = sorted(rng.choice(len(keys), size=min(n, len(keys)), replace=False))
    return [keys[i] for i in picked], vc.large_map_patch_step


class FeatureCache:
    """Dense features kept from one pass for the next (vocabulary pass → encoding pass), up to a byte budget.

    On maps small enough to fit, this saves running the backbone twice over the same images.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.batches: list[tuple[Batch, DenseFeatures]] = []

    def add(self, batch: Batch, feats: DenseFeatures) -> None:
        # pixels were uint8 / 255: keep them as uint8 (4× smaller), exact on the way back
        pixels = np.round(batch.pixels * 255).astype(np.uint8)
        size = feats.patches.numel() * feats.patches.element_size() + pixels.nbytes
        if self.nbytes + size <= self.max_bytes:
            self.batches.append((Batch(batch.keys, pixels, batch.geometries), feats))
            self.nbytes += size

    def keys(self) -> set[str]:
        return {k for b, _ in self.batches for k in b.keys}

    def take(self, wanted: set[str]) -> Iterator[tuple[Batch, DenseFeatures]]:
        """Cached batches restricted to ``wanted`` keys (the cache is emptied as it goes)."""
        while self.batches:
            batch, feats = self.batches.pop(0)
            batch = Batch(batch.keys, batch.pixels.astype(np.float32) / 255.0, batch.geometries)
            idx = [i for i, k in enumerate(batch.keys) if k in wanted]
            if not idx:
                continue
            if len(idx) < len(batch.keys):
                sel = torch.as_tensor(idx)
                batch = Batch([batch.keys[i] for i in idx], batch.pixels[idx], [batch.geometries[i] for i in idx])
                g = None if feats.global_token is None else feats.global_token[sel]
                feats = DenseFeatures(feats.patches[sel], feats.stride, feats.image_size, g)
            yield batch, feats
        self.nbytes = 0


def build_vocabulary(
    backbone: Backbone, config: Config, sources: Iterable[tuple[str | os.PathLike, Sequence[str]]],
    name: str = "map", progress: bool = False, cache: FeatureCache | None = None,
) -> Vocabulary:
    """Spherical k-means over a bounded sample of local descriptors from one or more image sets.

    ``sources`` are (root, keys) pairs; several pairs pool datasets into one domain vocabulary.
    RAM for the pool is capped by ``config.memory_plan().vocabulary_pool_bytes`` (reservoir
    sampling; ``vocabulary.max_bytes`` or a share of ``memory_budget_mb``). With
    ``cache``, the extracted features are also kept (within its budget) for the caller's next pass.
    """
    vc = config.vocabulary
    plan = memory_plan(config, backbone)
    sampler = DescriptorSampler(backbone.dim, plan.vocabulary_pool_bytes, seed=vc.seed)
    n_images = 0
    for root, keys in sources:
        sample, step = vocabulary_sample(keys, config)
        sampler.patch_step = step
        for batch, feats in extract(backbone, config, root, sample, progress and f"vocabulary {Path(root).name}",
                                    on_failure=lambda k, m: None):
            sampler.add(feats)
            n_images += len(batch.keys)
            if cache is not None:
                cache.add(batch, feats)
    if len(sampler.pool) < vc.k:
        raise ConfigError(f"only {len(sampler.pool)} descriptors from {n_images} images: too few for K={vc.k}")
    meta = {"name": name, "identity": descriptor_identity(config, backbone), "n_images": n_images,
            "sample_bytes": sampler.nbytes, "descriptors_seen": sampler.seen,
            "pooled_descriptors": int(len(sampler.pool)), "pool_max_bytes": plan.vocabulary_pool_bytes}
    sets = max(vc.sets, int(dict(config.aggregator_options).get("vocabularies", 1)))
    return fit_vocabulary(sampler.pool, vc.k, meta, seed=vc.seed, sets=sets)


def domain_vocabulary_dir() -> Path:
    from .backbones.weights import vprkit_cache_dir

    return Path(os.environ.get("VPRKIT_VOCABULARIES", vprkit_cache_dir() / "vocabularies"))


def resolve_vocabulary_source(source: str) -> Path | None:
    """``map`` → None; ``domain:NAME`` → the shared domain vocabulary file; otherwise a path.

    (``auto`` is resolved by the map build, which has the images to compare with the domains.)
    """
    if source == "map":
        return None
    if source.startswith("domain:"):
        path = domain_vocabulary_dir() / f"{source.split(':', 1)[1]}.npz"
        if not path.exists():
            raise ConfigError(f"domain vocabulary {source!r} not found at {path}; build it with `vprkit vocab build --domain NAME DATASET…`")
        return path
    return Path(source)


def make_aggregator(config: Config, backbone: Backbone, vocabulary: Vocabulary | None) -> Aggregator:
    factory = AGGREGATORS.get(config.aggregator)
    options = dict(config.aggregator_options)
    if _wants_vocabulary(factory, options):
        if vocabulary is None:
            raise ConfigError(f"aggregator {config.aggregator!r} needs a vocabulary")
        vocabulary.check_compatible(descriptor_identity(config, backbone))
        options["vocabulary"] = vocabulary
    return factory(backbone.dim, **options)


def _wants_vocabulary(factory: Any, options: dict[str, Any]) -> bool:
    wants = getattr(factory, "wants_vocabulary", None)
    return bool(wants(options)) if wants is not None else bool(getattr(factory, "needs_vocabulary", False))


def needs_vocabulary(config: Config) -> bool:
    return _wants_vocabulary(AGGREGATORS.get(config.aggregator), dict(config.aggregator_options)) or any(
        getattr(EXTENSIONS.get(g), "needs_vocabulary", False) for g in config.extensions
    )


# ---- maps --------------------------------------------------------------------------------------
@dataclass
class Map:
    """An opened map: its config, models, store and index, ready to localise queries."""

    dir: Path
    config: Config
    info: dict[str, Any]
    backbone: Backbone
    aggregator: Aggregator
    vocabulary: Vocabulary | None
    store: MapStore
    index: FaissIndex
    keys: list[str]
    poses: np.ndarray
    extensions: dict[str, MapExtension] = field(default_factory=dict)

    @property
    def images_root(self) -> Path:
        return Path(self.info["images_root"])

    def retriever(self) -> Retriever:
        return RETRIEVERS.get(self.config.retriever)(self, self.config.retriever_options)


def _atomic_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MapError(f"{path} is unreadable ({exc}); the map directory is damaged") from None


def _make_extensions(config: Config, backbone: Backbone, vocabulary: Vocabulary | None) -> dict[str, MapExtension]:
    if config.extensions:
        _import_plugins()
    return {g: EXTENSIONS.get(g)(opts, backbone, vocabulary) for g, opts in config.extensions.items()}


def build_map(
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    preset: str | Config | None = None,
    poses: str | os.PathLike | np.ndarray | None = None,
    keys: Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    _after_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Extract, aggregate and store descriptors of every image under ``images_dir`` into ``out``.

    Resumable: images already in the map (or in shards of an interrupted build) are skipped.
    Unreadable images are reported by name and skipped (listed in ``failures.json``). ``poses`` is
    a poses CSV or an N×2 array aligned with ``keys``. Returns the map's ``map.json`` content.
    """
    config = resolve_config(preset)
    root = Path(images_dir)
    out = Path(out)
    keys = list(keys) if keys is not None else list_images(root)
    if not keys:
        raise MapError(f"no images found in {root}")
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / MAP_FILE
    if info_path.exists():
        old = _read_json(info_path)
        if not _same_map_settings(old.get("config", {}), config):
            raise MapError(
                f"{out} holds a map built with preset {old.get('config', {}).get('name')!r} and other settings; "
                f"use the same preset to add images, or another --out"
            )
    xy = _pose_rows(poses, keys)
    backbone = load_backbone(config)
    store = MapStore(out, config.store_dtype)
    done = set(store.keys(include_pending=True))
    todo = [(i, k) for i, k in enumerate(keys) if k not in done]

    plan = memory_plan(config, backbone)
    cache = FeatureCache(plan.feature_cache_bytes)  # features of the vocabulary pass, kept for the encoding pass
    vocabulary = _obtain_vocabulary(config, backbone, root, keys, out, progress, log, cache)
    aggregator = make_aggregator(config, backbone, vocabulary)
    extensions = _make_extensions(config, backbone, vocabulary)
    for ext in extensions.values():
        if ext.needs_fit and not ext.try_load_state(out):
            fit_keys = _fit_sample(keys, int(ext.options.get("fit_images", DEFAULT_FIT_IMAGES)), config.vocabulary.seed)
            ext.fit(extract(backbone, config, root, fit_keys, progress and f"fit {ext.group}", on_failure=lambda k, m: None))
            ext.save_state(out)

    failures: dict[str, str] = {}
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
        store.write_shard(ks, vec, xy[[row_of[k] for k in ks]], extras if extensions else None)
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
        extract(backbone, config, root, [k for _, k in todo if k not in cached], progress and "map", on_failure),
    )
    for batch, feats in encoded:
        vec = aggregator(feats).float().cpu().numpy()
        per_image: list[dict] = [{} for _ in batch.keys]
        for g, ext in extensions.items():
            for d, payload in zip(per_image, ext.encode(batch, feats)):
                d[g] = payload
        pending.append((batch.keys, vec, per_image))
        pending_n += len(batch.keys)
        if pending_n >= SHARD_IMAGES:
            flush()
    flush()
    elapsed = time.perf_counter() - t0
    n = store.consolidate()
    if n == 0:
        raise MapError(f"none of the {len(keys)} images in {root} could be read; see the messages above")
    vectors = store.read_global()
    index = FaissIndex.build(vectors, config.index)
    index.save(out / INDEX_FILE)
    if failures or fail_path.exists():
        _atomic_json(fail_path, failures)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info = {
        "vprkit_version": __version__,
        "config": config.to_dict(),
        "images_root": str(root.resolve()),
        "backbone": backbone.identity(),
        "aggregator": aggregator.identity(),
        "descriptor_dim": int(vectors.shape[1]),
        "vocabulary": None if vocabulary is None else {
            "checksum": vocabulary.checksum, "source": config.vocabulary.source, "k": vocabulary.k},
        "counts": {"images": n, "failed": len(failures)},
        "index": {"factory": config.index, "ntotal": index.ntotal},
        "extensions": sorted(extensions),
        "created": (_read_json(info_path).get("created") if info_path.exists() else None) or now,
        "updated": now,
        "last_build": {"new_images": len(todo) - len(failures), "seconds": round(elapsed, 3)},
    }
    _atomic_json(info_path, info)
    if extensions:
        m = open_map(out)
        for ext in m.extensions.values():
            ext.finalize(m)
    return info


def _same_map_settings(old: dict[str, Any], config: Config) -> bool:
    """Whether a map built with settings ``old`` can be extended with ``config`` (memory caps may differ)."""
    try:
        previous = Config.from_dict(old).to_dict()  # older map.json files lack newer keys: fill defaults
    except (ConfigError, TypeError):
        return False
    current = config.to_dict()
    for d in (previous, current):
        for key in MEMORY_ONLY_SETTINGS:
            d.pop(key, None)
        for key in MEMORY_ONLY_VOCABULARY_SETTINGS:
            d.get("vocabulary", {}).pop(key, None)
    return previous == current


def _fit_sample(keys: Sequence[str], n: int, seed: int) -> list[str]:
    if len(keys) <= n:
        return list(keys)
    rng = np.random.default_rng(seed)
    return [keys[i] for i in sorted(rng.choice(len(keys), n, replace=False))]


def _pose_rows(poses, keys: Sequence[str]) -> np.ndarray:
    if poses is None:
        return np.full((len(keys), 2), np.nan)
    if isinstance(poses, np.ndarray):
        if poses.shape != (len(keys), 2):
            raise MapError(f"poses array must be {len(keys)}×2, got {poses.shape}")
        return poses.astype(np.float64)
    from .datasets.poses import read_poses

    return read_poses(poses).lookup(list(keys))


def _obtain_vocabulary(config, backbone, root, keys, out: Path, progress, log, cache: FeatureCache | None = None) -> Vocabulary | None:
    if not needs_vocabulary(config):
        return None
    path = out / VOCAB_FILE
    if path.exists():
        voc = Vocabulary.load(path)
    else:
        source = config.vocabulary.source
        if source == "auto":
            domain, dists = pick_domain(root, config, keys)
            log(f"vocabulary: nearest domain is {domain!r} (distances {', '.join(f'{k} {v:.3f}' for k, v in dists.items())})")
            source = f"domain:{domain}"
        src = resolve_vocabulary_source(source)
        if src is None:
            log(f"building vocabulary (K={config.vocabulary.k}) from {min(len(keys), config.vocabulary.large_map_images)}+ images of the map")
            voc = build_vocabulary(backbone, config, [(root, keys)], name=f"map:{out.name}", progress=progress, cache=cache)
        else:
            voc = Vocabulary.load(src)
        voc.check_compatible(descriptor_identity(config, backbone), source=f"preset {config.name}")
        if voc.k != config.vocabulary.k:
            raise VocabularyMismatchError(f"vocabulary {src} has K={voc.k}, the preset asks for K={config.vocabulary.k}")
        voc.save(path)
    return voc


def open_map(map_dir: str | os.PathLike) -> Map:
    """Load a built map: config, backbone, vocabulary, aggregator, keys, poses and index."""
    d = Path(map_dir)
    info_path = d / MAP_FILE
    if not info_path.exists():
        raise MapError(f"{d} is not a vprkit map (no {MAP_FILE}); build one with `vprkit map build`")
    info = _read_json(info_path)
    config = Config.from_dict(info["config"])
    backbone = load_backbone(config)
    vocabulary = Vocabulary.load(d / VOCAB_FILE) if (d / VOCAB_FILE).exists() else None
    if vocabulary is not None and info.get("vocabulary") and vocabulary.checksum != info["vocabulary"]["checksum"]:
        raise VocabularyMismatchError(f"{d / VOCAB_FILE} changed since the map was built; rebuild the map")
    aggregator = make_aggregator(config, backbone, vocabulary)
    store = MapStore(d, config.store_dtype)
    keys = store.keys()
    index_path = d / INDEX_FILE
    index = FaissIndex.load(index_path, config.index) if index_path.exists() else None
    if index is None or index.ntotal != len(keys):  # missing or stale: rebuild from the store
        index = FaissIndex.build(store.read_global(), config.index)
        index.save(index_path)
    extensions = _make_extensions(config, backbone, vocabulary)
    for ext in extensions.values():
        if ext.needs_fit and not ext.try_load_state(d):
            raise MapError(f"{d} lacks the fitted state of '{ext.group}'; rebuild the map")
    return Map(d, config, info, backbone, aggregator, vocabulary, store, index, keys, store.read_poses(), extensions)


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

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "seconds": round(self.seconds, 4),
                "matches": [{"image": m.key, "row": m.row, "score": round(m.score, 6), "position": m.position} for m in self.matches]}


def query_batches(map: Map, root: str | os.PathLike, keys: Sequence[str], progress: bool = False,
                  on_failure: Callable[[str, str], None] | None = None) -> Iterator[QueryBatch]:
    for batch, feats in extract(map.backbone, map.config, root, keys, progress and "queries", on_failure):
        g = map.aggregator(feats).float().cpu().numpy()
        yield QueryBatch(batch, feats, g)


def search(map: Map, query: QueryBatch, top_k: int, reranker=None) -> tuple[np.ndarray, np.ndarray]:
    """Retrieve (and optionally re-rank) a query batch → rows and scores, Q×top_k, best first."""
    retriever = map.retriever()
    k = max(top_k, reranker.shortlist if reranker is not None else 0)
    rows, scores = retriever.search(query, k)
    rows, scores = pad_topk(rows, scores, k)
    if reranker is not None:
        rows, scores = reranker.rerank(query, rows, scores)
    return pad_topk(rows, scores, top_k)


def get_reranker(map: Map, name: str | None):
    if not name:
        return None
    _import_plugins()
    from .rerank.base import RERANKERS

    return RERANKERS.get(name)(map)


def localize(
    map: Map | str | os.PathLike, queries: Sequence[str | os.PathLike], top_k: int = 10,
    rerank: str | None = None, progress: bool = False,
) -> list[QueryResult]:
    """Top-``top_k`` places for each query image path. Unreadable queries raise :class:`ImageReadError`."""
    m = map if isinstance(map, Map) else open_map(map)
    reranker = get_reranker(m, rerank)
    paths = [Path(q) for q in queries]
    for p in paths:
        if not p.is_file():
            raise ImageReadError(f"{p}: query image not found")
    results: list[QueryResult] = []
    # queries may live in different folders: read each by its absolute path, report it as given
    given = {str(p.resolve()): str(q) for p, q in zip(paths, queries)}
    t0 = time.perf_counter()
    for qb in query_batches(m, "/", list(given), progress):
        rows, scores = search(m, qb, top_k, reranker)
        dt = (time.perf_counter() - t0) / len(qb.keys)  # extraction + search, per query
        for key, r, s in zip(qb.keys, rows, scores):
            results.append(QueryResult(given[key], [_match(m, int(i), float(v)) for i, v in zip(r, s) if i >= 0], dt))
        t0 = time.perf_counter()
    return results


def _match(m: Map, row: int, score: float) -> Match:
    pos = m.poses[row]
    return Match(m.keys[row], row, score, None if np.isnan(pos).any() else (float(pos[0]), float(pos[1])))


# ---- evaluation --------------------------------------------------------------------------------
RECALL_NS = (1, 5, 10, 20)


def evaluate(
    dataset,
    preset: str | Config | None = None,
    out: str | os.PathLike | None = None,
    rerank: str | None = None,
    ns: Sequence[int] = RECALL_NS,
    no_positive: str = "fail",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build a map of ``dataset``'s database, localise every query, and measure Recall@N.

    ``dataset`` is a :class:`vprkit.datasets.Dataset` or a spec for :func:`vprkit.datasets.load_dataset`.
    With ``out``, the map lives in ``out/map`` (reused if it exists with the same settings) and the
    per-query CSV, the JSON summary and the resolved config are written there; otherwise a
    temporary map is used. Queries without any positive count as failures (``no_positive="fail"``,
    the VPR-methods-evaluation convention) or are left out (``"skip"``, SegVLAD's).
    """
    from .datasets import load_dataset
    from .evaluation.metrics import query_records, recall_at_n
    from .evaluation.report import PeakMemory, write_csv, write_json

    ds = load_dataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    if ds.ground_truth is None:
        raise ConfigError(f"dataset {ds.name} has no ground truth; use `vprkit map build` and `vprkit localize` instead")
    config = resolve_config(preset)
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
            build_map(ds.database_dir, map_dir, config, poses=ds.database_poses, keys=ds.database_images,
                      progress=progress, log=log)
            build_s = time.perf_counter() - t0
            m = open_map(map_dir)
            reranker = get_reranker(m, rerank)
            db_index = {k: i for i, k in enumerate(ds.database_images)}
            row_to_db = np.array([db_index[k] for k in m.keys] + [-1])  # last entry maps row -1
            k = max(max(ns), 1)
            ranked = np.full((len(ds.query_images), k), -1, np.int64)
            scores = np.full((len(ds.query_images), k), -np.inf, np.float32)
            q_index = {key: i for i, key in enumerate(ds.query_images)}
            failed: dict[str, str] = {}
            t1 = time.perf_counter()
            search_s = 0.0
            for qb in query_batches(m, ds.queries_dir, ds.query_images, progress,
                                    on_failure=lambda key, msg: failed.__setitem__(key, msg)):
                ts = time.perf_counter()
                rows, sc = search(m, qb, k, reranker)
                search_s += time.perf_counter() - ts
                idx = [q_index[key] for key in qb.keys]
                ranked[idx] = row_to_db[rows]
                scores[idx] = sc
            query_s = time.perf_counter() - t1
        for key, msg in failed.items():
            log(f"query not evaluated (counts as a failure): {msg}")
        recalls = recall_at_n(ranked, ds.ground_truth, ns=ns, no_positive=no_positive)
        n_db, n_q = len(m.keys), len(ds.query_images)
        summary = {
            "dataset": ds.name,
            "preset": config.name,
            "rerank": rerank,
            "recall": recalls,
            "timing": {
                "map_build_s": round(build_s, 3),
                "map_images_per_s": round(n_db / build_s, 2) if build_s else None,
                "query_total_s": round(query_s, 3),
                "ms_per_query": round(1000 * query_s / max(1, n_q), 2),
                "search_ms_per_query": round(1000 * search_s / max(1, n_q), 2),
            },
            "peak_rss_mb": round(mem.peak_mb, 1),
            "counts": {"database": n_db, "queries": n_q, "queries_unreadable": len(failed)},
            "config": config.to_dict(),
        }
        if out is not None:
            records = query_records(ds.query_images, ds.database_images, ranked, scores, ds.ground_truth)
            write_csv(records, out / "per_query.csv")
            write_json(summary, out / "summary.json")
        return summary
    finally:
        if tmp is not None:
            tmp.cleanup()


def map_info(map_dir: str | os.PathLike) -> dict[str, Any]:
    """``map.json`` plus bytes per image of the global descriptor and of each stored extra."""
    d = Path(map_dir)
    if not (d / MAP_FILE).exists():
        raise MapError(f"{d} is not a vprkit map (no {MAP_FILE})")
    info = _read_json(d / MAP_FILE)
    info["bytes_per_image"] = MapStore(d, info["config"]["store_dtype"]).extra_bytes()
    return info


# ---- domain vocabularies -----------------------------------------------------------------------
def _dataset_sources(datasets: Sequence) -> list:
    from .datasets import load_dataset

    return [load_dataset(d) if isinstance(d, (str, os.PathLike)) else d for d in datasets]


def build_domain_vocabulary(
    name: str, datasets: Sequence, preset: str | Config | None = None, out: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Pool sub-sampled database descriptors of several datasets into one vocabulary ``name``.

    Saved as ``<vocabularies>/<name>.npz`` (or ``out``) with each dataset's GeM centroid, so
    :func:`pick_domain` can later choose it for a new map. Memory is bounded by the preset's
    ``vocabulary.max_bytes`` whatever the datasets' sizes.
    """
    from .aggregation.domains import gem_descriptors

    config = resolve_config(preset)
    backbone = load_backbone(config)
    dss = _dataset_sources(datasets)
    voc = build_vocabulary(backbone, config, [(d.database_dir, d.database_images) for d in dss],
                           name=f"domain:{name}", progress=progress)
    voc.metadata["datasets"] = [d.name for d in dss]
    voc.metadata["dataset_gem_centroids"] = {
        d.name: gem_descriptors(backbone, config, d.database_dir, d.database_images).mean(0).round(6).tolist() for d in dss
    }
    path = Path(out) if out else domain_vocabulary_dir() / f"{name}.npz"
    return voc.save(path)


def analyse_dataset_domains(datasets: Sequence, preset: str | Config | None = None,
                            plot: str | os.PathLike | None = None, progress: bool = True):
    """GeM descriptors per dataset → PCA → suggested domains (+ scatter PNG). Saves the PCA for picking."""
    from .aggregation.domains import analyse_domains, gem_descriptors, plot_domains, save_pca

    config = resolve_config(preset)
    backbone = load_backbone(config)
    descs = {d.name: gem_descriptors(backbone, config, d.database_dir, d.database_images, progress=progress and d.name)
             for d in _dataset_sources(datasets)}
    analysis = analyse_domains(descs)
    save_pca(analysis.pca, domain_vocabulary_dir(), descriptor_identity(config, backbone))
    if plot is not None:
        plot_domains(analysis, plot)
    return analysis


def pick_domain(images_dir: str | os.PathLike, preset: str | Config | None = None,
                keys: Sequence[str] | None = None) -> tuple[str, dict[str, float]]:
    """The domain vocabulary nearest to the images of a new map (see :func:`nearest_domain`)."""
    from .aggregation.domains import gem_descriptors, nearest_domain

    config = resolve_config(preset)
    backbone = load_backbone(config)
    keys = list(keys) if keys is not None else list_images(images_dir)
    descs = gem_descriptors(backbone, config, images_dir, keys)
    return nearest_domain(descs, domain_vocabulary_dir(), descriptor_identity(config, backbone))
