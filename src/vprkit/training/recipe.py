"""``vprkit train RECIPE.toml``: a run description (TOML, or YAML when PyYAML is installed) → a checkpoint that is a preset.

A recipe (paths relative to the recipe file)::

    name = "nordland-mixvpr"                 # the checkpoint's preset name
    out = "runs/nordland-mixvpr"             # run folder: best.ckpt, best.head.pt, last.pt, curves.png

    [backbone]
    preset = "effnet2-vlad-ma4"              # backbone, its options and the image spec come from here
    image_size = [224, 112]                  # W×H (optional)
    options = { block = 19 }                 # the backbone's options changed from the preset's (optional)
    unfreeze = 0                             # train the last N backbone blocks too; 0 = frozen, cached
    cache_prefix = true                      # unfreeze > 0: cache the frozen prefix's output, train the N blocks on it
                                             # (false: re-read the images through the whole backbone every step)
    cache = "runs/features-nordland"         # feature cache folder (default: <out>/features); shared by runs
    memory_budget_mb = 1024                  # the cache is loaded into RAM when it fits a quarter of this

    [data]                                   # labels = "frames": the same file name in each folder is one place
    root = "../shared/datasets/nordland-64x32"
    labels = "frames"
    folders = ["summer", "winter"]
    frames = [0, 1788]                       # [first, end) of the sorted frame names (optional)
    tolerance = 0
    negatives = "any"                        # or "cross-domain": negatives only from another folder (season)
    # labels = "poses": images = "db/", poses = "poses.csv", radius = 10, soft_radius = 25

    [validation]                             # picks the best epoch: held out of training, never the judged set
    holdout = 300                            # the last 300 frames of [data] frames, taken out of training
    gap = 10                                 # and the 10 frames before them dropped (neighbours look alike)
    queries = "winter"
    database = "summer"
    # frames = [a, b], every = 4, tolerance = 0: an explicit frame range instead (must not overlap training)
    # dataset = "corridor"                   # any `vprkit eval` dataset instead
    refit = false                            # true (needs holdout): after the run, train again from scratch on the
                                             # whole [data] range (holdout and gap returned) for the picked number
                                             # of epochs, same seed and schedule → refit.ckpt, the run's checkpoint

    [monitor]                                # optional: recorded every epoch ("monitor R@1"), never picks
    queries = "winter"
    database = "summer"
    frames = [1788, 3576]
    every = 4

    [head]
    name = "mixvpr"                          # gem | netvlad | mixvpr | layout | mean
    options = { out_channels = 120, out_rows = 96 }
    projection = 0                           # > 0: a trainable linear projection to this many dims
    members = 1                              # > 1: an ensemble of that many heads, seeds seed … seed + N − 1, each
                                             # trained and picked as one head is (<out>/member<i>/); best.ckpt is
                                             # their concatenation (cosine = the members' mean; training.ensemble)
    member_init = "same"                     # or "split" (layout): member i starts on slice i of N of the channels
    start_slice = [0, 1]                     # layout: start as the identity on slice i of n of the backbone's channels
    vlad = { k = 64, assignments = 4, weight = 0.85 }   # optional: fuse with VLAD over the map's own vocabulary;
                                             # weight = [0.1, 0.2, 0.3] picks the best on [validation] after training
                                             # (its database plays the map: training.fusion), → <best>-fused.ckpt

    [loss]
    name = "multi-similarity"                # any of vprkit.training.LOSSES
    [miner]
    name = "multi-similarity"                # any of vprkit.training.MINERS, or "" for none
    [sampler]
    places = 32
    images_per_place = 2
    contiguous = 0.0                         # the share of batches that are windows of consecutive places
    [post]                                   # optional, fitted after training on the cached training images:
    pca = 1920                               # a PCA of the head's output to this many dims (centred, not whitened)
    centre = false                           # or: centre the head on its mean training output
    [optimiser]
    name = "adam"
    lr = 1e-3
    backbone_lr = 1e-4                       # the unfrozen backbone blocks' learning rate (default: lr)
    [schedule]
    name = "cosine"
    [train]
    epochs = 10
    seed = 0

:func:`run_recipe` does it all; the pieces (:func:`load_recipe`, :func:`prepare`) are usable alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..backbones import build_backbone
from ..config import Config
from ..datasets import GroundTruth
from ..errors import ConfigError
from ..images import FolderImages, list_images
from ..presets import resolve
from .checkpoint import checkpoint_config, write_checkpoint
from .curves import plot_curves
from .features import CachedFeatures, ImageFeatures, SuffixFeatures
from .fusion import fuse_checkpoint, fused_validation, vlad_spec
from .heads import KMEANS_SAMPLE, build_head, head_options, start_slice
from .labels import NEGATIVE_RULES, PlaceLabels, frame_keys
from .trainer import TrainSettings, Trainer, Validation

SECTIONS = ("backbone", "data", "validation", "monitor", "head", "post", "loss", "miner", "sampler", "optimiser", "schedule",
            "train")
TOP_LEVEL = ("name", "description", "out", *SECTIONS)
# The cache of a split backbone's frozen prefix: <cache>-before-last<N> beside the frozen features' <cache>.
PREFIX_CACHE_SUFFIX = "-before-last"


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML) recipe; unknown sections are errors."""
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ConfigError("YAML recipes need PyYAML (`pip install pyyaml`); or write the recipe as TOML") from None
        recipe = yaml.safe_load(p.read_text()) or {}
    else:
        import tomllib

        with open(p, "rb") as f:
            recipe = tomllib.load(f)
    unknown = sorted(set(recipe) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"{p}: unknown recipe keys {unknown}; known: {', '.join(TOP_LEVEL)}")
    recipe["_dir"] = str(p.resolve().parent)
    return recipe


