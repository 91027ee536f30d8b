"""A robust two-view model from matched keypoints: homography and fundamental / essential matrix, inliers,
and the relative rotation (and translation direction) of the query to the matched map image.

Conventions. Image ``a`` is the query, ``b`` the map image; ``x_b ~ H x_a`` and ``x_bᵀ F x_a = 0``. The
relative pose maps query-camera coordinates into map-camera coordinates, ``X_b = R X_a + t``, cameras
with x right, y down, z forward. So ``R``'s columns are the query camera's axes seen from the map camera
and ``t`` (unit length) points from the map camera to the query camera, in the map camera's frame.
``yaw, pitch, roll`` (degrees) decompose ``R = R_y(yaw) · R_x(pitch) · R_z(roll)``: yaw > 0 the query looks
right of the map image, pitch > 0 it looks up, roll > 0 it is turned about its optical axis from x
towards y (clockwise as seen from behind the camera).

Model selection. Both a homography and an epipolar model (essential matrix when intrinsics are known,
fundamental otherwise) are fitted. A homography explains a pure rotation, a distant scene or one
dominant plane — the cases in which the epipolar geometry is degenerate (the translation, and with it F
or E, is not determined). The homography is chosen when its inliers are at least :data:`HOMOGRAPHY_SHARE`
of the epipolar model's (F and E fit every match consistent with an H, so they always have at least as
many); then the rotation is ``K_b⁻¹ H K_a`` projected onto SO(3) and the translation direction is
``None``. Otherwise the rotation and translation come from the essential matrix (poselib's relative pose
with the cameras; uncalibrated: ``E = K_bᵀ F K_a`` with the assumed focal, decomposed by OpenCV's
``recoverPose``). Fewer than :data:`MIN_MODEL_INLIERS` supporting matches is no model at all.

Intrinsics. Given as ``"fx,fy,cx,cy"`` or ``"f"`` (pixels of the original image; centre = image centre),
or read from EXIF (``FocalLengthIn35mmFilm``: ``f = f35 / 36 · max(w, h)``; else ``FocalLength`` with
``FocalPlaneXResolution``), and scaled to the image size the keypoints are in. Without any, the
focal is :data:`ASSUMED_FOCAL_FACTOR` · max(w, h) (COLMAP's prior for unknown cameras) and the result
says ``calibrated: false``.

Robust fitting is poselib's RANSAC with local optimisation (``backend="poselib"``, the default:
LO-RANSAC with non-linear refinement); ``backend="opencv"`` uses OpenCV's USAC MAGSAC++ instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image
from scipy.spatial.transform import Rotation

from ..errors import ConfigError
from ..images import Geometry
from ..registry import Registry

# COLMAP's default focal for an unknown camera (``default_focal_length_factor``): f = 1.2 · max(w, h).
ASSUMED_FOCAL_FACTOR = 1.2
FILM_35MM_WIDTH_MM = 36.0  # the 35 mm equivalent focal length refers to a 36 mm wide frame
# EXIF FocalPlaneResolutionUnit → millimetres per unit (2: inch, 3: cm, 4: mm, 5: µm)
EXIF_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}
EXIF_IFD = 0x8769
EXIF_FOCAL_LENGTH, EXIF_FOCAL_35MM = 0x920A, 0xA405
EXIF_FOCAL_PLANE_X_RES, EXIF_FOCAL_PLANE_UNIT = 0xA20E, 0xA210

# Minimal samples: 4 point pairs fix a homography; 7 a fundamental matrix (8 for a unique one).
MIN_MATCHES = 8
# A model supported by fewer matches is no model: RANSAC finds up to 16 chance inliers for F among
# the mutual nearest neighbours of two unrelated images (measured by benchmarks/bench_verify.py).
MIN_MODEL_INLIERS = 20
# Homography chosen when its inliers are ≥ this share of the epipolar model's (see the module docs).
# ORB-SLAM uses a score ratio of 0.45 of H+F, i.e. about 0.8 of F's.
HOMOGRAPHY_SHARE = 0.8
# Inlier thresholds as fractions of the larger image's long side: 1 % (3.2 px at 320×240) for the
# homography's transfer error, 0.5 % for the (one-dimensional, tighter) epipolar error; never below 1 px.
HOMOGRAPHY_ERROR_FRACTION = 0.01
EPIPOLAR_ERROR_FRACTION = 0.005
MIN_ERROR_PX = 1.0
# RANSAC effort, bounded because verification fits two models for each of five pairs per query: poselib's
# adaptive stopping (success probability 0.999) with iteration caps. Measured on Corridor pairs (1 thread):
# 1000 iterations cost ~1.4 ms for a homography (4-point samples), ~10 ms for F (7-point), ~20 ms for E
# (5-point, with the cameras). A homography's inliers are often a small share of the matches (one plane),
# which needs more samples (0.2⁴: ~5000 for 0.999), so its cap is higher; F and E stop at 1000.
RANSAC_MIN_ITERATIONS = 50
HOMOGRAPHY_MAX_ITERATIONS = 5000
EPIPOLAR_MAX_ITERATIONS = 1000
RANSAC_SUCCESS_PROB = 0.999
RANSAC_SEED = 0  # reproducible answers for the same matches


@dataclass(frozen=True)
class Intrinsics:
    """A pinhole camera in pixels of an image of ``size`` (width, height); ``size`` None: of whatever image
    it is used with. ``source``: ``given``, ``exif`` or ``assumed`` (see :data:`ASSUMED_FOCAL_FACTOR`)."""

    fx: float
    fy: float
    cx: float | None = None  # None: the image centre
    cy: float | None = None
    size: tuple[int, int] | None = None
    source: str = "given"

    @classmethod
    def parse(cls, text: str, size: tuple[int, int] | None = None) -> "Intrinsics":
        """``"fx,fy,cx,cy"`` or ``"f"`` (pixels of an image of ``size``; the centre when not given)."""
        parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) not in (1, 4) or not all(np.isfinite(values)) or min(values[:2]) <= 0:
            raise ConfigError(
                f"intrinsics {text!r}: give 'fx,fy,cx,cy' or 'f' in pixels (positive focal lengths), e.g. '525,525,320,240'"
            )
        if len(values) == 1:
            return cls(values[0], values[0], size=size)
        return cls(*values, size=size)

    @classmethod
    def assumed(cls, size: tuple[int, int]) -> "Intrinsics":
        """The prior for an unknown camera: f = :data:`ASSUMED_FOCAL_FACTOR` · max(w, h), centred."""
        f = ASSUMED_FOCAL_FACTOR * max(size)
        return cls(f, f, size=tuple(size), source="assumed")

    @classmethod
    def from_exif(cls, image: str | os.PathLike | Image.Image) -> "Intrinsics | None":
        """The focal length an image file's EXIF records (in pixels of the image as viewed), or None."""
        img = Image.open(image) if not isinstance(image, Image.Image) else image
        try:
            exif = img.getexif()
            tags = {**dict(exif), **dict(exif.get_ifd(EXIF_IFD))}
            orientation = int(tags.get(0x0112, 1) or 1)
            w, h = (img.height, img.width) if orientation in (5, 6, 7, 8) else (img.width, img.height)
        finally:
            if not isinstance(image, Image.Image):
                img.close()
        f = _exif_focal_px(tags, w, h)
        return None if f is None else cls(f, f, size=(w, h), source="exif")

    def at(self, size: tuple[int, int]) -> "Intrinsics":
        """These intrinsics for the image resized to ``size`` (width, height)."""
        w, h = int(size[0]), int(size[1])
        sx, sy = (1.0, 1.0) if self.size is None else (w / self.size[0], h / self.size[1])
        cx = w / 2 if self.cx is None else self.cx * sx
        cy = h / 2 if self.cy is None else self.cy * sy
        return replace(self, fx=self.fx * sx, fy=self.fy * sy, cx=cx, cy=cy, size=(w, h))

    def for_prepared(self, geometry: Geometry) -> "Intrinsics":
        """These intrinsics (of the original file; ``size`` None means that size) in pixels of the image as
        prepared for the map's backbone: resized by ``geometry.scale``, then cropped by ``geometry.crop``."""
        oh, ow = geometry.original_size
        full = replace(self, size=self.size or (ow, oh)).at((ow, oh))
        (sy, sx), (top, left) = geometry.scale, geometry.crop
        h, w = geometry.size
        return replace(
            full, fx=full.fx * sx, fy=full.fy * sy, cx=full.cx * sx - left, cy=full.cy * sy - top, size=(w, h)
        )

    def matrix(self, size: tuple[int, int]) -> np.ndarray:
        """K (3×3) in pixels of an image of ``size``."""
        k = self.at(size)
        return np.array([[k.fx, 0, k.cx], [0, k.fy, k.cy], [0, 0, 1]], np.float64)


