"""The split layout of gmberton's VPR-datasets-downloader (used by VPR-methods-evaluation):
``<name>/images/{train,val,test}/{database,queries}/@UTM_east@UTM_north@…@.jpg``.

St Lucia, Pittsburgh 30k, Tokyo 24/7, MSLS-val, SF-XL, San Francisco, Eynsham, AmsterTime …
converted by that downloader all look like this; positives by radius from the file names
(25 m, the field's convention for street-level sets, VPR-methods-evaluation's default).
"""

from __future__ import annotations

from pathlib import Path

from ...errors import DatasetError
from ..base import RADIUS_OPTIONS, Dataset, load_utm_folders, radius_option, register_adapter

SPLITS = ("test", "val", "train")


def _splits(path: Path) -> list[str]:
    images = path / "images"
    return [s for s in SPLITS if (images / s / "database").is_dir() and (images / s / "queries").is_dir()]


@register_adapter(
    "vg-split",
    25,
    ("split",) + RADIUS_OPTIONS,
    "images/{test,val,train}/database/ + queries/ with @east@north@…@.jpg names (VPR-datasets-downloader: "
    "St Lucia, Pitts30k, Tokyo 24/7, SF-XL …); split=test by default",
    "radius 25 m",
)
def _vg_split():
    def detect(path: Path) -> bool:
        return bool(_splits(path))

    def load(
        path: Path, split: str | None = None, positive_dist_threshold: float | None = None, radius: float | None = None
    ) -> Dataset:
        r = radius_option(positive_dist_threshold, radius)
        available = _splits(path)
        split = split or ("test" if "test" in available else available[0])
        if split not in available:
            raise DatasetError(f"{path}: no split {split!r} under images/; available: {', '.join(available)}")
        folder = path / "images" / split
        ds = load_utm_folders(path, folder / "database", folder / "queries", r, "vg-split")
        ds.description = (ds.description + "; " if ds.description else "") + f"split {split}"
        return ds

    return detect, load
