"""NetVLAD: the soft-assignment formula against a straightforward reference, α initialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vprkit.aggregation.netvlad import NetVLAD, NetVLADLayer, alpha_from_margin
from vprkit.aggregation.vlad import Vocabulary, assignment_margin, hard_vlad
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError, VocabularyMismatchError


def reference_netvlad(x: np.ndarray, w: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """NetVLAD of one image's N×D descriptors, written out loop by loop."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    k = len(c)
    v = np.zeros_like(c)
    for n in range(len(x)):
        logits = w @ x[n] + b
        a = np.exp(logits - logits.max())
        a /= a.sum()
        for j in range(k):
            v[j] += a[j] * (x[n] - c[j])
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    v = v.ravel()
    return v / np.linalg.norm(v)


def test_layer_matches_reference_with_bias():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 15, 5)).astype(np.float32)
    c = rng.normal(size=(4, 5)).astype(np.float32)
    w = rng.normal(size=(4, 5)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    layer = NetVLADLayer(4, 5, bias=True)
    layer.load_weights(torch.from_numpy(c), torch.from_numpy(w).reshape(4, 5, 1, 1), torch.from_numpy(b))
    with torch.no_grad():
        out = layer(torch.from_numpy(x)).numpy()
    for i in range(2):
        np.testing.assert_allclose(out[i], reference_netvlad(x[i], w, b, c), atol=1e-5)


def test_alpha_initialisation_follows_the_released_models():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(6, 8)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    dots = np.sort(xn @ c.T, axis=1)[:, ::-1]
    margin = float(np.mean(dots[:, 0] - dots[:, 1]))
    assert assignment_margin(x, c) == pytest.approx(margin, rel=1e-5)
    alpha = alpha_from_margin(margin)
    assert alpha == pytest.approx(-math.log(0.01) / margin)
    layer = NetVLADLayer.from_centres(c, alpha)
    np.testing.assert_allclose(layer.assign.weight.detach().numpy(), alpha * c, rtol=1e-6)
    assert layer.assign.bias is None
    v2 = NetVLADLayer.from_centres(c, alpha, variant="v2")
    np.testing.assert_allclose(v2.assign.bias.detach().numpy(), -alpha * (c * c).sum(1), rtol=1e-5)
    with pytest.raises(ConfigError):
        NetVLADLayer.from_centres(c, alpha, variant="nope")


def test_large_alpha_tends_to_hard_vlad():
    rng = np.random.default_rng(2)
    c = rng.normal(size=(5, 7)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = torch.from_numpy(rng.normal(size=(1, 40, 7)).astype(np.float32))
    with torch.no_grad():
        soft = NetVLADLayer.from_centres(c, alpha=1e4)(x)
    torch.testing.assert_close(soft, hard_vlad(x, torch.from_numpy(c)), atol=1e-4, rtol=1e-4)


def test_aggregator_uses_the_vocabulary_margin_and_checks_dims():
    rng = np.random.default_rng(3)
    c = rng.normal(size=(4, 6)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    voc = Vocabulary(c, {"assignment_margin": 0.2})
    agg = NetVLAD(6, voc)
    assert agg.alpha == pytest.approx(alpha_from_margin(0.2)) and agg.dim == 24
    feats = DenseFeatures(torch.randn(3, 4, 5, 6), 16, (64, 80))
    out = agg(feats)
    assert out.shape == (3, 24) and torch.allclose(out.norm(dim=1), torch.ones(3))
    with pytest.raises(VocabularyMismatchError):
        NetVLAD(7, voc)
    with pytest.raises(ConfigError, match="assignment margin"):
        NetVLAD(6, Vocabulary(c, {}))
    with pytest.raises(VocabularyMismatchError):
        NetVLADLayer(4, 6).load_weights(torch.zeros(3, 6), torch.zeros(3, 6))


def test_fit_vocabulary_records_the_margin():
    from vprkit.aggregation.vlad import fit_vocabulary

    x = np.random.default_rng(4).normal(size=(400, 8)).astype(np.float32)
    voc = fit_vocabulary(x, 8)
    assert voc.metadata["assignment_margin"] == pytest.approx(assignment_margin(x, voc.centres), abs=1e-5)
