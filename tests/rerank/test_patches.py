"""Integral patch descriptors equal direct per-patch aggregation; projection behaves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vprkit.aggregation.netvlad import NetVLADLayer
from vprkit.errors import ConfigError
from vprkit.numerics import RANDOMISED_PCA_MAX_FRACTION
from vprkit.rerank.patches import (
    PatchProjection,
    PatchScale,
    box_sums,
    direct_patch_vlad,
    integral_map,
    integral_patch_vlad,
    patch_centres,
    patch_grid_positions,
)


def _layer(k=8, d=6, alpha=12.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return NetVLADLayer.from_centres(torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1), alpha)


def test_box_sums_hand_example():
    m = torch.arange(12.0).reshape(3, 4)  # [[0,1,2,3],[4,5,6,7],[8,9,10,11]]
    s = box_sums(integral_map(m), 2, 1)
    assert s.tolist() == [[10, 14, 18], [26, 30, 34]]
    assert box_sums(integral_map(m), 2, 2).tolist() == [[10, 18]]
    assert box_sums(integral_map(m), 3, 1).tolist() == [[45, 54]]


@pytest.mark.parametrize("scale", [PatchScale(1), PatchScale(2), PatchScale(3, 2), PatchScale(5), PatchScale(8)])
def test_integral_equals_direct_aggregation(scale):
    torch.manual_seed(1)
    cells = torch.randn(7, 9, 6)
    layer = _layer()
    fast = integral_patch_vlad(cells, layer, [scale])[0]
    slow = direct_patch_vlad(cells, layer, scale)
    assert fast.shape == slow.shape
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_all_scales_in_one_pass_and_patch_counts():
    cells = torch.randn(30, 40, 4)
    outs = integral_patch_vlad(cells, _layer(d=4), [PatchScale(2), PatchScale(5), PatchScale(8)])
    # the counts REFERENCE.md gives for a 30×40 map
    assert [o.shape[0] for o in outs] == [29 * 39, 26 * 36, 23 * 33]
    assert all(torch.allclose(o.norm(dim=1), torch.ones(len(o))) for o in outs)


def test_oversized_patch_is_clamped_to_the_map():
    p, rows, cols = PatchScale(8).effective((7, 14))
    assert (p, rows, cols) == (7, 1, 8)


def test_patch_centres_and_positions():
    scale = PatchScale(2, 2)
    c = patch_centres(scale, (4, 6), 16)
    # patches start at cells 0, 2, 4 (cols) and 0, 2 (rows); size 2 → centre one cell in: (j + 1)·16
    assert c[:3].tolist() == [[16, 16], [48, 16], [80, 16]]
    assert c[3].tolist() == [16, 48]
    assert patch_grid_positions(scale, (4, 6)).tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]


def test_projection_is_orthonormal_pca_and_outputs_unit_vectors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 20)).astype(np.float32) * np.r_[10.0, np.linspace(2, 0.1, 19)].astype(np.float32)
    p = PatchProjection.fit(x, 5)
    np.testing.assert_allclose(p.components @ p.components.T, np.eye(5), atol=1e-4)
    # the first axis is the direction of largest variance (axis 0 here)
    assert abs(p.components[0, 0]) > 0.99
    y = p(torch.from_numpy(x))
    assert y.shape == (500, 5) and torch.allclose(y.norm(dim=1), torch.ones(500), atol=1e-5)
    # whitening: projected (before normalisation) coordinates have unit variance
    w = PatchProjection.fit(x, 5, whiten=True)
    raw = (
        (torch.from_numpy(x) - torch.from_numpy(w.mean)) @ torch.from_numpy(w.components).T * torch.from_numpy(w.scale)
    )
    np.testing.assert_allclose(raw.var(0, unbiased=True).numpy(), np.ones(5), rtol=1e-3)
    # state round trip
    q = PatchProjection.from_state(w.state("pca_"), "pca_")
    torch.testing.assert_close(q(torch.from_numpy(x)), w(torch.from_numpy(x)))


def test_projection_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 50)).astype(np.float32)
    p = PatchProjection.fit(x, 32)
    assert p.dim == 9  # capped at n − 1
    np.testing.assert_allclose(p.components @ p.components.T, np.eye(9), atol=1e-4)


def test_bad_scale_is_refused():
    with pytest.raises(ConfigError):
        PatchScale(0)


def test_patches_extension_on_a_vit_backbone():
    """Patch descriptors are backbone-agnostic: a (tiny, random) DINOv2 value facet works the same."""
    from vprkit.backbones import build_backbone
    from vprkit.rerank import PatchesExtension

    vit = build_backbone(
        "dinov2_vits14",
        pretrained=False,
        layer=1,
        facet="value",
        config=dict(embed_dim=48, depth=3, num_heads=4, pos_grid=4),
    )

    class Batch:
        pixels = np.random.default_rng(0).random((2, 3, 112, 140)).astype(np.float32)

    with torch.inference_mode():
        feats = vit(torch.from_numpy(Batch.pixels))
    assert feats.grid == (8, 10) and feats.stride == 14
    ext = PatchesExtension({"scales": [[2, 1], [3, 2]], "pca_dim": 16, "k": 4}, vit, None)
    ext.fit([(Batch, feats)])
    sets = ext.describe_batch(Batch, feats)
    assert [len(s) for s in sets[0]] == [7 * 9, 3 * 4]
    assert sets[0][0].descriptors.shape[1] == 16 and sets[0][1].step_px == 28
    payload = ext.encode(Batch, feats)[0]
    back = ext.decode(payload)
    torch.testing.assert_close(back[0].descriptors, sets[0][0].descriptors, atol=2e-3, rtol=0)


def test_randomised_projection_finds_the_exact_principal_subspace():
    # a spectrum that decays like real descriptors: the randomised path (dim ≤ ¼ rank) must span
    # the same leading axes as the exact eigen-decomposition (dim > ¼ rank of the same data)
    rng = np.random.default_rng(2)
    basis, _ = np.linalg.qr(rng.normal(size=(120, 120)))
    x = (rng.normal(size=(600, 120)) * np.geomspace(10, 0.01, 120)) @ basis.T
    dim = 12
    assert dim <= RANDOMISED_PCA_MAX_FRACTION * 119
    fast = PatchProjection.fit(x.astype(np.float32), dim)
    exact = PatchProjection.fit(x.astype(np.float32), 119)  # exact path; its first 12 axes
    overlap = fast.components @ exact.components[:dim].T  # cosines between the two bases
    np.testing.assert_allclose(np.abs(np.linalg.svd(overlap, compute_uv=False)), np.ones(dim), atol=1e-3)
    np.testing.assert_allclose(fast.components @ fast.components.T, np.eye(dim), atol=1e-4)
    # reproducible, and whitening gives unit variance on the randomised axes too
    np.testing.assert_array_equal(PatchProjection.fit(x.astype(np.float32), dim).components, fast.components)
    w = PatchProjection.fit(x.astype(np.float32), dim, whiten=True)
    raw = (torch.from_numpy(x.astype(np.float32)) - torch.from_numpy(w.mean)) @ torch.from_numpy(w.components).T
    np.testing.assert_allclose((raw * torch.from_numpy(w.scale)).var(0, unbiased=True).numpy(), np.ones(dim), rtol=1e-3)
