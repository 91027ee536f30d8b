"""``[head] members = N``: N heads trained independently (seeds ``seed … seed + N − 1``), one ensemble preset.

Each member is an ordinary run of the same recipe in ``<out>/member<i>/`` (its own ``last.pt`` to
resume from, its own checkpoint picked on the validation set as a single head's is, its own
curves), with ``[train] seed = seed + i`` and the run's feature cache shared. The run's checkpoint
``<out>/best.ckpt`` (+ ``best.head.pt``) is then an ``ensemble`` aggregator
(:mod:`vprkit.aggregation.ensemble`) of the members' picked heads: their L2-normalised descriptors,
each scaled by ``1/√N``, concatenated — the ensemble's cosine is the mean of the members' cosines.
It is a preset like any checkpoint (``map build --preset RUN/best.ckpt``, ``localize``, ``eval``).
The ensemble is measured on the validation set (and the monitored set) once, after its members.

Members differ by their seed (batch order; random layers start differently). A layout head starts
as a *deterministic* truncated identity, so two half-width layout members would start on the same
channels; ``[head] member_init = "split"`` starts member ``i`` on slice ``i`` of N of the backbone's
channels instead (``[head] start_slice``, :func:`vprkit.training.heads.start_on_slice`).

A ``[post] pca = D`` step is fitted on the ensemble's output (over the cached training images),
as for one head: e.g. two full-width members reduced back to the budget. ``members = 1`` is a
plain run (a ``trained`` checkpoint). Combinations that cannot work are refused before training
(:func:`check_members`).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..aggregation.ensemble import Ensemble
from ..errors import ConfigError
from .checkpoint import checkpoint_config, write_checkpoint
from .heads import PARAMETERLESS_HEADS, SLICED_HEADS
from .preparation import prepare
from .run import check_post, post_train, run_single
from .sections import MEMBER_INITS, check_recipe, recipe_path, section
from .trainer import MONITOR_PREFIX, validate

__all__ = [
    "MEMBER_INITS",
    "MEMBER_PREFIX",
    "check_members",
    "ensemble_members",
    "member_init",
    "member_recipe",
    "run_ensemble",
]

MEMBER_PREFIX = "member"


def ensemble_members(recipe: Mapping[str, Any]) -> int:
    """``[head] members`` (default 1: one head), a whole number ≥ 1 as the ``[head]`` schema checks."""
    return int(section(recipe, "head")["members"])


def member_init(recipe: Mapping[str, Any]) -> str:
    """``[head] member_init`` (default "same"; :data:`~vprkit.training.sections.MEMBER_INITS`), checked."""
    return str(section(recipe, "head")["member_init"])


def check_members(recipe: Mapping[str, Any]) -> int:
    """``[head] members`` and the options it cannot go with — checked before training, so a typo costs no run."""
    n = ensemble_members(recipe)
    init = member_init(recipe)
    h = section(recipe, "head")
    name = h["name"]
    if init == "split" and name not in SLICED_HEADS:
        raise ConfigError(
            f"[head] member_init = 'split' starts each member on its own slice of the backbone's "
            f"channels: for {', '.join(SLICED_HEADS)} heads, not {name!r}"
        )
    if init == "split" and h.get("start_slice") is not None:
        raise ConfigError("[head] member_init = 'split' gives each member its start_slice: give one or the other")
    if n == 1:
        return n
    if name in PARAMETERLESS_HEADS and not h.get("projection"):
        raise ConfigError(
            f"[head] members = {n} with head {name!r}: it learns nothing, so its members would be "
            f"identical; give it a projection or train one head"
        )
    if h.get("vlad"):
        raise ConfigError(
            f"[head] members = {n} cannot be combined with [head] vlad (each member would carry its own "
            f"copy of the map's VLAD); ensemble the heads alone"
        )
    if section(recipe, "backbone")["unfreeze"]:
        raise ConfigError(
            f"[head] members = {n} needs a frozen backbone ([backbone] unfreeze = 0): a preset has one "
            f"backbone, and each member would train its own blocks"
        )
    if section(recipe, "validation")["refit"]:
        raise ConfigError(
            f"[head] members = {n} cannot be combined with [validation] refit = true (the ensemble is "
            f"measured on the held-out frames, which a refit trains on)"
        )
    if section(recipe, "post")["centre"]:
        raise ConfigError(f"[head] members = {n}: [post] centre is for one head; use [post] pca = D on the ensemble")
    return n


def member_recipe(recipe: Mapping[str, Any], i: int) -> dict[str, Any]:
    """Member ``i``'s recipe: the run's, in ``<out>/member<i>``, seed ``seed + i``, the run's cache, no ``[post]``."""
    r = copy.deepcopy({k: v for k, v in recipe.items() if k != "post"})
    out = recipe_path(recipe, recipe.get("out") or "run")
    h = dict(r.get("head") or {})
    n = ensemble_members(recipe)
    h.pop("members", None)
    if h.pop("member_init", "same") == "split":
        h["start_slice"] = [i, n]
    r["head"] = h
    r["name"] = f"{recipe.get('name') or out.name}-{MEMBER_PREFIX}{i}"
    r["out"] = str(out / f"{MEMBER_PREFIX}{i}")
    b = dict(r.get("backbone") or {})
    b["cache"] = str(recipe_path(recipe, b["cache"])) if b.get("cache") else str(out / "features")
    r["backbone"] = b
    train = dict(r.get("train") or {})
    train["seed"] = int(train.get("seed", 0)) + i
    r["train"] = train
    return r


