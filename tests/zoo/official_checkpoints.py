"""A file in the official container and key layout, with seeded random weights, for every zoo preset.

The family tests (``test_cosplace.py`` …) rebuild the recorded fixtures' weights; this helper covers every
published variant, recorded or not, so that end-to-end tests can give each preset a checkpoint file. The
official key → shape list is derived without the official code:

1. vprkit's backbone and aggregator are built for the preset with random weights (``zoo`` removed) and
   their ``state_dict`` shapes read, as ``backbone.<name>`` / ``aggregator.<name>`` — what a layout yields;
2. the family's layout is inverted here (:data:`INVERSES`): vprkit's names → the official ones, plus what
   the official model holds and vprkit ignores (DINOv2's ``mask_token``, its final norm when unused);
3. the inversion is checked by running the family's own layout forward on meta tensors of the official
   shapes (:func:`check_inverse`: it must give back vprkit's names and shapes), and proved by loading the
   written file through ``presets.resolve(preset, weights=path)`` (a strict load); where a fixture was
   recorded from the official code its key → shape list must be ours (``test_zoo_end_to_end.py``).

Containers as the authors publish them: ``torch.save`` of a state dict (CosPlace, EigenPlaces, BoQ, MixVPR's
and SALAD's ``.ckpt``), ``safetensors`` (MegaLoc), hloc's NetVLAD ``.mat`` struct (:mod:`netvlad_mat`),
AnyLoc's ``c_centers.pt`` (a K×D tensor at AnyLoc's cache path; the DINOv2 ViT-G network it describes is
DINOv2's own checkpoint, see :func:`write_dinov2_hub_checkpoint`).
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anyloc_centres  # noqa: E402
import netvlad_mat  # noqa: E402
import seeded  # noqa: E402

from vprkit.aggregation.options import AggregationOptions  # noqa: E402
from vprkit.aggregation.vocabulary import make_aggregator  # noqa: E402
from vprkit.backbones import BACKBONES  # noqa: E402
from vprkit.config import Config  # noqa: E402
from vprkit.presets import resolve  # noqa: E402
from vprkit.zoo import LAYOUTS, anyloc, zoo_entry_of  # noqa: E402
from vprkit.zoo import netvlad as zoo_netvlad  # noqa: E402

Shapes = dict[str, tuple[int, ...]]
NETVLAD_CLUSTERS = 64  # Relja Arandjelović's released models (K = 64 on VGG16's 512-d conv5_3)
# GeM's p drawn at seeded's bias scale (≈ 0.05) would make GeM meaningless; CosPlace's fixture fixes it at 3
GEM_P = 3.0
# the official DINOv2 holds a mask token (1×D, training only); vprkit's module has none
MASK_TOKEN = "mask_token"


# ---- 1. vprkit's names and shapes ------------------------------------------------------------------


def _without_zoo(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in ("zoo", "weights")}


def vprkit_modules(config: Config, **backbone_changes: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The preset's backbone and aggregator with random weights (no file read), before any inference folding."""
    backbone = BACKBONES.get(config.backbone)(
        **{**_without_zoo(config.backbone_options), "pretrained": False, **backbone_changes}
    )
    options = _without_zoo(config.aggregator_options)
    if config.aggregator == "netvlad":  # sized from the file in the zoo: the released K
        options["k"] = NETVLAD_CLUSTERS
    aggregator = make_aggregator(
        AggregationOptions.from_config(config.replace(aggregator_options=options)), backbone, None
    )
    return backbone, aggregator


def vprkit_shapes(preset: str) -> Shapes:
    """``backbone.<name>`` / ``aggregator.<name>`` → shape: what the preset's zoo layout must produce."""
    return dict(_vprkit_shapes(preset))


@functools.lru_cache(maxsize=None)
def _vprkit_shapes(preset: str) -> Shapes:
    config = resolve(preset)
    backbone, aggregator = vprkit_modules(config, **_dinov2_full(config))
    out = {}
    for part, module in (("backbone", backbone), ("aggregator", aggregator)):
        for name, tensor in module.state_dict().items():
            if not name.endswith("_extra_state"):
                out[f"{part}.{name}"] = tuple(tensor.shape)
    if config.aggregator == "netvlad":  # the released whitening: K·D → the published descriptor size
        vlad_dim = int(np.prod(out["aggregator.layer.centroids"]))
        out["aggregator.wpca.weight"] = (zoo_netvlad.OUTPUT_DIM, vlad_dim)
        out["aggregator.wpca.bias"] = (zoo_netvlad.OUTPUT_DIM,)
    return out


def _dinov2_full(config: Config) -> dict[str, Any]:
    """A DINOv2 zoo backbone built whole (every block, the final norm): the hub model's parameters."""
    if not config.backbone.startswith("dinov2"):
        return {}
    return {"facet": "token", "final_norm": True}


# ---- 2. the inverse layouts -------------------------------------------------------------------------


