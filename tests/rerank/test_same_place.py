"""The top-1's place (route neighbours) and the fusion rule that keeps the global order inside it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vprkit.config import RerankConfig
from vprkit.errors import ConfigError
from vprkit.rerank.fusion import global_order_within, rank_shortlist
from vprkit.rerank.places import RouteNeighbours
from vprkit.rerank.reranker import PatchReranker


def test_place_by_row_order_is_the_rows_within_the_radius_clipped_at_the_ends():
    places = RouteNeighbours(10, 2)
    assert not places.by_position
    assert places.place_of(5).tolist() == [3, 4, 5, 6, 7]
    assert places.place_of(0).tolist() == [0, 1, 2]
    assert places.place_of(9).tolist() == [7, 8, 9]
    with pytest.raises(IndexError):
        places.place_of(10)


def test_place_by_position_counts_a_second_traversal_of_the_same_spot():
    # rows 0-5 drive east along y = 0 every 10 m; rows 6-8 pass again along y = 1 at x = 20, 30, 40
    poses = np.array([[0, 0], [10, 0], [20, 0], [30, 0], [40, 0], [50, 0], [20, 1], [30, 1], [40, 1]], float)
    places = RouteNeighbours(len(poses), 1, poses)
    assert places.by_position
    # row 3 (x = 30): its two nearest are the other traversal's x = 30 (1 m) and one of x = 20/40 (≈10 m)
    got = places.place_of(3)
    assert 3 in got and 7 in got and len(got) == 3
    # the second traversal's row 7 has row 3 among its place too
    assert 3 in places.place_of(7)


def test_a_map_with_any_unknown_pose_falls_back_to_row_order():
    poses = np.array([[0, 0], [np.nan, np.nan], [20, 0], [30, 0]])
    places = RouteNeighbours(4, 1, poses)
    assert not places.by_position
    assert places.place_of(2).tolist() == [1, 2, 3]


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_the_radius_must_be_a_number_of_rows(bad):
    with pytest.raises(ValueError, match="radius"):
        RouteNeighbours(5, bad)


def test_radius_zero_makes_every_row_its_own_place():
    assert RouteNeighbours(5, 0).place_of(2).tolist() == [2]
    assert RouteNeighbours(5, 0, np.arange(10.0).reshape(5, 2)).place_of(2).tolist() == [2]


def _route(n_places: int, views: int, noise: float, seed: int = 0) -> np.ndarray:
    """A route of ``n_places`` random places, each filmed ``views`` times in a row (small changes):
    consecutive rows of one place are near-duplicates, rows of different places unrelated."""
    rng = np.random.default_rng(seed)
    places = rng.normal(size=(n_places, 64))
    rows = np.repeat(places, views, axis=0) + noise * rng.normal(size=(n_places * views, 64))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _radius_by_definition(desc: np.ndarray, quantile: float) -> int:
    """The definition, plainly: all pairs' cosines, their quantile, and the mean cosine at each lag."""
    n = len(desc)
    pairs = [float(desc[i] @ desc[j]) for i in range(n) for j in range(i + 1, n)]
    threshold = np.quantile(pairs, quantile)
    radius = 0
    for lag in range(1, 11):
        if np.mean([float(desc[i] @ desc[i + lag]) for i in range(n - lag)]) <= threshold:
            break
        radius = lag
    return radius


@pytest.mark.parametrize("exact_rows", [10**6, 10])  # measured exactly, and sampled
def test_place_radius_follows_how_densely_the_route_was_filmed(exact_rows, monkeypatch):
    from vprkit.rerank import places

    monkeypatch.setattr(places, "PLACE_EXACT_ROWS", exact_rows)
    radii = []
    for views in (1, 3, 5, 9):
        desc = _route(240 // views, views, noise=0.3)
        radius = places.place_radius(lambda rows: desc[rows], len(desc))
        assert radius == _radius_by_definition(desc, places.PLACE_SIMILARITY_QUANTILE), views
        radii.append(radius)
    # a place filmed once is its own place; the more views of each place in a row, the wider it reaches
    assert radii[0] == 0 and radii == sorted(radii) and radii[-1] > radii[1] > 0


def test_mask_marks_the_shortlist_entries_in_the_first_entrys_place():
    places = RouteNeighbours(100, 1)
    np.testing.assert_array_equal(places.mask(np.array([40, 41, 7, 39, 42])), [True, True, False, True, False])


def test_global_order_within_gives_the_group_its_scores_in_global_order():
    fused = np.array([0.1, 0.9, 0.5, 0.3])
    out = global_order_within(fused, np.array([True, True, False, True]))
    np.testing.assert_allclose(out, [0.9, 0.3, 0.5, 0.1])


def _fuse(same_place):
    # three candidates in global order: 0 the top-1, 1 its route neighbour, 2 another place; the
    # neighbour's patches out-score the top-1's
    per_scale = np.array([[0.2, 0.9, 0.1]])
    head_scores = np.array([0.80, 0.79, 0.70])
    keep = np.ones(3, bool)
    return rank_shortlist(per_scale, head_scores, keep, (1.0,), 0.5, None, None, same_place)


def test_a_neighbour_of_the_top1_cannot_overturn_it_but_another_place_can():
    assert int(np.argmax(_fuse(None))) == 1  # the original fusion: the neighbour wins on patches
    assert int(np.argmax(_fuse(np.array([True, True, False])))) == 0  # same place: global order stands
    # another place with the same patch lead does overturn it
    per_scale = np.array([[0.2, 0.1, 0.9, 0.1]])
    fused = rank_shortlist(
        per_scale,
        np.array([0.80, 0.79, 0.79, 0.50]),
        np.ones(4, bool),
        (1.0,),
        0.5,
        None,
        None,
        np.array([True, True, False, False]),
    )
    assert int(np.argmax(fused)) == 2


def test_same_place_must_hold_the_top1():
    with pytest.raises(ValueError, match="top-1"):
        _fuse(np.array([False, True, False]))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "near"])
