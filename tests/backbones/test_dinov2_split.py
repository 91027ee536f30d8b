"""DINOv2 split into a cached prefix (embedding + first blocks) and the trainable last blocks: the same model."""

from __future__ import annotations

import pytest
import torch

from vprkit.backbones import build_backbone
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError

TINY = dict(embed_dim=48, depth=4, num_heads=4, pos_grid=4)
PATCH = 14


def _tiny(name="dinov2_vits14", **kw):
    return build_backbone(name, trainable=True, pretrained=False, config=TINY, **kw).eval()


@pytest.mark.parametrize(
    "layer,facet,final_norm,last",
    [(3, "token", True, 2), (3, "token", False, 3), (2, "value", False, 1), (3, "key", False, 2)],
)
def test_prefix_then_suffix_is_the_whole_model(layer, facet, final_norm, last):
    net = _tiny(layer=layer, facet=facet, final_norm=final_norm)
    prefix, suffix = net.split(last)
    x = torch.rand(2, 3, 3 * PATCH, 5 * PATCH)  # not the native 4×4 grid: the positions are resampled
    with torch.no_grad():
        whole, parts = net(x), suffix(prefix(x))
    assert torch.allclose(parts.patches, whole.patches, atol=1e-6)
    assert torch.allclose(parts.global_token, whole.global_token, atol=1e-6)
    assert (parts.stride, parts.image_size, suffix.dim) == (whole.stride, whole.image_size, net.dim)
    # the prefix is keyed as the model cut where it stops (token facet, no final norm)
    cut = _tiny(layer=layer - last, facet="token")
    assert prefix.identity() == cut.identity()
    # shared modules: training the suffix trains the backbone a checkpoint saves
    ids = {id(p) for p in net.parameters()}
    assert {id(p) for p in suffix.parameters()} <= ids and {id(p) for p in prefix.parameters()} <= ids


def test_suffix_trains_the_last_blocks_from_cached_tokens():
    net = _tiny(layer=3, facet="token", final_norm=True)
    net.set_trainable(last_blocks=2)
    prefix, suffix = net.split(2)
    with torch.no_grad():
        cached = prefix(torch.rand(2, 3, 2 * PATCH, 2 * PATCH))
    out = suffix(DenseFeatures(cached.patches.half().float(), cached.stride, cached.image_size, cached.global_token))
    (out.patches.sum() + out.global_token.sum()).backward()
    assert net.blocks[-1].attn.qkv.weight.grad is not None and net.norm.weight.grad is not None
    assert net.blocks[1].attn.qkv.weight.grad is None  # frozen, in the prefix


def test_what_cannot_be_split_is_one_line():
    net = _tiny(layer=3, facet="token")
    with pytest.raises(ConfigError, match="transformer blocks"):
        net.split(4)
    with pytest.raises(ConfigError, match="register tokens"):
        _tiny("dinov2_vits14_reg", layer=3, facet="token").split(1)
    _, suffix = net.split(1)
    tokenless = DenseFeatures(torch.rand(1, 2, 2, TINY["embed_dim"]), PATCH, (28, 28))
    with pytest.raises(ConfigError, match="delete the cache to rebuild it"):
        suffix(tokenless)
