"""A recipe → what a run needs: labels, feature sources, head, validation and monitored sets (:func:`prepare`).

Also the pieces of a recipe every run reads: the preset it starts from (:func:`base_config`), its
training settings (:func:`settings_from`), the holdout split (:func:`split_holdout`) and the
trained checkpoint's configuration (:func:`trained_config`). Below the runs (:mod:`.run`,
:mod:`.ensemble`) and above the recipe's schema (:mod:`.sections`): nothing here starts training.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch

from ..backbones import build_backbone
from ..config import Config
from ..datasets import GroundTruth, load_dataset
from ..datasets.poses import read_poses
from ..errors import ConfigError
from ..images import FolderImages, list_images
from ..presets import resolve
from .features import CachedFeatures, ImageFeatures, SuffixFeatures
from .heads import build_head, check_features, head_options, start_slice
from .labels import NEGATIVE_RULES, PlaceLabels, frame_keys
from .sections import check_recipe, recipe_path, section
from .trainer import TrainSettings, Validation

# The cache of a split backbone's frozen prefix: <cache>-before-last<N> beside the frozen features' <cache>.
PREFIX_CACHE_SUFFIX = "-before-last"


def settings_from(recipe: Mapping[str, Any]) -> TrainSettings:
    """The trainer's settings: ``[sampler]``, ``[loss]``, ``[miner]``, ``[optimiser]``, ``[schedule]``, ``[train]``."""
    check_recipe(recipe)
    s, o, sch, tr, loss, miner = (
        section(recipe, k) for k in ("sampler", "optimiser", "schedule", "train", "loss", "miner")
    )
    return TrainSettings(
        epochs=int(tr["epochs"]),
        steps_per_epoch=tr["steps_per_epoch"] or None,
        places_per_batch=int(s["places"]),
        images_per_place=int(s["images_per_place"]),
        contiguous_batches=float(s["contiguous"]),
        loss=loss["name"],
        loss_options=dict(loss["options"] or {}),
        miner=miner["name"],
        miner_options=dict(miner["options"] or {}),
        optimiser=o["name"],
        lr=float(o["lr"]),
        weight_decay=float(o["weight_decay"]),
        momentum=float(o["momentum"]),
        loss_lr=o["loss_lr"],
        backbone_lr=None if o["backbone_lr"] is None else float(o["backbone_lr"]),
        schedule=sch["name"],
        warmup_steps=int(sch["warmup_steps"]),
        step_every=int(sch["step_every"]),
        step_gamma=float(sch["step_gamma"]),
        seed=int(tr["seed"]),
        grad_clip=tr["grad_clip"],
        feature_dropout=float(tr["feature_dropout"]),
        feature_shift=int(tr["feature_shift"]),
        device=str(tr["device"]),
    )


def base_config(recipe: Mapping[str, Any]) -> Config:
    """The preset the run starts from: ``[backbone] preset`` at ``image_size`` with ``options`` changed."""
    b = dict(recipe.get("backbone") or {})
    size = b.get("image_size")
    config = resolve(
        b.get("preset"),
        image_size=None if size is None else (int(size[1]), int(size[0])),
        memory_budget_mb=b.get("memory_budget_mb"),
    )
    options = b.get("options")
    if options:  # e.g. another block of the preset's backbone; validated as any preset's options are
        if not isinstance(options, Mapping):
            raise ConfigError(f"[backbone] options must be a table of the backbone's options, got {options!r}")
        config = resolve(config.replace(backbone_options={**dict(config.backbone_options), **dict(options)}))
    return config


def _frame_range(names: list[str], frames) -> list[str]:
    if frames is None:
        return names
    lo, hi = int(frames[0]), int(frames[1])
    return names[lo:hi]


@dataclass
class Prepared:
    """Everything a run needs, built from a recipe."""

    config: Config
    head: torch.nn.Module
    features: Any
    train_ids: np.ndarray
    places: PlaceLabels
    validation: Validation | None
    extra_parameters: list
    backbone: Any
    info: dict
    monitor: Validation | None = None


class EvalSet(NamedTuple):
    """The images of a validation or monitored set: queries and database under ``root``, and their ground truth."""

    root: Path
    queries: list[str]
    database: list[str]
    truth: GroundTruth

    @property
    def names(self) -> list[str]:
        return self.queries + self.database


