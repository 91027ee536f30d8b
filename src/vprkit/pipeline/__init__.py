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
from ..maps.index import build_index, serving_footprint, update_map_index
from ..maps.lock import map_write_lock
from ..maps.mapdir import BUILD_FILE, changed_entries, check_build_settings
from ..maps.extensions import EXTENSIONS, EXTENSIONS_DIR, MapExtension
from ..maps.store import PENDING_DIR
from ..presets import DEFAULT_PRESET, get_rerank_config, resolve
from ..retrieval import RETRIEVERS, QueryBatch, Retriever, SearchSpace, pad_topk
from ..retrieval.estimate import (Calibration, Estimate, estimate, load_or_fit_calibration, patch_score_kind, row_cosines,
                                 score_kind, sequence_positions)

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
    # the confidence's impostor distribution (retrieval.estimate); None until a localisation needs it
    calibration: Calibration | None = None

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
    # The confidence's calibration: read when fresh; a writable open fits and persists it (calibration.json),
    # a read-only one leaves it to the first localisation (fitted in memory, nothing written).
    calibration = load_or_fit_calibration(data.dir, data.index.search, data.store.read_global, data.keys, data.poses,
                                          write=not data.read_only, fit=not data.read_only, seed=config.vocabulary.seed)
    return Map(data, backbone, aggregator, extensions, calibration)


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
# An image from another folder than the one that stored its name, with other content: refuse, keep it as a
# new place under the run's prefix (NEW_PLACE_PREFIX), or re-encode it in place of the map's.
DUPLICATE_POLICIES = ("error", "new-place", "replace")
NEW_PLACE_PREFIX = "run{run}/"




def _check_build_policies(on_change: str, on_duplicate: str) -> None:
    """Refuse an unknown ``on_change`` / ``on_duplicate`` before any image is read (both build paths)."""
    if on_change not in CHANGE_POLICIES:
        raise ConfigError(f"on_change must be one of {CHANGE_POLICIES}, got {on_change!r}")
    if on_duplicate not in DUPLICATE_POLICIES:
        raise ConfigError(f"on_duplicate must be one of {DUPLICATE_POLICIES}, got {on_duplicate!r}")