def _exif_focal_px(tags: dict, w: int, h: int) -> float | None:
    """Focal length in pixels from EXIF tags: the 35 mm equivalent, else focal length × focal-plane resolution."""
    f35 = _exif_float(tags.get(EXIF_FOCAL_35MM))
    if f35:
        return f35 / FILM_35MM_WIDTH_MM * max(w, h)
    f_mm, xres = _exif_float(tags.get(EXIF_FOCAL_LENGTH)), _exif_float(tags.get(EXIF_FOCAL_PLANE_X_RES))
    unit = EXIF_UNIT_MM.get(int(tags.get(EXIF_FOCAL_PLANE_UNIT, 2) or 2))
    if f_mm and xres and unit:
        return f_mm * xres / unit
    return None


def _exif_float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return v if np.isfinite(v) and v > 0 else None


@dataclass(frozen=True)
class TwoViewResult:
    """The robust two-view model of one query–map pair (see the module docs for conventions).

    ``model``: ``homography``, ``essential``, ``fundamental`` or ``none``; ``inliers``: mask over the matches
    of the chosen model; ``rotation``/``translation``: ``X_map = R X_query + t`` (t unit, ``None`` for a
    homography or no model); ``calibrated``: False when the focal was assumed (then rotations are approximate).
    """

    model: str
    matches: int
    inliers: np.ndarray
    homography_inliers: int = 0
    epipolar_inliers: int = 0
    matrix: np.ndarray | None = None
    rotation: np.ndarray | None = None
    translation: np.ndarray | None = None
    calibrated: bool = False
    intrinsics_source: str = "assumed"
    extra: dict = field(default_factory=dict)

    @property
    def n_inliers(self) -> int:
        return int(self.inliers.sum())

    @property
    def inlier_ratio(self) -> float:
        return self.n_inliers / self.matches if self.matches else 0.0

    @property
    def rotation_deg(self) -> float | None:
        """The rotation's angle in degrees."""
        return None if self.rotation is None else rotation_angle_deg(self.rotation)

    @property
    def yaw_pitch_roll_deg(self) -> tuple[float, float, float] | None:
        return None if self.rotation is None else yaw_pitch_roll(self.rotation)

    def to_dict(self) -> dict:
        """Plain JSON values (no arrays but the rotation and translation as lists)."""
        ypr = self.yaw_pitch_roll_deg
        return {
            "model": self.model,
            "matches": self.matches,
            "inliers": self.n_inliers,
            "inlier_ratio": round(self.inlier_ratio, 4),
            "homography_inliers": self.homography_inliers,
            "epipolar_inliers": self.epipolar_inliers,
            "rotation_deg": None if ypr is None else round(float(self.rotation_deg), 3),
            "yaw_pitch_roll_deg": None if ypr is None else [round(float(v), 3) for v in ypr],
            "rotation": None if self.rotation is None else self.rotation.round(6).tolist(),
            "translation_direction": None if self.translation is None else self.translation.round(6).tolist(),
            "calibrated": self.calibrated,
            "intrinsics": self.intrinsics_source,
        }


