"""Unfrozen backbone blocks trained on a cached prefix: ``Backbone.split``, ``SuffixFeatures`` and the recipe path.

Why these checks: the cached-prefix path must be the re-reading path made fast, not a different
model — the split backbone computes the same function, a training step from the cache gives the
same loss and gradients as one from the images, a resumed run takes the same next step, and the
checkpoint (whose backbone weights carry the trained blocks) describes images through the pipeline
as the trainer's validation did. Tiny: 64×64 images, EfficientNet-Lite0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import synchronised_seasons
from vprkit.backbones import build_backbone
from vprkit.backbones.extract import extract
from vprkit.errors import ConfigError
from vprkit.images import FolderImages
from vprkit.training.checkpoint import checkpoint_config
from vprkit.training.features import CachedFeatures, ImageFeatures, SuffixFeatures
from vprkit.training.recipe import PREFIX_CACHE_SUFFIX, load_recipe, prepare, run_recipe, settings_from
from vprkit.training.trainer import Trainer, describe

# float32 caches make the cached path equal the re-reading one up to summation order.
TIGHT = 1e-4
# The pipeline folds BatchNorm into the convolutions: the same function, rounded differently.
FOLDED = 1e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture
def unfrozen_recipe(recipe_factory, tmp_path):
    """The tiny recipe (conftest) with the last ``unfreeze`` backbone blocks trained (at backbone_lr 0.001) on a float32
    cache of the frozen prefix (``cache_prefix = false``: images re-read), validated on frames 8-11, written as
    ``<name>.toml`` in ``tmp_path``; returns its path."""

    def make(unfreeze: int = 1, cache_prefix: bool = True, epochs: int = 2, name: str = "recipe") -> Path:
        if not (tmp_path / "data").is_dir():
            synchronised_seasons(tmp_path / "data", 12)
        recipe = recipe_factory(
            tmp_path,
            name="tiny-unfrozen",
            monitor=None,
            backbone={
                "unfreeze": unfreeze,
                "cache_dtype": "float32",
                "cache_prefix": cache_prefix,
                "cache": None,
                "memory_budget_mb": None,
            },
            data={"frames": [0, 8]},
            validation={"frames": [8, 12]},
            head={"options": {"out_channels": 3}},
            loss={"options": {"temperature": 0.1}},
            optimiser={"backbone_lr": 0.001},
            train={"epochs": epochs},
        )
        return recipe_factory.write(tmp_path / f"{name}.toml", recipe)

    return make


def _trainer(recipe: dict) -> Trainer:
    prep = prepare(recipe, progress=False)
    return Trainer(
        prep.head,
        prep.features,
        prep.places,
        settings_from(recipe),
        prep.validation,
        prep.train_ids,
        prep.extra_parameters,
        progress=False,
        monitor=prep.monitor,
    )


# ---- Backbone.split ---------------------------------------------------------------------------------


@pytest.mark.parametrize("last_blocks", [1, 3, 10])
def test_prefix_then_suffix_is_the_whole_backbone(last_blocks):
    torch.manual_seed(0)
    model = build_backbone("efficientnet-lite0", pretrained=False, trainable=True)
    for m in model.modules():  # non-trivial frozen statistics, so eval-mode BatchNorm matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    model.set_trainable(last_blocks=last_blocks).eval()
    prefix, suffix = model.split(last_blocks)
    assert len(suffix.blocks) == last_blocks and prefix.block == len(model.blocks) - last_blocks - 1
    assert (suffix.stride, suffix.dim) == (model.stride, model.dim)
    # The prefix is the backbone truncated there: the same identity, so its cache is keyed as one.
    truncated = build_backbone("efficientnet-lite0", pretrained=False, block=prefix.block)
    assert prefix.identity() == truncated.identity() and prefix.stride == truncated.stride
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    whole = model(x)
    with torch.no_grad():
        cached = prefix(x)
    split = suffix(cached)
    assert split.patches.shape == whole.patches.shape and split.image_size == whole.image_size
    assert torch.allclose(split.patches, whole.patches, rtol=0, atol=1e-5)
    # Gradients reach exactly the suffix's (shared) parameters.
    split.patches.square().mean().backward()
    trainable = {id(p) for p in suffix.parameters()}
    for p in model.parameters():
        assert (p.grad is not None) == (id(p) in trainable)


def test_split_refuses_what_it_cannot_do():
    model = build_backbone("efficientnet-lite0", pretrained=False, trainable=True)
    with pytest.raises(ConfigError, match="last_blocks ≥ 1"):
        model.split(0)
    with pytest.raises(ConfigError, match="keeps the stem and block 0"):
        model.split(len(model.blocks))
    with pytest.raises(ConfigError, match="optimised for inference"):
        build_backbone("efficientnet-lite0", pretrained=False).split(1)


# ---- the recipe path: same step as re-reading the images, resume, checkpoint ------------------------


def test_cached_prefix_step_equals_the_image_rereading_step(tmp_path, unfrozen_recipe):
    cached = _trainer(load_recipe(unfrozen_recipe(unfreeze=2)))
    reread = _trainer(load_recipe(unfrozen_recipe(unfreeze=2, cache_prefix=False, name="reread")))
    assert isinstance(cached.features, SuffixFeatures) and isinstance(reread.features, ImageFeatures)
    assert (tmp_path / "run" / f"features{PREFIX_CACHE_SUFFIX}2").is_dir()
    assert len(cached.extra_parameters) == len(reread.extra_parameters) > 0
    # Two optimiser groups: the head at lr, the unfrozen blocks at backbone_lr.
    assert [g["lr"] for g in cached.optimiser.param_groups] == [0.005, 0.001]
    ids = np.arange(4)
    key_ids = cached.features.ids([reread.features.keys[i] for i in ids])
    with torch.no_grad():
        assert rel_err(cached.features.batch(key_ids).patches, reread.features.batch(ids).patches) < TIGHT
    # The sampler draws ids of each source's own numbering; the same places, so the same images.
    for _ in range(2):
        a, b = cached.train_step(), reread.train_step()
        assert abs(a["loss"] - b["loss"]) <= TIGHT * abs(b["loss"])
        for p, q in zip(cached.extra_parameters, reread.extra_parameters):
            assert rel_err(p.grad, q.grad) < TIGHT
            assert rel_err(p.detach(), q.detach()) < TIGHT
        for p, q in zip(cached.head.parameters(), reread.head.parameters()):
            assert rel_err(p.grad, q.grad) < TIGHT


def test_cached_prefix_run_resumes_with_the_same_next_step(tmp_path, unfrozen_recipe):
    recipe = load_recipe(unfrozen_recipe(unfreeze=1))
    first = _trainer(recipe)
    first.train_step()
    first.save(tmp_path / "state.pt")
    expected = first.train_step()
    after = [p.detach().clone() for p in first.extra_parameters]
    resumed = _trainer(recipe).load(tmp_path / "state.pt")  # a fresh backbone: the blocks come from the file
    got = resumed.train_step()
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    for p, q in zip(resumed.extra_parameters, after):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)


def test_checkpoint_with_unfrozen_blocks_describes_images_as_the_trainer_validated(tmp_path, unfrozen_recipe):
    from vprkit import pipeline
    from vprkit.aggregation.options import AggregationOptions
    from vprkit.aggregation.vocabulary import make_aggregator

    path = unfrozen_recipe(unfreeze=2, epochs=1)  # one epoch: the best checkpoint is the last state
    s = run_recipe(path, progress=False)
    config = checkpoint_config(s["checkpoint"])
    assert Path(config.backbone_options["weights"]).is_file()
    # The trainer's side: the saved state on the cached prefix.
    recipe = load_recipe(path)
    trainer = _trainer(recipe).load(tmp_path / "run" / "last.pt")
    val = trainer.validation
    ids = np.concatenate([val.query_ids, val.database_ids])
    trained = describe(trainer.head, val.features, ids)
    # The pipeline's side: the checkpoint as a preset (folded backbone with the trained blocks), images read.
    backbone = pipeline.load_backbone(config)
    head = make_aggregator(AggregationOptions.from_config(config), backbone, None)
    keys = [val.features.keys[i] for i in ids]
    with torch.no_grad():
        piped = torch.cat(
            [head(f).float() for _, f in extract(backbone, config, FolderImages(tmp_path / "data", keys), keys)]
        )
    assert rel_err(piped, trained) < FOLDED
    # The untrained blocks describe differently: the checkpoint really carries the trained ones.
    plain = pipeline.load_backbone(
        config.replace(backbone_options={k: v for k, v in config.backbone_options.items() if k != "weights"})
    )
    with torch.no_grad():
        untrained = torch.cat(
            [head(f).float() for _, f in extract(plain, config, FolderImages(tmp_path / "data", keys), keys)]
        )
    assert rel_err(untrained, trained) > 10 * FOLDED
    # And the checkpoint builds a map and localises through the pipeline.
    info = pipeline.build_map(tmp_path / "data" / "summer", tmp_path / "map", config, progress=False)
    assert info["descriptor_dim"] == s["head_dim"]
    res = pipeline.localize(tmp_path / "map", [tmp_path / "data" / "summer" / "images-00010.png"], top_k=3)
    assert res[0].matches[0].key == "images-00010.png"


def test_suffix_features_sample_descriptors_of_the_suffix_output(tmp_path, unfrozen_recipe):
    prep = prepare(load_recipe(unfrozen_recipe(unfreeze=1)), progress=False)
    feats = prep.features
    assert isinstance(feats, SuffixFeatures) and isinstance(feats.cache, CachedFeatures)
    sample = feats.descriptor_sample(40, seed=0, ids=prep.train_ids)
    assert 0 < len(sample) <= 40 and sample.shape[1] == feats.dim and np.isfinite(sample).all()
    h, w = feats.grid
    with torch.no_grad():
        rows = feats.batch(prep.train_ids).patches.reshape(-1, feats.dim).numpy()
    # Every sampled descriptor is one of the suffix's output cells (not a cached prefix cell).
    assert all(np.abs(rows - s).max(axis=1).min() < 1e-5 for s in sample)


def test_runs_saved_before_backbone_lr_existed_still_resume(tmp_path, unfrozen_recipe):
    import json

    recipe = load_recipe(unfrozen_recipe(unfreeze=1))
    recipe["optimiser"] = {"lr": 0.005}  # no backbone_lr: one parameter group, as before the setting existed
    first = _trainer(recipe)
    first.train_step()
    state = first.state_dict()
    settings = json.loads(state["settings"])
    del settings["backbone_lr"]  # what an older version wrote
    state["settings"] = json.dumps(settings)
    torch.save(state, tmp_path / "old.pt")
    resumed = _trainer(recipe).load(tmp_path / "old.pt")
    assert resumed.step == 1 and len(resumed.optimiser.param_groups) == 1
