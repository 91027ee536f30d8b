import numpy as np
import pytest

from vprkit.errors import ConfigError
from vprkit.segments.retriever import rank_candidates
from vprkit.segments.voting import max_seg, max_sim, minmax, vote, weighted

# 3 query SuperSegments × K' = 3 retrieved map segments; map of 4 images
IMAGES = np.array([[0, 1, 0], [2, 0, -1], [1, 1, 2]])
SIMS = np.array([[0.9, 0.8, 0.5], [0.7, 0.6, np.nan], [0.95, 0.4, 0.3]])


def test_minmax_over_whole_table():
    n = minmax(SIMS, IMAGES >= 0)
    # min 0.3, max 0.95 over the valid entries
    assert n[2, 0] == pytest.approx(1.0) and n[2, 2] == pytest.approx(0.0)
    assert n[0, 0] == pytest.approx((0.9 - 0.3) / 0.65)
    assert n[1, 2] == 0.0


def test_weighted_voting_sums_normalised_similarities():
    def f(s):
        return (s - 0.3) / 0.65

    expected = np.array([f(0.9) + f(0.5) + f(0.6), f(0.8) + f(0.95) + f(0.4), f(0.7) + f(0.3), 0.0])
    np.testing.assert_allclose(weighted(IMAGES, SIMS, 4), expected)


def test_maxseg_counts_top1_votes():
    np.testing.assert_array_equal(max_seg(IMAGES, SIMS, 4), [1, 1, 1, 0])
    imgs = np.array([[3, 0], [3, 1], [0, 3]])
    sims = np.array([[0.9, 0.1], [0.8, 0.7], [0.6, 0.5]])
    np.testing.assert_array_equal(max_seg(imgs, sims, 4), [1, 0, 0, 2])


def test_maxsim_takes_best_single_similarity():
    out = max_sim(IMAGES, SIMS, 4)
    np.testing.assert_allclose(out[:3], [0.9, 0.95, 0.7])
    assert out[3] == -np.inf


def test_vote_dispatch_and_constant_table():
    np.testing.assert_allclose(vote(IMAGES, SIMS, 4, "maxsim")[:3], [0.9, 0.95, 0.7])
    with pytest.raises(ConfigError):
        vote(IMAGES, SIMS, 4, "borda")
    # all similarities equal → every retrieved segment counts 1
    np.testing.assert_allclose(weighted(np.array([[0, 0, 1]]), np.array([[0.5, 0.5, 0.5]]), 2), [2, 1])
    assert weighted(np.full((2, 2), -1), np.zeros((2, 2)), 3).tolist() == [0, 0, 0]


def test_rank_candidates_ties_and_fusion():
    seg = np.array([2.0, 5.0, 2.0, 0.0])
    glob = np.array([0.1, 0.2, 0.9, 0.95])
    order, final = rank_candidates(seg, glob)
    assert order.tolist() == [1, 2, 0, 3]  # tie between 0 and 2 broken by the global score
    np.testing.assert_allclose(final, [5, 2, 2, 0])
    order, _ = rank_candidates(seg, glob, fuse=10.0)  # global dominates
    assert order[0] == 3
