"""Mapillary Street-Level Sequences (MSLS), the layout of github.com/mapillary/mapillary_sls.

On disk (the repository's README, "Package structure")::

    train_val/<city>/{query,database}/images/<key>.jpg
                                     /seq_info.csv        ,key,sequence_key,frame_number
                                     /raw.csv             ,key,lon,lat,ca,captured_at,pano
                                     /postprocessed.csv   ,key,easting,northing,unique_cluster,control_panel,night,view_direction
                                     /subtask_index.csv   ,all,s2w,w2s,o2n,n2o,d2n,n2d  (booleans, one row per image)
    test/<city>/{query,database}/images/, seq_info.csv, subtask_index.csv   (no positions: unlabelled)

The first, unnamed column of each CSV is a row index. Cities: train (22), val (cph, sf), test (6),
as in ``mapillary_sls/datasets/msls.py``. Images are listed in ``seq_info.csv`` order. Like the
reference code, panoramas (``raw.csv`` ``pano``) are excluded unless ``include_panoramas=True``,
and ``subtask`` (default ``all``) keeps the rows flagged in ``subtask_index.csv`` when present.
Positives: within 25 m (``evaluate.py``'s default threshold), computed **within each city** (UTM
zones differ between cities). The night / view-direction / panorama flags, city and sequence
are kept per image in ``query_metadata`` / ``database_metadata``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import ConfigError, DatasetError
from ..base import RADIUS_OPTIONS, Dataset, radius_option, register_adapter
from ..ground_truth import GroundTruth
from .common import column, floats, read_csv, require_files, truthy

CITIES = {
    "train": (
        "trondheim",
        "london",
        "boston",
        "melbourne",
        "amsterdam",
        "helsinki",
        "tokyo",
        "toronto",
        "saopaulo",
        "moscow",
        "zurich",
        "paris",
        "bangkok",
        "budapest",
        "austin",
        "berlin",
        "ottawa",
        "phoenix",
        "goa",
        "amman",
        "nairobi",
        "manila",
    ),
    "val": ("cph", "sf"),
    "test": ("miami", "athens", "buenosaires", "stockholm", "bengaluru", "kampala"),
}
SPLIT_FOLDERS = ("train_val", "test")
SIDES = ("query", "database")
SEQ_INFO = "seq_info.csv"
RAW = "raw.csv"
POSTPROCESSED = "postprocessed.csv"
SUBTASKS = "subtask_index.csv"
SEQ_COLUMNS = ("key", "sequence_key", "frame_number")
RAW_COLUMNS = ("key", "lon", "lat", "ca", "captured_at", "pano")
POST_COLUMNS = ("key", "easting", "northing", "unique_cluster", "control_panel", "night", "view_direction")
SUBTASK_NAMES = ("all", "s2w", "w2s", "o2n", "n2o", "d2n", "n2d")
DEFAULT_RADIUS_M = 25.0  # mapillary_sls evaluate.py --threshold default


def _is_city(folder: Path) -> bool:
    return all((folder / side / SEQ_INFO).is_file() for side in SIDES)


def find_cities(root: Path) -> dict[str, Path]:
    """City name → folder, from ``train_val/`` and ``test/`` (or the folder itself if it is one city)."""
    if _is_city(root):
        return {root.name: root}
    out = {}
    for split in SPLIT_FOLDERS:
        d = root / split
        if d.is_dir():
            for c in sorted(d.iterdir()):
                if c.is_dir() and _is_city(c):
                    out[c.name] = c
    return out


def _by_key(path: Path, required: tuple[str, ...], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """Rows of ``path`` re-ordered to ``keys`` (joined on the key column)."""
    header, rows = read_csv(path, required, "MSLS file")
    ki = header.index("key")
    index = {r[ki].strip(): r for r in rows}
    missing = [k for k in keys if k not in index]
    if missing:
        raise DatasetError(f"{path}: no row for key(s) {', '.join(missing[:5])} listed in {SEQ_INFO}")
    return header, [index[k] for k in keys]


def read_side(folder: Path, subtask: str | None, include_panoramas: bool) -> dict:
    """One ``query/`` or ``database/`` folder: keys, positions (or None) and flags, filtered."""
    seq_path = folder / SEQ_INFO
    header, rows = read_csv(seq_path, SEQ_COLUMNS, "MSLS file")
    keys = column(header, rows, "key")
    seq = column(header, rows, "sequence_key")
    frame = column(header, rows, "frame_number")
    keep = np.ones(len(keys), dtype=bool)
    meta: dict[str, np.ndarray] = {
        "sequence_key": np.asarray(seq, dtype=object),
        "frame_number": np.asarray(floats(frame, seq_path, "frame_number")).astype(np.int64),
    }
    if subtask is not None and (folder / SUBTASKS).is_file():
        sh, srows = read_csv(folder / SUBTASKS, (subtask,), "MSLS file")
        if len(srows) != len(keys):
            raise DatasetError(f"{folder / SUBTASKS}: {len(srows)} rows but {SEQ_INFO} has {len(keys)}")
        keep &= np.asarray(truthy(column(sh, srows, subtask)))
    xy = None
    if (folder / RAW).is_file():
        rh, rrows = _by_key(folder / RAW, RAW_COLUMNS, keys)
        pano = np.asarray(truthy(column(rh, rrows, "pano")))
        meta["pano"] = pano
        meta["captured_at"] = np.asarray(column(rh, rrows, "captured_at"), dtype=object)
        if not include_panoramas:
            keep &= ~pano
    if (folder / POSTPROCESSED).is_file():
        ph, prows = _by_key(folder / POSTPROCESSED, POST_COLUMNS, keys)
        path = folder / POSTPROCESSED
        xy = np.stack(
            [
                floats(column(ph, prows, "easting"), path, "easting"),
                floats(column(ph, prows, "northing"), path, "northing"),
            ],
            axis=1,
        )
        meta["night"] = np.asarray(truthy(column(ph, prows, "night")))
        meta["view_direction"] = np.asarray(column(ph, prows, "view_direction"), dtype=object)
        meta["unique_cluster"] = np.asarray(column(ph, prows, "unique_cluster"), dtype=object)
    idx = np.flatnonzero(keep)
    return {
        "keys": [keys[i] for i in idx],
        "xy": xy[idx] if xy is not None else None,
        "meta": {k: v[idx] for k, v in meta.items()},
    }


def _parse_cities(cities, found: dict[str, Path]) -> list[str]:
    if cities is None:
        val = [c for c in CITIES["val"] if c in found]
        return val or sorted(found)
    names = cities.split(",") if isinstance(cities, str) else list(cities)
    out: list[str] = []
    for n in (x.strip() for x in names):
        if n in CITIES:  # a split name: its cities that are on disk
            present = [c for c in CITIES[n] if c in found]
            if not present:
                raise DatasetError(f"no MSLS {n} city found; available: {', '.join(sorted(found))}")
            out.extend(present)
        else:
            out.append(n)
    unknown = [c for c in out if c not in found]
    if unknown:
        raise DatasetError(f"MSLS cities not found: {', '.join(unknown)}; available: {', '.join(sorted(found))}")
    return out


@register_adapter(
    "msls",
    6,
    ("cities", "subtask", "include_panoramas") + RADIUS_OPTIONS,
    "Mapillary SLS: train_val/<city>/ and test/<city>/, each with query/ and database/ holding images/<key>.jpg, "
    "seq_info.csv, raw.csv, postprocessed.csv (train/val) and subtask_index.csv; cities=cph,sf (default: val "
    "cities found) or train/val/test; panoramas excluded unless include_panoramas=True",
    "radius 25 m within each city (mapillary_sls evaluate.py); test cities are unlabelled",
)
def _msls():
    def detect(path: Path) -> bool:
        return bool(find_cities(path))

    def load(
        path: Path,
        cities=None,
        subtask: str | None = "all",
        include_panoramas: bool = False,
        positive_dist_threshold: float | None = None,
        radius: float | None = None,
    ) -> Dataset:
        r = radius_option(positive_dist_threshold, radius, DEFAULT_RADIUS_M)
        if isinstance(include_panoramas, str):
            include_panoramas = include_panoramas.strip().lower() in ("1", "true", "yes")
        if subtask is not None and subtask not in SUBTASK_NAMES:
            raise ConfigError(f"MSLS subtask {subtask!r} unknown; one of {', '.join(SUBTASK_NAMES)}")
        found = find_cities(path)
        chosen = _parse_cities(cities, found)
        q_keys: list[str] = []
        d_keys: list[str] = []
        q_xy, d_xy, positives = [], [], []
        q_meta: dict[str, list] = {}
        d_meta: dict[str, list] = {}
        labelled = []
        for city in chosen:
            folder = found[city]
            rel = folder.relative_to(path).as_posix() if folder != path else ""
            q = read_side(folder / "query", subtask, include_panoramas)
            d = read_side(folder / "database", subtask, include_panoramas)
            for side, data, keys, meta in (("query", q, q_keys, q_meta), ("database", d, d_keys, d_meta)):
                names = [f"{side}/images/{k}.jpg" for k in data["keys"]]
                require_files(folder, names, f"MSLS {city} {side}", folder / side / SEQ_INFO)
                keys.extend(f"{rel}/{n}" if rel else n for n in names)
                data["meta"]["city"] = np.asarray([city] * len(names), dtype=object)
                for k, v in data["meta"].items():
                    meta.setdefault(k, []).append(v)
            has = q["xy"] is not None and d["xy"] is not None
            labelled.append(has)
            if has:
                offset = len(d_keys) - len(d["keys"])
                gt = GroundTruth.from_radius(q["xy"], d["xy"], r)
                positives.extend(p + offset for p in gt.positives)
                q_xy.append(q["xy"])
                d_xy.append(d["xy"])
        if any(labelled) and not all(labelled):
            raise DatasetError(
                f"{path}: cities {', '.join(c for c, ok in zip(chosen, labelled) if not ok)} have no {POSTPROCESSED} "
                f"(test cities) while others have; evaluate labelled and unlabelled cities separately"
            )
        if not q_keys or not d_keys:
            raise DatasetError(f"{path}: no MSLS images left for cities {', '.join(chosen)} (subtask {subtask})")
        gt = GroundTruth(positives, len(d_keys), source=f"radius {r:g} m within each city") if all(labelled) else None
        rule = {"kind": "radius", "meters": r, "scope": "per city"} if gt is not None else {"kind": "none"}
        if gt is not None:
            gt.rule = dict(rule)
        ds = Dataset(
            path.name,
            path,
            d_keys,
            path,
            q_keys,
            gt,
            np.concatenate(d_xy) if gt is not None else None,
            np.concatenate(q_xy) if gt is not None else None,
            description=f"MSLS cities {', '.join(chosen)}; subtask {subtask}; panoramas "
            f"{'kept' if include_panoramas else 'excluded'}",
            layout="msls",
            ground_truth_rule=rule,
        )

        def merge(meta: dict[str, list], n: int) -> dict:
            return {k: np.concatenate(v) for k, v in meta.items() if sum(len(x) for x in v) == n}

        ds.query_metadata = merge(q_meta, len(q_keys))
        ds.database_metadata = merge(d_meta, len(d_keys))
        return ds

    return detect, load
