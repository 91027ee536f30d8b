import numpy as np
import pytest

from vprkit.segments.base import mask_centroids, masks_to_patches
from vprkit.segments.graph import adjacency, expand, supersegments

T0, T1, T2, B0, B1, B2, B3 = range(7)
EDGES = [(T0, T1), (T1, T2), (B0, B1), (B1, B2), (B2, B3), (B0, T0), (T0, B1), (B1, T1), (T1, B2), (B2, T2), (T2, B3)]


def expected_adjacency():
    a = np.eye(7, dtype=bool)
    for i, j in EDGES:
        a[i, j] = a[j, i] = True
    return a


def test_centroids_of_layout(brick_layout):
    c = mask_centroids(brick_layout)
    np.testing.assert_allclose(c[T0], [19.5, 15.5])
    np.testing.assert_allclose(c[B3], [109.5, 47.5])


def test_delaunay_adjacency_of_hand_made_layout(brick_layout):
    a = adjacency(mask_centroids(brick_layout))
    assert a.dtype == bool
    np.testing.assert_array_equal(a, expected_adjacency())
    assert (a == a.T).all() and a.diagonal().all()


@pytest.mark.parametrize(
    "order,expected",
    [
        (0, {B0}),
        (1, {B0, T0, B1}),
        (2, {B0, T0, B1, T1, B2}),
        (3, {B0, T0, B1, T1, B2, T2, B3}),
    ],
)
def test_expansion_orders_from_b0(order, expected):
    reach = expand(expected_adjacency(), order)
    assert set(np.flatnonzero(reach[B0])) == expected


def test_expansion_from_t2_and_identity():
    a = expected_adjacency()
    np.testing.assert_array_equal(expand(a, 0), np.eye(7, dtype=bool))
    assert set(np.flatnonzero(expand(a, 1)[T2])) == {T2, T1, B2, B3}
    assert set(np.flatnonzero(expand(a, 2)[T2])) == {T2, T1, B2, B3, T0, B1}
    with pytest.raises(ValueError):
        expand(a, -1)


def test_supersegments_are_unions_of_patch_sets(brick_layout):
    sp = masks_to_patches(brick_layout, (8, 15), 8)
    a = expected_adjacency()
    for order in range(4):
        sup = supersegments(sp, a, order)
        reach = expand(a, order)
        for s in range(7):
            np.testing.assert_array_equal(sup[s], sp[reach[s]].any(0))
    # o = 0 gives the segments themselves
    np.testing.assert_array_equal(supersegments(sp, a, 0), sp)


def test_degenerate_one_and_two_segments():
    np.testing.assert_array_equal(adjacency(np.array([[5.0, 5.0]])), [[True]])
    np.testing.assert_array_equal(adjacency(np.array([[0.0, 0.0], [9.0, 1.0]])), np.ones((2, 2), bool))
    assert adjacency(np.zeros((0, 2))).shape == (0, 0)
    sp = np.array([[True, False, True]])
    np.testing.assert_array_equal(supersegments(sp, adjacency(np.array([[1.0, 1.0]])), 3), sp)


def test_collinear_centroids_fall_back_to_a_chain():
    pts = np.array([[30.0, 30.0], [10.0, 10.0], [20.0, 20.0], [0.0, 0.0]])  # on a line, shuffled
    a = adjacency(pts)
    expected = np.eye(4, dtype=bool)
    for i, j in [(3, 1), (1, 2), (2, 0)]:  # chain in order along the line
        expected[i, j] = expected[j, i] = True
    np.testing.assert_array_equal(a, expected)


def test_duplicate_and_nan_centroids_do_not_crash():
    pts = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 0.0], [np.nan, np.nan]])
    a = adjacency(pts)
    assert a.shape == (5, 5) and (a == a.T).all()
    assert (a.sum(1) >= 2).all()  # everyone has at least one neighbour besides itself
    same = adjacency(np.zeros((4, 2)))  # all identical
    assert same.shape == (4, 4) and (same.sum(1) >= 2).all()
