"""A training recipe's schema: one table of typed settings per section, checked before any work.

Why: a recipe is written by hand, and a misspelt key (``learning_rate`` for ``lr``, ``epoch`` for
``epochs``) used to be ignored — the run went ahead with the default and the typo showed only in
the results, hours later. Every section is declared here once, with the same
:class:`~vprkit.options.Option` machinery that checks presets' component options:
:func:`check_recipe` refuses an unknown section or key with the closest valid one (in its section,
else in the section it belongs to) and a value of the wrong type or range naming the field — one
line, before a model is built or an image read. The head's ``options`` are the inner head's
component options and are checked against that aggregator's schema.

:func:`section` returns a section checked and filled with its declared defaults (what the code
reads); :func:`recipe_path` resolves a recipe's paths against its folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from ..options import Option, check_settings, closest_name, validate_options
from .features import CACHE_DTYPES
from .heads import HEADS, KMEANS_SAMPLE
from .labels import NEGATIVE_RULES
from .losses import LOSSES
from .miners import MINERS
from .trainer import OPTIMISERS, SCHEDULES

SECTIONS = (
    "backbone",
    "data",
    "validation",
    "monitor",
    "head",
    "post",
    "loss",
    "miner",
    "sampler",
    "optimiser",
    "schedule",
    "train",
)
TOP_LEVEL = ("name", "description", "out", *SECTIONS)
# Where a recipe's relative paths start: the recipe file's folder (load_recipe sets it; dict recipes may give it).
RECIPE_DIR = "_dir"
# [data] labels: synchronised frame sequences (the same file name in each folder is one place), or poses.
LABEL_KINDS = ("frames", "poses")
# [head] member_init: "same" — every member starts as one head does (they differ by seed: batch order, random
# layers); "split" — a layout member i starts as the identity on slice i of N of the backbone's channels.
MEMBER_INITS = ("same", "split")
# [head] vlad: the map-vocabulary VLAD fused with the head (training.fusion checks the values).
VLAD_KEYS = ("k", "assignments", "weight")


TOP: tuple[Option, ...] = (
    Option("name", "str", None, "the checkpoint's preset name (default: the out folder's name)", nullable=True),
    Option("description", "str", None, "the checkpoint preset's description", nullable=True),
    Option("out", "path", "run", "run folder: best.ckpt, last.pt, history.json, curves.png"),
    Option(RECIPE_DIR, "path", None, "internal: the folder relative paths start from", nullable=True),
    *(Option(name, "mapping", None, f"the [{name}] section", nullable=True) for name in SECTIONS),
)
BACKBONE: tuple[Option, ...] = (
    Option("preset", "path", None, "preset (or checkpoint) giving backbone, options and image spec", nullable=True),
    Option("image_size", "pair", None, "W×H replacing the preset's", nullable=True),
    Option("options", "mapping", None, "the backbone's options changed from the preset's", nullable=True),
    Option("unfreeze", "int", 0, "train the last N backbone blocks too (0: frozen, cached)", low=0),
    Option("cache_prefix", "bool", True, "unfreeze > 0: cache the frozen prefix's output (false: re-read images)"),
    Option("cache", "path", None, "feature cache folder (default: <out>/features)", nullable=True),
    Option("cache_dtype", "str", "float16", "dtype of the feature cache", choices=CACHE_DTYPES),
    Option(
        "memory_budget_mb", "int", None, "RAM budget; the cache is loaded when it fits a quarter", low=1, nullable=True
    ),
)
DATA: tuple[Option, ...] = (
    Option("root", "path", ".", "folder of the training images"),
    Option("labels", "str", "frames", "how images are grouped into places", choices=LABEL_KINDS),
    Option("folders", "strings", None, "frames: synchronised sequences, one folder each", nullable=True),
    Option("frames", "pair", None, "frames: [first, end) of the sorted frame names", nullable=True),
    Option("every", "int", None, "frames: every n-th frame (0: all)", low=0, nullable=True),
    Option("tolerance", "int", 0, "frames: frames apart still one place", low=0),
    Option("soft_tolerance", "int", None, "frames: soft positives this many frames apart", low=0, nullable=True),
    Option("negatives", "str", "any", "which images may be negatives", choices=NEGATIVE_RULES),
    Option("images", "path", None, "poses: the image folder under root", nullable=True),
    Option("poses", "path", None, "poses: the poses file", nullable=True),
    Option("radius", "float", 10.0, "poses: metres within which images are one place", low=0, low_open=True),
    Option("soft_radius", "float", 25.0, "poses: metres of soft positives", low=0, nullable=True),
)
# A set of queries → database frames, or a dataset: [validation] picks the epoch, [monitor] is only recorded.
EVALUATION_SET: tuple[Option, ...] = (
    Option("queries", "str", "winter", "folder of the query images (under root)"),
    Option("database", "str", "summer", "folder of the database images (under root)"),
    Option("frames", "pair", None, "[first, end) of the sorted frame names", nullable=True),
    Option("every", "int", 1, "every n-th frame", low=1),
    Option("tolerance", "int", 0, "frames apart still counted as the same place", low=0),
    Option("dataset", "str", None, "any `vprkit eval` dataset (name or folder) instead of frames", nullable=True),
    Option("root", "path", None, "folder holding queries and database (default: [data] root)", nullable=True),
)
VALIDATION: tuple[Option, ...] = (
    *EVALUATION_SET,
    Option("holdout", "int", 0, "the last N [data] frames become the validation set", low=0),
    Option("gap", "int", 0, "frames dropped before the holdout", low=0),
    Option("refit", "bool", False, "retrain on the whole [data] range for the picked epochs"),
)
HEAD: tuple[Option, ...] = (
    Option("name", "str", "gem", "the trained head", choices=HEADS),
    Option("options", "mapping", None, "the head's options (its aggregator's)", nullable=True),
    Option(
        "projection", "int", None, "a trainable linear projection to this many dims (0: none)", low=0, nullable=True
    ),
    Option("members", "int", 1, "an ensemble of this many heads, seeds seed … seed + N − 1", low=1),
    Option("member_init", "str", "same", "where ensemble members start", choices=MEMBER_INITS),
    Option("start_slice", "pair", None, "layout: start on slice i of n of the channels", nullable=True),
    Option("vlad", "mapping", None, "fuse with VLAD over the map's vocabulary", nullable=True, keys=VLAD_KEYS),
    Option("kmeans_sample", "int", KMEANS_SAMPLE, "netvlad: descriptors sampled for k-means", low=1),
)
POST: tuple[Option, ...] = (
    Option("pca", "int", None, "a PCA of the head's output to this many dims (0: none)", low=0, nullable=True),
    Option("centre", "bool", False, "centre the head on its mean training output"),
)
SAMPLER: tuple[Option, ...] = (
    Option("places", "int", 32, "places per batch", low=2),
    Option("images_per_place", "int", 2, "images of each place per batch", low=1),
    Option("contiguous", "float", 0.0, "share of batches that are windows of consecutive places", low=0, high=1),
)
OPTIMISER: tuple[Option, ...] = (
    Option("name", "str", "adam", "the optimiser", choices=OPTIMISERS),
    Option("lr", "float", 1e-3, "the head's learning rate", low=0, low_open=True),
    Option("weight_decay", "float", 0.0, "weight decay", low=0),
    Option("momentum", "float", 0.9, "sgd momentum", low=0),
    Option(
        "loss_lr",
        "float",
        None,
        "classifier losses' weights' learning rate (default: lr)",
        low=0,
        low_open=True,
        nullable=True,
    ),
    Option(
        "backbone_lr",
        "float",
        None,
        "the unfrozen backbone blocks' learning rate (default: lr)",
        low=0,
        low_open=True,
        nullable=True,
    ),
)
SCHEDULE: tuple[Option, ...] = (
    Option("name", "str", "cosine", "the learning-rate schedule", choices=SCHEDULES),
    Option("warmup_steps", "int", 0, "steps of linear warm-up", low=0),
    Option("step_every", "int", 1, "step schedule: epochs between decays", low=1),
    Option("step_gamma", "float", 0.5, "step schedule: the decay factor", low=0, low_open=True),
)
TRAIN: tuple[Option, ...] = (
    Option("epochs", "int", 10, "epochs of training", low=1),
    Option(
        "steps_per_epoch", "int", None, "steps per epoch (0 or None: one pass over the places)", low=0, nullable=True
    ),
    Option("seed", "int", 0, "the run's seed (batches, random layers)"),
    Option("grad_clip", "float", None, "clip the gradient norm to this (0 or None: no clipping)", low=0, nullable=True),
    Option("feature_dropout", "float", 0.0, "probability of dropping a whole cell of a training batch", low=0, high=1),
    Option("feature_shift", "int", 0, "shift training batches' grid by up to this many cells", low=0),
    Option("device", "str", "auto", "where the head trains: auto, cpu, cuda, cuda:N or mps"),
)


def recipe_schema() -> dict[str, tuple[Option, ...]]:
    """Every section's settings (``""``: the top level). Built per call: a plugin may register losses or miners."""
    loss = (
        Option("name", "str", "multi-similarity", "any of vprkit.training.LOSSES", choices=tuple(LOSSES.names())),
        Option("options", "mapping", None, "the loss's keyword arguments", nullable=True),
    )
    miner = (
        Option(
            "name",
            "str",
            "multi-similarity",
            'any of vprkit.training.MINERS, or "" for none',
            choices=("", *MINERS.names()),
            nullable=True,
        ),
        Option("options", "mapping", None, "the miner's keyword arguments", nullable=True),
    )
    return {
        "": TOP,
        "backbone": BACKBONE,
        "data": DATA,
        "validation": VALIDATION,
        "monitor": EVALUATION_SET,
        "head": HEAD,
        "post": POST,
        "loss": loss,
        "miner": miner,
        "sampler": SAMPLER,
        "optimiser": OPTIMISER,
        "schedule": SCHEDULE,
        "train": TRAIN,
    }


