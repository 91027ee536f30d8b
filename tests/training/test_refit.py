"""``[validation] refit = true``: the epoch count picked on the holdout, retrained from scratch on the whole
training range (holdout and gap returned), same seed and schedule; ``refit.ckpt`` is the run's preset.

Fast: 64×64 synthetic seasons through EfficientNet-Lite0 (cached once per test), a layout head, 2–3 epochs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import synchronised_seasons
from vprkit.errors import ConfigError
from vprkit.training.checkpoint import checkpoint_config, is_checkpoint
from vprkit.training.recipe import (
    prepare,
    refit_recipe,
    refit_run,
    run_recipe,
    settings_from,
    split_holdout,
    wants_refit,
)
from vprkit.training.trainer import MONITOR_PREFIX, Trainer


@pytest.fixture
def refit_recipe_of(recipe_factory):
    """The tiny recipe (conftest) picked on a 4-frame holdout (gap 2) and refitted, ``epochs`` long;
    ``**validation`` changes ``[validation]``."""

    def make(root: Path, out: str = "run", epochs: int = 3, **validation) -> dict:
        return recipe_factory(
            root,
            name="refit-run",
            out=out,
            train={"epochs": epochs},
            validation={"holdout": 4, "gap": 2, "refit": True, **validation},
        )

    return make


def _frame(key: str) -> int:
    return int(Path(key).stem.split("-")[1])


@pytest.fixture
def data(tmp_path):
    synchronised_seasons(tmp_path / "data", 24)
    return tmp_path


def test_refit_trains_on_the_whole_range_for_the_picked_epochs_and_is_the_preset(data, refit_recipe_of):
    from vprkit import pipeline

    r = refit_recipe_of(data)
    s = run_recipe(r, progress=False)
    run = data / "run"
    picked = s["best"]["epoch"]
    assert Path(s["checkpoint"]) == run / "refit.ckpt" and Path(s["picked_checkpoint"]) == run / "best.ckpt"
    for f in ("refit.ckpt", "refit.head.pt", "refit.last.pt", "refit.history.json", "refit.curves.png", "best.ckpt"):
        assert (run / f).is_file(), f
    # The picked run trained on frames 0-9 (12-15 held out, 10-11 the gap); the refit on all of 0-15.
    assert s["train_places"] == 10 and s["refit"]["train_places"] == 16 and s["refit"]["train_images"] == 32
    union = prepare(refit_recipe(r), progress=False)
    assert {_frame(union.features.keys[i]) for i in union.train_ids} == set(range(16))
    assert union.validation is None and union.monitor is not None
    # Exactly the picked number of epochs, each of the union's steps (16 places / 4 per batch), monitored only.
    hist = json.loads((run / "refit.history.json").read_text())
    assert len(hist) == picked == s["refit"]["picked_epoch"] == s["refit"]["epochs"]
    assert s["refit"]["steps"] == picked * 4 and [h["step"] for h in hist] == [4 * (i + 1) for i in range(picked)]
    assert all(h["refit"] and f"{MONITOR_PREFIX}R@1" in h and "R@1" not in h for h in hist)
    # The checkpoint records what was refitted and from which pick; it is a preset that builds a map.
    info = json.loads((run / "refit.ckpt").read_text())
    assert is_checkpoint(run / "refit.ckpt")
    assert info["refit"]["epochs"] == picked and info["refit"]["schedule_epochs"] == 3
    assert info["refit"]["picked_on_validation"]["R@1"] == s["best"]["R@1"] and info["refit"]["frames"] == [0, 16]
    assert "monitor" not in json.dumps(info["refit"])
    config = checkpoint_config(s["checkpoint"])
    assert config.name == "refit-run-refit" and "refitted" in config.description
    built = pipeline.build_map(data / "data" / "summer", data / "map", config, progress=False)
    assert built["descriptor_dim"] == s["head_dim"] == 4 * union.features.grid[0] * union.features.grid[1]
    assert json.loads((run / "summary.json").read_text())["refit"]["picked_epoch"] == picked
    # One cache serves both runs: the first run cached the gap frames the refit returns to training.
    keys = set(json.loads((data / "cache" / "keys.json").read_text()))
    assert {f"{s}/images-{i:05d}.png" for s in ("summer", "winter") for i in range(24)} <= keys
    # A resumed run with nothing left to do keeps the same result.
    again = run_recipe(r, progress=False)
    assert again["refit"]["history"] == s["refit"]["history"] and again["checkpoint"] == s["checkpoint"]
    # Deterministic: a fresh run elsewhere gives the same refitted head, bit for bit.
    other = run_recipe(refit_recipe_of(data, out="run2"), progress=False)
    a = torch.load(run / "refit.head.pt", weights_only=True)
    b = torch.load(data / "run2" / "refit.head.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert other["refit"]["history"][-1]["loss"] == s["refit"]["history"][-1]["loss"]


def test_refit_runs_the_given_epochs_on_the_recipes_schedule(data, refit_recipe_of):
    """Stopped after the picked epoch, on the full schedule: the refit's lr is where the picked run's was."""
    r = refit_recipe_of(data, epochs=3)
    settings = settings_from(r)
    out = data / "run"
    out.mkdir()
    res = refit_run(
        r, 2, {"R@1": 0.5, "epoch": 2, "monitor R@1": 0.1}, settings, out, progress=False, log=lambda m: None
    )
    assert res["epochs"] == 2 and res["steps"] == 8 and len(res["history"]) == 2
    union = prepare(refit_recipe(r), progress=False)
    ref = Trainer(union.head, union.features, union.places, settings, train_ids=union.train_ids, progress=False)
    assert ref.total_steps == 12  # the schedule is 3 epochs of the union's 4 steps
    assert res["history"][-1]["lr"] == pytest.approx(ref._lr_factor(8) * settings.lr)
    assert json.loads((out / "refit.ckpt").read_text())["refit"]["picked_on_validation"] == {"R@1": 0.5}
    with pytest.raises(ConfigError, match="picked epoch"):
        refit_run(r, 4, {}, settings, out, progress=False)


@pytest.mark.parametrize(
    "change,match",
    [
        (
            {"validation": {"queries": "winter", "database": "summer", "frames": [16, 20], "refit": True}},
            "needs holdout",
        ),
        ({"post": {"pca": 4}}, r"\[post\]"),
        ({"head": {"name": "layout", "options": {"out_channels": 4}, "vlad": {"k": 4, "weight": 0.5}}}, "vlad"),
        ({"validation": {"holdout": 4, "refit": "yes"}}, "true or false"),
    ],
)
def test_refit_option_errors_come_before_training(tmp_path, change, match, refit_recipe_of):
    r = {**refit_recipe_of(tmp_path), **change}
    with pytest.raises(ConfigError, match=match):
        run_recipe(r, progress=False)
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "cache").exists()


def test_refit_leaves_the_split_unchanged_and_is_off_by_default(data, refit_recipe_of):
    r = refit_recipe_of(data)
    train, val = split_holdout(r, r["data"], r["validation"])
    assert train["frames"] == [0, 10] and val["frames"] == [12, 16] and "refit" not in val
    union = refit_recipe(r)
    assert "validation" not in union and union["data"] == r["data"] and union["monitor"] == r["monitor"]
    assert "validation" in r  # the recipe itself is not changed
    plain = refit_recipe_of(data)
    del plain["validation"]["refit"]
    assert not wants_refit(plain) and wants_refit(r) and not wants_refit({})


def test_refit_with_unfrozen_blocks_writes_its_own_backbone_weights(tmp_path, refit_recipe_of):
    synchronised_seasons(tmp_path / "data", 12)
    r = refit_recipe_of(tmp_path, epochs=2, holdout=2, gap=1)
    r["backbone"] = {**r["backbone"], "unfreeze": 1}
    r["data"] = {**r["data"], "frames": [0, 12]}
    r["head"] = {"name": "gem"}
    r["sampler"] = {"places": 3, "images_per_place": 2}
    del r["monitor"]
    s = run_recipe(r, progress=False)
    assert Path(s["checkpoint"]).name == "refit.ckpt" and s["refit"]["train_places"] == 12 and s["train_places"] == 9
    picked, refitted = checkpoint_config(s["picked_checkpoint"]), checkpoint_config(s["checkpoint"])
    assert Path(picked.backbone_options["weights"]).name == "best.backbone.pth"
    assert Path(refitted.backbone_options["weights"]).name == "refit.backbone.pth"
    a = torch.load(picked.backbone_options["weights"], weights_only=True)
    b = torch.load(refitted.backbone_options["weights"], weights_only=True)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # trained again, on more frames
