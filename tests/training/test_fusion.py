"""The fused (trained head + map VLAD) descriptor measured on the validation set, and its VLAD weight picked there.

Fast: random features on tiny grids for the measurement and the choice; 64×64 images through
EfficientNet-Lite0 for the recipe run (trained, fused on validation, a map built and queried with it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import synchronised_seasons
from vprkit.aggregation.vlad import VLAD, fit_vocabulary
from vprkit.backbones.base import DenseFeatures
from vprkit.datasets import GroundTruth
from vprkit.errors import ConfigError
from vprkit.evaluation.metrics import recall_at_n
from vprkit.presets import resolve
from vprkit.training.checkpoint import checkpoint_config, write_checkpoint
from vprkit.training.fusion import (
    database_vocabulary,
    fuse_checkpoint,
    fused_validation,
    pick_weight,
    vlad_spec,
)
from vprkit.training.heads import build_head
from vprkit.training.recipe import run_recipe
from vprkit.training.trainer import Validation

H, W, D, PLACES = 3, 4, 8, 12


class Feats:
    """Features held in memory: ids index the rows of ``x`` (B×H×W×D)."""

    def __init__(self, x: torch.Tensor):
        self.x, self.grid, self.dim = x, (x.shape[1], x.shape[2]), x.shape[3]

    def __len__(self):
        return len(self.x)

    def batch(self, ids):
        return DenseFeatures(self.x[torch.as_tensor(np.asarray(ids))], 16, (H * 16, W * 16))


def _shuffled_cells_validation(seed: int = 0) -> Validation:
    """Queries are their place's database map with the cells in another order, plus noise: an orderless
    VLAD recognises them, a layout head (cells kept in place) hardly does."""
    g = torch.Generator().manual_seed(seed)
    db = torch.randn(PLACES, H, W, D, generator=g)
    q = torch.stack([m.reshape(H * W, D)[torch.randperm(H * W, generator=g)].reshape(H, W, D) for m in db])
    q = q + 0.05 * torch.randn(q.shape, generator=g)
    feats = Feats(torch.cat([q, db]))
    gt = GroundTruth.from_frames(np.arange(PLACES), np.arange(PLACES), 0)
    return Validation(feats, np.arange(PLACES), np.arange(PLACES, 2 * PLACES), gt, ns=(1, 5))


def _layout_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    head = build_head("layout", D, (H, W), {"out_channels": D})  # the identity start: the flattened map
    torch.save(head.state_dict(), tmp_path / "h.pt")
    config = resolve("effnet-gem").replace(
        name="t",
        aggregator="trained",
        aggregator_options={"head": "layout", "head_options": {"height": H, "width": W, "out_channels": D}},
    )
    return write_checkpoint(tmp_path / "best.ckpt", config, tmp_path / "h.pt", {"epoch": 1})


def test_the_database_vocabulary_is_the_one_a_map_of_the_database_gets():
    val = _shuffled_cells_validation()
    config = resolve("effnet-gem")
    voc = database_vocabulary(val, config, k=5)
    db = val.features.batch(val.database_ids).patches.reshape(-1, D).numpy()
    ref = fit_vocabulary(db, 5, seed=config.vocabulary.seed, centres=config.vocabulary.centres)
    assert voc.k == 5 and voc.metadata["n_descriptors"] == PLACES * H * W  # database cells only, every one
    assert np.allclose(voc.centres, ref.centres, atol=1e-6)


def test_fused_validation_measures_the_weighted_cosine_and_the_weight_is_picked_on_it(tmp_path):
    val = _shuffled_cells_validation()
    ckpt = _layout_checkpoint(tmp_path)
    config = checkpoint_config(ckpt)
    weights = [0.1, 0.5, 0.9]
    got = fused_validation(config, D, val, k=4, assignments=2, weights=weights)
    # Reference: rank by w·cos(VLAD) + (1 − w)·cos(flattened map), computed here from the parts.
    feats = val.features
    voc = database_vocabulary(val, config, k=4)
    vlad = VLAD(D, voc, assignments=2).eval()
    with torch.no_grad():
        vq, vd = vlad(feats.batch(val.query_ids)), vlad(feats.batch(val.database_ids))
    flat = lambda ids: torch.nn.functional.normalize(  # noqa: E731
        feats.batch(ids).patches.permute(0, 3, 1, 2).flatten(1), dim=1
    )
    hq, hd = flat(val.query_ids), flat(val.database_ids)
    for w in weights:
        s = w * vq @ vd.T + (1 - w) * hq @ hd.T
        ranked = torch.topk(s, 5, dim=1).indices.numpy()
        ref = recall_at_n(ranked, val.ground_truth, (1, 5))
        assert (got[w]["R@1"], got[w]["R@5"]) == pytest.approx((ref["R@1"], ref["R@5"]))
    # Cells shuffled: the layout alone is poor, VLAD carries the recall, so more VLAD weight is better here.
    assert got[0.9]["R@1"] > got[0.1]["R@1"]
    assert pick_weight(got) == 0.9
    out, measured = fuse_checkpoint(ckpt, D, val, {"k": 4, "assignments": 2, "weight": weights})
    fused = checkpoint_config(out)
    assert out.name == "best-fused.ckpt" and measured["weight"] == 0.9 and measured["R@1"] == got[0.9]["R@1"]
    assert fused.aggregator_options["vlad"] == {"k": 4, "assignments": 2, "weight": 0.9} and fused.vocabulary.k == 4
    assert fused.aggregator_options["state"] == config.aggregator_options["state"]  # the same trained state
    assert json.loads(out.read_text())["fused"]["weights"]["0.1"]["R@1"] == pytest.approx(got[0.1]["R@1"], abs=1e-6)


def test_pick_weight_breaks_ties_by_recall_at_5_then_the_smaller_vlad_weight():
    assert pick_weight({0.1: {"R@1": 0.5, "R@5": 0.7}, 0.2: {"R@1": 0.6, "R@5": 0.6}}) == 0.2
    assert pick_weight({0.1: {"R@1": 0.6, "R@5": 0.7}, 0.2: {"R@1": 0.6, "R@5": 0.8}}) == 0.2
    assert pick_weight({0.3: {"R@1": 0.6, "R@5": 0.8}, 0.2: {"R@1": 0.6, "R@5": 0.8}}) == 0.2


@pytest.mark.parametrize(
    "vlad,match",
    [
        ({"k": 4, "weight": [0.2, 1.0]}, "in \\(0, 1\\)"),
        ({"k": 0, "weight": 0.2}, "k must"),
        ({"k": 4, "weight": []}, "non-empty"),
        ({"k": 4, "weight": [0.2, 0.2]}, "repeat"),
        ({"k": 4, "weights": [0.2]}, "unknown keys"),
        ({"k": 4, "assignments": 1.5, "weight": 0.2}, "assignments must"),
    ],
)
def test_vlad_spec_errors(vlad, match):
    with pytest.raises(ConfigError, match=match):
        vlad_spec(vlad)


def test_vlad_spec_of_one_weight_and_of_candidates():
    assert vlad_spec({"weight": 0.85}) == {
        "k": None,
        "assignments": 4,
        "weights": [0.85],
        "chosen_on_validation": False,
    }
    assert vlad_spec({"k": 8, "assignments": 1, "weight": [0.1, 0.3]}) == {
        "k": 8,
        "assignments": 1,
        "weights": [0.1, 0.3],
        "chosen_on_validation": True,
    }


@pytest.fixture
def fused_recipe(recipe_factory, tmp_path):
    """The tiny recipe (conftest) with ``[head] vlad`` and ``[post] pca = 6``, picked on a holdout
    (``validation=False``: no validation set)."""

    def make(vlad: dict, validation: bool = True) -> dict:
        return recipe_factory(
            tmp_path,
            name="fused-run",
            monitor=None,
            head={"vlad": vlad},
            post={"pca": 6},
            validation={"holdout": 5, "gap": 1} if validation else None,
        )

    return make


def test_recipe_picks_the_vlad_weight_on_validation_and_the_fused_checkpoint_localises(tmp_path, fused_recipe):
    from vprkit import pipeline

    synchronised_seasons(tmp_path / "data", 16)
    s = run_recipe(fused_recipe({"k": 4, "assignments": 2, "weight": [0.2, 0.6]}), progress=False)
    ckpt = Path(s["checkpoint"])
    assert ckpt.name == "best-post-fused.ckpt" and Path(s["unfused_checkpoint"]).name == "best-post.ckpt"
    f = s["fused_validation"]
    assert set(f["weights"]) == {"0.2", "0.6"}
    assert f["weight"] == pick_weight({float(w): r for w, r in f["weights"].items()})
    config = checkpoint_config(ckpt)
    assert config.aggregator_options["vlad"]["weight"] == f["weight"] and config.vocabulary.k == 4
    # The head before fusion is unchanged (no VLAD in it): the weight is only decided after training.
    assert "vlad" not in checkpoint_config(s["unfused_checkpoint"]).aggregator_options
    built = pipeline.build_map(tmp_path / "data" / "summer", tmp_path / "map", config, progress=False)
    assert built["descriptor_dim"] == 6 + 4 * pipeline.load_backbone(config).dim
    res = pipeline.localize(tmp_path / "map", [tmp_path / "data" / "winter" / "images-00003.png"], top_k=3)
    assert len(res) == 1 and len(res[0].matches) == 3 and res[0].error is None


def test_a_weight_list_without_validation_is_refused_before_training(tmp_path, fused_recipe):
    synchronised_seasons(tmp_path / "data", 16)
    with pytest.raises(ConfigError, match="picked on the validation set"):
        run_recipe(fused_recipe({"k": 4, "weight": [0.2, 0.6]}, validation=False), progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()


# ---- [backbone] options: another block of the preset's backbone -------------------------------------


def test_backbone_options_change_the_preset_backbone_and_are_validated():
    from vprkit.training.recipe import base_config

    c = base_config({"backbone": {"preset": "effnet-gem", "image_size": [64, 64], "options": {"block": 7}}})
    assert c.backbone_options["block"] == 7 and c.image.size == (64, 64)
    assert base_config({"backbone": {"preset": "effnet-gem"}}).backbone_options["block"] == 10  # the preset's
    with pytest.raises(ConfigError, match="unknown option 'blok'"):
        base_config({"backbone": {"preset": "effnet-gem", "options": {"blok": 7}}})
    with pytest.raises(ConfigError, match="must be a table"):
        base_config({"backbone": {"preset": "effnet-gem", "options": [7]}})


def test_a_recipe_on_another_block_trains_there_and_its_checkpoint_builds_maps_there(tmp_path, fused_recipe):
    from vprkit import pipeline

    synchronised_seasons(tmp_path / "data", 16)
    r = fused_recipe({})
    r["head"].pop("vlad")
    r.pop("post")
    r["backbone"]["options"] = {"block": 7}  # EfficientNet-Lite0 block 7: 80 channels (the preset's block 10: 112)
    s = run_recipe(r, progress=False)
    config = checkpoint_config(s["checkpoint"])
    backbone = pipeline.load_backbone(config)
    assert config.backbone_options["block"] == 7 and backbone.dim == 80
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["identity"]["backbone"]["dim"] == 80
    built = pipeline.build_map(tmp_path / "data" / "summer", tmp_path / "map", config, progress=False)
    assert built["descriptor_dim"] == s["head_dim"] == 4 * 4 * 4  # 64×64 at stride 16: 4×4 cells × 4 channels