def check_recipe(recipe: Mapping[str, Any], source: str | os.PathLike | None = None) -> None:
    """ConfigError (one line, prefixed with ``source``) unless every section and key of ``recipe`` is known and typed.

    Checked before any work, so a typo costs no run: unknown sections and keys (with the closest valid
    key, also from the section it belongs to), wrong types and ranges, unknown ``[head] vlad`` keys and
    ``[head] options`` outside the head's schema.
    """
    try:
        _check(recipe)
    except ConfigError as e:
        if source is None:
            raise
        raise ConfigError(f"{source}: {e}") from None


def _check(recipe: Mapping[str, Any]) -> None:
    schema = recipe_schema()
    if not isinstance(recipe, Mapping):
        raise ConfigError(f"a recipe is a table of sections and settings, got {recipe!r}")
    for key, value in recipe.items():
        if key not in (RECIPE_DIR, *TOP_LEVEL) and isinstance(value, Mapping):
            near = closest_name(key, SECTIONS) or next((s for s in SECTIONS if key in _names(schema[s])), None)
            raise ConfigError(
                f"the recipe has no section [{key}]{f' (did you mean [{near}]?)' if near else ''}; "
                f"sections: {', '.join(SECTIONS)}"
            )
    for name in SECTIONS:  # first: a section that is not a table is named as a section
        if recipe.get(name) is not None:
            others = {f"[{s}]": _names(schema[s]) for s in SECTIONS if s != name}
            check_settings(f"[{name}]", schema[name], recipe[name], elsewhere=others)
    check_settings("the recipe", schema[""], recipe, elsewhere={f"[{s}]": _names(schema[s]) for s in SECTIONS})
    head = recipe.get("head") or {}
    if head.get("options"):
        validate_options("aggregator", head.get("name", "gem"), head["options"], where="[head] options of")


def _names(options: tuple[Option, ...]) -> list[str]:
    return [o.name for o in options]


def check_section(name: str, values: Any) -> None:
    """ConfigError unless ``values`` is a valid ``[name]`` section (known keys, typed values)."""
    check_settings(f"[{name}]", recipe_schema()[name], values)


def section(recipe: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Section ``name`` of ``recipe``, checked, with every setting it leaves out at its declared default."""
    given = recipe.get(name) or {}
    check_section(name, given)
    return {**{o.name: o.default for o in recipe_schema()[name]}, **given}


def recipe_path(recipe: Mapping[str, Any], value: str | os.PathLike) -> Path:
    """A path of the recipe (``~`` and ``$VARS`` expanded), relative ones from the recipe's folder."""
    p = Path(os.path.expandvars(str(value))).expanduser()
    return p if p.is_absolute() else Path(recipe.get(RECIPE_DIR, ".")) / p
