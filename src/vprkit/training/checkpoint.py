"""A trained checkpoint is a preset: ``best.ckpt`` (JSON: a Config dict) + ``best.head.pt`` (the head's state).

The checkpoint's Config names the ``trained`` aggregator with ``state`` relative to the checkpoint;
:func:`checkpoint_config` reads it (the JSON alone, no model is built) and makes ``state`` absolute,
so ``presets.resolve("./run/best.ckpt")`` can return it; :func:`register_checkpoint` registers it
under a name. :func:`add_pca` appends a PCA / whitening projection fitted on a sample of images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..aggregation.options import AggregationOptions
from ..aggregation.projection import Projection
from ..aggregation.vocabulary import make_aggregator
from ..backbones import build_backbone
from ..backbones.extract import extract, ignore_failures, sample_keys
from ..config import Config
from ..errors import ConfigError
from ..images import image_source
from ..io import atomic_write_json
from ..presets import register_preset

CHECKPOINT_SUFFIX = ".ckpt"
FORMAT = "vprkit-checkpoint"


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint file written by :func:`write_checkpoint`."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_config(path: str | os.PathLike) -> Config:
    """The :class:`Config` a checkpoint resolves to (its head state made an absolute path)."""
    p = Path(path)
    if not is_checkpoint(p):
        raise ConfigError(f"{p} is not a vprkit training checkpoint (a .ckpt file written by `vprkit train`)")
    d = json.loads(p.read_text())["config"]
    opts = dict(d.get("aggregator_options", {}))
    if opts.get("state") is not None and not Path(opts["state"]).is_absolute():
        opts["state"] = str((p.parent / opts["state"]).resolve())
    d["aggregator_options"] = opts
    return Config.from_dict(d)


def write_checkpoint(
    path: str | os.PathLike, config: Config, state_file: str | os.PathLike, info: dict[str, Any]
) -> Path:
    """Write ``path`` (JSON) naming ``state_file`` relative to it."""
    p = Path(path)
    rel = os.path.relpath(Path(state_file).resolve(), p.parent.resolve())
    d = config.to_dict()
    d["aggregator_options"] = {**d["aggregator_options"], "state": rel}
    atomic_write_json(p, {"format": FORMAT, "config": d, **info}, default=str)
    return p


def register_checkpoint(path: str | os.PathLike, name: str | None = None) -> Config:
    """Register a checkpoint as a named preset (default name: the checkpoint's run folder + file stem)."""
    config = checkpoint_config(path)
    p = Path(path).resolve()
    return register_preset(config.replace(name=name or f"{p.parent.name}/{p.stem}"))


def add_pca(
    checkpoint: str | os.PathLike,
    images,
    dim: int,
    whiten: bool = False,
    out: str | os.PathLike | None = None,
    sample: int = 2000,
    whiten_reg: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Append a PCA (``whiten``: whitened) projection to ``dim`` dims fitted on ≤ ``sample`` of ``images``.

    Writes ``out`` (default ``<stem>-pca<dim>[w].ckpt`` beside the checkpoint) and its head state.
    """
    src = Path(checkpoint)
    config = checkpoint_config(src)
    backbone = build_backbone(config.backbone, **dict(config.backbone_options))
    head = make_aggregator(AggregationOptions.from_config(config), backbone, None)
    source = image_source(images)
    keys = sample_keys(list(source.keys), sample, seed)
    descs = []
    for _, feats in extract(backbone, config, source, keys, progress and "add-pca", on_failure=ignore_failures):
        with torch.no_grad():
            descs.append(head(feats).float())
    x = torch.cat(descs)
    head.add_projection(Projection.from_pca(x, dim, whiten=whiten, whiten_reg=whiten_reg))
    suffix = f"-pca{head.dim}{'w' if whiten else ''}"
    out = Path(out) if out is not None else src.with_name(src.stem + suffix + CHECKPOINT_SUFFIX)
    state_file = out.with_suffix(".head.pt")
    torch.save(head.state_dict(), state_file)
    info = {k: v for k, v in json.loads(src.read_text()).items() if k not in ("format", "config")}
    info["pca"] = {"dim": head.dim, "whiten": whiten, "fitted_on": len(x), "from": src.name}
    name = config.name + suffix
    return write_checkpoint(
        out,
        config.replace(
            name=name, description=config.description + f"; PCA {head.dim}" + (" whitened" if whiten else "")
        ),
        state_file,
        info,
    )
