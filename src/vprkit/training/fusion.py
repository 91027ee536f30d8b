"""The fused (trained head + map VLAD) descriptor on the validation set, and its VLAD weight picked there.

A checkpoint with ``[head] vlad = {k, assignments, weight}`` concatenates the trained head with VLAD
over the *map's own* vocabulary (:class:`~vprkit.aggregation.projection.TrainedHead`); its cosine is
``weight·VLAD + (1 − weight)·head``. The trainer validates the head alone (the vocabulary belongs to
a map, not to the run), so how much the map VLAD should count is not something training sees. Here
the validation set plays the map: a vocabulary is fitted on its *database* images' cached features,
exactly as a map build fits one on the map's images (the same image / patch sampling rule,
:func:`~vprkit.aggregation.vocabulary.vocabulary_sample`, and the preset's seed and centre kind), and
the fused descriptor — the same ``TrainedHead`` module the checkpoint resolves to — is validated at each
candidate weight. ``weight = [w1, w2, …]`` in a recipe picks the best of them there (Recall@1, then
Recall@5, then the smaller VLAD weight), never on the set the run is judged on.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..aggregation.options import VocabularyOptions
from ..aggregation.projection import TrainedHead
from ..aggregation.vlad import Vocabulary, fit_vocabulary
from ..aggregation.vocabulary import vocabulary_sample
from ..config import Config
from ..errors import ConfigError
from .checkpoint import checkpoint_config, write_checkpoint
from .trainer import Validation, validate

# Database images per feature read when sampling the vocabulary's descriptors.
VOCABULARY_CHUNK = 128


def vlad_spec(vlad: Mapping[str, Any]) -> dict[str, Any]:
    """``[head] vlad`` checked: ``k`` ≥ 1 (None: the preset vocabulary's), ``assignments`` ≥ 1, ``weight`` one
    number or a list, each in (0, 1)."""
    unknown = sorted(set(vlad) - {"k", "assignments", "weight"})
    if unknown:
        raise ConfigError(f"[head] vlad has unknown keys {unknown}; known: k, assignments, weight")
    k, m = vlad.get("k"), vlad.get("assignments", 4)
    for name, v in (("k", k), ("assignments", m)):
        if name == "k" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"[head] vlad {name} must be a positive integer, got {v!r}")
    w = vlad.get("weight", 0.5)
    weights = list(w) if isinstance(w, (list, tuple)) else [w]
    if not weights:
        raise ConfigError("[head] vlad weight: give a number or a non-empty list of candidates")
    for x in weights:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 < float(x) < 1.0:
            raise ConfigError(f"[head] vlad weight must be in (0, 1), got {x!r}")
    if len(set(float(x) for x in weights)) != len(weights):
        raise ConfigError(f"[head] vlad weight candidates repeat: {weights}")
    return {
        "k": None if k is None else int(k),
        "assignments": int(m),
        "weights": [float(x) for x in weights],
        "chosen_on_validation": isinstance(w, (list, tuple)),
    }


def database_vocabulary(validation: Validation, config: Config, k: int) -> Vocabulary:
    """The vocabulary a map of the validation *database* would get: its images' descriptors, k-means K = ``k``.

    Same sampling as a map build (all patches of every image up to ``large_map_images``, above that
    AnyLoc's fraction of the images and every ``large_map_patch_step``-th patch), each descriptor
    L2-normalised, spherical k-means with the preset's vocabulary seed and centre kind.
    """
    vc = dataclasses.replace(config.vocabulary, k=int(k))
    ids, step = vocabulary_sample(list(np.asarray(validation.database_ids).tolist()), VocabularyOptions(vc))
    ids = np.asarray(ids, dtype=np.int64)
    parts = []
    with torch.no_grad():  # unfrozen blocks (SuffixFeatures) run here too, without building a graph
        for i in range(0, len(ids), VOCABULARY_CHUNK):
            p = validation.features.batch(ids[i : i + VOCABULARY_CHUNK]).patches[:, ::step, ::step]
            parts.append(p.reshape(-1, p.shape[-1]).float().cpu().numpy())
    sample = np.concatenate(parts)
    return fit_vocabulary(
        sample, vc.k, {"name": "validation-database", "n_images": int(len(ids))}, seed=vc.seed, centres=vc.centres
    )


def fused_head(
    config: Config, backbone_dim: int, vocabulary: Vocabulary, k: int, assignments: int, weight: float
) -> TrainedHead:
    """The module a checkpoint of ``config`` fused with map VLAD at ``weight`` resolves to (on ``vocabulary``)."""
    options = {key: v for key, v in config.aggregator_options.items() if key != "vlad"}
    return TrainedHead(
        backbone_dim, **options, vlad={"k": k, "assignments": assignments, "weight": weight}, vocabulary=vocabulary
    ).eval()


def fused_validation(
    config: Config, backbone_dim: int, validation: Validation, k: int, assignments: int, weights: Sequence[float]
) -> dict[float, dict[str, float]]:
    """Recall@N on ``validation`` of the checkpoint ``config``'s head fused with map VLAD, for each weight."""
    vocabulary = database_vocabulary(validation, config, k)
    return {
        float(w): validate(fused_head(config, backbone_dim, vocabulary, k, assignments, w), validation) for w in weights
    }


def pick_weight(recalls: Mapping[float, Mapping[str, float]]) -> float:
    """The best weight: highest Recall@1, then Recall@5, then the smaller VLAD weight."""
    return min(recalls, key=lambda w: (-recalls[w]["R@1"], -recalls[w].get("R@5", 0.0), w))


def fuse_checkpoint(
    checkpoint: str | os.PathLike, backbone_dim: int, validation: Validation, vlad: Mapping[str, Any]
) -> tuple[Path, dict[str, Any]]:
    """Validate ``checkpoint`` fused with map VLAD at each candidate weight; write ``<stem>-fused.ckpt`` at the best.

    The new checkpoint shares the head state; its config gains ``vlad`` (the picked weight) and the
    vocabulary size K the map build must fit. Returns it with what was measured (every weight's
    validation recalls, the picked weight and its Recall@1).
    """
    src = Path(checkpoint)
    config = checkpoint_config(src)
    spec = vlad_spec(vlad)
    spec["k"] = spec["k"] or config.vocabulary.k
    recalls = fused_validation(config, backbone_dim, validation, spec["k"], spec["assignments"], spec["weights"])
    w = pick_weight(recalls)
    v = {"k": spec["k"], "assignments": spec["assignments"], "weight": w}
    agg = {**config.aggregator_options, "vlad": v}
    fused = config.replace(
        name=config.name + "-fused",
        aggregator_options=agg,
        vocabulary=dataclasses.replace(config.vocabulary, k=spec["k"]),
        description=config.description + f" + VLAD K={spec['k']} ×{spec['assignments']} over the map's vocabulary "
        f"(weight {w}, picked on validation)",
    )
    measured = {
        "weights": {
            str(k): {n: round(float(r), 6) for n, r in rec.items() if n.startswith("R@")} for k, rec in recalls.items()
        },
        "weight": w,
        "R@1": float(recalls[w]["R@1"]),
        "k": spec["k"],
        "assignments": spec["assignments"],
        "vocabulary": "validation database (as a map build)",
    }
    info = {k: v for k, v in json.loads(src.read_text()).items() if k not in ("format", "config")}
    info["fused"] = {**measured, "from": src.name}
    state = config.aggregator_options["state"]
    out = write_checkpoint(src.with_name(src.stem + "-fused.ckpt"), fused, state, info)
    return out, measured