def _prefixed(shapes: Mapping[str, Any], prefixes: Mapping[str, str]) -> dict[str, Any]:
    """Each key's first matching prefix replaced (the inverse of ``vprkit.zoo.renamed``); others kept."""
    out = {}
    for key, value in shapes.items():
        for old, new in prefixes.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def _with_hub_extras(shapes: Mapping[str, Any], backbone_prefix: str) -> dict[str, Any]:
    """The hub DINOv2's ``mask_token`` (1×D), which the official state dicts hold and vprkit ignores."""
    embed_dim = shapes[backbone_prefix + "cls_token"][-1]
    return {**shapes, backbone_prefix + MASK_TOKEN: (1, embed_dim)}


_RESNET_NAMES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
_RESNET_SEQUENTIAL = ("0", "1", "4", "5", "6", "7")  # nn.Sequential(conv1, bn1, relu, maxpool, layer1..)


def _resnet_sequential(prefix: str) -> dict[str, str]:
    return {f"backbone.{n}.": f"{prefix}{i}." for n, i in zip(_RESNET_NAMES, _RESNET_SEQUENTIAL)}


def _cosplace_resnet(shapes: Shapes) -> Shapes:
    return _prefixed(
        shapes,
        {**_resnet_sequential("backbone."), "aggregator.fc.": "aggregation.3.", "aggregator.": "aggregation.1."},
    )


def _cosplace_vgg16(shapes: Shapes) -> Shapes:
    return _prefixed(
        shapes, {"backbone.features.": "backbone.", "aggregator.fc.": "aggregation.3.", "aggregator.": "aggregation.1."}
    )


def _boq_resnet(shapes: Shapes) -> Shapes:
    return _prefixed(shapes, _resnet_sequential("backbone.net."))


def _boq_dinov2(shapes: Shapes) -> Shapes:
    return _with_hub_extras(_prefixed(shapes, {"backbone.": "backbone.dino."}), "backbone.dino.")


_MIXER = re.compile(r"^aggregator\.mixers\.(\d+)\.(norm|fc1|fc2)\.")
_MIXER_POSITIONS = {"norm": "0", "fc1": "1", "fc2": "3"}  # FeatureMixerLayer.mix = (LayerNorm, Linear, ReLU, Linear)


def _mixvpr(shapes: Shapes) -> Shapes:
    out = {}
    for key, shape in _prefixed(shapes, {"backbone.": "backbone.model."}).items():
        match = _MIXER.match(key)
        if match:
            key = f"aggregator.mix.{match.group(1)}.mix.{_MIXER_POSITIONS[match.group(2)]}." + key[match.end() :]
        out[key] = shape
    return out


# SALAD's official MLPs: token_features (Linear, ReLU, Linear), cluster_features and score (1×1 Conv2d,
# Dropout, ReLU, 1×1 Conv2d): vprkit's hidden / out parts at these positions; the convs hold 4-d kernels
_SALAD_MLPS = {"token_features": ("0", "2", False), "cluster_features": ("0", "3", True), "score": ("0", "3", True)}
_SALAD_KEY = re.compile(
    r"^(aggregator\.(?:agg\.)?)(token_features|cluster_features|score)\.(hidden|out)\.(weight|bias)$"
)


def _salad_head(shapes: Shapes) -> Shapes:
    out = {}
    for key, shape in shapes.items():
        match = _SALAD_KEY.match(key)
        if match:
            prefix, mlp, part, leaf = match.groups()
            hidden, last, conv = _SALAD_MLPS[mlp]
            key = f"{prefix}{mlp}.{hidden if part == 'hidden' else last}.{leaf}"
            if conv and leaf == "weight":
                shape = (*shape, 1, 1)
        elif key.endswith(".dustbin"):
            key = key.removesuffix("dustbin") + "dust_bin"
        out[key] = shape
    return out


def _salad(shapes: Shapes) -> Shapes:
    return _with_hub_extras(_salad_head(_prefixed(shapes, {"backbone.": "backbone.model."})), "backbone.model.")


def _megaloc(shapes: Shapes) -> Shapes:
    return _salad_head(
        _prefixed(shapes, {"aggregator.projection.": "aggregator.linear.", "aggregator.": "aggregator.agg."})
    )


def _netvlad_hloc(shapes: Shapes) -> Shapes:
    """vprkit's names → hloc's module names (what :mod:`netvlad_mat` writes as the MATLAB struct)."""
    out = _prefixed({k: v for k, v in shapes.items() if k.startswith("backbone.")}, {"backbone.features.": "backbone."})
    k, d = shapes["aggregator.layer.centroids"]
    out["netvlad.score_proj.weight"] = (k, d, 1)  # hloc's Conv1d(D, K, 1)
    out["netvlad.centers"] = (d, k)
    out["whiten.weight"] = shapes["aggregator.wpca.weight"]
    out["whiten.bias"] = shapes["aggregator.wpca.bias"]
    return out