def _fitted_extensions(config: Config, backbone, vocabulary, source: ImageSource, keys: list[str], out: Path,
                       progress: bool) -> dict[str, MapExtension]:
    """The map's extensions with their state: loaded when the map has it (an interrupted build's), else
    fitted on the seeded sample of ``fit_images`` of the build's keys and saved into ``extensions/<group>.npz``.

    Shared by the single-process and the Ray build, so both encode with the very same state.
    """
    extensions = _make_extensions(config, backbone, vocabulary)
    for ext in extensions.values():
        if ext.needs_fit and not ext.try_load_state(out):
            fit_keys = sample_keys(keys, int(ext.options.get("fit_images", DEFAULT_FIT_IMAGES)), config.vocabulary.seed)
            ext.fit(_features_on_cpu(extract(backbone, config, source, fit_keys, progress and f"fit {ext.group}",
                                             on_failure=ignore_failures)))
            ext.save_state(out)
    return extensions

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
    on_duplicate: str = "error",
    crs: str | dict | None = None,
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
    - **Duplicate names.** An image of *another folder* than the run that stored its name, with other
      content, is a duplicate: ``on_duplicate="error"`` (the default) refuses the build naming the first
      ones; ``"new-place"`` stores it as a new place under the key ``run<N>/<name>`` (N: the first run
      from this folder; its file is still ``<folder>/<name>``); ``"replace"`` re-encodes it in place of
      the map's entry, which then points to the new folder. An identical copy is the same picture: it is
      counted (``last_build.copies``), keeps its entry and takes a new pose. Re-running a folder resumes.
    - **Poses keep their frame.** Headings and timestamps are stored per row; the frame is recorded in
      ``map.json`` → ``crs`` (UTM zone for lat/lon, local metres for easting/northing unless ``crs`` states
      one, e.g. ``"utm:33N"``). Lat/lon of a later run are projected into the map's zone (points too far
      from it are refused); lat/lon into a map with local-metre poses is refused.
    """
    started = time.perf_counter()
    _check_build_policies(on_change, on_duplicate)
    config = resolve_config(preset)
    source = image_source(images, keys)
    keys = list(source.keys)
    if not keys:
        raise MapError(f"no images found in {source.describe()}")
    out = Path(out)
    with map_write_lock(out):
        info = _build_locked(config, source, keys, out, poses, progress, log, on_change, _after_shard, on_duplicate, crs)
        info["last_build"]["seconds"] = round(time.perf_counter() - started, 3)  # the whole build, as a user waits for it
        atomic_write_json(out / MAP_FILE, info, default=str)
    return info


def _build_locked(config: Config, source: ImageSource, keys: list[str], out: Path, poses, progress, log,
                  on_change: str, _after_shard, on_duplicate: str = "error", crs: str | dict | None = None) -> dict[str, Any]:
    info_path = out / MAP_FILE
    for folder in (out, out / PENDING_DIR, out / EXTENSIONS_DIR):  # we hold the lock: leftovers are a dead build's
        clean_orphans(folder, older_than_s=0)
    check_build_settings(out, config)
    previous = read_json(info_path) if info_path.exists() else {}
    from ..datasets.poses import LOCAL_CRS
    from ..maps.mapdir import next_run_id

    runs = list(previous.get("runs", []))
    root = str(source.root.resolve()) if isinstance(source, FolderImages) else None
    run = {"run": next_run_id(runs), "images_root": root,
           "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    store = MapStore(out, config.store_dtype)
    has_poses = bool(len(store)) and bool(np.isfinite(store.read_poses()).all(axis=1).any())
    xy, headings, stamps, frame, pose_report = _pose_rows(poses, keys, crs, previous.get("crs"), has_poses)
    stored = store.entry_table(include_pending=True)
    # where each image is stored: under its own name, or (a duplicate kept as a new place) under the run's prefix
    prefix = next((r["key_prefix"] for r in runs if r.get("images_root") == root and r.get("key_prefix")),
                  NEW_PLACE_PREFIX.format(run=run["run"]))
    target = {k: (prefix + k if on_duplicate == "new-place" and prefix + k in stored else k) for k in keys}
    in_map = [k for k in keys if target[k] in stored]
    view = {k: stored[target[k]] for k in in_map}
    root_of_run = {r.get("run"): r.get("images_root") for r in runs}
    root_of_run[run["run"]] = root  # rows of this run's interrupted attempt (shards) come from this folder

    def stored_root(k: str) -> str | None:
        run_id = view[k][3]
        return root_of_run.get(run_id) if run_id >= 0 else previous.get("images_root")

    changed = changed_entries(source, in_map, view, runs + [run], root, log)
    changed_set = set(changed)
    foreign = [k for k in changed if stored_root(k) != root]  # other content under the name, from another folder
    same = [k for k in changed if stored_root(k) == root]
    copies = [k for k in in_map if stored_root(k) != root and k not in changed_set and view[k][0]]  # content known equal
    if copies:
        log(f"{len(copies)} image(s) are identical copies of map images stored from another folder "
            f"(e.g. {', '.join(copies[:3])}): kept as they are" + ("; their poses are updated" if poses is not None else ""))
    refused = (same if on_change == "refuse" else []) + (
        foreign if on_duplicate == "error" and on_change == "refuse" else [])
    if refused:
        foreign_set = set(foreign)
        dup = [k for k in refused if k in foreign_set]
        raise MapError(
            f"{len(refused)} image(s) in {source.describe()} differ from what {out} holds under the same name "
            f"(e.g. {', '.join(refused[:3])})"
            + (f"; {len(dup)} of them come from another folder than the map's images of those names "
               f"(e.g. {', '.join(dup[:3])}): keep both with --on-duplicate new-place (stored as "
               f"'{prefix}<name>'), or replace the map's with --on-duplicate replace" if dup else "")
            + "; build into another --out, or re-encode them with --on-change reencode")
    reencode = set(same) | (set(foreign) if on_duplicate != "new-place" else set())
    if on_duplicate == "new-place" and foreign:
        for k in foreign:
            target[k] = prefix + k
        run["key_prefix"] = prefix
        log(f"keeping {len(foreign)} image(s) whose names are in the map as new places '{prefix}<name>' "
            f"(e.g. {', '.join(foreign[:3])})")
    if any(target[k] != k for k in keys):
        run["key_prefix"] = prefix
    todo = [(i, k) for i, k in enumerate(keys) if target[k] not in stored or k in reencode]
    changed = sorted(reencode)
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
    extensions = _fitted_extensions(config, backbone, vocabulary, source, keys, out, progress)

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
        at = [row_of[k] for k in ks]
        store.write_shard([target[k] for k in ks], vec, xy[at], extras if extensions else None, entries,
                          headings=headings[at], timestamps=stamps[at])
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
    given = np.isfinite(xy).all(axis=1)  # images without a pose row keep the pose they have
    updated_poses = store.update_poses(
        [target[k] for k, g in zip(keys, given) if g], xy[given], skip={target[k] for k in todo_keys},
        headings=headings[given] if pose_report is not None and pose_report.get("has_headings") else None,
        timestamps=stamps[given] if pose_report is not None and pose_report.get("has_timestamps") else None,
    ) if poses is not None else 0
    if updated_poses:
        log(f"updated the poses of {updated_poses} image(s) already in the map")
    vectors = store.read_global()
    index = update_map_index(out, vectors, config)  # keeps a compressed index (trained once), adds the new rows
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
        "crs": frame or previous.get("crs") or dict(LOCAL_CRS),
        "backbone": backbone.identity(),
        "aggregator": aggregator.identity(),
        "descriptor_dim": int(vectors.shape[1]),
        "vocabulary": None if vocabulary is None else {
            "checksum": vocabulary.checksum, "source": config.vocabulary.source, "k": vocabulary.k},
        "counts": {"images": n, "failed": len(failures),
                   **({"ignored_files_by_extension": listing.ignored} if listing is not None and listing.ignored else {})},
        "index": {"factory": index.factory, "ntotal": index.ntotal},
        "extensions": sorted(extensions),
        "environment": _recorded_environment(),
        "created": previous.get("created") or now,
        "updated": now,
        "last_build": {"new_images": run["new_images"], "reencoded": len(changed), "copies": len(copies),
                       "new_places": len(foreign) if on_duplicate == "new-place" else 0,
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


def _pose_rows(poses, keys: Sequence[str], crs: str | dict | None = None, previous_crs: dict | None = None,
               has_poses: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict | None, dict[str, Any] | None]:
    """Positions (N×2), headings and timestamps (N, NaN unknown) aligned with ``keys``, their frame, and what matched.

    The frame is the one stated (``crs``), else the CSV's (UTM of its lat/lon, local metres for
    easting/northing), else the map's; None when no poses are given. Lat/lon are projected into the
    map's UTM zone when it has one. A frame that contradicts the map's recorded one is refused when
    the map already has poses (local metres and UTM cannot be mixed).
    """
    from ..datasets.poses import LOCAL_CRS, match_poses, parse_crs, read_poses

    n = len(keys)
    nan = np.full(n, np.nan)
    stated = parse_crs(crs)
    previous = parse_crs(previous_crs) if previous_crs else None
    if poses is None:
        xy, heads, stamps, frame, report = np.full((n, 2), np.nan), nan, nan.copy(), stated, None
    elif isinstance(poses, np.ndarray):
        if poses.shape != (n, 2):
            raise MapError(f"poses array must be {n}×2, got {poses.shape}")
        xy, heads, stamps, frame, report = poses.astype(np.float64), nan, nan.copy(), stated, None
    else:
        target = stated if stated and stated["kind"] == "utm" else (previous if previous and previous["kind"] == "utm" else None)
        table = read_poses(poses, zone=target["zone"] if target else None,
                           northern=target["hemisphere"] == "N" if target else None)
        if table.utm_zone is None:  # easting/northing: the frame stated, or the map's, or local metres
            frame = stated or previous or dict(LOCAL_CRS)
        else:
            frame = table.crs
            if stated and stated["kind"] == "local":
                raise MapError(f"{poses} gives lat/lon but the stated frame is local metres; drop --crs or give easting,northing")
        matched, rep_ = match_poses(table, list(keys))
        xy = matched.lookup(list(keys))
        heads, stamps = matched.lookup_column("headings", list(keys)), matched.lookup_column("timestamps", list(keys))
        report = {**rep_.to_dict(), "has_headings": table.headings is not None, "has_timestamps": table.timestamps is not None}
    if previous and has_poses and frame and frame != previous:
        raise MapError(f"the map's poses are in {_describe_crs(previous)} but these are in {_describe_crs(frame)}; "
                       f"give poses in the map's frame (or build another map)")
    return xy, heads, stamps, frame, report


def _describe_crs(crs: Mapping[str, Any]) -> str:
    if crs.get("kind") == "utm":
        return f"UTM zone {crs['zone']}{crs.get('hemisphere', 'N')} (EPSG:{crs.get('epsg')})"
    return f"local {crs.get('unit', 'm')}"


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
    """One ranked map image. ``score`` ranks (its meaning is ``score_kind``: ``cosine`` for global retrieval,
    ``fused_zscore`` after re-ranking, …); ``cosine`` is the global cosine in every mode, comparable across modes."""

    key: str
    row: int
    score: float
    position: tuple[float, float] | None
    heading: float | None = None  # degrees, where the map has headings
    score_kind: str = "cosine"
    cosine: float | None = None


@dataclass
class QueryResult:
    """A query's ranked matches and the :class:`~vprkit.retrieval.estimate.Estimate` (position, confidence, unknown)."""

    query: str
    matches: list[Match]
    seconds: float = 0.0
    error: str | None = None  # why the query could not be localised (unreadable image); matches are then empty
    estimate: Estimate | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"query": self.query, "seconds": round(self.seconds, 4),
               "matches": [{"image": m.key, "row": m.row, "score": round(m.score, 6), "score_kind": m.score_kind,
                            "cosine": None if m.cosine is None else round(m.cosine, 6), "position": m.position,
                            "heading_deg": m.heading}
                           for m in self.matches]}
        if self.estimate is not None:
            out["estimate"] = self.estimate.to_dict()
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


