"""The ``ensemble`` aggregator and ``[head] members = N``: N heads trained with seeds seed … seed + N − 1, each picked
on the validation set, concatenated (each scaled by 1/√N) into one preset whose cosine is the members' mean.

Fast: 64×64 synthetic seasons through EfficientNet-Lite0 (cached once per module), tiny layout heads, 2 epochs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import run_cli, synchronised_seasons
from vprkit.aggregation import AGGREGATORS
from vprkit.aggregation.ensemble import Ensemble
from vprkit.aggregation.projection import Projection, TrainedHead
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError
from vprkit.training import run as run_module
from vprkit.training.checkpoint import checkpoint_config, is_checkpoint
from vprkit.training.ensemble import check_members, member_recipe
from vprkit.training.recipe import run_recipe

C, H, W = 6, 3, 4


class Interrupted(Exception):
    """A run stopped from outside (as by a restart) in the middle of a member."""


def _features(n: int, seed: int) -> DenseFeatures:
    g = torch.Generator().manual_seed(seed)
    return DenseFeatures(torch.randn(n, H, W, C, generator=g), 16, (H * 16, W * 16))


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def _layout(out_channels: int = 3) -> dict:
    return {
        "aggregator": "trained",
        "options": {"head": "layout", "head_options": {"height": H, "width": W, "out_channels": out_channels}},
    }


def _members() -> dict:
    return {"a": _layout(3), "b": _layout(5), "c": {"aggregator": "gem", "options": {"p": 2.0}}}


# ---- the aggregator ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [None, {"a": 1.0, "b": 2.0, "c": 5.0}])
def test_the_ensembles_cosine_is_the_mean_of_its_members_cosines(weights):
    ens = Ensemble(C, members=_members(), weights=weights)
    for i, m in enumerate(ens.members.values()):
        _randomised(m, i)
    x, y = _features(5, 1), _features(5, 2)
    with torch.no_grad():
        ex, ey = ens(x), ens(y)
        mx, my = ens.member_outputs(x), ens.member_outputs(y)
    w = [1 / 3] * 3 if weights is None else [1 / 8, 2 / 8, 5 / 8]
    assert ens.weights == pytest.approx(w)
    assert ens.dim == ex.shape[1] == H * W * 3 + H * W * 5 + C
    # Unit norm, and ⟨y, y'⟩ = Σ wᵢ ⟨mᵢ, mᵢ'⟩ for every pair (also across the two batches).
    assert torch.allclose(ex.norm(dim=1), torch.ones(5), atol=1e-6)
    expected = sum(wi * (a @ b.T) for wi, a, b in zip(w, mx, my))
    assert torch.allclose(ex @ ey.T, expected, atol=1e-6)
    # Each member's part is its own (normalised) descriptor scaled by √wᵢ, in member order.
    dims = [m.shape[1] for m in mx]
    for part, m, wi in zip(torch.split(ex, dims, dim=1), mx, w):
        assert torch.allclose(part, math.sqrt(wi) * m, atol=1e-6)
    assert ens.identity()["members"]["c"]["aggregator"] == "gem"


def test_one_member_is_that_member_and_gradients_reach_every_member():
    one = Ensemble(C, members={"a": _layout(3)})
    _randomised(one, 0)
    alone = TrainedHead(C, head="layout", head_options={"height": H, "width": W, "out_channels": 3})
    alone.load_state_dict({k.removeprefix("members.a."): v for k, v in one.state_dict().items()})
    x = _features(3, 0)
    assert torch.allclose(one(x), alone(x), atol=1e-6)
    ens = Ensemble(C, members=_members(), trainable=True)
    assert all(p.requires_grad for p in ens.parameters())
    ens(x).sum().backward()
    assert all(m.head.conv.weight.grad is not None for k, m in ens.members.items() if k != "c")
    assert not any(p.requires_grad for p in Ensemble(C, members=_members()).parameters())  # frozen by default


def test_state_round_trip_rebuilds_member_projections_centres_and_the_ensembles_projection(tmp_path):
    ens = Ensemble(C, members=_members())
    ens.members["a"].add_projection(Projection(H * W * 3, 7))
    _randomised(ens, 3)
    ens.members["b"].set_centre(torch.randn(H * W * 5))
    ens.add_projection(Projection.from_pca(ens(_features(40, 4)), 9))
    torch.save(ens.state_dict(), tmp_path / "ens.pt")
    again = Ensemble(C, members=_members(), state=tmp_path / "ens.pt")
    assert again.dim == 9 and len(again.members["a"].projections) == 1 and again.members["b"].head_centre is not None
    x = _features(4, 5)
    assert torch.allclose(again(x), ens(x), atol=1e-6)
    assert again.identity()["state"] == "ens.pt" and again.identity()["projections"] == [9]
    with pytest.raises(ConfigError, match="does not fit"):
        Ensemble(C, members={"a": _layout(3), "z": _layout(5)}, state=tmp_path / "ens.pt")
    with pytest.raises(ConfigError, match="cannot follow"):
        ens.add_projection(Projection(5, 2))


def test_members_that_need_a_vocabulary_get_the_maps_and_sample_fits_reach_them():
    from vprkit.aggregation import fit_vocabulary

    members = {"v": {"aggregator": "vlad", "options": {}}, "g": {"aggregator": "gem"}}
    assert AGGREGATORS.get("ensemble").wants_vocabulary({"members": members})
    assert not AGGREGATORS.get("ensemble").wants_vocabulary({"members": _members()})
    with pytest.raises(ConfigError, match="needs the map's vocabulary"):
        Ensemble(C, members=members)
    sample = _features(20, 6).flat().reshape(-1, C).numpy()
    ens = Ensemble(C, members=members, vocabulary=fit_vocabulary(sample, 4, seed=0))
    assert ens.dim == 4 * C + C and ens.is_fitted
    nv = Ensemble(
        C,
        members={
            "n0": {"aggregator": "netvlad", "options": {"k": 3}},
            "n1": {"aggregator": "netvlad", "options": {"k": 3}},
        },
    )
    assert not nv.is_fitted and nv.learns_from_sample
    nv.fit(sample, seed=0)  # member i with seed + i: two different k-means initialisations
    assert nv.is_fitted
    c0, c1 = (m.layer.centroids for m in nv.members.values())
    assert not torch.allclose(c0, c1)


@pytest.mark.parametrize(
    "members,weights,match",
    [
        (None, None, "at least one"),
        ({}, None, "at least one"),
        ({"a": {"options": {}}}, None, "aggregator = NAME"),
        ({"a": {"aggregator": "nope"}}, None, "unknown aggregator 'nope'"),
        ({"a": {"aggregator": "ensemble", "options": {"members": {"b": _layout()}}}}, None, "cannot be a member"),
        ({"a": {"aggregator": "gem", "options": {"q": 1}}}, None, "unknown option 'q'"),
        ({"a": {"aggregator": "gem", "extra": 1}}, None, "unknown keys"),
        ({"a.b": {"aggregator": "gem"}}, None, "contain no"),
        ({"a": {"aggregator": "gem"}, "b": {"aggregator": "mean"}}, {"a": 1.0}, "every member"),
        ({"a": {"aggregator": "gem"}, "b": {"aggregator": "mean"}}, {"a": 1.0, "b": -1}, "positive"),
    ],
)
def test_bad_members_and_weights_are_config_errors(members, weights, match):
    with pytest.raises(ConfigError, match=match):
        Ensemble(C, members=members, weights=weights)


# ---- [head] members = N ------------------------------------------------------------------------------


@pytest.fixture
def ensemble_recipe(recipe_factory):
    """The tiny recipe (conftest) as an ensemble of two 3-channel layout heads, seeds 3 and 4, cross-season
    negatives, half the batches consecutive frames, picked on a 4-frame holdout; ``**head`` changes ``[head]``."""

    def make(root: Path, out: str = "run", **head) -> dict:
        return recipe_factory(
            root,
            name="ens-run",
            out=out,
            data={"frames": [0, 14], "negatives": "cross-domain"},
            validation={"holdout": 4, "gap": 1},
            monitor={"frames": [14, 18]},
            head={"options": {"out_channels": 3}, "members": 2, **head},
            sampler={"contiguous": 0.5},
            train={"seed": 3},
        )

    return make


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    synchronised_seasons(root / "data", 18)
    return root


RECIPE = """
name = "ens-run"
out = "run"
[backbone]
preset = "effnet-gem"
image_size = [64, 64]
memory_budget_mb = 64
cache = "cache"
[data]
root = "data"
labels = "frames"
folders = ["summer", "winter"]
frames = [0, 14]
negatives = "cross-domain"
[validation]
queries = "winter"
database = "summer"
holdout = 4
gap = 1
[monitor]
queries = "winter"
database = "summer"
frames = [14, 18]
[head]
name = "layout"
options = { out_channels = 3 }
members = 2
[loss]
name = "infonce"
[miner]
name = ""
[sampler]
places = 4
images_per_place = 2
contiguous = 0.5
[optimiser]
lr = 0.005
[train]
epochs = 2
seed = 3
"""


@pytest.fixture(scope="module")
def trained(data):
    """``vprkit train`` on the recipe above (the same run as ``ensemble_recipe(data)``): its summary."""
    (data / "recipe.toml").write_text(RECIPE)
    r = run_cli(["train", data / "recipe.toml", "--quiet"])
    assert r.exit_code == 0, r.output
    ckpt = data / "run" / "best.ckpt"
    assert str(ckpt) in r.output and "96-d head" in r.output and "best epoch [" in r.output
    return json.loads((data / "run" / "summary.json").read_text())


def _without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_members_train_with_their_own_seeds_and_the_ensemble_is_the_preset(data, trained):
    from vprkit import pipeline

    run = data / "run"
    s = trained
    assert Path(s["checkpoint"]) == run / "best.ckpt" and is_checkpoint(run / "best.ckpt")
    for i in (0, 1):
        for f in ("best.ckpt", "best.head.pt", "last.pt", "history.json", "curves.png", "summary.json"):
            assert (run / f"member{i}" / f).is_file(), (i, f)
        assert json.loads((run / f"member{i}" / "summary.json").read_text())["best"] == s["members"][i]["best"]
        settings = json.loads((run / f"member{i}" / "best.ckpt").read_text())["settings"]
        assert settings["seed"] == 3 + i and settings["contiguous_batches"] == 0.5
    assert not (run / "features").exists() and (data / "cache" / "meta.json").is_file()  # the run's one cache
    # The ensemble's state is its members' picked states, side by side; its checkpoint names no member file.
    ens_state = torch.load(run / "best.head.pt", weights_only=True)
    for i in (0, 1):
        member = torch.load(run / f"member{i}" / "best.head.pt", weights_only=True)
        assert all(torch.equal(ens_state[f"members.member{i}.{k}"], v) for k, v in member.items())
    assert not torch.equal(ens_state["members.member0.head.conv.weight"], ens_state["members.member1.head.conv.weight"])
    config = checkpoint_config(run / "best.ckpt")
    assert config.aggregator == "ensemble" and config.name == "ens-run"
    assert set(config.aggregator_options["members"]) == {"member0", "member1"}
    assert all("state" not in m["options"] for m in config.aggregator_options["members"].values())
    info = json.loads((run / "best.ckpt").read_text())
    grid = 4 * 4  # 64×64 at stride 16
    assert s["head_dim"] == info["head_dim"] == 2 * 3 * grid
    assert info["epoch"] == s["best"]["epoch"] == [m["best"]["epoch"] for m in s["members"]]
    assert 0 <= info["validation"]["R@1"] <= 1 and "monitor R@1" in s["best"]
    assert s["train_seconds"] >= sum(m["train_seconds"] for m in s["members"])
    # The ensemble measured on the holdout is the preset's: the map's descriptors are the ensemble's.
    m = pipeline.build_map(data / "data" / "summer", data / "map", config, progress=False)
    assert m["descriptor_dim"] == s["head_dim"]
    res = pipeline.localize(data / "map", [data / "data" / "summer" / "images-00005.png"], top_k=2)
    assert res[0].matches[0].key == "images-00005.png"


def test_cli_builds_a_map_with_the_ensemble_checkpoint_and_localises(data, trained):
    ckpt = data / "run" / "best.ckpt"
    r = run_cli(["map", "build", data / "data" / "summer", "--out", data / "cli-map", "--preset", ckpt])
    assert r.exit_code == 0, r.output
    r = run_cli(["localize", data / "cli-map", data / "data" / "summer" / "images-00013.png", "--top-k", "2", "--json"])
    assert r.exit_code == 0 and "images-00013.png" in r.output


def test_cli_add_pca_projects_the_ensemble(data, trained):
    from vprkit import pipeline

    ckpt = data / "run" / "best.ckpt"
    r = run_cli(["add-pca", ckpt, data / "data" / "summer", "--dim", "4"])
    assert r.exit_code == 0 and "4-d PCA" in r.output
    pca = checkpoint_config(data / "run" / "best-pca4.ckpt")
    assert pca.aggregator == "ensemble"
    pipeline.build_map(data / "data" / "summer", data / "pca-map", pca, progress=False)
    assert pipeline.open_map(data / "pca-map").aggregator.dim == 4


def test_a_member_resumes_where_it_was_interrupted(data, trained, monkeypatch, ensemble_recipe):
    """Member 1 stopped after its first epoch (member 0 done): the rerun trains only what is left, identically."""
    real = run_module.plot_curves
    logs: list[str] = []

    def interrupt(history, out, title=None):
        real(history, out, title=title)
        if title == "ens-run-member1" and len(history) == 1:
            raise Interrupted("stopped after member 1's first epoch")

    monkeypatch.setattr(run_module, "plot_curves", interrupt)
    r = ensemble_recipe(data, out="resumed")
    with pytest.raises(Interrupted):
        run_recipe(r, progress=False, log=logs.append)
    assert (data / "resumed" / "member0" / "summary.json").is_file()
    assert (
        not (data / "resumed" / "member1" / "summary.json").exists() and not (data / "resumed" / "best.ckpt").exists()
    )
    monkeypatch.setattr(run_module, "plot_curves", real)
    logs.clear()
    s = run_recipe(r, progress=False, log=logs.append)
    steps = trained["members"][1]["history"][-1]["step"]
    assert any("resuming" in m and "member1" in m and f"step {steps // 2}/{steps}" in m for m in logs), logs
    assert any("resuming" in m and "member0" in m and f"step {steps}/{steps}" in m for m in logs), logs
    a = torch.load(data / "resumed" / "best.head.pt", weights_only=True)
    b = torch.load(data / "run" / "best.head.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [_without_seconds(m["history"]) for m in s["members"]] == [
        _without_seconds(m["history"]) for m in trained["members"]
    ]
    assert s["best"] == trained["best"]


def test_post_pca_is_fitted_on_the_ensembles_output(data, trained, ensemble_recipe):
    from vprkit import pipeline

    # The members are resumed (done): only the ensemble and its PCA are new.
    s = run_recipe({**ensemble_recipe(data), "post": {"pca": 5}}, progress=False, log=lambda m: None)
    assert Path(s["checkpoint"]).name == "best-post.ckpt" and Path(s["trained_checkpoint"]).name == "best.ckpt"
    config = checkpoint_config(s["checkpoint"])
    assert config.aggregator == "ensemble" and s["head_dim"] == 5
    assert [_without_seconds(m["history"]) for m in s["members"]] == [
        _without_seconds(m["history"]) for m in trained["members"]
    ]
    built = pipeline.build_map(data / "data" / "summer", data / "post-map", config, progress=False)
    assert built["descriptor_dim"] == 5


@pytest.mark.parametrize(
    "change,match",
    [
        ({"members": 0}, r"\[head\] members must be an integer ≥ 1, got 0"),
        ({"members": -1}, r"\[head\] members must be an integer ≥ 1, got -1"),
        ({"members": "2"}, r"\[head\] members must be an integer ≥ 1, got '2'"),
        ({"members": True}, r"\[head\] members must be an integer ≥ 1, got True"),
        ({"members": 1.5}, r"\[head\] members must be an integer ≥ 1, got 1.5"),
        ({"name": "mean", "options": {}}, "learns nothing"),
        ({"vlad": {"k": 4, "weight": 0.5}}, "vlad"),
        ({"_backbone": {"unfreeze": 1}}, "frozen backbone"),
        ({"_validation": {"refit": True}}, "refit"),
        ({"_post": {"centre": True}}, r"\[post\] centre"),
    ],
)
def test_bad_member_combinations_fail_before_training(tmp_path, change, match, ensemble_recipe):
    change = dict(change)
    sections = {k[1:]: change.pop(k) for k in list(change) if k.startswith("_")}
    r = ensemble_recipe(tmp_path, **change)
    for k, v in sections.items():
        r[k] = {**r.get(k, {}), **v}
    with pytest.raises(ConfigError, match=match):
        run_recipe(r, progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_one_member_is_a_plain_run_and_member_recipes_share_the_runs_cache(tmp_path, ensemble_recipe):
    r = ensemble_recipe(tmp_path)
    assert check_members(r) == 2 and check_members({**r, "head": {"name": "layout", "members": 1}}) == 1
    assert check_members({"head": {"name": "mean", "projection": 8, "members": 3}}) == 3
    m = member_recipe({**r, "post": {"pca": 4}}, 1)
    assert m["out"] == str(tmp_path / "run" / "member1") and m["train"]["seed"] == 4 and m["name"] == "ens-run-member1"
    assert "members" not in m["head"] and "post" not in m and m["backbone"]["cache"] == str(tmp_path / "cache")
    assert r["head"]["members"] == 2 and r["train"]["seed"] == 3  # the recipe itself is not changed
    no_cache = {**r, "backbone": {k: v for k, v in r["backbone"].items() if k != "cache"}}
    assert member_recipe(no_cache, 0)["backbone"]["cache"] == str(tmp_path / "run" / "features")


def test_split_members_start_on_disjoint_slices_of_the_channels(data, ensemble_recipe):
    from vprkit.training.heads import build_head
    from vprkit.training.recipe import prepare

    x = _features(2, 7)
    flat = x.patches.permute(0, 3, 1, 2)  # B × C × h × w, as the layout head flattens it
    for i, channels in ((0, [0, 1, 2]), (1, [3, 4, 5])):
        head = build_head("layout", C, (H, W), {"out_channels": 3}, slice_of=(i, 2))
        with torch.no_grad():
            assert torch.allclose(
                head(x), torch.nn.functional.normalize(flat[:, channels].flatten(1), dim=1), atol=1e-6
            )
    wrapped = build_head("layout", C, (H, W), {"out_channels": 4}, slice_of=(1, 2))  # 2 × 4 > 6: wraps round
    centre = wrapped.head.conv.weight[:, :, 1, 1]
    assert centre.argmax(dim=1).tolist() == [3, 4, 5, 0] and centre.sum().item() == 4
    # The recipe: member i of N gets [head] start_slice = [i, N]; its prepared head starts there.
    r = ensemble_recipe(data, member_init="split")
    assert check_members(r) == 2
    m = member_recipe(r, 1)
    assert m["head"]["start_slice"] == [1, 2] and "member_init" not in m["head"]
    head = prepare(m, progress=False).head.head
    c = head.conv.weight.shape[1]
    assert head.conv.weight[:, :, 1, 1].argmax(dim=1).tolist() == [c // 2 + j for j in range(3)]
    assert "start_slice" not in member_recipe(ensemble_recipe(data), 1)["head"]


@pytest.mark.parametrize(
    "head,match",
    [
        ({"member_init": "random"}, "member_init must be one of"),
        ({"name": "gem", "options": {}, "member_init": "split"}, "for layout heads"),
        ({"member_init": "split", "start_slice": [0, 2]}, "one or the other"),
    ],
)
def test_bad_member_inits_are_config_errors(tmp_path, head, match, ensemble_recipe):
    with pytest.raises(ConfigError, match=match):
        run_recipe(ensemble_recipe(tmp_path, **head), progress=False)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "value,name,match",
    [
        ([2, 2], "layout", r"0 ≤ i < n"),
        ([0], "layout", r"\[i, n\]"),
        ([True, 2], "layout", r"\[i, n\]"),
        ([0, 2], "gem", "not 'gem'"),
    ],
)
def test_bad_start_slices_are_config_errors(value, name, match):
    from vprkit.training.heads import start_slice

    with pytest.raises(ConfigError, match=match):
        start_slice(value, name)
    assert start_slice(None, "gem") is None and start_slice([1, 3], "layout") == (1, 3)