INVERSES: dict[str, Callable[[Shapes], Shapes]] = {
    "cosplace-resnet": _cosplace_resnet,
    "cosplace-vgg16": _cosplace_vgg16,
    "boq-resnet": _boq_resnet,
    "boq-dinov2": _boq_dinov2,
    "mixvpr-resnet": _mixvpr,
    "salad": _salad,
    "megaloc": _megaloc,
    "netvlad-mat": _netvlad_hloc,
}


def _entry(preset: str):
    entry = zoo_entry_of(resolve(preset))
    if entry is None:
        raise ValueError(f"{preset} is not a zoo preset")
    return entry


def official_shapes(preset: str) -> Shapes:
    """The official checkpoint's key → shape list for ``preset`` (for ``netvlad-*``: hloc's module names,
    which :mod:`netvlad_mat` turns into the MATLAB struct; for ``anyloc-*``: ``c_centers``)."""
    entry = _entry(preset)
    if entry.layout == "anyloc-vocabulary":
        return {"c_centers": (anyloc.NUM_CLUSTERS, anyloc.EMBED_DIM)}
    return INVERSES[entry.layout](vprkit_shapes(preset))


def check_inverse(preset: str) -> None:
    """The family's own layout, run on meta tensors of :func:`official_shapes`, must give back vprkit's
    names and shapes (the parts vprkit ignores — DINOv2's mask token, an unused final norm — aside)."""
    entry = _entry(preset)
    if entry.format != "torch" and entry.format != "safetensors":
        return  # the .mat and the vocabulary are proved by loading the written file
    official = {k: torch.empty(s, device="meta") for k, s in official_shapes(preset).items()}
    converted = {k: tuple(v.shape) for k, v in LAYOUTS.get(entry.layout)(official).items()}
    wanted = vprkit_shapes(preset)
    ignored = {k for k in converted if k not in wanted and k.rsplit(".", 1)[-1] == MASK_TOKEN}
    assert {k: v for k, v in converted.items() if k not in ignored} == wanted, preset


# ---- 3. the files ------------------------------------------------------------------------------------


def official_weights(preset: str, seed: int = 0, shapes: Shapes | None = None) -> dict[str, np.ndarray]:
    """Seeded random weights under the official names (``shapes``: :func:`official_shapes` unless given)."""
    shapes = official_shapes(preset) if shapes is None else shapes
    entry = _entry(preset)
    if entry.layout == "netvlad-mat":
        return netvlad_mat.seeded_netvlad_weights(shapes, seed)
    overrides = {k: GEM_P for k in shapes if entry.layout.startswith("cosplace") and k == "aggregation.1.p"}
    return seeded.seeded_state_dict(shapes, seed, overrides=overrides)


def write_official_checkpoint(preset: str, folder: Path, seed: int = 0, whiten_dim: int | None = None) -> Path:
    """``preset``'s checkpoint in the official container, key names and file name, with seeded random weights.

    ``anyloc-*``: AnyLoc's ``c_centers.pt`` at AnyLoc's cache path below ``folder`` (pass ``folder`` or the
    file as the vocabulary). ``whiten_dim`` (``netvlad-*`` only) writes a smaller WPCA than the released
    4096 outputs — the aggregator sizes itself from the file — so tests need not write a 600 MB ``.mat``.
    """
    entry = _entry(preset)
    folder = Path(folder)
    path = folder / entry.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry.layout == "anyloc-vocabulary":
        torch.save(torch.from_numpy(anyloc_centres.seeded_centres(anyloc.NUM_CLUSTERS, anyloc.EMBED_DIM, seed)), path)
        return path
    shapes = official_shapes(preset)
    if whiten_dim is not None and entry.layout == "netvlad-mat":
        shapes["whiten.weight"] = (whiten_dim, shapes["whiten.weight"][1])
        shapes["whiten.bias"] = (whiten_dim,)
    weights = official_weights(preset, seed, shapes)
    if entry.format == "mat":
        return netvlad_mat.write_netvlad_mat(path, weights)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    if entry.format == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def write_dinov2_hub_checkpoint(path: Path, config: Mapping[str, Any], name: str, seed: int = 0) -> Path:
    """A DINOv2 hub-layout ``.pth`` (the ``dinov2_vit*14_pretrain.pth`` container: a state dict with the hub's
    names, ``mask_token`` included) for the ViT ``name`` with :class:`ViTConfig` overrides ``config`` (tiny
    stand-ins for ViT-G in tests)."""
    last = int(config["depth"]) - 1
    backbone = BACKBONES.get(name)(pretrained=False, layer=last, facet="token", final_norm=True, config=dict(config))
    shapes = _with_hub_extras({k: tuple(v.shape) for k, v in backbone.state_dict().items()}, "")
    weights = seeded.seeded_state_dict(shapes, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    return path
