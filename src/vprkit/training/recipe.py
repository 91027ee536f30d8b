"""``vprkit train RECIPE.toml``: a run description (TOML, or YAML with PyYAML) → a checkpoint that is a preset.

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
    name = "mixvpr"                          # gem | netvlad | mixvpr | layout | mean | gem-fc | boq | salad
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

Every section is declared once, typed (:mod:`vprkit.training.sections`): an unknown section or key,
or a value of the wrong type, is refused with a one-line :class:`~vprkit.errors.ConfigError` naming
the section, the key and the closest valid one, before any image is read or model built.

:func:`run_recipe` does it all; the pieces (:func:`load_recipe`, :func:`prepare`) are usable alone. The
layers below it: :mod:`.sections` (the schema) ← :mod:`.preparation` (features, head, validation) ←
:mod:`.run` (one head's run) ← :mod:`.ensemble` (``[head] members``) ← this module, which only reads
and dispatches (and re-exports the pieces under their old names).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import ConfigError
from .ensemble import check_members, run_ensemble
from .preparation import (
    PREFIX_CACHE_SUFFIX,
    Prepared,
    base_config,
    prepare,
    settings_from,
    split_holdout,
    trained_config,
    wants_refit,
)
from .run import POST_BATCH, check_post, check_refit, post_train, refit_recipe, refit_run, run_single
from .sections import RECIPE_DIR, SECTIONS, TOP_LEVEL, check_recipe, recipe_path, section

__all__ = [
    "POST_BATCH",
    "PREFIX_CACHE_SUFFIX",
    "SECTIONS",
    "TOP_LEVEL",
    "Prepared",
    "base_config",
    "check_post",
    "check_recipe",
    "check_refit",
    "load_recipe",
    "post_train",
    "prepare",
    "recipe_path",
    "refit_recipe",
    "refit_run",
    "run_recipe",
    "settings_from",
    "split_holdout",
    "trained_config",
    "wants_refit",
]


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML) recipe, checked section by section.

    Every key of every section is checked against its schema (:func:`~vprkit.training.sections.check_recipe`)
    here, before anything runs; errors start with the file's path.
    """
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml  # an optional extra: TOML recipes need nothing beyond the standard library
        except ModuleNotFoundError:
            raise ConfigError("YAML recipes need PyYAML (`pip install pyyaml`); or write the recipe as TOML") from None
        recipe = yaml.safe_load(p.read_text()) or {}
    else:
        with open(p, "rb") as f:
            recipe = tomllib.load(f)
    check_recipe(recipe, source=p)
    recipe[RECIPE_DIR] = str(p.resolve().parent)
    return recipe


def run_recipe(
    path: str | os.PathLike | Mapping[str, Any],
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train what the recipe says: ``best.ckpt`` (+ ``best.head.pt``), ``last.pt``, ``history.json``, ``curves.png``.

    The whole recipe is checked first (schema, ``[post]``, ``[head] members`` and what they cannot go
    with), so a typo costs no run and leaves nothing behind. ``[head] members = N > 1`` trains N heads
    and writes their ensemble (:func:`vprkit.training.ensemble.run_ensemble`); otherwise one head is
    trained (:func:`vprkit.training.run.run_single`: resumes from ``last.pt``; with ``[validation]
    refit = true`` the picked epoch count is retrained on the whole training range). Returns the
    run's summary: the best validation recall, the checkpoint path and the training time.
    """
    recipe = load_recipe(path) if not isinstance(path, Mapping) else dict(path)
    check_recipe(recipe)
    if recipe.get("post"):
        check_post(dict(recipe["post"]), int(section(recipe, "backbone")["unfreeze"]))
    if check_members(recipe) > 1:  # [head] members = N: N runs, then their ensemble is the preset
        return run_ensemble(recipe, resume, progress, log)
    return run_single(recipe, resume, progress, log)
