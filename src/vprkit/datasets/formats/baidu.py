"""Baidu Mall (Sun et al., CVPR 2017, "A dataset for benchmarking image-based localization").

On disk (as AnyLoc's ``custom_datasets/baidu_dataloader.py`` reads it)::

    training_images_undistort/*.jpg   database images
    training_gt/*.camera              one camera file per database image
    query_images_undistort/*.jpg      queries
    query_gt/*.camera

A ``.camera`` file is text; its lines 5–7 (0-based 4–6) are the 3×3 rotation matrix and its
second-to-last line the camera centre ``x y z`` (metres). Camera files are paired with images by
name (stem), else by natural sort order when the counts match (AnyLoc's rule). Positives: camera
centres within 10 m (3-D) **and** a mean absolute difference of the ZYX Euler angles below 20°
(AnyLoc's ``dist_thresh=10, ang_thresh=20``); ``max_angle_diff=None`` drops the angle test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from ...errors import DatasetError
from ..base import RADIUS_OPTIONS, Dataset, radius_option, register_adapter
from ..ground_truth import GroundTruth
from .common import images_natural, natural_key

DB_IMAGES, DB_GT = "training_images_undistort", "training_gt"
Q_IMAGES, Q_GT = "query_images_undistort", "query_gt"
DEFAULT_RADIUS_M = 10.0
DEFAULT_ANGLE_DEG = 20.0
ROTATION_LINES = slice(4, 7)


def read_camera_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(centre xyz, ZYX Euler angles in degrees) of one Baidu ``.camera`` file."""
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="strict").splitlines()]
        while lines and not lines[-1].strip():
            lines.pop()
        rows = [np.array(lines[i].split(), dtype=np.float64) for i in range(4, 7)]
        centre = np.array(lines[-2].split(), dtype=np.float64)
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as e:
        raise DatasetError(
            f"{path}: not a Baidu Mall camera file (lines 5-7 a rotation matrix, second-to-last line x y z): {e}"
        ) from e
    if centre.size != 3 or any(r.size != 3 for r in rows):
        raise DatasetError(f"{path}: expected 3 numbers on lines 5-7 and on the second-to-last line")
    euler = Rotation.from_matrix(np.stack(rows)).as_euler("zyx", degrees=True)
    return centre, euler


def _poses(images: list[str], gt_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(
        (p for p in gt_dir.iterdir() if p.is_file() and p.suffix == ".camera"), key=lambda p: natural_key(p.name)
    )
    by_stem = {p.stem: p for p in files}
    stems = [Path(k).stem for k in images]
    if all(s in by_stem for s in stems):
        chosen = [by_stem[s] for s in stems]
    elif len(files) == len(images):
        chosen = files
    else:
        raise DatasetError(f"{gt_dir}: {len(files)} .camera files for {len(images)} images, and names do not match")
    poses = [read_camera_file(p) for p in chosen]
    return np.stack([c for c, _ in poses]), np.stack([e for _, e in poses])


@register_adapter(
    "baidu-mall",
    7,
    ("max_angle_diff",) + RADIUS_OPTIONS,
    "Baidu Mall: training_images_undistort/ + training_gt/*.camera (database), query_images_undistort/ + "
    "query_gt/*.camera (queries)",
    "camera centres within 10 m and mean |Δ Euler ZYX| < 20° (AnyLoc baidu_dataloader)",
)
def _baidu():
    def detect(path: Path) -> bool:
        return all((path / d).is_dir() for d in (DB_IMAGES, DB_GT, Q_IMAGES, Q_GT))

    def load(
        path: Path,
        max_angle_diff: float | None = DEFAULT_ANGLE_DEG,
        positive_dist_threshold: float | None = None,
        radius: float | None = None,
    ) -> Dataset:
        r = radius_option(positive_dist_threshold, radius, DEFAULT_RADIUS_M)
        db = images_natural(path / DB_IMAGES, "database")
        q = images_natural(path / Q_IMAGES, "query")
        d_xyz, d_eul = _poses(db, path / DB_GT)
        q_xyz, q_eul = _poses(q, path / Q_GT)
        hits = cKDTree(d_xyz).query_ball_point(q_xyz, r, return_sorted=True)
        positives = []
        for i, h in enumerate(hits):
            h = np.asarray(h, dtype=np.int64)
            if max_angle_diff is not None and h.size:
                diff = np.abs((d_eul[h] - q_eul[i] + 180.0) % 360.0 - 180.0).mean(axis=1)
                h = h[diff < float(max_angle_diff)]
            positives.append(h)
        rule = {"kind": "radius", "meters": r, "dims": 3, "source": "AnyLoc baidu_dataloader"}
        source = f"radius {r:g} m (3-D)"
        if max_angle_diff is not None:
            rule["max_angle_diff_deg"] = float(max_angle_diff)
            rule["angle"] = "mean |Δ Euler ZYX|"
            source += f", mean Euler difference < {float(max_angle_diff):g}°"
        gt = GroundTruth(positives, len(db), source=source, rule=dict(rule))
        ds = Dataset(
            path.name,
            path / DB_IMAGES,
            db,
            path / Q_IMAGES,
            q,
            gt,
            d_xyz[:, :2],
            q_xyz[:, :2],
            layout="baidu-mall",
            ground_truth_rule=rule,
        )
        ds.database_metadata["xyz"], ds.query_metadata["xyz"] = d_xyz, q_xyz
        ds.database_metadata["euler_zyx_deg"], ds.query_metadata["euler_zyx_deg"] = d_eul, q_eul
        return ds

    return detect, load