def test_config_rejects_a_bad_same_place(bad):
    with pytest.raises(ConfigError, match="same_place"):
        RerankConfig("t", same_place=bad)


def test_the_reranker_needs_the_maps_places_when_the_preset_uses_them():
    settings = RerankConfig("t", same_place=1)
    stub_ext = SimpleNamespace(describe_batch=lambda batch, feats: [[]])
    stub_candidates = SimpleNamespace(stored=True, close=lambda: None)
    with pytest.raises(ValueError, match="RouteNeighbours"):
        PatchReranker(settings, stub_ext, stub_candidates)
    assert PatchReranker(settings, stub_ext, stub_candidates, places=RouteNeighbours(4, 1)).places is not None


# ---- "auto": a place as far as the neighbours look alike -------------------------------------------


def _stretch_route() -> np.ndarray:
    """20 rows of unrelated views, except rows 8-13: one spot filmed six times (the robot slowed down),
    and rows 15-16, alike again but behind the unrelated row 14."""
    rng = np.random.default_rng(4)
    desc = rng.normal(size=(20, 32))
    spot = rng.normal(size=32)
    desc[8:14] = spot + 0.2 * rng.normal(size=(6, 32))
    desc[15:17] = spot + 0.2 * rng.normal(size=(2, 32))
    return desc / np.linalg.norm(desc, axis=1, keepdims=True)


def test_a_place_by_similarity_reaches_as_far_as_the_neighbours_look_alike():
    desc = _stretch_route()
    places = RouteNeighbours(len(desc), 10, read_rows=lambda rows: desc[rows], similarity=0.5)
    assert places.place_of(10).tolist() == [8, 9, 10, 11, 12, 13]  # stops at row 14, not at 15-16 beyond it
    assert places.place_of(8).tolist() == [8, 9, 10, 11, 12, 13]
    assert places.place_of(3).tolist() == [3]  # an unrelated row is its own place
    # the radius caps it
    capped = RouteNeighbours(len(desc), 1, read_rows=lambda rows: desc[rows], similarity=0.5)
    assert capped.place_of(10).tolist() == [9, 10, 11]


def test_a_place_by_similarity_with_poses_goes_nearest_first():
    desc = _stretch_route()
    poses = np.c_[np.arange(20.0) * 5, np.zeros(20)]
    poses[16] = poses[10] + [0.5, 0.0]  # row 16: the slow spot again on a second pass, nearest to row 10 of all
    places = RouteNeighbours(len(desc), 3, poses, read_rows=lambda rows: desc[rows], similarity=0.5)
    got = places.place_of(10).tolist()
    assert 16 in got and 10 in got and set(got) <= {8, 9, 10, 11, 12, 13, 16}
    assert places.place_of(3).tolist() == [3]


def test_a_place_by_similarity_needs_the_descriptors_and_the_similarity():
    with pytest.raises(ValueError, match="both"):
        RouteNeighbours(5, 2, read_rows=lambda rows: np.zeros((len(rows), 2)))
    with pytest.raises(ValueError, match="both"):
        RouteNeighbours(5, 2, similarity=0.5)


def test_auto_places_use_the_maps_similarity_quantile():
    from vprkit.rerank import places as places_module
    from vprkit.rerank.reranker import route_neighbours

    desc = _route(40, 3, noise=0.3)
    store = type(
        "Store",
        (),
        {
            "read_global": staticmethod(lambda rows: desc[np.asarray(rows)]),
            "read_poses": staticmethod(lambda: None),
            "__len__": lambda self: len(desc),
        },
    )()
    logged = []
    got = route_neighbours(RerankConfig("t", same_place="auto"), store, logged.append)
    pairs = (desc @ desc.T)[np.triu_indices(len(desc), 1)]
    assert got.similarity == pytest.approx(np.quantile(pairs, places_module.PLACE_SIMILARITY_QUANTILE), abs=1e-6)
    assert got.radius == places_module.MAX_PLACE_RADIUS and "cosine >" in logged[0]
    # each place is its own three views (rows 3k … 3k+2): as alike as near-duplicates, unlike the next place
    assert got.place_of(4).tolist() == [3, 4, 5]
    assert route_neighbours(RerankConfig("t", same_place=2), store, logged.append).similarity is None