def _training_keys(recipe, data) -> tuple[Path, list[str], PlaceLabels]:
    root = recipe_path(recipe, data.get("root", "."))
    kind = data.get("labels", "frames")
    negatives = str(data.get("negatives", "any"))
    if negatives not in NEGATIVE_RULES:
        raise ConfigError(f"[data] negatives must be one of {NEGATIVE_RULES}, got {negatives!r}")
    if kind == "frames":
        folders = data.get("folders")
        if not folders:
            raise ConfigError("[data] labels = 'frames' needs folders = [...] (synchronised sequences)")
        names = _frame_range(
            sorted(set.intersection(*(set(frame_keys(list_images(root / f))) for f in folders))), data.get("frames")
        )
        if data.get("every"):
            names = names[:: int(data["every"])]
        keys = [f"{f}/{n}" for f in folders for n in names]
        places = PlaceLabels.from_frames(
            frame_keys(keys), tolerance=int(data.get("tolerance", 0)), soft_tolerance=data.get("soft_tolerance")
        )
        if negatives != "any":  # each folder (season) is a domain
            places = places.with_domains(np.repeat(np.arange(len(folders)), len(names)), negatives=negatives)
        return root, keys, places
    if negatives != "any":
        raise ConfigError(f"[data] negatives = {negatives!r} needs frame labels with folders (each folder a domain)")
    if kind == "poses":
        images = root / data.get("images", ".")
        keys = [str(Path(data.get("images", ".")) / k) if data.get("images") else k for k in list_images(images)]
        poses = read_poses(recipe_path(recipe, data["poses"]))
        rel = list_images(images)
        xy = poses.lookup(rel)
        places = PlaceLabels.from_poses(
            xy, radius=float(data.get("radius", 10.0)), soft_radius=data.get("soft_radius", 25.0)
        )
        return root, keys, places
    raise ConfigError(f"[data] labels must be 'frames' or 'poses', got {kind!r}")


def _validation_keys(recipe, val, data_root: Path) -> EvalSet:
    if val.get("dataset"):
        ds = load_dataset(str(recipe_path(recipe, val["dataset"])) if os.sep in str(val["dataset"]) else val["dataset"])
        if val.get("every"):
            ds = ds.subset(every=int(val["every"]))
        root = Path(os.path.commonpath([ds.queries_dir, ds.database_dir]))
        q = [str((Path(ds.queries_dir) / k).relative_to(root)) for k in ds.query_images]
        d = [str((Path(ds.database_dir) / k).relative_to(root)) for k in ds.database_images]
        return EvalSet(root, q, d, ds.ground_truth)
    root = recipe_path(recipe, val["root"]) if val.get("root") else data_root
    qf, df = val.get("queries", "winter"), val.get("database", "summer")
    names = sorted(set(frame_keys(list_images(root / qf))) & set(frame_keys(list_images(root / df))))
    names = _frame_range(names, val.get("frames"))[:: int(val.get("every", 1))]
    gt = GroundTruth.from_frames(names, names, tolerance=int(val.get("tolerance", 0)))
    return EvalSet(root, [f"{qf}/{n}" for n in names], [f"{df}/{n}" for n in names], gt)


