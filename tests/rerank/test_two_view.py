"""The two-view model: relative rotation from synthetic views of known rotation, model selection, no model for
unrelated images, the rotation conventions, and intrinsics (string, scaling, EXIF, assumed)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from vprkit.errors import ConfigError
from vprkit.images import Geometry
from vprkit.rerank.local_features import make_local_features
from vprkit.rerank.two_view import (
    ASSUMED_FOCAL_FACTOR,
    Intrinsics,
    TwoViewOptions,
    nearest_rotation,
    rotation_angle_deg,
    rotation_from_ypr,
    two_view,
    yaw_pitch_roll,
)

SIZE = (320, 240)
# Corridor was filmed with a wide-angle (fisheye) lens: a 90° horizontal field of view (f = w / 2) is closer to
# it than the narrow default prior, and leaves the overlap a 30° rotation needs.
WIDE_FOCAL = 0.5 * max(SIZE)
ANGLES = (0.0, 5.0, 10.0, 20.0, 30.0)
TRIALS = 6
MAX_MEDIAN_ERROR_DEG = 2.0  # the target


@pytest.fixture(scope="module")
def xfeat():
    return make_local_features("xfeat")


@pytest.fixture(scope="module")
def corridor(shared_datasets) -> np.ndarray:
    img = Image.open(shared_datasets / "corridor" / "ref" / "0000010.jpg").convert("RGB")
    return np.asarray(img.resize(SIZE, Image.BILINEAR))


def rotated_view(image: np.ndarray, r: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The view of a camera rotated by ``r`` (X_view = R X_image): the homography K R K⁻¹ of the image."""
    return cv2.warpPerspective(image, k @ r @ np.linalg.inv(k), (image.shape[1], image.shape[0]))


def rotation_errors(pipeline, image, rotations, k, intrinsics, options=TwoViewOptions()) -> list[float]:
    fa = pipeline.extract(image)
    errors = []
    for r in rotations:
        fb = pipeline.extract(rotated_view(image, r, k))
        ia, ib, _ = pipeline.match(fa, fb)
        res = two_view(fa.keypoints[ia], fb.keypoints[ib], fa.image_size, fb.image_size, intrinsics, options=options)
        errors.append(np.inf if res.rotation is None else rotation_angle_deg(res.rotation @ r.T))
    return errors


