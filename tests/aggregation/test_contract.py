"""The aggregator contract (aggregation/base.py): nn.Modules, fit from a sample, state dicts, devices, gradients."""

import io

import numpy as np
import pytest
import torch
from torch import nn

from vprkit.aggregation import AGGREGATORS, Aggregator, NORM_FLOOR
from vprkit.aggregation.gem import GeM, GlobalToken, Mean
from vprkit.aggregation.netvlad import NetVLAD
from vprkit.aggregation.vlad import VLAD, fit_vocabulary
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError, VocabularyMismatchError


def sample(n=600, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def feats(b=3, d=8, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(b, 3, 4, d, generator=g)
    return DenseFeatures(p.requires_grad_(requires_grad), 16, (48, 64), torch.randn(b, d, generator=g))


def roundtrip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True): the state must be plain tensors and strings."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_every_registered_aggregator_is_a_module():
    voc = fit_vocabulary(sample(), 4)
    for name in ("gem", "mean", "cls", "vlad", "netvlad"):
        factory = AGGREGATORS.get(name)
        opts = {"vocabulary": voc} if factory.wants_vocabulary({}) else {}
        agg = factory(8, **opts)
        assert isinstance(agg, Aggregator) and isinstance(agg, nn.Module)
        out = agg(feats())
        assert out.shape == (3, agg.dim) and agg.is_fitted
        torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
        assert agg.identity()["aggregator"] == name
    assert NORM_FLOOR == pytest.approx(1e-12)


def test_stateless_aggregators_fit_is_a_no_op():
    for agg in (GeM(8), Mean(8), GlobalToken(8)):
        assert not agg.learns_from_sample
        before = {k: v.clone() for k, v in agg.state_dict().items()}
        assert agg.fit(sample()) is None
        assert all(torch.equal(before[k], v) for k, v in agg.state_dict().items())


def test_gem_p_is_a_parameter_frozen_unless_trainable_and_in_the_state():
    f = feats(requires_grad=True)
    agg = GeM(8)
    assert isinstance(agg.p, nn.Parameter) and not agg.p.requires_grad
    agg(f).sum().backward()
    assert f.patches.grad is not None and agg.p.grad is None  # differentiable in the features
    for signed in (False, True):
        t = GeM(8, p=2.5, signed=signed, trainable=True)
        out = t(feats(seed=2))
        (out[:, 0] * 3 + out[:, 1]).sum().backward()
        assert t.p.grad is not None and torch.isfinite(t.p.grad) and float(t.p.grad) != 0.0
    src = GeM(8, p=4.0, signed=True)
    dst = GeM(8, signed=True)
    dst.load_state_dict(roundtrip(src.state_dict()))
    assert float(dst.p) == 4.0 and dst.identity() == src.identity()
    torch.testing.assert_close(dst(feats()), src(feats()))


def test_vlad_state_dict_carries_centres_and_vocabulary():
    voc = fit_vocabulary(sample(), 4, metadata={"name": "v"}, sets=2)
    agg = VLAD(8, voc, vocabularies=2, assignments=2)
    state = roundtrip(agg.state_dict())
    assert state["centre_sets"].shape == (2, 4, 8)
    fresh = VLAD(8, k=4, vocabularies=2, assignments=2)
    assert not fresh.is_fitted
    with pytest.raises(ConfigError, match="no vocabulary yet"):
        fresh(feats())
    fresh.load_state_dict(state)
    assert fresh.is_fitted and fresh.identity() == agg.identity()
    assert fresh.vocabulary.checksum == voc.checksum
    torch.testing.assert_close(fresh(feats()), agg(feats()))
    with pytest.raises(RuntimeError):  # another K does not load
        VLAD(8, k=5, vocabularies=2).load_state_dict(state)
    raw_state = roundtrip(VLAD(8, fit_vocabulary(sample(), 4, centres="raw")).state_dict())
    with pytest.raises(VocabularyMismatchError):
        VLAD(8, k=4, centres="unit").load_state_dict(raw_state)


def test_vlad_fit_builds_the_vocabulary_from_a_sample():
    x = sample()
    agg = VLAD(8, k=4, vocabularies=2)
    assert agg.learns_from_sample
    agg.fit(torch.from_numpy(x), seed=3)
    ref = VLAD(8, fit_vocabulary(x, 4, seed=3, sets=2), vocabularies=2)
    torch.testing.assert_close(agg(feats()), ref(feats()))
    assert agg.vocabulary.checksum == ref.vocabulary.checksum
    with pytest.raises(ConfigError, match="needs a vocabulary"):
        VLAD(8)
    with pytest.raises(VocabularyMismatchError):
        VLAD(8, fit_vocabulary(x, 4), k=5)


def test_vlad_is_differentiable_in_the_features_and_moves_with_to():
    agg = VLAD(8, fit_vocabulary(sample(), 4), assignments=2)
    f = feats(requires_grad=True)
    agg(f)[:, :5].sum().backward()
    assert f.patches.grad is not None and torch.isfinite(f.patches.grad).all() and f.patches.grad.abs().sum() > 0
    # every tensor it uses moves with the module: on the meta device nothing stays behind on the CPU
    meta = VLAD(8, fit_vocabulary(sample(), 4), assignments=2).to("meta")
    assert meta.centres.device.type == "meta"
    out = meta(DenseFeatures(torch.empty(2, 3, 4, 8, device="meta"), 16, (48, 64)))
    assert out.device.type == "meta" and out.shape == (2, 32)
    assert VLAD(8, fit_vocabulary(sample(), 4)).to(torch.float64)(feats()).shape == (3, 32)


def test_netvlad_is_a_module_around_its_layer_frozen_unless_trainable():
    voc = fit_vocabulary(sample(), 4)
    agg = NetVLAD(8, voc)
    assert "layer.assign.weight" in agg.state_dict() and not any(p.requires_grad for p in agg.parameters())
    out = agg(feats())
    assert not out.requires_grad  # inference code may call .numpy() without a grad context
    t = NetVLAD(8, voc, trainable=True)
    f = feats(requires_grad=True)
    t(f).sum().backward()
    assert t.layer.assign.weight.grad is not None and t.layer.centroids.grad is not None and f.patches.grad is not None


def test_netvlad_fit_and_state_roundtrip():
    x = sample(seed=4)
    agg = NetVLAD(8, k=4)
    assert not agg.is_fitted and not NetVLAD.wants_vocabulary({"k": 4})
    with pytest.raises(ConfigError, match="not fitted"):
        agg(feats())
    agg.fit(x, seed=2)
    ref = NetVLAD(8, fit_vocabulary(x, 4, seed=2))
    assert agg.alpha == pytest.approx(ref.alpha)
    torch.testing.assert_close(agg(feats()), ref(feats()))
    fresh = NetVLAD(8, k=4)
    fresh.load_state_dict(roundtrip(agg.state_dict()))
    assert fresh.is_fitted and fresh.alpha == pytest.approx(agg.alpha)
    torch.testing.assert_close(fresh(feats()), agg(feats()))
