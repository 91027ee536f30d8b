"""Transformed query sets (rotated, zoomed, off-centre cropped) for testing re-ranking: the transforms
against their definitions, and the datasets built from real Corridor queries (cached, deterministic,
same ground truth)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vprkit.datasets import load_dataset
from vprkit.datasets.transforms import QUERY_TRANSFORMS, crop, rotate, transformed_queries, zoom
from vprkit.errors import ConfigError

QUERIES = 6


def _ramp(h: int = 40, w: int = 60) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4, y * 6, (x + y) * 2], -1).astype(np.uint8)


def test_rotation_by_0_is_identity_and_by_180_flips_both_axes():
    img = _ramp()
    np.testing.assert_array_equal(rotate(img, 0), img)
    np.testing.assert_array_equal(rotate(img, 180), img[::-1, ::-1])


def test_a_quarter_turn_of_a_square_image_is_rot90_and_corners_of_30_degrees_are_black():
    sq = _ramp(41, 41)
    np.testing.assert_array_equal(rotate(sq, 90), np.rot90(sq))  # counter-clockwise
    r = rotate(_ramp(), 30)
    assert r.shape == (40, 60, 3) and (r[0, 0] == 0).all() and (r[-1, -1] == 0).all()
    assert (r[20, 30] != 0).any()  # the centre is still picture


def test_zoom_keeps_the_centre_and_the_size():
    img = _ramp()
    np.testing.assert_array_equal(zoom(img, 1.0), img)
    z = zoom(img, 2.0)
    assert z.shape == img.shape
    assert np.abs(z[20, 30].astype(int) - img[20, 30].astype(int)).max() <= 4  # the centre stays at the centre
    assert z[:, :, 0].max() - z[:, :, 0].min() < img[:, :, 0].max() - img[:, :, 0].min()  # a narrower view


def test_off_centre_crops_cycle_through_the_corners():
    img = _ramp()
    tl, tr = crop(img, 0.5, 0), crop(img, 0.5, 1)
    assert tl.shape == tr.shape == img.shape
    assert tl[:, :, 0].mean() < img[:, :, 0].mean() < tr[:, :, 0].mean()  # left half, then right half
    np.testing.assert_array_equal(crop(img, 0.5, 4), tl)
    with pytest.raises(ConfigError, match="0 < amount < 1"):
        crop(img, 1.2)
    with pytest.raises(ConfigError, match="zoom factor"):
        zoom(img, 0.5)


def test_transformed_queries_reuse_the_ground_truth_and_are_written_once(shared_datasets, tmp_path):
    ds = load_dataset(shared_datasets / "corridor").subset(1, QUERIES, which="queries")
    assert set(QUERY_TRANSFORMS.names()) == {"rotate", "zoom", "crop"}
    out = transformed_queries(ds, "rotate", 15, tmp_path)
    assert out.name == f"{ds.name}+rotate15" and out.database_images == ds.database_images
    assert out.ground_truth is ds.ground_truth and len(out.query_images) == QUERIES
    files = [out.queries_dir / k for k in out.query_images]
    assert all(f.suffix == ".png" and f.is_file() for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    first = [f.read_bytes() for f in files]
    again = transformed_queries(ds, "rotate", 15, tmp_path)
    assert [f.stat().st_mtime_ns for f in files] == stamps and again.queries_dir == out.queries_dir  # cached
    other = transformed_queries(ds, "rotate", 15, tmp_path / "elsewhere")
    assert [(other.queries_dir / k).read_bytes() for k in other.query_images] == first  # deterministic
    with pytest.raises(ConfigError, match="unknown query transform 'spin'"):
        transformed_queries(ds, "spin", 1, tmp_path)
    with pytest.raises(ConfigError, match="labelled"):
        transformed_queries(dataclasses.replace(ds, ground_truth=None), "zoom", 1.3, tmp_path)
