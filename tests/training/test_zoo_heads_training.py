"""The zoo's heads (SALAD, BoQ, CosPlace's gem-fc, MixVPR) trained by ``vprkit train`` on zoo-style backbones.

Why: issue 28 asks that every zoo head be a registered aggregator trainable like the others, and that
training a head on a zoo backbone work. Each case trains a few steps through the recipe path (the
backbone of a zoo preset, made tiny and random: a 3-block DINOv2 ViT for SALAD and BoQ-DINOv2, a
ResNet-18 for gem-fc and the ResNet BoQ and MixVPR), builds a map with the checkpoint and localises
one image. SALAD also reads DINOv2's CLS token, so its features must carry it: the feature cache keeps
the global tokens, a cache written before it did is refused in one line, and the last blocks of a
split DINOv2 train on the cached prefix (patch tokens + CLS token).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import synchronised_seasons
from vprkit.backbones import build_backbone
from vprkit.errors import ConfigError
from vprkit.training.checkpoint import checkpoint_config
from vprkit.training.features import GLOBAL_TOKENS_FILE, GLOBAL_TOKENS_KEY, META_FILE, CachedFeatures, SuffixFeatures
from vprkit.training.heads import check_features
from vprkit.training.recipe import prepare, run_recipe, settings_from
from vprkit.training.trainer import Trainer

FRAMES = 16
TINY_VIT = {"embed_dim": 48, "depth": 3, "num_heads": 4, "pos_grid": 4}
# A tiny random DINOv2 in the SALAD / BoQ-DINOv2 presets' place: the last block's tokens, at 56×56 (4×4 patches).
DINO = {
    "preset": "dinov2-cls-vits14",
    "image_size": [56, 56],
    "options": {"layer": TINY_VIT["depth"] - 1, "pretrained": False, "config": TINY_VIT},
}
# A random ResNet-18 in the CosPlace / BoQ-R50 / MixVPR presets' place: the zoo entry off, its weights a seeded
# random file (RESNET_WEIGHTS, written by the fixture), so that the map build and the query read the same network.
# CosPlace reads images at their own size (64×64 here), so no memory budget: the map build's plan would assume
# the largest image size.
RESNET_WEIGHTS = "resnet18-random.pth"
RESNET = {"preset": "cosplace-r18-32", "image_size": [64, 64], "memory_budget_mb": None, "options": {"zoo": None}}
RESNET_L3 = {**RESNET, "options": {**RESNET["options"], "cut": "layer3"}}
BOQ = {"proj_channels": 16, "num_queries": 4, "num_layers": 1, "row_dim": 2}
# case → (backbone section, head, head options): small heads, so that each run takes a few seconds
CASES = {
    "salad": (DINO, "salad", {"num_clusters": 4, "cluster_dim": 8, "token_dim": 8}),
    "boq-dinov2": (DINO, "boq", BOQ),
    "boq-r50": (RESNET_L3, "boq", BOQ),
    "gem-fc": (RESNET, "gem-fc", {"out_dim": 8}),
    "mixvpr": (RESNET_L3, "mixvpr", {"depth": 1, "out_channels": 8, "out_rows": 2}),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo-heads")
    synchronised_seasons(root / "data", FRAMES)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(build_backbone("resnet18", trainable=True, pretrained=False).state_dict(), root / RESNET_WEIGHTS)
    return root


def _recipe(recipe_factory, root: Path, case: str, backbone: dict | None = None, **sections) -> dict:
    """The tiny recipe (conftest) training ``case``'s head for one epoch on frames 0–11, validated on 12–15."""
    base, head, options = CASES[case]
    if base["options"].get("zoo", "") is None:  # a ResNet: the seeded random weights
        base = {**base, "options": {**base["options"], "weights": str(root / RESNET_WEIGHTS)}}
    return recipe_factory(
        root,
        name=f"tiny-{case}",
        out=f"run-{case}",
        monitor=None,
        backbone={**base, "cache": str(root / f"cache-{case}"), **(backbone or {})},
        data={"frames": [0, 12]},
        validation={"frames": [12, FRAMES]},
        head={"name": head, "options": options},
        train={"epochs": 1},
        **sections,
    )


@pytest.mark.parametrize("case", list(CASES))
def test_zoo_head_trains_builds_a_map_and_localises(data, recipe_factory, case):
    from vprkit import pipeline

    summary = run_recipe(_recipe(recipe_factory, data, case), progress=False, log=lambda _: None)
    config = checkpoint_config(summary["checkpoint"])
    assert config.aggregator == "trained" and config.aggregator_options["head"] == CASES[case][1]
    info = pipeline.build_map(data / "data" / "summer", data / f"map-{case}", config, progress=False)
    assert info["descriptor_dim"] == summary["head_dim"]
    res = pipeline.localize(data / f"map-{case}", [data / "data" / "summer" / "images-00003.png"], top_k=3)
    assert len(res[0].matches) == 3 and res[0].matches[0].key == "images-00003.png"