def rotation_angle_deg(r: np.ndarray) -> float:
    """The angle of a rotation matrix, in degrees."""
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))


def yaw_pitch_roll(r: np.ndarray) -> tuple[float, float, float]:
    """``R = R_y(yaw) R_x(pitch) R_z(roll)`` in degrees (intrinsic Y-X-Z; see the module docs for signs)."""
    yaw, pitch, roll = Rotation.from_matrix(r).as_euler("YXZ", degrees=True)
    return float(yaw), float(pitch), float(roll)


def rotation_from_ypr(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """The inverse of :func:`yaw_pitch_roll` (degrees → 3×3)."""
    return Rotation.from_euler("YXZ", [yaw, pitch, roll], degrees=True).as_matrix()


def nearest_rotation(m: np.ndarray) -> np.ndarray:
    """The rotation closest (Frobenius) to ``m`` up to scale: scaled to det 1, then SVD-projected onto SO(3)."""
    det = np.linalg.det(m)
    if not np.isfinite(det) or abs(det) < 1e-12:
        raise ValueError("degenerate matrix")
    u, _, vt = np.linalg.svd(m / np.cbrt(det))
    return u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt


def rotation_from_homography(h: np.ndarray, ka: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """R with ``H ≈ K_b R K_a⁻¹`` (exact for a pure rotation), projected onto SO(3)."""
    return nearest_rotation(np.linalg.inv(kb) @ h @ ka)


# ---- robust estimators: poselib (default) or OpenCV USAC MAGSAC++ -------------------------------------


@dataclass(frozen=True)
class Fit:
    """One robust fit: the model matrix (or ``(R, t)``) and its inlier mask."""

    model: Any
    inliers: np.ndarray


def _ransac_options(threshold_key: str, threshold: float, max_iterations: int = EPIPOLAR_MAX_ITERATIONS) -> dict:
    return {
        threshold_key: float(threshold),
        "min_iterations": RANSAC_MIN_ITERATIONS,
        "max_iterations": max_iterations,
        "success_prob": RANSAC_SUCCESS_PROB,
        "seed": RANSAC_SEED,
    }


def _poselib():
    try:
        import poselib
    except ModuleNotFoundError as exc:
        raise ConfigError("two-view fitting with poselib needs `pip install poselib` (or backend='opencv')") from exc
    return poselib


def _camera(k: np.ndarray, size: tuple[int, int]) -> dict:
    return {
        "model": "PINHOLE",
        "width": int(size[0]),
        "height": int(size[1]),
        "params": [k[0, 0], k[1, 1], k[0, 2], k[1, 2]],
    }


class PoselibFitter:
    """poselib's LO-RANSAC estimators with non-linear refinement."""

    name = "poselib"

    def homography(self, xa: np.ndarray, xb: np.ndarray, thr: float) -> Fit:
        h, info = _poselib().estimate_homography(
            xa, xb, _ransac_options("max_reproj_error", thr, HOMOGRAPHY_MAX_ITERATIONS)
        )
        return Fit(h, np.asarray(info["inliers"], bool))

    def fundamental(self, xa: np.ndarray, xb: np.ndarray, thr: float) -> Fit:
        f, info = _poselib().estimate_fundamental(xa, xb, _ransac_options("max_epipolar_error", thr))
        return Fit(f, np.asarray(info["inliers"], bool))

    def relative_pose(self, xa, xb, ka, kb, size_a, size_b, thr: float) -> Fit:
        pose, info = _poselib().estimate_relative_pose(
            xa, xb, _camera(ka, size_a), _camera(kb, size_b), _ransac_options("max_epipolar_error", thr)
        )
        return Fit((np.asarray(pose.R), np.asarray(pose.t)), np.asarray(info["inliers"], bool))


class OpenCVFitter:
    """OpenCV's USAC MAGSAC++ (``cv2.USAC_MAGSAC``)."""

    name = "opencv"

    def homography(self, xa, xb, thr: float) -> Fit:
        h, mask = cv2.findHomography(xa, xb, cv2.USAC_MAGSAC, thr, maxIters=HOMOGRAPHY_MAX_ITERATIONS)
        return Fit(h, _mask(mask, len(xa)))

    def fundamental(self, xa, xb, thr: float) -> Fit:
        f, mask = cv2.findFundamentalMat(xa, xb, cv2.USAC_MAGSAC, thr, RANSAC_SUCCESS_PROB, EPIPOLAR_MAX_ITERATIONS)
        return Fit(None if f is None else f[:3], _mask(mask, len(xa)))

    def relative_pose(self, xa, xb, ka, kb, size_a, size_b, thr: float) -> Fit:
        na, nb = _normalised(xa, ka), _normalised(xb, kb)
        focal = (ka[0, 0] + ka[1, 1] + kb[0, 0] + kb[1, 1]) / 4
        e, mask = cv2.findEssentialMat(
            na, nb, np.eye(3), cv2.USAC_MAGSAC, RANSAC_SUCCESS_PROB, thr / focal, EPIPOLAR_MAX_ITERATIONS
        )
        if e is None or e.shape != (3, 3):
            return Fit(None, np.zeros(len(xa), bool))
        inliers = _mask(mask, len(xa))
        return Fit(recover_pose(e, na, nb, inliers), inliers)


def _mask(mask: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros(n, bool) if mask is None else mask.reshape(-1).astype(bool)


def _normalised(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    return (x - k[:2, 2]) / np.array([k[0, 0], k[1, 1]])


def recover_pose(e: np.ndarray, na: np.ndarray, nb: np.ndarray, inliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, t) of an essential matrix on normalised inlier points (cheirality), ``X_b = R X_a + t``."""
    _, r, t, _ = cv2.recoverPose(e, na[inliers], nb[inliers], np.eye(3))
    return r, t.reshape(3)


FITTERS: Registry[Callable[[], Any]] = Registry("two-view backend")
FITTERS.register("poselib", PoselibFitter)
FITTERS.register("opencv", OpenCVFitter)


# ---- the two-view model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TwoViewOptions:
    """Thresholds and the robust estimator (see the module constants for why these defaults)."""

    backend: str = "poselib"
    homography_error_fraction: float = HOMOGRAPHY_ERROR_FRACTION
    epipolar_error_fraction: float = EPIPOLAR_ERROR_FRACTION
    homography_share: float = HOMOGRAPHY_SHARE
    min_model_inliers: int = MIN_MODEL_INLIERS


def _no_model(n: int, source: str, calibrated: bool, **counts: int) -> TwoViewResult:
    return TwoViewResult("none", n, np.zeros(n, bool), calibrated=calibrated, intrinsics_source=source, **counts)


def two_view(
    kp_a: np.ndarray,
    kp_b: np.ndarray,
    size_a: tuple[int, int],
    size_b: tuple[int, int],
    intrinsics_a: Intrinsics | None = None,
    intrinsics_b: Intrinsics | None = None,
    options: TwoViewOptions = TwoViewOptions(),
) -> TwoViewResult:
    """The robust two-view model of matched keypoints ``kp_a[i] ↔ kp_b[i]`` (query a, map image b; pixels of
    images of ``size_a`` / ``size_b`` as (width, height)).

    ``intrinsics_b`` defaults to ``intrinsics_a`` (a robot's map taken with its own camera); with neither, the
    focal is assumed and the result is ``calibrated=False``. See the module docs for the model selection.
    """
    xa, xb = np.asarray(kp_a, np.float64).reshape(-1, 2), np.asarray(kp_b, np.float64).reshape(-1, 2)
    n = len(xa)
    calibrated = intrinsics_a is not None or intrinsics_b is not None
    cam_a = intrinsics_a or intrinsics_b or Intrinsics.assumed(size_a)
    cam_b = intrinsics_b or intrinsics_a or Intrinsics.assumed(size_b)
    source = cam_a.source if cam_a.source == cam_b.source else f"{cam_a.source}/{cam_b.source}"
    if n < MIN_MATCHES:
        return _no_model(n, source, calibrated)
    fitter = FITTERS.get(options.backend)()
    long_side = max(*size_a, *size_b)
    h_thr = max(MIN_ERROR_PX, options.homography_error_fraction * long_side)
    e_thr = max(MIN_ERROR_PX, options.epipolar_error_fraction * long_side)
    ka, kb = cam_a.matrix(size_a), cam_b.matrix(size_b)
    hom = fitter.homography(xa, xb, h_thr)
    if calibrated:
        epi = fitter.relative_pose(xa, xb, ka, kb, size_a, size_b, e_thr)
    else:
        epi = fitter.fundamental(xa, xb, e_thr)
    nh, ne = int(hom.inliers.sum()), int(epi.inliers.sum())
    counts = {"homography_inliers": nh, "epipolar_inliers": ne}
    if max(nh, ne) < options.min_model_inliers or (hom.model is None and epi.model is None):
        return _no_model(n, source, calibrated, **counts)
    if hom.model is not None and nh >= options.homography_share * ne:
        rotation = rotation_from_homography(np.asarray(hom.model), ka, kb)
        return TwoViewResult(
            "homography", n, hom.inliers, nh, ne, np.asarray(hom.model), rotation, None, calibrated, source
        )
    if calibrated:
        r, t = epi.model
        e = _essential(r, t)
        return TwoViewResult("essential", n, epi.inliers, nh, ne, e, r, _unit(t), calibrated, source)
    f = np.asarray(epi.model)
    r, t = recover_pose(kb.T @ f @ ka, _normalised(xa, ka), _normalised(xb, kb), epi.inliers)
    return TwoViewResult("fundamental", n, epi.inliers, nh, ne, f, r, _unit(t), calibrated, source)


def _essential(r: np.ndarray, t: np.ndarray) -> np.ndarray:
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    return tx @ r


def _unit(t: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(t))
    return None if norm == 0 or not np.isfinite(norm) else np.asarray(t, np.float64) / norm