def _frame_names(recipe: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    """The sorted frame names every ``[data] folders`` folder has (before any frame range)."""
    root = recipe_path(recipe, data.get("root", "."))
    return sorted(set.intersection(*(set(frame_keys(list_images(root / f))) for f in data["folders"])))


def split_holdout(recipe: Mapping[str, Any], data: Mapping[str, Any], val: Mapping[str, Any]) -> tuple[dict, dict]:
    """``[validation] holdout = N`` (frame labels): the last N training frames become the validation set.

    Why: the checkpoint must be picked on frames the run neither trains on nor is judged on. The
    held-out frames (and ``gap`` frames before them, which look like their neighbours) leave the
    training range; the validation set is ``queries`` → ``database`` on the held-out frames. Returns
    the new ``[data]`` and ``[validation]`` sections (unchanged without ``holdout``).
    """
    data, val = dict(data), dict(val)
    val.pop("refit", None)  # a run-level choice (run_recipe), not part of the validation set
    n, gap = int(val.pop("holdout", 0) or 0), int(val.pop("gap", 0) or 0)
    if not n:
        return data, val
    if data.get("labels", "frames") != "frames" or not data.get("folders"):
        raise ConfigError("[validation] holdout needs frame labels ([data] labels = 'frames' with folders)")
    if n < 1 or gap < 0 or "frames" in val or "dataset" in val:
        raise ConfigError("[validation] holdout = N ≥ 1 (gap ≥ 0) replaces frames / dataset; give one or the other")
    total = len(_frame_names(recipe, data))
    lo, hi = (int(v) for v in (data.get("frames") or (0, total)))
    hi = min(hi, total)
    if hi - lo - n - gap < 1:
        raise ConfigError(f"[validation] holdout {n} + gap {gap} leaves no training frame in [{lo}, {hi})")
    data["frames"] = [lo, hi - n - gap]
    val["frames"] = [hi - n, hi]
    val.setdefault("root", data.get("root", "."))
    return data, val


def _check_disjoint(train_keys: list[str], val_keys: list[str]) -> None:
    """Validation places must not be training places (the same frame in another season is the same place)."""
    shared = sorted(set(frame_keys(train_keys)) & set(frame_keys(val_keys)))
    if shared:
        raise ConfigError(
            f"{len(shared)} validation frames are also training frames (e.g. {shared[0]}); "
            "hold them out ([validation] holdout = N) or move [data] frames"
        )


def wants_refit(recipe: Mapping[str, Any]) -> bool:
    """Whether ``[validation] refit`` asks for a refit (a boolean: the section's schema checks it)."""
    return bool(section(recipe, "validation")["refit"])


@dataclass
class ImageSets:
    """The images a run reads: training keys and labels, the refit's extra keys, the validation and monitored sets."""

    root: Path
    keys: list[str]
    places: PlaceLabels
    refit_keys: list[str]
    validation: EvalSet | None
    monitor: EvalSet | None

    def shares_root(self, s: EvalSet) -> bool:
        """Whether set ``s`` lies under the training root (its images then go into the training cache)."""
        return s.root.resolve() == self.root.resolve()


def image_sets(recipe: Mapping[str, Any]) -> ImageSets:
    """The recipe's training, validation and monitored images (names only: no image is read here)."""
    data, val = split_holdout(recipe, recipe.get("data") or {}, recipe.get("validation") or {})
    # A run that will be refitted caches the frames it returns to training (the gap) now, so the refit reuses the cache.
    refit_keys = _training_keys(recipe, dict(recipe.get("data") or {}))[1] if wants_refit(recipe) else []
    root, keys, places = _training_keys(recipe, data)
    sets = ImageSets(root, keys, places, refit_keys, None, None)
    if val:
        sets.validation = _validation_keys(recipe, val, root)
        if data.get("labels", "frames") == "frames" and not val.get("dataset") and sets.shares_root(sets.validation):
            _check_disjoint(keys, sets.validation.names)
    monitor = dict(recipe.get("monitor") or {})
    if monitor:
        sets.monitor = _validation_keys(recipe, monitor, root)
    return sets


@dataclass
class FeatureSources:
    """The features a run trains and validates on, and what the head is sized and (NetVLAD) initialised from."""

    features: Any
    train_ids: np.ndarray
    validation: Any
    monitor: Any
    grid: tuple[int, int]
    sample: Any  # a source of cached descriptors for k-means, or None when images are re-read

    def evaluation(self, feats: Any, s: EvalSet | None) -> Validation | None:
        """The validation (or monitored) set ``s`` over its feature source ``feats``."""
        if s is None:
            return None
        if feats is self.features:  # its images are in the training cache: found by key
            return Validation(feats, feats.ids(s.queries), feats.ids(s.database), s.truth)
        n = len(s.queries)
        return Validation(feats, np.arange(n), np.arange(n, n + len(s.database)), s.truth)


def image_features(backbone, config: Config, sets: ImageSets) -> FeatureSources:
    """Unfrozen blocks with ``cache_prefix = false``: every source re-reads its images through the whole backbone."""
    features = ImageFeatures(backbone, config, FolderImages(sets.root, sets.keys), sets.keys)

    def own(s: EvalSet | None) -> ImageFeatures | None:
        return None if s is None else ImageFeatures(backbone, config, FolderImages(s.root, s.names), s.names)

    return FeatureSources(
        features, np.arange(len(sets.keys)), own(sets.validation), own(sets.monitor), features.batch([0]).grid, None
    )


def cached_features(
    recipe: Mapping[str, Any],
    backbone,
    config: Config,
    sets: ImageSets,
    unfreeze: int,
    progress: bool,
    info: dict[str, Any],
) -> FeatureSources:
    """The backbone's output cached once (``unfreeze = N``: the frozen prefix's, the last N blocks run on it).

    The validation and monitored sets under the training root share the training cache; others get
    their own (``<cache>-validation``, ``<cache>-monitor``). Records the cache time in ``info``.
    """
    b = section(recipe, "backbone")
    out = recipe_path(recipe, recipe.get("out") or "run")
    cache_dir = recipe_path(recipe, b["cache"]) if b["cache"] else out / "features"
    cached, suffix = backbone, None
    if unfreeze > 0:
        # The frozen prefix is a fixed function of the image (no augmentation here): cache its output
        # once, beside the frozen features' cache, and run only the unfrozen blocks at every step.
        cached, suffix = backbone.split(unfreeze)
        cache_dir = cache_dir.with_name(f"{cache_dir.name}{PREFIX_CACHE_SUFFIX}{unfreeze}")
        info["cached_prefix"] = cached.identity()
    ram = config.memory_plan().feature_cache_bytes
    shared = [s for s in (sets.validation, sets.monitor) if s is not None and sets.shares_root(s)]
    all_keys = list(dict.fromkeys(sets.keys + sets.refit_keys + [k for s in shared for k in s.names]))
    t0 = time.perf_counter()
    features = CachedFeatures.build(
        cached,
        config,
        FolderImages(sets.root, all_keys),
        cache_dir,
        all_keys,
        dtype=b["cache_dtype"],
        progress=progress and "cache features",
        max_ram_bytes=ram,
    )
    info["cache_seconds"] = round(time.perf_counter() - t0, 1)
    train_ids = features.ids(sets.keys)

    def evaluation_features(s: EvalSet | None, role: str):
        """Features of a validation or monitored set: none, the training cache, or a cache of its own."""
        if s is None:
            return None
        if sets.shares_root(s):
            return features
        return CachedFeatures.build(
            cached,
            config,
            FolderImages(s.root, s.names),
            Path(f"{cache_dir}-{role}"),
            s.names,
            dtype=b["cache_dtype"],
            progress=progress and f"cache {role}",
            max_ram_bytes=ram,
        )

    vfeat, mfeat = evaluation_features(sets.validation, "validation"), evaluation_features(sets.monitor, "monitor")
    if suffix is not None:  # every feature source runs the (shared) unfrozen blocks on its prefix cache
        wrapped = {id(f): SuffixFeatures(f, suffix) for f in (features, vfeat, mfeat) if f is not None}
        features, vfeat, mfeat = (None if f is None else wrapped[id(f)] for f in (features, vfeat, mfeat))
    return FeatureSources(features, train_ids, vfeat, mfeat, features.grid, features)


def _unfrozen_parameters(backbone, unfreeze: int) -> list:
    """``[backbone] unfreeze = N``: the last N blocks' parameters, trained with the head."""
    if unfreeze <= 0:
        return []
    # Unfrozen blocks keep their BatchNorm statistics (eval mode): batches of two images per place are
    # no population to re-estimate them from, and the map is built with the same statistics.
    backbone.set_trainable(last_blocks=unfreeze).eval()
    return [p for p in backbone.parameters() if p.requires_grad]


def _head(recipe: Mapping[str, Any], backbone, sources: FeatureSources, seed: int) -> torch.nn.Module:
    """The ``[head]`` to train, built under the run's seed (NetVLAD: from k-means on the cached training features)."""
    h = section(recipe, "head")
    name = h["name"]
    check_features(name, sources.features)
    sample = None
    if name == "netvlad":
        if sources.sample is None:
            raise ConfigError(
                "a netvlad head with unfrozen blocks: train it frozen first (k-means needs cached features)"
            )
        sample = sources.sample.descriptor_sample(int(h["kmeans_sample"]), seed, sources.train_ids)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_head(
            name,
            backbone.dim,
            sources.grid,
            h["options"],
            h["projection"] or None,
            sample,
            seed,
            start_slice(h["start_slice"], name),
        )


def prepare(
    recipe: Mapping[str, Any], progress: bool = True, log: Callable[[str], None] = print, with_head: bool = True
) -> Prepared:
    """Labels, features, head, validation and monitor of a recipe (``with_head=False``: no head, ``head`` is None).

    Features: frozen (``unfreeze = 0``) — the backbone's output, cached; ``unfreeze = N`` — the output
    of the frozen prefix cached (``<cache>-before-lastN``) and the last N blocks run on it with
    gradients (:class:`SuffixFeatures`); with ``cache_prefix = false`` — the images re-read through
    the whole backbone at every step (:class:`ImageFeatures`, for when the images must change).
    """
    check_recipe(recipe)
    config = base_config(recipe)
    b = section(recipe, "backbone")
    sets = image_sets(recipe)
    torch.set_num_threads(config.threads)
    unfreeze = int(b["unfreeze"])
    backbone = build_backbone(config.backbone, trainable=unfreeze > 0, **dict(config.backbone_options))
    places = sets.places
    info: dict[str, Any] = {
        "train_images": len(sets.keys),
        "train_places": len(set(places.class_labels(np.arange(len(sets.keys))).tolist()))
        if places.has_classes
        else None,
    }
    extra = _unfrozen_parameters(backbone, unfreeze)
    if unfreeze > 0 and not b["cache_prefix"]:
        sources = image_features(backbone, config, sets)
    else:
        sources = cached_features(recipe, backbone, config, sets, unfreeze, progress, info)
    validation = sources.evaluation(sources.validation, sets.validation)
    monitor = sources.evaluation(sources.monitor, sets.monitor)
    features, train_ids = sources.features, sources.train_ids
    # Labels over the training ids: the feature source's ids when the cache also holds validation images.
    if len(train_ids) != len(features) or not np.array_equal(train_ids, np.arange(len(train_ids))):
        places = _relabel(places, train_ids, len(features))
    head = _head(recipe, backbone, sources, int(section(recipe, "train")["seed"])) if with_head else None
    return Prepared(config, head, features, train_ids, places, validation, extra, backbone, info, monitor)


def _relabel(places: PlaceLabels, train_ids: np.ndarray, n: int) -> PlaceLabels:
    """Frame / pose labels defined on the training keys, re-expressed on the ids of a larger feature source."""
    if not places.has_classes:
        raise ConfigError("pose labels need a feature cache of the training images only (give validation another root)")
    classes = np.full(n, -1, dtype=np.int64)
    classes[train_ids] = places.class_labels(np.arange(len(train_ids))).numpy()
    # Images outside training get their own classes (never sampled; they are not in train_ids).
    outside = classes < 0
    classes[outside] = classes.max() + 1 + np.arange(int(outside.sum()))
    relabelled = PlaceLabels.from_classes(classes)
    if places.domains is None:
        return relabelled
    domains = np.full(n, -1, dtype=np.int64)  # unknown outside training: never a cross-domain negative
    domains[train_ids] = places.domains
    return relabelled.with_domains(domains, negatives=places.negatives)


def trained_config(recipe: Mapping[str, Any], prepared: Prepared) -> Config:
    """The checkpoint's preset: the base preset, ``trained`` aggregator (and a fixed map VLAD weight, if any)."""
    h = section(recipe, "head")
    name = h["name"]
    feats = prepared.features
    opts = head_options(name, h["options"], feats.grid if hasattr(feats, "grid") else feats.batch([0]).grid)
    run_name = recipe.get("name") or Path(recipe.get("out") or "run").name
    agg: dict[str, Any] = {"head": name, "head_options": opts, "state": None}
    vocabulary = prepared.config.vocabulary
    fused = ""
    # A list of VLAD weights is picked on the validation set after training (training.fusion): until then the
    # checkpoint is the head alone.
    if h["vlad"] and not isinstance(h["vlad"].get("weight"), (list, tuple)):
        v = {
            "k": int(h["vlad"].get("k", vocabulary.k)),
            "assignments": int(h["vlad"].get("assignments", 4)),
            "weight": float(h["vlad"].get("weight", 0.5)),
        }
        agg["vlad"] = v
        vocabulary = dataclasses.replace(vocabulary, k=v["k"])
        fused = f" + VLAD K={v['k']} ×{v['assignments']} over the map's vocabulary (weight {v['weight']})"
    return prepared.config.replace(
        name=run_name,
        description=recipe.get("description")
        or f"trained {name} head on {prepared.config.backbone} ({prepared.head.dim}-d){fused}, from `vprkit train`",
        aggregator="trained",
        aggregator_options=agg,
        vocabulary=vocabulary,
        extensions={},
        rerank=None,
    )