def get_reranker(map: Map, name, log: Callable[[str], None] = logger.info, save: bool = True):
    """The re-ranker ``name`` (a re-ranking preset name or settings) for ``map``.

    It reads the map's stored patches when they match the settings, else computes them on the fly:
    the patch state is fitted once and, with ``save``, saved into the map with the candidates'
    patches (new files only, under the map's write lock, renamed into place — even on a read-only
    open, so readers sharing the map never refit; ``save=False`` writes nothing, see
    :mod:`vprkit.rerank.saved`).
    """
    if not name:
        return None
    if hasattr(name, "rerank") and hasattr(name, "shortlist"):  # a re-ranker already built (kept by a service)
        return name
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
                         keys=map.keys, images=images, log=log, save=save)


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

    Each result carries an :class:`~vprkit.retrieval.estimate.Estimate` (position, heading, spread,
    confidence, unknown) whose confidence comes from the global cosines whatever ``rerank`` is, and
    each match names its score (``score_kind``) and gives its global ``cosine``.
    """
    if unreadable not in ("raise", "report"):
        raise ConfigError(f"unreadable must be 'raise' or 'report', got {unreadable!r}")
    m = map if isinstance(map, Map) else open_map(map, read_only=True, device=device)
    source = query_source(queries, check_files=unreadable == "raise")
    reranker = get_reranker(m, rerank)
    cal = m.calibration
    if cal is None or not cal.covers(len(m.keys)):  # not fitted yet (a read-only open), or the map changed much
        cal = m.calibration = load_or_fit_calibration(
            m.data.dir, m.index.search, m.store.read_global, m.keys, m.poses, write=not m.data.read_only,
            seed=m.config.vocabulary.seed)
    elif cal.sequence is None or len(cal.sequence) != len(m.keys):  # a few places added or removed live
        cal.sequence = sequence_positions(m.keys)
    kind = score_kind(RETRIEVERS.get(m.config.retriever), reranker)
    headings = getattr(m.data, "headings", None)
    failed: dict[str, str] = {}
    done: dict[str, QueryResult] = {}
    t0 = time.perf_counter()
    on_failure = None if unreadable == "raise" else failed.__setitem__
    for qb in query_batches(m, source, progress=progress, on_failure=on_failure):
        rows, scores = search(m, qb, top_k, reranker)
        q = qb.global_descriptors
        # the global cosine of every returned row, and the query's top global cosines: the mode-independent evidence
        cos = scores if kind == "cosine" else row_cosines(m.store.read_global, q, rows)
        evidence = cos if kind == "cosine" and rows.shape[1] >= cal.k else m.index.search(q, cal.k)[1]
        for i, key in enumerate(qb.keys):
            est = estimate(rows[i], cos[i], m.poses, headings, cal, evidence=evidence[i], sequence=cal.sequence)
            matches = [_match(m, int(r), float(v), kind, float(c), headings)
                       for r, v, c in zip(rows[i], scores[i], cos[i]) if r >= 0]
            done[key] = QueryResult(key, matches, 0.0, estimate=est)
        dt = (time.perf_counter() - t0) / len(qb.keys)  # extraction + search + estimate, per query
        for key in qb.keys:
            done[key].seconds = dt
        t0 = time.perf_counter()
    if reranker is not None and not isinstance(map, Map):
        reranker.close()
    return [done[k] if k in done else QueryResult(k, [], 0.0, failed.get(k, "not localised")) for k in source.keys]


def _match(m: Map, row: int, score: float, kind: str = "cosine", cosine: float | None = None,
           headings: np.ndarray | None = None) -> Match:
    pos = m.poses[row]
    heading = None if headings is None or not np.isfinite(headings[row]) else float(headings[row])
    return Match(m.keys[row], row, score, None if np.isnan(pos).any() else (float(pos[0]), float(pos[1])), heading,
                 kind, score if cosine is None and kind == "cosine" else cosine)


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
    sequence_length: int | None = None,
) -> dict[str, Any]:
    """Build a map of ``dataset``'s database, localise every query, and measure Recall@N.

    ``dataset`` is a :class:`vprkit.datasets.Dataset` or a spec for :func:`vprkit.datasets.load_dataset`.
    With ``out``, the map lives in ``out/map`` (reused if it exists with the same settings) and the
    per-query CSV, the JSON summary and the resolved config are written there; otherwise a
    temporary map is used. Queries without any positive count as failures (``no_positive="fail"``,
    the VPR-methods-evaluation convention) or are left out (``"skip"``, SegVLAD's).
    ``sequence_length`` ≥ 2 scores each query as the middle of a run of that many consecutive queries
    (:mod:`vprkit.retrieval.sequence`, straight lines at 1–3 rows per query) — for sequential datasets
    only, whose queries and database are both traversals in route order; re-ranking is then not applied.
    """
    from ..datasets import load_dataset
    from . import sequences as _sequences

    ds = load_dataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    if ds.ground_truth is None:
        raise ConfigError(f"dataset {ds.name} has no ground truth; use `vprkit map build` and `vprkit localize` instead")
    seq_settings = _sequences.sequence_settings(sequence_length, defaults=_sequences.OFFLINE_DEFAULTS)
    if seq_settings is not None:
        _sequences.check_sequential_dataset(ds, sorted(ds.database_images))
        if rerank:
            raise ConfigError("re-ranking and sequence matching are not combined; choose one")
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
            described: dict[str, np.ndarray] = {}
            for qb in query_batches(m, FolderImages(ds.queries_dir, ds.query_images), progress=progress,
                                    on_failure=rankings.fail):
                if seq_settings is not None:  # scored as a sequence once every query is described
                    described.update(zip(qb.keys, qb.global_descriptors))
                    continue
                ts = time.perf_counter()
                rows, sc = search(m, qb, rankings.k, reranker)
                search_s += time.perf_counter() - ts
                rankings.add(qb.keys, rows, sc)
            if seq_settings is not None and described:
                _sequences.check_sequential_dataset(ds, list(m.keys))
                ts = time.perf_counter()
                in_order = [k for k in ds.query_images if k in described]  # unreadable ones stay failures
                rows, sc = _sequences.sequence_rankings(m.store.read_global(), np.stack([described[k] for k in in_order]),
                                                        seq_settings, rankings.k)
                search_s += time.perf_counter() - ts
                rankings.add(in_order, rows, sc)
            query_s = time.perf_counter() - t1
        for key, msg in rankings.failed.items():
            log(f"query not evaluated (counts as a failure): {msg}")
        n_db, n_q = len(m.keys), len(ds.query_images)
        summary = {
            "dataset": ds.name,
            "preset": config.name,
            "rerank": rerank,
            **({"sequence": {f: getattr(seq_settings, f) for f in seq_settings.__dataclass_fields__},
                "score_kind": seq_settings.score_kind} if seq_settings is not None else {}),
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
    """``map.json`` plus bytes per image of the global descriptor and of each stored extra, a summary of the
    poses (``poses``: how many rows have one, extent in metres and — UTM maps — degrees, CRS, how many
    have a heading / timestamp) and each run's image count (``runs[i]["images"]``: rows stored from it)."""
    from ..maps.mapdir import crs_to_latlon, map_crs

    d = Path(map_dir)
    info = read_map_info(d)
    store = MapStore(d, info["config"].get("store_dtype", "float32"))
    info["bytes_per_image"] = store.extra_bytes()
    n = len(store)
    crs = map_crs(info)
    xy = store.read_poses() if n else np.zeros((0, 2))
    known = np.isfinite(xy).all(axis=1)
    poses: dict[str, Any] = {"images": n, "with_pose": int(known.sum()), "crs": crs,
                             "with_heading": int(np.isfinite(store.read_headings()).sum()) if n else 0,
                             "with_timestamp": 0, "extent": None, "extent_latlon": None, "time_range": None}
    stamps = store.read_timestamps() if n else np.zeros(0)
    poses["with_timestamp"] = int(np.isfinite(stamps).sum())
    if known.any():
        lo, hi = xy[known].min(axis=0), xy[known].max(axis=0)
        poses["extent"] = {"easting": [float(lo[0]), float(hi[0])], "northing": [float(lo[1]), float(hi[1])]}
        if crs.get("kind") == "utm":
            ll = crs_to_latlon(crs, xy[known])
            poses["extent_latlon"] = {"lat": [float(ll[:, 0].min()), float(ll[:, 0].max())],
                                      "lon": [float(ll[:, 1].min()), float(ll[:, 1].max())]}
    if poses["with_timestamp"]:
        t = stamps[np.isfinite(stamps)]
        poses["time_range"] = [datetime.fromtimestamp(float(v), timezone.utc).isoformat(timespec="seconds")
                               for v in (t.min(), t.max())]
    info["poses"] = poses
    rows_of_run = np.unique(store.read_entries()["run"], return_counts=True) if n else ([], [])
    counts = {int(r): int(c) for r, c in zip(*rows_of_run)}
    info["runs"] = [{**r, "images": counts.get(int(r.get("run", -1)), 0)} for r in info.get("runs", [])]
    if counts.get(-1):
        info["runs_unrecorded_images"] = counts[-1]  # rows of maps built before runs were recorded
    info["serving"] = serving_footprint(d)  # bytes per place on disk and the RAM to serve the map
    return info


def _record_change(map_dir: Path, **change: Any) -> dict[str, Any]:
    """Note a maintenance change in ``map.json`` (counts, index size, time, what changed) atomically."""
    info = read_map_info(map_dir)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    store = MapStore(map_dir, info["config"].get("store_dtype", "float32"))
    info.setdefault("counts", {})["images"] = len(store)
    if "ntotal" in change:
        info.setdefault("index", {})["ntotal"] = change.pop("ntotal")
    if "crs" in change:
        crs = change.pop("crs")
        if crs is not None:
            info["crs"] = crs
    info["updated"] = now
    info["last_change"] = {"at": now, **change}
    atomic_write_json(map_dir / MAP_FILE, info, default=str)
    return info


# How many keys a map.json change record lists (the count is always complete).
MAX_LISTED_KEYS = 20


def remove_places(map_dir: str | os.PathLike, keys: Sequence[str]) -> dict[str, Any]:
    """Remove the images ``keys`` from a map: store rows, index entries and derived extension data.

    Holds the map's write lock. Every key must be in the map (else one :class:`MapError` and nothing
    changes). The store changes atomically first; the index follows (rows removed in place, or rebuilt
    from the store when its kind cannot remove) — a crash in between leaves a stale index, which the
    next open rebuilds. Returns ``{"removed": keys, "rows": removed rows (ascending), "images": rows left}``.
    """
    d = Path(map_dir)
    keys = list(dict.fromkeys(str(k) for k in keys))
    if not keys:
        raise MapError("no image keys given to remove")
    with map_write_lock(d):
        data = open_map_data(d, read_only=False)
        try:
            rows = data.store.remove(keys)
            try:
                data.index.remove(rows)
            except (RuntimeError, NotImplementedError, MapError) as exc:  # an index kind that cannot delete
                logger.info("rebuilding the index after removing rows (%s)", exc)
                data.index = build_index(data.store.read_global(), data.config, d)
            data.index.save_to_map(d)
            if data.config.extensions:  # derived per-map data (e.g. a SuperSegment index) follows the rows
                backbone = load_backbone(data.config)
                for ext in _make_extensions(data.config, backbone, data.vocabulary).values():
                    if not ext.needs_fit or ext.try_load_state(d):
                        ext.finalize(data.store, d)
            n = len(data.store)
            _record_change(d, removed=len(rows), removed_keys=keys[:MAX_LISTED_KEYS], ntotal=data.index.ntotal)
        finally:
            data.store.close()
    return {"removed": keys, "rows": rows.tolist(), "images": n}


def _pose_updates(poses: Mapping[str, Any], keys: list[str], current_xy: np.ndarray, current_h: np.ndarray,
                  current_t: np.ndarray, crs: dict) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, dict]:
    """Rows for :meth:`MapStore.update_poses` from ``key → (easting, northing)`` or ``key → {easting, northing | lat,
    lon, heading, timestamp}`` (see :func:`vprkit.datasets.poses.project_pose`); values not given keep the map's.
    Returns keys, xy, headings, timestamps and the frame (the map's; UTM once lat/lon land in a map without poses)."""
    from ..datasets.poses import project_pose

    row_of = {k: i for i, k in enumerate(keys)}
    unknown = [k for k in poses if k not in row_of]
    if unknown:
        raise MapError(f"{len(unknown)} key(s) not in the map: {', '.join(repr(k) for k in unknown[:5])}")
    names = list(poses)
    rows = np.array([row_of[k] for k in names], np.int64)
    xy, heads, stamps = current_xy[rows].copy(), current_h[rows].copy(), current_t[rows].copy()
    frame = dict(crs)
    empty = not np.isfinite(current_xy).all(axis=1).any()
    local_given = False  # easting/northing given while the frame was still local metres
    for i, k in enumerate(names):
        before = frame
        pos, heading, stamp, frame = project_pose(poses[k], frame, allow_local_latlon=empty and not local_given)
        if pos is not None and before.get("kind") != "utm" and frame.get("kind") != "utm":
            local_given = True
        if pos is not None:
            xy[i] = pos
        if heading is not None:
            heads[i] = heading
        if stamp is not None:
            stamps[i] = stamp
    return names, xy, heads, stamps, frame