def _path(recipe: Mapping[str, Any], value: str | os.PathLike) -> Path:
    p = Path(os.path.expandvars(str(value))).expanduser()
    return p if p.is_absolute() else Path(recipe.get("_dir", ".")) / p


def settings_from(recipe: Mapping[str, Any]) -> TrainSettings:
    s, o, sch, tr = (dict(recipe.get(k, {})) for k in ("sampler", "optimiser", "schedule", "train"))
    loss, miner = dict(recipe.get("loss", {})), dict(recipe.get("miner", {}))
    return TrainSettings(
        epochs=int(tr.get("epochs", 10)), steps_per_epoch=tr.get("steps_per_epoch") or None,
        places_per_batch=int(s.get("places", 32)), images_per_place=int(s.get("images_per_place", 2)),
        contiguous_batches=float(s.get("contiguous", 0.0)),
        loss=loss.get("name", "multi-similarity"), loss_options=dict(loss.get("options", {})),
        miner=miner.get("name", "multi-similarity") if "miner" in recipe or "name" in miner else "multi-similarity",
        miner_options=dict(miner.get("options", {})),
        optimiser=o.get("name", "adam"), lr=float(o.get("lr", 1e-3)), weight_decay=float(o.get("weight_decay", 0.0)),
        momentum=float(o.get("momentum", 0.9)), loss_lr=o.get("loss_lr"),
        backbone_lr=None if o.get("backbone_lr") is None else float(o["backbone_lr"]),
        schedule=sch.get("name", "cosine"), warmup_steps=int(sch.get("warmup_steps", 0)),
        step_every=int(sch.get("step_every", 1)), step_gamma=float(sch.get("step_gamma", 0.5)),
        seed=int(tr.get("seed", 0)), grad_clip=tr.get("grad_clip"),
        feature_dropout=float(tr.get("feature_dropout", 0.0)), feature_shift=int(tr.get("feature_shift", 0)),
        device=str(tr.get("device", "auto")),
    )


def base_config(recipe: Mapping[str, Any]) -> Config:
    b = dict(recipe.get("backbone", {}))
    size = b.get("image_size")
    config = resolve(b.get("preset"), image_size=None if size is None else (int(size[1]), int(size[0])),
                     memory_budget_mb=b.get("memory_budget_mb"))
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


