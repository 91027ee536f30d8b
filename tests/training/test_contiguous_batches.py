"""Contiguous batches ([sampler] contiguous): a share of the batches are windows of consecutive places."""

from __future__ import annotations

import numpy as np
import pytest

from vprkit.errors import ConfigError
from vprkit.training import PlaceLabels
from vprkit.training.recipe import settings_from
from vprkit.training.trainer import PlaceSampler, place_groups

N, P = 40, 8


def _groups():
    # Two images (seasons) per place; places in frame order, as place_groups gives them for frame labels.
    labels = PlaceLabels.from_frames(np.r_[np.arange(N), np.arange(N)])
    return place_groups(labels)


def _places_of(batch: np.ndarray) -> np.ndarray:
    return np.unique(batch % N)  # image i and i + N are the same place (frame i)


def test_place_groups_of_frame_labels_are_in_frame_order():
    g = _groups()
    assert [sorted(x.tolist()) for x in g] == [[i, i + N] for i in range(N)]


def test_every_batch_is_a_window_of_consecutive_places_at_share_one():
    s = PlaceSampler(_groups(), P, 2, seed=3, contiguous=1.0)
    starts = set()
    for epoch in range(3):
        for step in range(s.steps_per_epoch):
            b = s.batch(epoch, step)
            places = _places_of(b)
            assert len(b) == 2 * P and len(places) == P
            assert np.array_equal(places, np.arange(places[0], places[0] + P))  # consecutive frames
            assert np.array_equal(b, s.batch(epoch, step))  # a pure function of (seed, epoch, step)
            starts.add(int(places[0]))
    assert len(starts) > 3  # windows start at various frames


def test_a_share_of_the_batches_are_windows_and_the_others_are_unchanged():
    plain = PlaceSampler(_groups(), P, 2, seed=1)
    mixed = PlaceSampler(_groups(), P, 2, seed=1, contiguous=0.5)
    zero = PlaceSampler(_groups(), P, 2, seed=1, contiguous=0.0)
    windows = changed = total = 0
    for epoch in range(40):
        for step in range(plain.steps_per_epoch):
            a, b = plain.batch(epoch, step), mixed.batch(epoch, step)
            assert np.array_equal(a, zero.batch(epoch, step))
            places = _places_of(b)
            is_window = np.array_equal(places, np.arange(places[0], places[0] + P))
            windows += is_window
            if not np.array_equal(a, b):
                changed += 1
                assert is_window  # only window batches differ from the plain sampler's
            total += 1
    assert 0.35 < windows / total < 0.65 and changed > 0.3 * total


def test_share_out_of_range_is_refused_and_the_recipe_key_reaches_the_settings():
    with pytest.raises(ConfigError, match="contiguous"):
        PlaceSampler(_groups(), P, 2, contiguous=1.5)
    s = settings_from({"sampler": {"places": 8, "images_per_place": 2, "contiguous": 0.25}})
    assert s.contiguous_batches == 0.25
    assert settings_from({}).contiguous_batches == 0.0
