"""vprkit.numerics: L2 normalisation, z-scores, reservoir sampling and the one PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vprkit.errors import ConfigError
from vprkit.numerics import NORM_FLOOR, PCA, RANDOMISED_PCA_MAX_FRACTION, ReservoirSampler, l2_normalise, zscore


# ---- l2_normalise ------------------------------------------------------------------------------
def test_l2_normalise_numpy_and_torch_agree_and_keep_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-20, 0.0]], np.float32)
    y = l2_normalise(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[0], [0.6, 0.8])
    assert np.all(y[1] == 0) and np.all(np.isfinite(y))
    np.testing.assert_allclose(y[2], [1e-20 / NORM_FLOOR, 0.0], rtol=1e-5)  # below the floor: divided by it
    np.testing.assert_allclose(l2_normalise(torch.from_numpy(x)).numpy(), y)
    np.testing.assert_allclose(l2_normalise(x.T, axis=0), y.T)
    assert l2_normalise(np.array([3, 4])).dtype.kind == "f"


# ---- zscore ------------------------------------------------------------------------------------
def _old_segments_z(x):
    """``segments/retriever._z`` as it was, the reference for ``nonfinite="min", flat_std=0``."""
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros_like(x)
    x = np.where(finite, x, x[finite].min())
    sd = x.std()
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


def test_zscore_rows_flat_rows_and_invalid_entries():
    z = zscore(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    np.testing.assert_allclose(z[0], [-1.224744871, 0.0, 1.224744871])  # population std (ddof 0)
    np.testing.assert_array_equal(z[1], 0.0)  # a constant row carries no information
    # invalid entries neither shift the statistics nor get a score
    v = np.array([True, True, True, False])
    np.testing.assert_allclose(zscore(np.array([1.0, 2.0, 3.0, 100.0]), v), [*z[0], 0.0])
    np.testing.assert_array_equal(zscore(np.array([1.0, 2.0]), np.array([False, False])), 0.0)
    # spread at or below flat_std counts as flat
    assert np.all(zscore(np.array([0.0, 1e-10])) == 0.0)
    assert np.all(zscore(np.array([0.0, 1e-10]), flat_std=0.0) != 0.0)
    # valid broadcasts over rows
    s = np.array([[1.0, 2.0, 9.0], [3.0, 1.0, -9.0]])
    np.testing.assert_allclose(zscore(s, np.array([True, True, False]))[:, :2], [[-1, 1], [1, -1]])


def test_zscore_non_finite_entries():
    s = np.array([1.0, np.nan, 3.0, -np.inf])
    # default: non-finite entries are invalid → 0 and excluded from the statistics
    np.testing.assert_allclose(zscore(s), [-1.0, 0.0, 1.0, 0.0])
    # "min": they take the row's worst finite value and count (the SegVLAD fusion semantics)
    for x in (
        s,
        np.array([0.2, 0.7, 0.1, 0.4]),
        np.array([np.nan, np.nan]),
        np.array([2.0, 2.0, np.inf]),
        np.random.default_rng(0).normal(size=50),
    ):
        np.testing.assert_allclose(zscore(x, nonfinite="min", flat_std=0.0), _old_segments_z(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        zscore(s, nonfinite="drop")


# ---- ReservoirSampler --------------------------------------------------------------------------
def test_reservoir_fills_then_replaces_and_counts():
    r = ReservoirSampler(5, 3, seed=0)
    r.add(np.arange(9, dtype=np.float32).reshape(3, 3))
    assert len(r) == 3 and r.seen == 3 and r.nbytes == 3 * 3 * 4
    r.add(np.arange(30, dtype=np.float32).reshape(10, 3) + 100)
    assert r.pool.shape == (5, 3) and r.seen == 13 and r.nbytes == 5 * 3 * 4
    # every kept row is one of the rows seen, intact
    assert all(row[1] == row[0] + 1 and row[2] == row[0] + 2 for row in r.pool)
    lazy = ReservoirSampler(4, None, seed=1)
    assert len(lazy) == 0 and lazy.nbytes == 0
    lazy.add(np.ones((2, 7)))
    assert lazy.pool.shape == (2, 7) and lazy.pool.dtype == np.float32
    with pytest.raises(ValueError):
        lazy.add(np.ones((2, 6)))


def test_reservoir_sample_is_uniform_over_the_stream():
    n, cap, trials = 60, 12, 1500
    counts = np.zeros(n)
    for seed in range(trials):
        r = ReservoirSampler(cap, 1, seed=seed)
        rng = np.random.default_rng(10_000 + seed)
        cuts = np.sort(rng.choice(np.arange(1, n), size=5, replace=False))
        for chunk in np.split(np.arange(n, dtype=np.float32)[:, None], cuts):  # uneven batches
            r.add(chunk)
        kept = r.pool[:, 0].astype(int)
        assert len(set(kept)) == cap  # no row kept twice
        counts[kept] += 1
    expected = trials * cap / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = n - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), chi2  # ≈ 5 σ of a chi-square with n − 1 dof
    assert counts[:cap].mean() < 1.2 * expected and counts[-cap:].mean() > 0.8 * expected  # no early/late bias


# ---- PCA ---------------------------------------------------------------------------------------
def _decaying(seed=2, n=600, d=120, top=10.0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return ((rng.normal(size=(n, d)) * np.geomspace(top, 0.01, d)) @ basis.T + rng.normal(size=d)).astype(np.float32)


def _subspace_cosines(a, b):
    return np.linalg.svd(a @ b.T, compute_uv=False)


@pytest.mark.parametrize("n,d,dim", [(600, 120, 40), (60, 120, 30)])  # covariance and Gram paths
def test_pca_exact_path_spans_the_exact_principal_subspace(n, d, dim):
    x = _decaying(n=n, d=d)
    assert dim > RANDOMISED_PCA_MAX_FRACTION * min(d, n - 1)  # auto picks the exact path
    p = PCA.fit(x, dim)
    _, _, vt = np.linalg.svd(x.astype(np.float64) - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(p.mean, x.mean(0), atol=1e-5)
    np.testing.assert_allclose(p.components @ p.components.T, np.eye(dim), atol=1e-4)
    np.testing.assert_allclose(_subspace_cosines(p.components, vt[:dim]), 1.0, atol=1e-3)
    # axes in order of decreasing variance
    var = ((x - p.mean) @ p.components.T).var(0)
    assert np.all(np.diff(var) <= 1e-6 * var[0])


def test_pca_randomised_path_is_close_to_exact_and_reproducible():
    x = _decaying()
    dim = 12
    fast = PCA.fit(x, dim)  # auto: dim ≤ ¼ rank → randomised
    exact = PCA.fit(x, dim, method="exact")
    np.testing.assert_allclose(_subspace_cosines(fast.components, exact.components), 1.0, atol=1e-3)
    np.testing.assert_array_equal(PCA.fit(x, dim).components, fast.components)
    np.testing.assert_array_equal(PCA.fit(x, dim, method="randomised").components, fast.components)
    other = PCA.fit(x, dim, seed=5)
    np.testing.assert_allclose(_subspace_cosines(other.components, exact.components), 1.0, atol=1e-3)
    # the global torch RNG is untouched
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    PCA.fit(x, dim)
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("method", ["exact", "randomised"])
def test_pca_whitening_gives_unit_variance_on_the_fit_sample(method):
    x = _decaying()
    w = PCA.fit(x, 12, whiten=True, method=method)
    raw = (x - w.mean) @ w.components.T * w.scale
    np.testing.assert_allclose(raw.var(0, ddof=1), 1.0, rtol=1e-3)
    y = w.transform(x, normalise=False)
    np.testing.assert_allclose(y, raw, rtol=1e-4, atol=1e-4)
    # regularised whitening: scale_i = 1/sqrt(var_i + reg·mean(var) + eps) keeps the scales closer together
    r = PCA.fit(x, 12, whiten=True, whiten_reg=1.0, method=method)
    var = 1.0 / w.scale.astype(np.float64) ** 2
    np.testing.assert_allclose(r.scale, 1.0 / np.sqrt(var + var.mean()), rtol=1e-3)
    assert w.scale[0] / w.scale[-1] < r.scale[0] / r.scale[-1] < 1


def test_pca_transform_types_normalisation_and_caps():
    x = _decaying(n=50, d=20)
    p = PCA.fit(x, 8)
    y = p.transform(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (50, 8)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    t = p(torch.from_numpy(x))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), y, atol=1e-6)
    assert not p.whitened and np.all(p.scales == 1)
    assert PCA.fit(x[:5], 8).dim == 4  # capped at n − 1
    with pytest.raises(ConfigError):
        PCA.fit(x[:1], 4)
    with pytest.raises(ConfigError):
        PCA.fit(x, 4, method="svd")


def test_pca_state_round_trips_and_reads_both_stored_formats():
    x = _decaying(n=200, d=30)
    w = PCA.fit(x, 6, whiten=True)
    for prefix in ("", "pca_"):
        st = w.state(prefix)
        assert set(st) == {f"{prefix}mean", f"{prefix}components", f"{prefix}scale"}
        np.testing.assert_array_equal(PCA.from_state(st, prefix).transform(x), w.transform(x))
    p = PCA.fit(x, 6)
    assert set(p.state("pca_")) == {"pca_mean", "pca_components"}  # patches.npz, unwhitened
    assert PCA.from_state(p.state("pca_"), "pca_").scale is None
    # SegVLAD's segments.npz: pca_scales always present (ones when not whitened)
    seg = {"pca_mean": w.mean, "pca_components": w.components, "pca_scales": w.scale}
    np.testing.assert_array_equal(PCA.from_state(seg, "pca_").transform(x), w.transform(x))
    # and from an npz file, as maps store them
    from io import BytesIO

    buf = BytesIO()
    np.savez(buf, **w.state("pca_"))
    buf.seek(0)
    with np.load(buf) as z:
        np.testing.assert_array_equal(PCA.from_state(z, "pca_").transform(x), w.transform(x))


def test_pca_from_linear_is_a_trained_projection_then_l2():
    rng = np.random.default_rng(3)
    weight, bias = rng.normal(size=(4, 6, 1, 1)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    p = PCA.from_linear(weight, bias)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    expected = x @ weight.reshape(4, 6).T + bias
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(p.transform(x), expected, rtol=1e-5, atol=1e-6)
    st = p.state("pca_")
    assert "pca_bias" in st and "pca_scale" not in st
    np.testing.assert_allclose(PCA.from_state(st, "pca_").transform(x), expected, rtol=1e-5, atol=1e-6)
