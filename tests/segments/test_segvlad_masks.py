import numpy as np
import pytest
from PIL import Image

from vprkit.errors import ConfigError
from vprkit.images import ImageSpec, load_prepared, prepare_image
from vprkit.segments import SEGMENTERS, build_segmenter
from vprkit.segments.base import handle_uncovered, labels_to_masks, masks_to_patches, masks_to_prepared
from vprkit.segments.retriever import batch_images, segment_graph


def test_any_pixel_rule_on_brick_layout(brick_layout):
    sp = masks_to_patches(brick_layout, (8, 15), 8)
    assert sp.shape == (7, 120)
    grid = sp.reshape(7, 8, 15)
    # T0 covers columns 0..39 → patch columns 0..4, rows 0..3 only
    assert grid[0, :4, :5].all() and not grid[0, 4:].any() and not grid[0, :, 5:].any()
    # B0 = pixels 0..19 → patch columns 0, 1 and 2 (pixels 16..23 straddle B0/B1)
    assert grid[3, 4:, :3].all() and not grid[3, :, 3:].any()
    assert grid[4, 4:, 2].all()  # shared border patch also belongs to B1
    # every patch is covered
    assert sp.any(0).all()


def test_single_pixel_makes_a_patch_member():
    m = np.zeros((1, 32, 32), bool)
    m[0, 17, 30] = True
    np.testing.assert_array_equal(masks_to_patches(m, (2, 2), 16)[0], [False, False, False, True])


def test_crop_offset_maps_original_masks_onto_the_right_patch():
    # original 100×130; resize_crop keeps the size and crops to a multiple of 16 → 96×128, offset (2, 1)
    img = Image.fromarray(np.zeros((100, 130, 3), np.uint8))
    _, geo = prepare_image(img, ImageSpec((100, 130), "resize_crop"), multiple=16)
    assert geo.crop == (2, 1) and geo.size == (96, 128)
    orig = np.zeros((1, 100, 130), bool)
    orig[0, 18:34, 33:49] = True  # prepared rows 16..31, cols 32..47 = exactly patch (1, 2)
    prep = masks_to_prepared(orig, geo)
    assert prep.shape == (1, 96, 128)
    assert prep[0, 16:32, 32:48].all() and prep.sum() == 16 * 16
    sp = masks_to_patches(prep, (6, 8), 16).reshape(6, 8)
    assert np.argwhere(sp).tolist() == [[1, 2]]
    # ignoring the crop (the reference implementation's bug) would smear it over 4 patches
    wrong = masks_to_patches(orig[:, :96, :128], (6, 8), 16).reshape(6, 8)
    assert wrong.sum() == 4


def test_segmenter_sees_the_cropped_prepared_image(tmp_path):
    # a white square in the file at rows 18..33, cols 33..48 must land on patch (1, 2) of the prepared image
    arr = np.zeros((100, 130, 3), np.uint8)
    arr[18:34, 33:49] = 255
    Image.fromarray(arr).save(tmp_path / "sq.png")
    pix, geo = load_prepared(tmp_path / "sq.png", ImageSpec((100, 130), "resize_crop"), multiple=16)
    assert geo.crop == (2, 1)
    masks = labels_to_masks((pix[..., 0] > 128).astype(np.int64))  # background, square
    sp = masks_to_patches(masks, (6, 8), 16).reshape(2, 6, 8)
    assert np.argwhere(sp[1]).tolist() == [[1, 2]]


def test_uncovered_modes():
    grid = (2, 3)
    sp = np.array([[1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]], bool)
    near = handle_uncovered(sp, grid, "nearest")
    # cell 1 is equidistant; cells 3 / 4 / 5 are nearest to 0 / (0 or 2) / 2
    assert near.any(0).all() and near[0, 3] and near[1, 5]
    assert near.sum() == 6  # each cell in exactly one segment here
    rest = handle_uncovered(sp, grid, "rest")
    assert rest.shape == (3, 6) and rest[2].tolist() == [False, True, False, True, True, True]
    np.testing.assert_array_equal(handle_uncovered(sp, grid, "drop"), sp)
    np.testing.assert_array_equal(handle_uncovered(np.zeros((0, 6), bool), grid), np.ones((1, 6), bool))
    with pytest.raises(ConfigError):
        handle_uncovered(sp, grid, "bogus")


def test_segment_graph_with_no_masks_is_one_whole_image_segment():
    sp, cents, a = segment_graph(np.zeros((0, 32, 48), bool), (2, 3), 16)
    assert sp.shape == (1, 6) and sp.all() and a.tolist() == [[True]]
    np.testing.assert_allclose(cents, [[24.0, 16.0]])


def _image(h=96, w=128, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 30, 30)
    img[:, w // 2 :] = (30, 30, 200)
    img[h // 2 :, :, 1] = 180
    return np.clip(img + rng.integers(0, 10, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "name,opts", [("slic", {"n_segments": 12}), ("felzenszwalb", {}), ("grid", {"cells_across": 4})]
)
def test_weights_free_segmenters_return_masks_in_prepared_pixels(name, opts):
    img = _image()
    masks = build_segmenter(name, **opts)(img)
    assert masks.dtype == bool and masks.shape[1:] == (96, 128) and len(masks) >= 2
    assert masks.any(0).all()  # a partition of the image


def test_grid_segmenter_cells():
    masks = build_segmenter("grid", cell=32)(_image())
    assert len(masks) == 3 * 4 and (masks.sum((1, 2)) == 32 * 32).all()


def test_feature_cluster_segmenter_follows_the_features():
    feats = np.zeros((6, 8, 4), np.float32)
    feats[:, :4, 0] = 1
    feats[:, 4:, 1] = 1
    feats += np.random.default_rng(0).normal(0, 0.01, feats.shape).astype(np.float32)
    seg = build_segmenter("features", k=2, spatial=0.1, min_cells=2)
    masks = seg(_image(), feats, 16)
    assert masks.shape == (2, 96, 128)
    sp = masks_to_patches(masks, (6, 8), 16).reshape(2, 6, 8)
    halves = {tuple(np.unique(np.argwhere(s)[:, 1])) for s in sp}
    assert halves == {(0, 1, 2, 3), (4, 5, 6, 7)}
    with pytest.raises(ConfigError):
        seg(_image())


def test_registry_and_errors():
    assert {"slic", "felzenszwalb", "features", "grid", "sam"} <= set(SEGMENTERS.names())
    with pytest.raises(ConfigError):
        build_segmenter("slic", bogus=1)
    with pytest.raises(ConfigError):
        build_segmenter("sam")  # needs a checkpoint


def test_batch_images_roundtrip():
    from vprkit.images import Batch

    img = _image()
    b = Batch(["a"], img.transpose(2, 0, 1)[None].astype(np.float32) / 255, [None])
    np.testing.assert_array_equal(batch_images(b)[0], img)
