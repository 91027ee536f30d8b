import math

import numpy as np
import pytest
import torch

from vprkit.aggregation.vlad import (
    VLAD,
    DescriptorSampler,
    Vocabulary,
    fit_vocabulary,
    hard_vlad,
    residual_sums,
    assign,
)
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError, VocabularyMismatchError

C = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_hand_computed_vlad():
    # (3,0)→c1, residual 0; (2,1)/√5→c1, residual (2/√5−1, 1/√5); (1,2)/√5→c2, residual (1/√5, 2/√5−1); (0,5)→c2, 0.
    x = torch.tensor([[[3.0, 0.0], [2.0, 1.0], [1.0, 2.0], [0.0, 5.0]]])
    r1 = torch.tensor([2 / math.sqrt(5) - 1, 1 / math.sqrt(5)])
    r2 = torch.tensor([1 / math.sqrt(5), 2 / math.sqrt(5) - 1])
    expected = torch.cat([r1 / r1.norm(), r2 / r2.norm()]) / math.sqrt(2)
    assert torch.allclose(hard_vlad(x, C)[0], expected, atol=1e-6)


def test_descriptors_are_normalised_before_assignment_and_residuals():
    x = torch.tensor([[[3.0, 0.0], [2.0, 1.0], [1.0, 2.0], [0.0, 5.0]]])
    scaled = x * torch.tensor([[[7.0], [0.1], [3.0], [100.0]]])  # per-descriptor scale must not matter
    assert torch.allclose(hard_vlad(x, C), hard_vlad(scaled, C), atol=1e-6)


def test_intra_normalisation_before_global_norm_and_empty_clusters_zero():
    # cluster 1 gets ten descriptors, cluster 2 one: after intra-norm both blocks have equal norm
    many = [[1.0, 0.3]] * 10 + [[0.2, 1.0]]
    v = hard_vlad(torch.tensor([many]), torch.cat([C, torch.tensor([[-1.0, 0.0]])]))[0].view(3, 2)
    norms = v.norm(dim=1)
    assert float(norms[0]) == pytest.approx(float(norms[1]), abs=1e-6)
    assert float(norms[0]) == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert float(norms[2]) == 0.0  # empty cluster stays zero, no NaN


def test_membership_sums_equal_per_region_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 5, generator=g)
    c = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=1)
    m = (torch.rand(2, 3, 30, generator=g) > 0.5).float()
    xn, labels = assign(x, c)
    fast = residual_sums(xn, labels, c, m)
    for b in range(2):
        for s in range(3):
            sel = m[b, s].bool()
            loop = residual_sums(xn[b : b + 1, sel], labels[b : b + 1, sel], c)[0]
            assert torch.allclose(fast[b, s], loop, atol=1e-5)


def test_vlad_aggregator_dim_and_chunks():
    rng = np.random.default_rng(0)
    voc = fit_vocabulary(rng.normal(size=(500, 8)).astype(np.float32), k=4)
    agg = VLAD(8, voc, chunk=2)
    f = DenseFeatures(torch.randn(5, 3, 4, 8), 16, (48, 64))
    out = agg(f)
    assert out.shape == (5, 32) and agg.dim == 32
    assert torch.allclose(out, hard_vlad(f.flat(), torch.from_numpy(voc.centres)), atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)


def test_vocabulary_roundtrip_checksum_and_mismatch(tmp_path):
    rng = np.random.default_rng(1)
    ident = {"backbone": "efficientnet-lite0", "block": 10, "dim": 8, "stride": 16, "image": {"size": [240, 320]}}
    voc = fit_vocabulary(rng.normal(size=(300, 8)).astype(np.float32), k=4, metadata={"identity": ident})
    assert np.allclose(np.linalg.norm(voc.centres, axis=1), 1, atol=1e-5)
    p = voc.save(tmp_path / "v.npz")
    back = Vocabulary.load(p)
    assert back.checksum == voc.checksum and back.k == 4
    back.check_compatible(ident)
    with pytest.raises(VocabularyMismatchError, match="block"):
        back.check_compatible({**ident, "block": 12})
    with pytest.raises(VocabularyMismatchError, match="image"):
        back.check_compatible({**ident, "image": {"size": [480, 640]}})
    with pytest.raises(VocabularyMismatchError):
        VLAD(16, back)


def test_corrupt_vocabulary_detected(tmp_path):
    voc = Vocabulary(np.eye(3, dtype=np.float32), {"name": "x"})
    p = voc.save(tmp_path / "v.npz")
    with np.load(p) as z:
        np.savez(p, centres=z["centres"] * 2, metadata=z["metadata"], checksum=z["checksum"])
    with pytest.raises(VocabularyMismatchError, match="checksum"):
        Vocabulary.load(p)


def test_sampler_memory_cap_and_uniformity():
    s = DescriptorSampler(dim=4, max_bytes=4 * 4 * 100)  # room for 100 descriptors
    for i in range(50):
        patches = torch.zeros(1, 2, 5, 4)
        patches[..., 0] = 1.0
        patches[..., 1] = float(i)  # image i is identifiable after normalisation
        s.add(DenseFeatures(patches, 16, (32, 80)))
    assert len(s.pool) == 100 and s.seen == 500 and s.nbytes == 100 * 4 * 4
    # reservoir sampling keeps rows from late images too, not only the first ten images
    image_of_row = np.round(s.pool[:, 1] / s.pool[:, 0]).astype(int)
    assert image_of_row.max() >= 25 and len(np.unique(image_of_row)) > 20