def _training_keys(recipe, data) -> tuple[Path, list[str], PlaceLabels]:
    root = _path(recipe, data.get("root", "."))
    kind = data.get("labels", "frames")
    negatives = str(data.get("negatives", "any"))
    if negatives not in NEGATIVE_RULES:
        raise ConfigError(f"[data] negatives must be one of {NEGATIVE_RULES}, got {negatives!r}")
    if kind == "frames":
        folders = data.get("folders")
        if not folders:
            raise ConfigError("[data] labels = 'frames' needs folders = [...] (synchronised sequences)")
        names = _frame_range(sorted(set.intersection(*(set(frame_keys(list_images(root / f))) for f in folders))),
                             data.get("frames"))
        if data.get("every"):
            names = names[:: int(data["every"])]
        keys = [f"{f}/{n}" for f in folders for n in names]
        places = PlaceLabels.from_frames(frame_keys(keys), tolerance=int(data.get("tolerance", 0)),
                                         soft_tolerance=data.get("soft_tolerance"))
        if negatives != "any":  # each folder (season) is a domain
            places = places.with_domains(np.repeat(np.arange(len(folders)), len(names)), negatives=negatives)
        return root, keys, places
    if negatives != "any":
        raise ConfigError(f"[data] negatives = {negatives!r} needs frame labels with folders (each folder a domain)")
    if kind == "poses":
        from ..datasets.poses import read_poses

        images = root / data.get("images", ".")
        keys = [str(Path(data.get("images", ".")) / k) if data.get("images") else k for k in list_images(images)]
        poses = read_poses(_path(recipe, data["poses"]))
        rel = list_images(images)
        xy = poses.lookup(rel)
        places = PlaceLabels.from_poses(xy, radius=float(data.get("radius", 10.0)),
                                        soft_radius=data.get("soft_radius", 25.0))
        return root, keys, places
    raise ConfigError(f"[data] labels must be 'frames' or 'poses', got {kind!r}")


def _validation_keys(recipe, val, data_root: Path) -> tuple[Path, list[str], list[str], GroundTruth]:
    if val.get("dataset"):
        from ..datasets import load_dataset

        ds = load_dataset(str(_path(recipe, val["dataset"])) if os.sep in str(val["dataset"]) else val["dataset"])
        if val.get("every"):
            ds = ds.subset(every=int(val["every"]))
        root = Path(os.path.commonpath([ds.queries_dir, ds.database_dir]))
        q = [str((Path(ds.queries_dir) / k).relative_to(root)) for k in ds.query_images]
        d = [str((Path(ds.database_dir) / k).relative_to(root)) for k in ds.database_images]
        return root, q, d, ds.ground_truth
    root = _path(recipe, val["root"]) if val.get("root") else data_root
    qf, df = val.get("queries", "winter"), val.get("database", "summer")
    names = sorted(set(frame_keys(list_images(root / qf))) & set(frame_keys(list_images(root / df))))
    names = _frame_range(names, val.get("frames"))[:: int(val.get("every", 1))]
    gt = GroundTruth.from_frames(names, names, tolerance=int(val.get("tolerance", 0)))
    return root, [f"{qf}/{n}" for n in names], [f"{df}/{n}" for n in names], gt


