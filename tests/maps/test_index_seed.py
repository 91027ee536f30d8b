"""``FaissIndex.build(seed=…)`` seeds the k-means FAISS runs to train an index (it used to be ignored)."""

import faiss
import numpy as np

from vprkit.maps import FaissIndex


def _trained_centres(seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((1200, 16)).astype("float32")
    index = FaissIndex.build(x, "IVF8,PQ4x4", seed=seed).index  # keep it alive: the views below borrow its memory
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    coarse = faiss.downcast_index(ivf.quantizer)
    return faiss.rev_swig_ptr(coarse.get_xb(), 8 * 16).copy(), faiss.vector_to_array(ivf.pq.centroids)


def test_same_seed_same_index_other_seed_other_codebooks():
    a, pa = _trained_centres(0)
    b, pb = _trained_centres(0)
    c, pc = _trained_centres(7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pa, pb)
    assert not np.allclose(a, c) and not np.allclose(pa, pc)