def test_multi_vocabulary_vlad_is_scaled_concatenation_of_per_vocabulary_vlads(tmp_path):
    rng = np.random.default_rng(3)
    voc = fit_vocabulary(rng.normal(size=(600, 8)).astype(np.float32), k=4, sets=3, seed=5)
    assert voc.sets == 3 and voc.alternates.shape == (2, 4, 8) and voc.metadata["sets"] == 3
    single = fit_vocabulary(rng.normal(size=(600, 8)).astype(np.float32), k=4, seed=5)
    assert single.sets == 1 and single.alternates is None
    assert not np.allclose(voc.centres, voc.alternates[0])  # other seeds, other centres
    f = DenseFeatures(torch.randn(3, 2, 5, 8), 16, (32, 80))
    agg = VLAD(8, voc, vocabularies=3, chunk=2)
    out = agg(f)
    parts = [hard_vlad(f.flat(), torch.from_numpy(c)) for c in [voc.centres, *voc.alternates]]
    assert out.shape == (3, 96) and agg.dim == 96
    torch.testing.assert_close(out, torch.cat(parts, 1) / math.sqrt(3))
    # similarity = mean of the per-vocabulary similarities
    sims = out @ out[:1].T
    torch.testing.assert_close(sims, sum(p @ p[:1].T for p in parts) / 3)
    # saved and loaded with its alternates; the checksum covers them
    back = Vocabulary.load(voc.save(tmp_path / "multi.npz"))
    assert back.sets == 3 and back.checksum == voc.checksum
    torch.testing.assert_close(VLAD(8, back, vocabularies=3)(f), out)
    assert Vocabulary(voc.centres, voc.metadata).checksum != voc.checksum
    with pytest.raises(VocabularyMismatchError, match="rebuild it with vocabulary sets"):
        VLAD(8, single, vocabularies=2)


def _reference_multi_assignment_vlad(x: np.ndarray, c: np.ndarray, m: int) -> np.ndarray:
    """The definition written out descriptor by descriptor (no vectorisation), for comparison."""
    k, d = c.shape
    sums = np.zeros((k, d))
    for desc in x:
        desc = desc / np.linalg.norm(desc)
        for j in np.argsort(-(c @ desc))[:m]:  # the m highest-cosine centres
            sums[j] += desc - c[j]
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    sums = np.where(norms > 0, sums / np.maximum(norms, 1e-12), 0.0)
    v = sums.ravel()
    return v / np.linalg.norm(v)


def test_multiple_assignment_hand_computed():
    # three centres at 0°, 45°, 90°; with m = 2 the descriptor at 10° goes to the 0° and 45° centres,
    # the one at 80° to the 90° and 45° centres; the 45° cluster gets both residuals.
    c = torch.tensor([[1.0, 0.0], [math.sqrt(0.5), math.sqrt(0.5)], [0.0, 1.0]])
    a, b = math.radians(10), math.radians(80)
    x = torch.tensor([[[math.cos(a), math.sin(a)], [math.cos(b), math.sin(b)]]])
    xa, xb = x[0, 0], x[0, 1]
    blocks = [xa - c[0], (xa - c[1]) + (xb - c[1]), xb - c[2]]
    expected = torch.cat([r / r.norm() for r in blocks]) / math.sqrt(3)
    torch.testing.assert_close(hard_vlad(x, c, assignments=2)[0], expected)
    # m = 1 leaves the middle cluster empty: AnyLoc's hard VLAD
    hard = torch.cat([(xa - c[0]) / (xa - c[0]).norm(), torch.zeros(2), (xb - c[2]) / (xb - c[2]).norm()]) / math.sqrt(
        2
    )
    torch.testing.assert_close(hard_vlad(x, c, assignments=1)[0], hard)


def test_multiple_assignment_matches_per_descriptor_reference_and_keeps_dim():
    rng = np.random.default_rng(7)
    voc = fit_vocabulary(rng.normal(size=(800, 6)).astype(np.float32), k=8)
    f = DenseFeatures(torch.from_numpy(rng.normal(size=(3, 4, 5, 6)).astype(np.float32)), 16, (64, 80))
    for m in (1, 3, 8):
        agg = VLAD(6, voc, assignments=m, chunk=2)
        out = agg(f)
        assert out.shape == (3, 48) and agg.dim == 48  # multiple assignment costs no dimension
        for i in range(3):
            ref = _reference_multi_assignment_vlad(f.flat()[i].numpy(), voc.centres, m)
            np.testing.assert_allclose(out[i].numpy(), ref, atol=1e-5)
    assert VLAD(6, voc, assignments=3).identity()["assignments"] == 3
    assert "assignments" not in VLAD(6, voc).identity()
    with pytest.raises(ConfigError, match="between 1 and the vocabulary's K=8"):
        VLAD(6, voc, assignments=9)
    with pytest.raises(ConfigError, match="assignments=0"):
        VLAD(6, voc, assignments=0)


def test_multiple_assignment_region_sums_equal_per_region_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 20, 5, generator=g)
    c = torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    membership = (torch.rand(2, 3, 20, generator=g) > 0.5).float()
    xn, labels = assign(x, c, assignments=2)
    assert labels.shape == (2, 20, 2)
    fast = residual_sums(xn, labels, c, membership)
    for b in range(2):
        for s in range(3):
            sel = membership[b, s].bool()
            torch.testing.assert_close(fast[b, s], residual_sums(xn[b : b + 1, sel], labels[b : b + 1, sel], c)[0])