def test_the_cache_keeps_the_cls_token_and_an_older_cache_is_refused_for_salad(data, recipe_factory):
    recipe = _recipe(recipe_factory, data, "salad")
    prep = prepare(recipe, progress=False)
    cache = prep.features
    assert isinstance(cache, CachedFeatures) and cache.missing_global_tokens() is None
    with torch.no_grad():
        whole = prep.backbone(torch.rand(1, 3, 56, 56))
    batch = cache.batch([2, 0])
    assert batch.global_token.shape == (2, whole.dim) and batch.global_token.dtype == torch.float32
    assert np.allclose(batch.global_token[1].numpy(), cache.batch([0]).global_token[0].numpy())
    mapped = CachedFeatures(cache.root, max_ram_bytes=1)  # too big for the budget: rows read from the memory maps
    assert not mapped.in_memory and torch.equal(mapped.batch([2, 0]).global_token, batch.global_token)
    # A cache written before the tokens were kept (no record in meta.json, no file) still serves other heads.
    root = Path(cache.root)
    meta = json.loads((root / META_FILE).read_text())
    meta.pop(GLOBAL_TOKENS_KEY)
    (root / META_FILE).write_text(json.dumps(meta))
    (root / GLOBAL_TOKENS_FILE).unlink()
    old = CachedFeatures(root)
    assert old.batch([0]).global_token is None and old.batch([0]).patches.shape == batch.patches[:1].shape
    check_features("boq", old)
    with pytest.raises(ConfigError, match="delete it to rebuild it") as err:
        check_features("salad", old)
    assert "\n" not in str(err.value)


def test_salad_with_the_last_dinov2_block_unfrozen_trains_on_the_cached_prefix(data, recipe_factory):
    recipe = _recipe(
        recipe_factory,
        data,
        "salad",
        backbone={"unfreeze": 1, "cache": str(data / "cache-unfrozen")},
        optimiser={"backbone_lr": 0.001},
    )
    prep = prepare(recipe, progress=False)
    assert isinstance(prep.features, SuffixFeatures) and prep.features.missing_global_tokens() is None
    assert prep.info["cached_prefix"]["layer"] == TINY_VIT["depth"] - 2
    last, first = prep.backbone.blocks[-1].mlp.fc2.weight, prep.backbone.blocks[0].mlp.fc2.weight
    before, frozen = last.detach().clone(), first.detach().clone()
    trainer = Trainer(
        prep.head,
        prep.features,
        prep.places,
        settings_from(recipe),
        prep.validation,
        prep.train_ids,
        prep.extra_parameters,
        progress=False,
    )
    trainer.fit(max_steps=2)
    assert not torch.equal(before, last.detach()) and torch.equal(frozen, first.detach())


@pytest.mark.parametrize("case", ["salad", "gem-fc"])
def test_unfrozen_dinov2_or_resnet_blocks_are_saved_and_a_map_reads_them(data, recipe_factory, case):
    """SALAD's own recipe trains DINOv2's last blocks; CosPlace's the ResNet's: the checkpoint must carry them."""
    from vprkit import pipeline
    from vprkit.presets import resolve

    recipe = _recipe(
        recipe_factory,
        data,
        case,
        backbone={"unfreeze": 1, "cache": str(data / f"cache-unfrozen-save-{case}")},
        optimiser={"backbone_lr": 0.01},
    )
    recipe["out"] = str(data / f"run-unfrozen-{case}")
    summary = run_recipe(recipe, progress=False, log=lambda _: None)
    config = checkpoint_config(summary["checkpoint"])
    saved = config.backbone_options["weights"]
    assert Path(saved).is_file() and config.backbone_options.get("zoo") is None
    trained = torch.load(saved, weights_only=True)
    loaded = build_backbone(config.backbone, **dict(config.backbone_options)).state_dict()
    differs = [k for k in trained if k in loaded and not torch.equal(trained[k], loaded[k])]
    # the inference graph may fold BatchNorm into the convolutions: compare a trainable build then
    if differs:
        loaded = build_backbone(config.backbone, trainable=True, **dict(config.backbone_options)).state_dict()
        differs = [k for k in trained if not torch.equal(trained[k], loaded[k])]
    assert not differs, differs[:3]
    info = pipeline.build_map(data / "data" / "summer", data / f"map-unfrozen-{case}", resolve(config), progress=False)
    assert info["descriptor_dim"] == summary["head_dim"]
    res = pipeline.localize(data / f"map-unfrozen-{case}", [data / "data" / "summer" / "images-00005.png"], top_k=2)
    assert res[0].matches[0].key == "images-00005.png"