def update_place_poses(map_dir: str | os.PathLike, poses: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Set the poses of images already in a map, from a poses CSV or a mapping (see :func:`_pose_updates`).

    Holds the map's write lock. A CSV's lat/lon are projected into the map's UTM zone; its rows that
    match no image are reported (none matching is an error); a heading or timestamp column replaces
    the stored values of the rows it covers (an empty cell: unknown). A mapping names keys that must
    be in the map. Returns ``{"updated": rows changed, "crs": the map's frame, "report": CSV match report}``.
    """
    from ..maps.mapdir import map_crs

    d = Path(map_dir)
    with map_write_lock(d):
        info = read_map_info(d)
        store = MapStore(d, info["config"].get("store_dtype", "float32"))
        keys = store.keys()
        xy_now = store.read_poses()
        has_poses = bool(np.isfinite(xy_now).all(axis=1).any())
        crs = map_crs(info)
        report = None
        if isinstance(poses, Mapping):
            names, xy, heads, stamps, frame = _pose_updates(poses, keys, xy_now, store.read_headings(),
                                                            store.read_timestamps(), crs)
            updated = store.update_poses(names, xy, headings=heads, timestamps=stamps)
        else:
            xy, heads, stamps, frame, report = _pose_rows(poses, keys, None, info.get("crs"), has_poses)
            matched = np.isfinite(xy).all(axis=1)
            names = [k for k, m in zip(keys, matched) if m]
            updated = store.update_poses(
                names, xy[matched], headings=heads[matched] if report.get("has_headings") else None,
                timestamps=stamps[matched] if report.get("has_timestamps") else None)
        _record_change(d, poses_updated=updated, crs=frame if frame != crs else None,
                       **({"poses": report} if report is not None else {}))
    return {"updated": updated, "crs": frame, "report": report}


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

    The result names its scores: ``score_kind`` (``weighted_inlier_ratio`` for RANSAC presets,
    ``weighted_rapid_spatial_score`` for rapid scoring) for ``score``, ``scale_score_kind`` for each
    scale's; ``patch_state`` says whether the map's fitted state was used (``"map"``) — scores without
    a map are not comparable with a map's. With a map, ``cosine`` is the two images' global cosine
    (the number ``localize`` reports per match); without one it is None (no vocabulary to encode with).
    """
    from ..rerank.draw import match_pair

    settings = get_rerank_config(rerank)
    kind = patch_score_kind(settings.scorer)
    if map_dir is not None:
        m = open_map(map_dir, read_only=True)
        reranker = get_reranker(m, rerank, log=lambda _: None)
        tm = match_pair(image_a, image_b, settings, m.config, m.backbone, reranker.extension, out)
        g = np.concatenate([qb.global_descriptors for qb in query_batches(m, query_source({"a": image_a, "b": image_b},
                                                                                           check_files=False))])
        tm.cosine, tm.patch_state = float(g[0] @ g[1]), "map"
    else:
        config = resolve_config(preset)
        tm = match_pair(image_a, image_b, settings, config, load_backbone(config), None, out)
        tm.cosine, tm.patch_state = None, "fitted on the two images"
    tm.score_kind, tm.scale_score_kind = f"weighted_{kind}", kind
    return tm


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
    methods = _compare_methods(presets, modes)
    tmp = tempfile.TemporaryDirectory(prefix="vprkit-compare-") if out is None else None
    root = Path(tmp.name) if tmp is not None else Path(out)
    try:
        records = []
        for spec in datasets:
            ds = load_dataset(spec) if isinstance(spec, (str, os.PathLike)) else spec
            for preset, mode in methods:
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


def _compare_methods(presets: Sequence[str | Config], modes: Sequence[str | None]) -> list[tuple[Any, str | None]]:
    """(preset, re-ranking mode) pairs: ``"NAME+MODE"`` names one pair; a bare preset is crossed with ``modes``.

    The ``+`` form lets one table hold methods that cannot all be crossed (a SegVLAD preset has no patch
    re-ranking), e.g. ``effnet2-vlad-ma4 effnet2-vlad-ma4+speed segvlad-slic``.
    """
    out: list[tuple[Any, str | None]] = []
    for preset in presets:
        if isinstance(preset, str) and "+" in preset:
            name, mode = preset.split("+", 1)
            if not name or not mode:
                raise ConfigError(f"method {preset!r}: write PRESET+RERANK, e.g. effnet2-vlad-ma4+speed")
            out.append((name, None if mode == "none" else mode))
        else:
            out.extend((preset, mode) for mode in modes)
    return out


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