def _ensemble_config(recipe: Mapping[str, Any], name: str, first, saved: dict, n: int, dim: int, seed: int):
    """The ensemble's preset: the first member's settings with the ``ensemble`` aggregator over all members."""
    description = recipe.get("description") or (
        f"ensemble of {n} trained {first.aggregator_options.get('head')} heads on {first.backbone} "
        f"({dim}-d, seeds from {seed}), from `vprkit train`"
    )
    return first.replace(
        name=name, aggregator="ensemble", aggregator_options={"members": saved}, description=description
    )


def run_ensemble(
    recipe: Mapping[str, Any], resume: bool = True, progress: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train ``[head] members`` heads (each resumable, each picked on validation), then write the ensemble preset."""
    check_recipe(recipe)
    if recipe.get("post"):  # fitted on the ensemble after its members: checked before they train
        check_post(dict(recipe["post"]))
    n = check_members(recipe)
    seed = int(section(recipe, "train")["seed"])
    out = recipe_path(recipe, recipe.get("out") or "run")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    members = []
    for i in range(n):
        log(f"ensemble member {i + 1}/{n} (seed {seed + i})")
        members.append(run_single(member_recipe(recipe, i), resume=resume, progress=progress, log=log))
    t1 = time.perf_counter()
    # The features (validation, monitor, training images for [post]) of the run itself: the members' shared cache.
    base = {
        **member_recipe(recipe, 0),
        "name": recipe.get("name") or out.name,
        "out": str(out),
        "train": dict(recipe.get("train") or {}),
    }
    prepared = prepare(base, progress=progress, log=log, with_head=False)
    configs = [checkpoint_config(s["checkpoint"]) for s in members]
    specs = {
        f"{MEMBER_PREFIX}{i}": {"aggregator": c.aggregator, "options": dict(c.aggregator_options)}
        for i, c in enumerate(configs)
    }
    ensemble = Ensemble(prepared.features.dim, members=specs).eval()
    state = out / "best.head.pt"
    torch.save(ensemble.state_dict(), state)
    record: dict[str, Any] = {"epoch": [int(s["best"]["epoch"]) for s in members]}
    if prepared.validation is not None:
        rec = validate(ensemble, prepared.validation)
        record.update({f"R@{k}": rec[f"R@{k}"] for k in prepared.validation.ns})
    if prepared.monitor is not None:  # recorded only, never picks
        rec = validate(ensemble, prepared.monitor)
        record.update({f"{MONITOR_PREFIX}R@{k}": rec[f"R@{k}"] for k in prepared.monitor.ns})
    # The members' checkpoints hold their states; the ensemble's holds them all (its members name none).
    saved = {
        k: {"aggregator": v["aggregator"], "options": {o: x for o, x in v["options"].items() if o != "state"}}
        for k, v in specs.items()
    }
    name = recipe.get("name") or out.name
    config = _ensemble_config(recipe, name, configs[0], saved, n, int(ensemble.dim), seed)
    info = {
        "validation": {k: v for k, v in record.items() if k.startswith("R@")},
        "epoch": record["epoch"],
        "head_dim": int(ensemble.dim),
        "members": [
            {"checkpoint": str(Path(s["checkpoint"]).relative_to(out)), "seed": seed + i, "best": s["best"]}
            for i, s in enumerate(members)
        ],
        "train": prepared.info,
    }
    checkpoint = write_checkpoint(out / "best.ckpt", config, state, info)
    head_dim = int(ensemble.dim)
    extra: dict[str, Any] = {}
    post = dict(recipe.get("post") or {})
    if post:
        extra["trained_checkpoint"] = str(checkpoint)
        checkpoint, head_dim = post_train(prepared, checkpoint, post)
    seconds = sum(float(s["train_seconds"]) for s in members) + (time.perf_counter() - t1)
    log(f"ensemble of {n}: " + "  ".join(f"{k} {v:.3f}" for k, v in record.items() if isinstance(v, float)))
    summary = {
        "name": name,
        "checkpoint": str(checkpoint),
        "best": record,
        "history": [],
        "members": [{k: s[k] for k in ("checkpoint", "best", "history", "train_seconds", "head_dim")} for s in members],
        "train_seconds": round(seconds, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "head_dim": head_dim,
        **extra,
        **prepared.info,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