def _frame_names(recipe: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    """The sorted frame names every ``[data] folders`` folder has (before any frame range)."""
    root = _path(recipe, data.get("root", "."))
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
        raise ConfigError(f"{len(shared)} validation frames are also training frames (e.g. {shared[0]}); "
                          "hold them out ([validation] holdout = N) or move [data] frames")


def prepare(recipe: Mapping[str, Any], progress: bool = True, log: Callable[[str], None] = print,
            with_head: bool = True) -> Prepared:
    """Labels, features, head, validation and monitor of a recipe (``with_head=False``: no head, ``head`` is None).

    Features: frozen (``unfreeze = 0``) — the backbone's output, cached; ``unfreeze = N`` — the output
    of the frozen prefix cached (``<cache>-before-lastN``) and the last N blocks run on it with
    gradients (:class:`SuffixFeatures`); with ``cache_prefix = false`` — the images re-read through
    the whole backbone at every step (:class:`ImageFeatures`, for when the images must change).
    """
    config = base_config(recipe)
    b = dict(recipe.get("backbone", {}))
    data, val = split_holdout(recipe, recipe.get("data", {}), recipe.get("validation", {}))
    # A run that will be refitted caches the frames it returns to training (the gap) now, so the refit reuses the cache.
    refit_keys = _training_keys(recipe, dict(recipe["data"]))[1] if wants_refit(recipe) else []
    mon = dict(recipe.get("monitor", {}))
    seed = int(dict(recipe.get("train", {})).get("seed", 0))
    torch.set_num_threads(config.threads)
    unfreeze = int(b.get("unfreeze", 0))
    root, keys, places = _training_keys(recipe, data)
    vroot = vq = vd = gt = None
    if val:
        vroot, vq, vd, gt = _validation_keys(recipe, val, root)
        if data.get("labels", "frames") == "frames" and not val.get("dataset") and vroot.resolve() == root.resolve():
            _check_disjoint(keys, vq + vd)
    mroot = mq = md = mgt = None
    if mon:
        mroot, mq, md, mgt = _validation_keys(recipe, mon, root)
    backbone = build_backbone(config.backbone, trainable=unfreeze > 0, **dict(config.backbone_options))
    extra: list = []
    info: dict[str, Any] = {"train_images": len(keys), "train_places": len(set(places.class_labels(np.arange(len(keys))).tolist()))
                            if places.has_classes else None}
    if unfreeze > 0:
        # Unfrozen blocks keep their BatchNorm statistics (eval mode): batches of two images per place are
        # no population to re-estimate them from, and the map is built with the same statistics.
        backbone.set_trainable(last_blocks=unfreeze).eval()
        extra = [p for p in backbone.parameters() if p.requires_grad]
    if unfreeze > 0 and not bool(b.get("cache_prefix", True)):
        features = ImageFeatures(backbone, config, FolderImages(root, keys), keys)
        train_ids = np.arange(len(keys))
        vfeat = None if gt is None else ImageFeatures(backbone, config, FolderImages(vroot, vq + vd), vq + vd)
        mfeat = None if mgt is None else ImageFeatures(backbone, config, FolderImages(mroot, mq + md), mq + md)
        grid = features.batch([0]).grid
        sample_src = None
    else:
        out = _path(recipe, recipe.get("out", "run"))
        cache_dir = _path(recipe, b["cache"]) if b.get("cache") else out / "features"
        cached, suffix = backbone, None
        if unfreeze > 0:
            # The frozen prefix is a fixed function of the image (no augmentation here): cache its output
            # once, beside the frozen features' cache, and run only the unfrozen blocks at every step.
            cached, suffix = backbone.split(unfreeze)
            cache_dir = cache_dir.with_name(f"{cache_dir.name}{PREFIX_CACHE_SUFFIX}{unfreeze}")
            info["cached_prefix"] = cached.identity()
        ram = config.memory_plan().feature_cache_bytes
        same = gt is not None and vroot.resolve() == root.resolve()
        msame = mgt is not None and mroot.resolve() == root.resolve()
        all_keys = list(dict.fromkeys(keys + refit_keys + (vq + vd if same else []) + (mq + md if msame else [])))
        t0 = time.perf_counter()
        features = CachedFeatures.build(cached, config, FolderImages(root, all_keys), cache_dir, all_keys,
                                        dtype=b.get("cache_dtype", "float16"), progress=progress and "cache features",
                                        max_ram_bytes=ram)
        info["cache_seconds"] = round(time.perf_counter() - t0, 1)
        train_ids = features.ids(keys)
        def evaluation_features(truth, shares_training_cache: bool, root, queries, database, role: str):
            """Features of a validation or monitored set: none, the training cache, or a cache of its own."""
            if truth is None:
                return None
            if shares_training_cache:
                return features
            names = queries + database
            return CachedFeatures.build(cached, config, FolderImages(root, names), Path(f"{cache_dir}-{role}"), names,
                                        dtype=b.get("cache_dtype", "float16"), progress=progress and f"cache {role}",
                                        max_ram_bytes=ram)

        vfeat = evaluation_features(gt, same, vroot, vq, vd, "validation")
        mfeat = evaluation_features(mgt, msame, mroot, mq, md, "monitor")
        if suffix is not None:  # every feature source runs the (shared) unfrozen blocks on its prefix cache
            wrapped = {id(f): SuffixFeatures(f, suffix) for f in (features, vfeat, mfeat) if f is not None}
            features, vfeat, mfeat = (None if f is None else wrapped[id(f)] for f in (features, vfeat, mfeat))
        grid = features.grid
        sample_src = features

    def eval_set(feats, q: list[str] | None, d: list[str] | None, truth: GroundTruth | None) -> Validation | None:
        if truth is None:
            return None
        if feats is features:
            return Validation(feats, features.ids(q), features.ids(d), truth)
        return Validation(feats, np.arange(len(q)), np.arange(len(q), len(q) + len(d)), truth)

    validation = eval_set(vfeat, vq, vd, gt)
    monitor = eval_set(mfeat, mq, md, mgt)
    # Labels over the training ids: the feature source's ids when the cache also holds validation images.
    if len(train_ids) != features.__len__() or not np.array_equal(train_ids, np.arange(len(train_ids))):
        places = _relabel(places, train_ids, len(features))
    h = dict(recipe.get("head", {}))
    name = h.get("name", "gem")
    if not with_head:
        return Prepared(config, None, features, train_ids, places, validation, extra, backbone, info, monitor)
    sample = None
    if name == "netvlad":
        if sample_src is None:
            raise ConfigError("a netvlad head with unfrozen blocks: train it frozen first (k-means needs cached features)")
        sample = sample_src.descriptor_sample(int(h.get("kmeans_sample", KMEANS_SAMPLE)), seed, train_ids)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = build_head(name, backbone.dim, grid, h.get("options"), h.get("projection") or None, sample, seed,
                          start_slice(h.get("start_slice"), name))
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
    h = dict(recipe.get("head", {}))
    name = h.get("name", "gem")
    feats = prepared.features
    opts = head_options(name, h.get("options"), feats.grid if hasattr(feats, "grid") else feats.batch([0]).grid)
    run_name = recipe.get("name") or Path(recipe.get("out", "run")).name
    agg: dict[str, Any] = {"head": name, "head_options": opts, "state": None}
    vocabulary = prepared.config.vocabulary
    fused = ""
    # A list of VLAD weights is picked on the validation set after training (training.fusion): until then the
    # checkpoint is the head alone.
    if h.get("vlad") and not isinstance(h["vlad"].get("weight"), (list, tuple)):
        v = {"k": int(h["vlad"].get("k", vocabulary.k)), "assignments": int(h["vlad"].get("assignments", 4)),
             "weight": float(h["vlad"].get("weight", 0.5))}
        agg["vlad"] = v
        vocabulary = dataclasses.replace(vocabulary, k=v["k"])
        fused = f" + VLAD K={v['k']} ×{v['assignments']} over the map's vocabulary (weight {v['weight']})"
    return prepared.config.replace(
        name=run_name,
        description=recipe.get("description") or f"trained {name} head on {prepared.config.backbone} "
                                                   f"({prepared.head.dim}-d){fused}, from `vprkit train`",
        aggregator="trained", aggregator_options=agg, vocabulary=vocabulary, extensions={}, rerank=None,
    )


def _save_backbone(prepared: Prepared, out: Path, name: str = "best.backbone.pth") -> str:
    """Unfrozen EfficientNet-Lite blocks → a full weights file its loader reads (``backbone_options.weights``)."""
    config = prepared.config
    if not config.backbone.startswith("efficientnet"):
        raise ConfigError("saving an unfrozen backbone is implemented for EfficientNet-Lite only")
    from ..backbones.efficientnet import VARIANTS
    from ..backbones.weights import package_data_dirs, resolve_weights

    _, package, filename = VARIANTS[config.backbone]
    src = resolve_weights(config.backbone, filename, dict(config.backbone_options).get("weights"),
                          search_dirs=package_data_dirs(package, "models"))
    full = torch.load(src, map_location="cpu", weights_only=True)
    for k, v in prepared.backbone.state_dict().items():
        k2 = k.replace("stem.0.", "_conv_stem.", 1).replace("stem.1.", "_bn0.", 1)
        k2 = "_blocks." + k2[len("blocks."):] if k2.startswith("blocks.") else k2
        if k2 in full:
            full[k2] = v.detach().clone()
    path = out / name
    torch.save(full, path)
    return str(path.resolve())


def run_recipe(path: str | os.PathLike | Mapping[str, Any], resume: bool = True, progress: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train what the recipe says; write ``best.ckpt`` (+ ``best.head.pt``), ``last.pt``, ``history.json``, ``curves.png``.

    Resumes from ``last.pt`` when it exists (and ``resume``). ``[head] members = N > 1`` trains N heads and
    writes their ensemble instead (:func:`vprkit.training.ensemble.run_ensemble`). Returns a summary with the best
    validation recall, the checkpoint path and the training time. With ``[validation] refit = true``
    the picked epoch count is then retrained on the whole training range (:func:`refit_run`): the
    summary's ``checkpoint`` is ``refit.ckpt`` (``picked_checkpoint`` the one picked on the holdout),
    ``refit`` its record, and ``train_seconds`` covers both runs.
    """
    from .ensemble import check_members, run_ensemble

    recipe = load_recipe(path) if not isinstance(path, Mapping) else dict(path)
    if recipe.get("post"):
        check_post(dict(recipe["post"]), int(dict(recipe.get("backbone", {})).get("unfreeze", 0)))
    if check_members(recipe) > 1:  # [head] members = N: N runs, then their ensemble is the preset
        return run_ensemble(recipe, resume, progress, log)
    out = _path(recipe, recipe.get("out", "run"))
    out.mkdir(parents=True, exist_ok=True)
    vlad = dict(dict(recipe.get("head", {})).get("vlad") or {})
    if vlad:  # checked before training, so a typo costs no run
        if vlad_spec(vlad)["chosen_on_validation"] and not recipe.get("validation"):
            raise ConfigError("[head] vlad weight = [candidates] is picked on the validation set: give [validation]")
    refit = check_refit(recipe)
    prepared = prepare(recipe, progress, log)
    settings = settings_from(recipe)
    config = trained_config(recipe, prepared)
    t0 = time.perf_counter()

    def on_best(trainer: Trainer, record: dict) -> None:
        cfg = config
        if prepared.extra_parameters:
            cfg = cfg.replace(backbone_options={**cfg.backbone_options, "weights": _save_backbone(prepared, out)})
        torch.save(trainer.head.state_dict(), out / "best.head.pt")
        write_checkpoint(out / "best.ckpt", cfg, out / "best.head.pt",
                         {"validation": {k: v for k, v in record.items() if k.startswith("R@")}, "epoch": record["epoch"],
                          "step": record["step"], "head_dim": int(trainer.head.dim), "settings": settings.to_dict(),
                          "train": prepared.info})

    def on_epoch(trainer: Trainer, record: dict) -> None:
        trainer.save(out / "last.pt")
        (out / "history.json").write_text(json.dumps(trainer.history, indent=2) + "\n")
        plot_curves(trainer.history, out / "curves.png", title=config.name)

    trainer = Trainer(prepared.head, prepared.features, prepared.places, settings, prepared.validation,
                      prepared.train_ids, prepared.extra_parameters, progress, on_best, on_epoch, prepared.monitor)
    if resume and (out / "last.pt").exists():
        trainer.load(out / "last.pt")
        log(f"resuming {out} at step {trainer.step}/{trainer.total_steps}")
    trainer.fit()
    seconds = time.perf_counter() - t0
    checkpoint, head_dim = out / "best.ckpt", int(prepared.head.dim)
    post = dict(recipe.get("post", {}))
    summary_extra: dict[str, Any] = {}
    if post:
        summary_extra["trained_checkpoint"] = str(checkpoint)
        checkpoint, head_dim = post_train(prepared, checkpoint, post)
    if vlad and prepared.validation is not None:
        # The map VLAD's weight (or weights to pick from) measured on the validation set, the fused descriptor whole.
        spec = vlad_spec(vlad)
        if spec["chosen_on_validation"]:
            summary_extra["unfused_checkpoint"] = str(checkpoint)
            checkpoint, summary_extra["fused_validation"] = fuse_checkpoint(checkpoint, prepared.backbone.dim,
                                                                            prepared.validation, vlad)
            log(f"map VLAD weight {summary_extra['fused_validation']['weight']} picked on validation: "
                + ", ".join(f"{w}: R@1 {r['R@1']:.3f}" for w, r in summary_extra["fused_validation"]["weights"].items()))
        else:
            fused = checkpoint_config(checkpoint)  # its VLAD's K is the checkpoint vocabulary's
            rec = fused_validation(fused, prepared.backbone.dim, prepared.validation,
                                   fused.vocabulary.k, spec["assignments"], spec["weights"])
            summary_extra["fused_validation"] = {"weight": spec["weights"][0], "R@1": float(rec[spec["weights"][0]]["R@1"])}
    if refit:
        # The epoch count picked on the holdout, retrained on the whole training range: that model is the run's.
        summary_extra["picked_checkpoint"] = str(checkpoint)
        summary_extra["refit"] = refit_run(recipe, int(trainer.best["epoch"]), trainer.best, settings, out, resume,
                                           progress, log)
        checkpoint = Path(summary_extra["refit"]["checkpoint"])
        seconds += summary_extra["refit"]["train_seconds"]
    summary = {"name": config.name, "checkpoint": str(checkpoint), "best": trainer.best, "history": trainer.history,
               "train_seconds": round(seconds, 1), "head_dim": head_dim, **summary_extra, **prepared.info}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def wants_refit(recipe: Mapping[str, Any]) -> bool:
    """Whether ``[validation] refit`` asks for a refit (a boolean; anything else is an error)."""
    value = dict(recipe.get("validation") or {}).get("refit", False)
    if not isinstance(value, bool):
        raise ConfigError(f"[validation] refit must be true or false, got {value!r}")
    return value


def check_refit(recipe: Mapping[str, Any]) -> bool:
    """``[validation] refit = true`` and the options it cannot go with — checked before training, so a typo costs no run."""
    if not wants_refit(recipe):
        return False
    val = dict(recipe["validation"])
    if not int(val.get("holdout", 0) or 0):
        raise ConfigError("[validation] refit = true needs holdout = N: the refit returns the held-out frames (and the "
                          "gap) to training, which an explicit frame range or another dataset cannot be")
    if recipe.get("post"):
        raise ConfigError("[validation] refit = true cannot be combined with [post] (fitted on the picked run's "
                          "training images); fit it on the refitted checkpoint with `vprkit add-pca`")
    if dict(recipe.get("head", {})).get("vlad"):
        raise ConfigError("[validation] refit = true cannot be combined with [head] vlad (the fusion weight is measured "
                          "on the held-out frames, which the refit trains on)")
    return True


def refit_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The refit's recipe: the same, over the whole ``[data]`` range (holdout and gap returned), without validation."""
    r = {k: v for k, v in recipe.items() if k != "validation"}
    r["name"] = f"{recipe.get('name') or Path(recipe.get('out', 'run')).name}-refit"
    return r


def refit_run(recipe: Mapping[str, Any], epochs: int, picked: Mapping[str, Any], settings: TrainSettings, out: Path,
              resume: bool = True, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Retrain from scratch on the union of training, gap and held-out frames for the ``epochs`` picked on the holdout.

    Same seed, same settings and the same schedule (the recipe's ``epochs`` long, over the union's steps per
    epoch), stopped after ``epochs`` epochs: the refitted model sits where the picked one sat in its schedule,
    having seen every training-range frame. Nothing is validated (no frame of the range is held out); the
    monitor, if any, is still only recorded. Writes ``refit.ckpt`` (+ ``refit.head.pt``), a preset like
    ``best.ckpt``, with ``refit.last.pt`` (to resume), ``refit.history.json`` and ``refit.curves.png``.
    """
    if epochs < 1 or epochs > settings.epochs:
        raise ConfigError(f"refit for {epochs} epochs: the picked epoch must be in 1..{settings.epochs}")
    union = refit_recipe(recipe)
    log(f"refit: {epochs} epochs (picked on the holdout) on the whole training range {union['data'].get('frames')}")
    prepared = prepare(union, progress, log)
    config = trained_config(union, prepared)
    config = config.replace(description=config.description + f"; refitted on the whole training range for {epochs} "
                                                             f"epochs (picked on the holdout)")
    t0 = time.perf_counter()

    def on_epoch(trainer: Trainer, record: dict) -> None:
        record["refit"] = True
        trainer.save(out / "refit.last.pt")
        (out / "refit.history.json").write_text(json.dumps(trainer.history, indent=2) + "\n")
        plot_curves(trainer.history, out / "refit.curves.png", title=config.name)

    trainer = Trainer(prepared.head, prepared.features, prepared.places, settings, None, prepared.train_ids,
                      prepared.extra_parameters, progress, None, on_epoch, prepared.monitor)
    if resume and (out / "refit.last.pt").exists():
        trainer.load(out / "refit.last.pt")
        log(f"resuming the refit at step {trainer.step}/{epochs * trainer.steps_per_epoch}")
    trainer.fit(max_steps=epochs * trainer.steps_per_epoch)
    seconds = time.perf_counter() - t0
    if len(trainer.history) != epochs:
        raise ConfigError(f"the refit ran {len(trainer.history)} epochs instead of {epochs} "
                          f"({out / 'refit.last.pt'} is from another run: delete it)")
    if prepared.extra_parameters:
        config = config.replace(backbone_options={**config.backbone_options,
                                                  "weights": _save_backbone(prepared, out, "refit.backbone.pth")})
    torch.save(trainer.head.state_dict(), out / "refit.head.pt")
    info = {"refit": {"epochs": epochs, "schedule_epochs": settings.epochs, "picked_on_validation":
                      {k: v for k, v in picked.items() if k.startswith("R@")}, "frames": union["data"].get("frames")},
            "epoch": epochs, "step": trainer.step, "head_dim": int(trainer.head.dim), "settings": settings.to_dict(),
            "train": prepared.info}
    checkpoint = write_checkpoint(out / "refit.ckpt", config, out / "refit.head.pt", info)
    return {"checkpoint": str(checkpoint), "picked_epoch": epochs, "epochs": len(trainer.history),
            "steps": trainer.step, "history": trainer.history, "train_seconds": round(seconds, 1), **prepared.info}


# Cached training features per forward pass when fitting a post-training step.
POST_BATCH = 256
POST_KEYS = ("pca", "centre")


def check_post(post: Mapping[str, Any], unfreeze: int = 0) -> None:
    """A ``[post]`` section that :func:`post_train` can fit — checked before training, so a typo costs no run."""
    unknown = sorted(set(post) - set(POST_KEYS))
    if unknown:
        raise ConfigError(f"[post] has unknown keys {unknown}; known: {', '.join(POST_KEYS)}")
    pca, centre = post.get("pca"), bool(post.get("centre"))
    if pca and centre:
        raise ConfigError("[post] takes pca or centre, not both (a PCA centres already)")
    if not pca and not centre:
        raise ConfigError("[post] needs pca = D (a positive number of dims) or centre = true")
    if pca and (isinstance(pca, bool) or not isinstance(pca, int) or pca < 1):
        raise ConfigError(f"[post] pca must be a positive number of dims, got {pca!r}")
    if unfreeze:
        raise ConfigError("[post] is fitted on cached features of a frozen backbone; with [backbone] unfreeze > 0 "
                          "fit it afterwards with `vprkit add-pca CHECKPOINT IMAGES --dim D`")


def post_train(prepared: Prepared, checkpoint: str | os.PathLike, post: Mapping[str, Any]) -> tuple[Path, int]:
    """Fit a step after training on the training images' cached features; returns ``best-post.ckpt`` and its head dim.

    ``post``: ``{"pca": D}`` appends a PCA of the head's output to ``D`` dims (centred, not whitened:
    whitening the trained layout amplified its noisy directions, 0.655–0.680 against 0.696);
    ``{"centre": True}`` centres the head on its mean training output (the map's VLAD part, when fused,
    stays as it is). Why after training: a PCA of what the head learned keeps the directions the
    training places vary along, so the fused descriptor can give the map's own VLAD more bytes. The
    trained checkpoint stays; the new one (``best-post.ckpt`` + ``best-post.head.pt``) is the preset.
    """
    from ..aggregation import AGGREGATORS
    from ..aggregation.projection import Projection, TrainedHead, add_centre
    from .checkpoint import checkpoint_config

    check_post(post, unfreeze=1 if prepared.extra_parameters else 0)
    src = Path(checkpoint)
    config = checkpoint_config(src)
    options = {k: v for k, v in config.aggregator_options.items() if k != "vlad"}  # the head alone, no vocabulary
    # A trained head, or an ensemble of them ([head] members): both take projections after their output.
    head = AGGREGATORS.get(config.aggregator)(prepared.features.dim, **options).eval()
    if post.get("centre") and not isinstance(head, TrainedHead):
        raise ConfigError(f"[post] centre is for one trained head, not a {config.aggregator!r} checkpoint")
    ids = prepared.train_ids
    batches = [ids[i:i + POST_BATCH] for i in range(0, len(ids), POST_BATCH)]
    state = src.with_name("best-post.head.pt")
    if post.get("pca"):
        with torch.no_grad():
            x = torch.cat([head(prepared.features.batch(b)).float() for b in batches])
        head.add_projection(Projection.from_pca(x, int(post["pca"])))
        torch.save(head.state_dict(), state)
    else:
        add_centre(head, (prepared.features.batch(b) for b in batches), state)
    info = {k: v for k, v in json.loads(src.read_text()).items() if k not in ("format", "config")}
    info["post"] = {**dict(post), "fitted_on": len(ids), "from": src.name}
    out = write_checkpoint(src.with_name("best-post.ckpt"),
                           config.replace(name=config.name + "-post", description=config.description + f"; then {dict(post)}"),
                           state, info)
    return out, int(head.head_dim)
