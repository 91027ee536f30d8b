import numpy as np
import pytest
import torch

from vprkit.errors import ConfigError
from vprkit.segments.supersegments import (
    PCA,
    describe,
    select_distinctive,
    supersegment_sap,
    supersegment_vlad,
    supersegment_vlad_loop,
)


def _data(seed=0, n=60, d=12, k=5, s=9):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    c = rng.normal(size=(k, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    m = rng.random((s, n)) < 0.3
    m[0] = False  # an empty SuperSegment
    m[1] = True  # the whole image
    return x, c, m


def test_vectorised_vlad_equals_per_segment_loop():
    for seed in range(3):
        x, c, m = _data(seed)
        fast = supersegment_vlad(x, m, c)
        slow = supersegment_vlad_loop(x, m, c)
        assert fast.shape == (len(m), c.size)
        np.testing.assert_allclose(fast, slow, atol=1e-5)
        assert np.allclose(fast[0], 0)  # empty stays zero, no NaN
        np.testing.assert_allclose(np.linalg.norm(fast[1:], axis=1), 1, atol=1e-5)


def test_whole_image_supersegment_equals_global_vlad():
    from vprkit.aggregation.vlad import hard_vlad

    x, c, m = _data(1)
    np.testing.assert_allclose(
        supersegment_vlad(x, m, c)[1], hard_vlad(torch.from_numpy(x)[None], torch.from_numpy(c))[0].numpy(), atol=1e-5
    )


def test_sap_is_mean_of_normalised_descriptors():
    x, c, m = _data(2)
    sap = supersegment_sap(x, m)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = 3
    ref = xn[m[s]].mean(0)
    np.testing.assert_allclose(sap[s], ref / np.linalg.norm(ref), atol=1e-5)
    np.testing.assert_allclose(describe(x, m, pooling="sap"), sap)
    with pytest.raises(ConfigError):
        describe(x, m, None, "vlad")
    with pytest.raises(ConfigError):
        describe(x, m, c, "max")


def test_pca_projection_and_regularised_whitening():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20)) * np.linspace(5, 0.1, 20)
    p = PCA.fit(x, 8)
    y = p.transform(x)
    assert y.shape == (300, 8) and np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    assert np.allclose(p.scales, 1)
    w = PCA.fit(x, 8, whiten=True, reg=0.0)
    z = (x - w.mean) @ w.components.T * w.scales
    np.testing.assert_allclose(z.std(0, ddof=1), 1, atol=1e-3)  # plain whitening: unit variance
    r = PCA.fit(x, 8, whiten=True, reg=1.0)
    # scales[0] < scales[-1] (big eigenvalue → small scale); regularised whitening keeps them closer to 1
    assert w.scales[0] / w.scales[-1] < r.scales[0] / r.scales[-1] < 1
    # dimension is capped by the number of samples
    assert PCA.fit(x[:5], 8).dim == 4
    q = PCA.from_state(p.state())
    np.testing.assert_allclose(q.transform(x), y, atol=1e-6)


def test_select_distinctive():
    d = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32)
    np.testing.assert_array_equal(select_distinctive(d, np.ones(4), 1, "distinct"), [3])
    np.testing.assert_array_equal(select_distinctive(d, np.array([5, 1, 9, 2]), 2, "area"), [0, 2])
    np.testing.assert_array_equal(select_distinctive(d, np.ones(4), 0), np.arange(4))
    np.testing.assert_array_equal(select_distinctive(d, np.ones(4), 10), np.arange(4))
    with pytest.raises(ConfigError):
        select_distinctive(d, np.ones(4), 2, "random")


def test_auto_whitening_needs_many_samples_per_dimension():
    from vprkit.segments.retriever import AUTO_WHITEN_SAMPLES_PER_DIM, whiten_decision

    assert whiten_decision("auto", AUTO_WHITEN_SAMPLES_PER_DIM * 512, 512)
    assert not whiten_decision("auto", 2600, 512)  # Corridor-sized map: whitening collapsed recall
    assert whiten_decision(True, 10, 512) and not whiten_decision(False, 10**6, 512)
    with pytest.raises(ConfigError):
        whiten_decision("yes", 10, 512)
