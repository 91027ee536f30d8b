"""The CosPlace / EigenPlaces ``gem-fc`` head: its equations, its gradients, and ``vprkit train`` with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import synchronised_seasons
from vprkit.aggregation import AGGREGATORS
from vprkit.aggregation.gem_fc import GeMFC
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError
from vprkit.training.checkpoint import checkpoint_config
from vprkit.training.heads import build_head
from vprkit.training.recipe import run_recipe

B, H, W, C = 3, 5, 7, 16


def _feats(grad: bool = False) -> DenseFeatures:
    torch.manual_seed(0)
    patches = torch.relu(torch.randn(B, H, W, C)).requires_grad_(grad)
    return DenseFeatures(patches, 16, (H * 16, W * 16))


def _cosplace_equations(head: GeMFC, patches: torch.Tensor) -> torch.Tensor:
    """CosPlace's head written out on an NCHW map: L2 over channels, clamp/pow/avg-pool/root, linear, L2."""
    x = F.normalize(patches.permute(0, 3, 1, 2), p=2.0, dim=1)
    x = F.avg_pool2d(x.clamp(min=1e-6).pow(head.p), (x.size(-2), x.size(-1))).pow(1.0 / head.p)
    return F.normalize(F.linear(x[:, :, 0, 0], head.fc.weight, head.fc.bias), p=2.0, dim=1)


def test_head_follows_cosplace_equations_and_dims():
    head = AGGREGATORS.get("gem-fc")(C, out_dim=8, p=2.5)
    feats = _feats()
    with torch.no_grad():
        out, want = head(feats), _cosplace_equations(head, feats.patches)
    assert head.dim == 8 and out.shape == (B, 8)
    assert torch.allclose(out, want, atol=1e-6)
    assert head.identity() == {"aggregator": "gem-fc", "dim": 8, "zoo": None}
    assert AGGREGATORS.get("gem-fc")(C).dim == C  # out_dim defaults to the backbone's
    assert not any(p.requires_grad for p in head.parameters())  # frozen unless trainable
    with pytest.raises(ConfigError, match="16-d"):
        head(DenseFeatures(torch.rand(1, 2, 2, 4), 16, (32, 32)))


def test_trainable_head_learns_p_and_the_linear_layer():
    head = build_head("gem-fc", C, (H, W), {"out_dim": 6})
    feats = _feats(grad=True)
    head(feats)[:, 0].sum().backward()
    inner = head.head
    assert inner.p.grad is not None and inner.fc.weight.grad.abs().sum() > 0
    assert feats.patches.grad is not None and head.dim == 6


def test_vprkit_train_with_the_gem_fc_head_gives_a_map_preset(tmp_path, recipe_factory):
    from vprkit import pipeline

    synchronised_seasons(tmp_path / "data", 24)
    recipe = recipe_factory(
        tmp_path,
        name="tiny-gem-fc",
        monitor=None,
        validation={"frames": [16, 24]},
        head={"name": "gem-fc", "options": {"out_dim": 5}},
    )
    summary = run_recipe(recipe_factory.write(tmp_path / "recipe.toml", recipe), progress=False)
    config = checkpoint_config(summary["checkpoint"])
    info = pipeline.build_map(tmp_path / "data" / "summer", tmp_path / "map", config, progress=False)
    assert summary["head_dim"] == 5 and info["descriptor_dim"] == 5