def random_rotations(angle_deg: float, n: int, seed: int) -> list[np.ndarray]:
    """Rotations of ``angle_deg`` about random axes: yaw, pitch and roll mixed."""
    axes = np.random.default_rng(seed).normal(size=(n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    return list(Rotation.from_rotvec(axes * np.radians(angle_deg)).as_matrix())


@pytest.mark.parametrize("angle", ANGLES)
def test_rotation_of_synthetic_views_within_two_degrees(xfeat, corridor, angle):
    intr = Intrinsics.parse(str(WIDE_FOCAL), SIZE)
    errors = rotation_errors(xfeat, corridor, random_rotations(angle, TRIALS, seed=int(angle)), intr.matrix(SIZE), intr)
    assert np.median(errors) <= MAX_MEDIAN_ERROR_DEG, errors


def test_uncalibrated_rotation_uses_the_assumed_focal(xfeat, corridor):
    k = Intrinsics.assumed(SIZE).matrix(SIZE)
    assert k[0, 0] == ASSUMED_FOCAL_FACTOR * max(SIZE)
    errors = rotation_errors(xfeat, corridor, random_rotations(10.0, TRIALS, seed=1), k, None)
    assert np.median(errors) <= MAX_MEDIAN_ERROR_DEG, errors
    fa = xfeat.extract(corridor)
    fb = xfeat.extract(rotated_view(corridor, rotation_from_ypr(8, 0, 0), k))
    ia, ib, _ = xfeat.match(fa, fb)
    res = two_view(fa.keypoints[ia], fb.keypoints[ib], SIZE, SIZE)
    assert res.model == "homography" and res.translation is None
    assert not res.calibrated and res.to_dict()["intrinsics"] == "assumed" and res.to_dict()["calibrated"] is False


def test_opencv_backend_agrees(xfeat, corridor):
    intr = Intrinsics.parse(str(WIDE_FOCAL))
    errors = rotation_errors(
        xfeat, corridor, random_rotations(20.0, 3, seed=2), intr.matrix(SIZE), intr, TwoViewOptions(backend="opencv")
    )
    assert np.median(errors) <= MAX_MEDIAN_ERROR_DEG, errors


def test_yaw_sign_and_result_fields(xfeat, corridor):
    """A query turned right of the map image: its centre appears right of the map image's centre; yaw > 0."""
    intr = Intrinsics.parse(str(WIDE_FOCAL))
    k = intr.matrix(SIZE)
    r = rotation_from_ypr(12.0, 0.0, 0.0)
    centre = k @ r @ np.array([0.0, 0.0, 1.0])
    assert centre[0] / centre[2] > SIZE[0] / 2 + 10  # where the query's optical axis lands in the map image
    fa, fb = xfeat.extract(corridor), xfeat.extract(rotated_view(corridor, r, k))
    ia, ib, _ = xfeat.match(fa, fb)
    res = two_view(fa.keypoints[ia], fb.keypoints[ib], SIZE, SIZE, intr)
    yaw, pitch, roll = res.yaw_pitch_roll_deg
    assert abs(yaw - 12.0) < 1.0 and abs(pitch) < 1.0 and abs(roll) < 1.0
    d = res.to_dict()
    assert d["model"] == "homography" and d["calibrated"] is True and d["inliers"] == res.n_inliers > 50
    assert 0 < d["inlier_ratio"] <= 1 and d["translation_direction"] is None and abs(d["rotation_deg"] - 12) < 1


def test_translation_gives_an_epipolar_model_with_direction():
    """Points in depth seen by two cameras 1 m apart sideways: essential matrix, t along x, no rotation."""
    rng = np.random.default_rng(0)
    pts = np.c_[rng.uniform(-4, 4, 200), rng.uniform(-3, 3, 200), rng.uniform(4, 12, 200)]
    intr = Intrinsics.parse("300,300,160,120")
    k = intr.matrix(SIZE)
    t_true = np.array([-1.0, 0.0, 0.0])  # X_b = X_a + t: the query camera is 1 m to the left of the map camera
    xa, xb = pts @ k.T, (pts + t_true) @ k.T
    xa, xb = xa[:, :2] / xa[:, 2:], xb[:, :2] / xb[:, 2:]
    res = two_view(xa, xb, SIZE, SIZE, intr)
    assert res.model == "essential" and res.n_inliers >= 190
    assert rotation_angle_deg(res.rotation) < 0.5
    assert np.dot(res.translation, t_true) > 0.99
    unc = two_view(xa, xb, SIZE, SIZE)  # uncalibrated: F, rotation and direction with the assumed focal
    assert unc.model == "fundamental" and not unc.calibrated and unc.translation is not None


def test_unrelated_images_give_no_model(xfeat, corridor, shared_datasets):
    fa = xfeat.extract(corridor)
    foreign = sorted((shared_datasets / "toy-unlabelled" / "database").glob("*.jpg"))[:3]
    foreign += sorted((shared_datasets / "nordland-64x32" / "summer").glob("*.png"))[:3000:1000]
    for path in foreign:
        img = Image.open(path).convert("RGB")
        fb = xfeat.extract(np.asarray(img.resize((320, round(320 * img.height / img.width)), Image.BILINEAR)))
        ia, ib, _ = xfeat.match(fa, fb)
        res = two_view(fa.keypoints[ia], fb.keypoints[ib], fa.image_size, fb.image_size)
        assert res.model == "none" and res.n_inliers == 0 and res.rotation is None, (path.name, res.to_dict())


def test_too_few_matches_is_no_model():
    res = two_view(np.zeros((5, 2)), np.zeros((5, 2)), SIZE, SIZE)
    assert res.model == "none" and res.matches == 5 and res.inlier_ratio == 0.0


def test_intrinsics_parse_scale_and_errors():
    full = Intrinsics.parse("1000, 1000, 960, 540", size=(1920, 1080))
    small = full.at((320, 180))
    assert (small.fx, small.fy, small.cx, small.cy) == pytest.approx((1000 / 6, 1000 / 6, 160, 90))
    f = Intrinsics.parse("500").at((640, 480))
    assert (f.fx, f.cx, f.cy) == (500, 320, 240)
    # a 1920×1080 file resized to 427×240 and centre-cropped to 416×240 for the backbone
    geometry = Geometry((1080, 1920), (240 / 1080, 427 / 1920), (0, 5), (240, 416))
    prepared = full.for_prepared(geometry)
    assert prepared.size == (416, 240)
    assert (prepared.fx, prepared.cx, prepared.cy) == pytest.approx((1000 * 427 / 1920, 960 * 427 / 1920 - 5, 120))
    centre = Intrinsics.parse("1000").for_prepared(geometry)  # no size: the file's
    assert (centre.cx, centre.fy) == pytest.approx((prepared.cx, 1000 * 240 / 1080))
    for bad in ("", "a,b", "1,2,3", "-5", "nan"):
        with pytest.raises(ConfigError, match="fx,fy,cx,cy"):
            Intrinsics.parse(bad)


def test_intrinsics_from_exif(tmp_path):
    img = Image.new("RGB", (400, 300), (128, 128, 128))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 28  # FocalLengthIn35mmFilm
    img.save(tmp_path / "f35.jpg", exif=exif)
    intr = Intrinsics.from_exif(tmp_path / "f35.jpg")
    assert intr.source == "exif" and intr.fx == pytest.approx(28 / 36 * 400) and intr.size == (400, 300)
    exif = Image.Exif()
    ifd = exif.get_ifd(0x8769)
    ifd[0x920A], ifd[0xA20E], ifd[0xA210] = 4.0, 1000.0, 4  # 4 mm at 1000 px/mm
    img.save(tmp_path / "plane.jpg", exif=exif)
    assert Intrinsics.from_exif(tmp_path / "plane.jpg").fx == pytest.approx(4000)
    img.save(tmp_path / "none.jpg")
    assert Intrinsics.from_exif(tmp_path / "none.jpg") is None


def test_rotation_helpers_round_trip():
    r = rotation_from_ypr(20.0, -7.0, 3.0)
    assert yaw_pitch_roll(r) == pytest.approx((20.0, -7.0, 3.0))
    noisy = r * 2.5 + 1e-3
    assert rotation_angle_deg(nearest_rotation(noisy) @ r.T) < 0.1
    assert rotation_angle_deg(r) == pytest.approx(np.degrees(Rotation.from_matrix(r).magnitude()))
