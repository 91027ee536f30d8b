"""Loading evaluation datasets from the folder layouts used in the field, into one :class:`Dataset`.

``load_dataset("corridor")`` finds a folder under the data root (``$VPRKIT_DATA``, default
``./datasets``) or takes a path, detects its layout with the adapters in :data:`DATASET_ADAPTERS`
(tried in priority order, first match wins) and returns image keys plus ground truth.

Layouts (highest priority first):

1. ``vpr-bench`` — ``ref/`` + ``query/`` + ``ground_truth.csv`` (``query,positives``). VPR-Bench's
   ``ground_truth_new.npy`` is a pickle and is never loaded (pickles can run code).
2. ``explicit`` — ``database/`` + ``queries/`` + ``ground_truth.csv`` and/or ``poses.csv``
   (image paths relative to the dataset folder, e.g. ``database/0001.jpg``); GT from the list, or
   by ``radius`` metres from the poses.
3. ``utm-filenames`` — ``database/`` + ``queries/`` with ``@UTM_east@UTM_north@…@.jpg`` names
   (VPR-methods-evaluation); GT by ``radius`` (25 m). Names without coordinates → unlabelled.
4. ``sequences`` — sub-folders holding identically named frames (Nordland); GT by file name with
   ``tolerance`` files either side.

Standard benchmark formats (Pittsburgh/Tokyo ``.mat``, MSLS, Baidu Mall, AnyLoc's sets, VP-Air,
AmsterTime, RobotCar-style CSVs, VPR-datasets-downloader splits) live in :mod:`.formats`, one module
per format, and register themselves in :data:`~.base.DATASET_ADAPTERS` like the layouts here;
:func:`describe_adapters` lists every layout with what it expects on disk and its default ground truth.
Radius-based layouts take ``positive_dist_threshold`` (metres; ``radius`` is the older name). Every loaded :class:`Dataset` records its ground-truth rule
machine-readably in ``ground_truth_rule`` (``{"kind": "radius", "meters": 25.0}``, ``{"kind":
"frames", "tolerance": 1, "match": "name"}``, ``{"kind": "list", "file": …}``, ``{"kind": "none"}`` …).

Named protocols (:data:`NAMED_PROTOCOLS`, matched on the folder's or its parent's name):
``nordland*`` defaults to queries ``winter``, database ``summer``, ±10 original frames (±1 file
for every-10th-frame names like nordland-64x32, ±10 at full rate); ``gardens*`` to
``night_right`` vs ``day_right``; ``17places`` to ±15 frames.
A ``:P`` suffix (``nordland-64x32:600``) or ``places=P`` keeps every :data:`PLACES_STEP`-th file
and the first ``P`` of those, with exact-frame ground truth unless ``tolerance`` is given — the
"600 places (every 4th file, exact-frame match only)" baseline of the shared data README. Note it
covers the first 2,400 files (~67 %) of the ride, not the whole ride.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DatasetError
from ..images import list_images
from . import formats  # noqa: F401  (the standard benchmark formats register their layouts on import)
from .base import (
    DATASET_ADAPTERS,
    GROUND_TRUTH_CSV,
    POSES_CSV,
    RADIUS_OPTIONS,
    Dataset,
    DatasetAdapter,
    image_keys,
    load_utm_folders,
    ordered_adapters,
    radius_option,
    register_adapter,
)
from .ground_truth import DEFAULT_FRAME_TOLERANCE, GroundTruth
from .poses import match_poses, read_poses

log = logging.getLogger(__name__)

DATA_ROOT_ENV = "VPRKIT_DATA"
DEFAULT_DATA_ROOT = "./datasets"
VPR_BENCH_PICKLE = "ground_truth_new.npy"
# Take every PLACES_STEP-th file for "places=P" subsets (the README's Nordland-600 protocol).
PLACES_STEP = 4
# Tolerance used with places=P unless given: the README baseline is exact-frame.
PLACES_TOLERANCE = 0
# A folder counts as synchronised sequences when two sub-folders share at least this share of names.
MIN_SHARED_NAME_FRACTION = 0.5
# Named protocols: dataset-name prefix → (layout they apply to, default options, where the defaults come from).
# A "queries"/"database" default also matches a folder that merely contains the word
# (nordland_winter_images, winter_images_test …) when exactly one does.
# Nordland's tolerance is ±10 original frames (Patch-NetVLAD); in files that depends on the
# frame step of the names (±1 file for every-10th-frame data such as nordland-64x32, ±10 at full rate).
NORDLAND_TOLERANCE_FRAMES = 10
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def _nordland_tolerance(path: Path, opts: dict[str, Any]) -> int:
    """±10 original frames expressed in files, from the frame numbers in the database names."""
    folder = path / str(opts.get("database", ""))
    names = list_images(folder) if opts.get("database") and folder.is_dir() else []
    nums = sorted({int(m.group(1)) for n in names if (m := _LAST_NUMBER.search(n.rsplit("/", 1)[-1]))})
    if len(nums) < 2:
        return DEFAULT_FRAME_TOLERANCE
    step = float(np.median(np.diff(nums)))
    return max(1, int(round(NORDLAND_TOLERANCE_FRAMES / step))) if step > 0 else DEFAULT_FRAME_TOLERANCE


NAMED_PROTOCOLS: dict[str, tuple[str, dict[str, Any], str]] = {
    "nordland": (
        "sequences",
        {"queries": "winter", "database": "summer", "tolerance": _nordland_tolerance},
        "Nordland winter vs summer, ±10 original frames (Patch-NetVLAD; ±1 file of every-10th-frame data)",
    ),
    "gardens": (
        "sequences",
        {"queries": "night_right", "database": "day_right"},
        "Gardens Point night_right vs day_right (AnyLoc custom_datasets/gardens.py)",
    ),
    "17places": ("vpr-bench", {"tolerance": 15}, "17 Places ±15 frames (VPR-Bench protocol)"),
    "17-places": ("vpr-bench", {"tolerance": 15}, "17 Places ±15 frames (VPR-Bench protocol)"),
}
# Options every load understands (adapters add their own).
COMMON_OPTIONS = ("adapter", "every", "limit", "places", "name")


def shared_name_fraction(a: Sequence[str], b: Sequence[str]) -> float:
    """The share of the smaller of two lists of image keys (relative to their folders) that the other one also
    has: how far two traversals pair up frame by frame (1.0 for Nordland's seasons, Corridor's ref/ and query/)."""
    names_a, names_b = set(a), set(b)
    smaller = min(len(names_a), len(names_b))
    return len(names_a & names_b) / smaller if smaller else 0.0


# --- the built-in layouts -----------------------------------------------------------------------


def _unpickled_npy_error(path: Path) -> DatasetError:
    return DatasetError(
        f"{path.parent} has only {VPR_BENCH_PICKLE}, VPR-Bench's pickled ground truth, which vprkit does not "
        f"load (unpickling can run arbitrary code). Convert it once, in an environment you trust, to "
        f"{GROUND_TRUTH_CSV} with header query,positives (positives space-separated, e.g. "
        f"'query/0000.jpg,ref/0000.jpg ref/0001.jpg'), or, if query i matches reference i, pass "
        f"tolerance=N (i ± N frames)"
    )


@register_adapter(
    "vpr-bench",
    10,
    ("tolerance",),
    "ref/ + query/ + ground_truth.csv (VPR-Bench: Corridor, SPED, 17 Places, Gardens Point, St Lucia …); "
    "with only the pickled ground_truth_new.npy, tolerance=N pairs the i-th query with the i-th reference ±N",
    "the CSV list; else frame index ±tolerance (17places: ±15 by default); else, for two synchronised "
    "traversals (file names that pair up), the same file name (exact frame, as Nordland's places=P protocol)",
)
def _vpr_bench():
    def detect(path: Path) -> bool:
        return (path / "ref").is_dir() and (path / "query").is_dir()

    def load(path: Path, tolerance: int | None = None) -> Dataset:
        db = image_keys(path / "ref", "database")
        q = image_keys(path / "query", "query")
        csv_path = path / GROUND_TRUTH_CSV
        description = ""
        if csv_path.is_file():
            gt = GroundTruth.from_list(csv_path, q, db, query_prefix="query", db_prefix="ref")
        elif tolerance is not None:
            # VPR-Bench's image sets are index-aligned (i-th query ↔ i-th reference): the ±N frame
            # protocol can be rebuilt without unpickling ground_truth_new.npy.
            if len(q) != len(db):
                raise DatasetError(
                    f"{path}: tolerance needs index-aligned ref/ and query/ (same count); found {len(db)} "
                    f"reference and {len(q)} query images. Provide {GROUND_TRUTH_CSV} instead"
                )
            tolerance = int(tolerance)
            gt = GroundTruth.from_frames(np.arange(len(q)), np.arange(len(db)), tolerance=tolerance)
            gt.rule["match"] = "index"
            description = f"query i ↔ reference i ±{tolerance} (index-aligned)"
        elif (path / VPR_BENCH_PICKLE).is_file():
            raise _unpickled_npy_error(path / VPR_BENCH_PICKLE)
        elif shared_name_fraction(q, db) >= MIN_SHARED_NAME_FRACTION:
            # Two synchronised traversals whose frames share names: the same name is the same place.
            gt = GroundTruth.from_frames(q, db, tolerance=0)
            description = "synchronised traversals: same file name (exact frame)"
        else:
            gt = None
        return Dataset(path.name, path / "ref", db, path / "query", q, gt, description=description, layout="vpr-bench")

    return detect, load


@register_adapter(
    "explicit",
    20,
    RADIUS_OPTIONS,
    "database/ + queries/ + ground_truth.csv or poses.csv",
    "the CSV list, else radius 25 m from poses.csv",
)
def _explicit():
    def detect(path: Path) -> bool:
        return (
            (path / "database").is_dir()
            and (path / "queries").is_dir()
            and ((path / GROUND_TRUTH_CSV).is_file() or (path / POSES_CSV).is_file())
        )

    def load(path: Path, positive_dist_threshold: float | None = None, radius: float | None = None) -> Dataset:
        radius = radius_option(positive_dist_threshold, radius)
        db = image_keys(path / "database", "database")
        q = image_keys(path / "queries", "query")
        db_xy = q_xy = None
        description = ""
        if (path / POSES_CSV).is_file():
            # Rows are named relative to the dataset folder: database/<key>, queries/<key>.
            names = [f"database/{k}" for k in db] + [f"queries/{k}" for k in q]
            matched, report = match_poses(read_poses(path / POSES_CSV), names, log_warnings=False)
            if report.n_images_without_pose:
                missing = report.images_without_pose
                total = report.n_images_without_pose
                shown = ", ".join(missing) + (f" … ({total} in total)" if total > len(missing) else "")
                raise DatasetError(
                    f"{path / POSES_CSV}: no pose for {shown}; every image needs a row "
                    f"(image paths relative to {path}, e.g. database/<name>)"
                    + (f". {report.hint}" if report.hint else "")
                )
            if report.n_unmatched_poses:
                log.warning("%s", report.message())
                description = f"{report.n_unmatched_poses} pose row(s) match no image"
            xy = matched.lookup(names)
            db_xy, q_xy = xy[: len(db)], xy[len(db) :]
        if (path / GROUND_TRUTH_CSV).is_file():
            gt = GroundTruth.from_list(path / GROUND_TRUTH_CSV, q, db, query_prefix="queries", db_prefix="database")
        else:
            gt = GroundTruth.from_radius(q_xy, db_xy, radius)
        return Dataset(
            path.name,
            path / "database",
            db,
            path / "queries",
            q,
            gt,
            db_xy,
            q_xy,
            description=description,
            layout="explicit",
        )

    return detect, load


@register_adapter(
    "utm-filenames",
    30,
    RADIUS_OPTIONS,
    "database/ + queries/ with @east@north@…@.jpg names (VPR-methods-evaluation; or none: unlabelled)",
    "radius 25 m",
)
def _utm_filenames():
    def detect(path: Path) -> bool:
        return (path / "database").is_dir() and (path / "queries").is_dir()

    def load(path: Path, positive_dist_threshold: float | None = None, radius: float | None = None) -> Dataset:
        radius = radius_option(positive_dist_threshold, radius)
        return load_utm_folders(path, path / "database", path / "queries", radius, "utm-filenames")

    return detect, load


def read_frame_list(list_path: str | os.PathLike) -> set[str]:
    """Frame names (without folders) of a list file: one image path per line, ``#`` comments allowed."""
    path = Path(list_path)
    if not path.is_file():
        raise DatasetError(f"frame list {path} does not exist")
    names = set()
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(line.replace("\\", "/").rsplit("/", 1)[-1])
    if not names:
        raise DatasetError(f"frame list {path} is empty; expected one image path per line")
    return names


def _sequence_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


@register_adapter(
    "sequences",
    40,
    ("queries", "database", "tolerance", "frame_list"),
    "sub-folders of identically named frames (Nordland full or a partition: spring/summer/fall/winter, "
    "sections as sub-folders; Gardens Point day_left/day_right/night_right); frame_list=FILE keeps the "
    "frames named in FILE (e.g. Patch-NetVLAD's nordland_imageNames_index.txt: the test section)",
    "same file name ±tolerance files (nordland*: winter vs summer, ±10 original frames; gardens*: night_right vs "
    "day_right, ±1 file)",
)
def _sequences():
    def detect(path: Path) -> bool:
        folders = _sequence_folders(path)
        if len(folders) < 2:
            return False
        return shared_name_fraction(list_images(folders[0]), list_images(folders[1])) >= MIN_SHARED_NAME_FRACTION

    def load(
        path: Path,
        queries: str | None = None,
        database: str | None = None,
        tolerance: int = DEFAULT_FRAME_TOLERANCE,
        frame_list: str | os.PathLike | None = None,
    ) -> Dataset:
        names = [f.name for f in _sequence_folders(path)]
        if queries is None or database is None:
            if len(names) != 2:
                raise ConfigError(f"{path} has sequences {', '.join(names)}; choose with queries=… and database=…")
            # Two folders and nothing said: first (alphabetical) is the map, second the queries;
            # with one side given, the other folder is the other side.
            if queries is None and database is None:
                database, queries = names
            elif queries is None:
                queries = names[1] if database == names[0] else names[0]
            else:
                database = names[1] if queries == names[0] else names[0]
        for role, sub in (("queries", queries), ("database", database)):
            if sub not in names:
                raise DatasetError(f"{path} has no sequence {sub!r} for {role}; available: {', '.join(names)}")
        if queries == database:
            raise ConfigError(f"queries and database are the same sequence {queries!r}")
        tolerance = int(tolerance)
        db = image_keys(path / database, "database")
        q = image_keys(path / queries, "query")
        description = f"queries {queries}, database {database}, same file name ±{tolerance} file(s)"
        if frame_list is not None:
            keep = read_frame_list(frame_list)
            db = [k for k in db if k.rsplit("/", 1)[-1] in keep]
            q = [k for k in q if k.rsplit("/", 1)[-1] in keep]
            if not db or not q:
                raise DatasetError(
                    f"{frame_list}: none of its {len(keep)} frame names is in {path / database} or {path / queries} "
                    f"(names are compared without folders, e.g. images-00202.png)"
                )
            description += f"; {len(q)} frames listed in {Path(frame_list).name}"
        gt = GroundTruth.from_frames(q, db, tolerance=tolerance)
        return Dataset(
            path.name, path / database, db, path / queries, q, gt, description=description, layout="sequences"
        )

    return detect, load


# --- entry point ---------------------------------------------------------------------------------


def data_root() -> Path:
    """Folder that dataset names are looked up in: ``$VPRKIT_DATA`` or ``./datasets``."""
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def _resolve(spec: str | os.PathLike, root_dir: str | os.PathLike | None = None) -> tuple[Path, str, int | None]:
    """(folder, display name, places from a ':P' suffix); names are looked up under ``root_dir`` if given."""
    root = Path(root_dir) if root_dir is not None else data_root()
    direct = Path(spec)
    if direct.is_dir():
        return direct, direct.resolve().name, None
    text = str(spec)
    places = None
    base = text
    if ":" in text:
        head, _, tail = text.rpartition(":")
        if tail.isdigit():
            base, places = head, int(tail)
    for candidate in (Path(base), root / base):
        if candidate.is_dir():
            return candidate, candidate.resolve().name, places
    available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    hint = (
        f"available under {root}: {', '.join(available)}"
        if available
        else (f"the data root {root.resolve()} {'is empty' if root.is_dir() else 'does not exist'}")
    )
    raise DatasetError(
        f"dataset {text!r} not found: not a folder, and no folder {base!r} under the data root "
        f"(set {DATA_ROOT_ENV}); {hint}"
    )


def detect_layout(path: str | os.PathLike) -> DatasetAdapter:
    """The first adapter whose ``detect`` accepts ``path`` (raises if none does)."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist")
    for adapter in ordered_adapters():
        if adapter.detect(path):
            return adapter
    if (path / VPR_BENCH_PICKLE).is_file():
        raise _unpickled_npy_error(path / VPR_BENCH_PICKLE)
    if not any(path.iterdir()):
        raise DatasetError(f"no images found in {path}: the folder is empty")
    raise DatasetError(f"{path}: unrecognised dataset layout. Expected one of:\n{describe_adapters()}")


def load_dataset(spec: str | os.PathLike, *, data_root: str | os.PathLike | None = None, **options: Any) -> Dataset:
    """Load a dataset by path or by name under the data root, detecting its layout.

    ``data_root``: the folder names are looked up in (default: ``$VPRKIT_DATA``, else ``./datasets``);
    a caller passes its own (``vprkit eval --data-root``) instead of setting the environment variable.

    Options: ``adapter`` (force a layout by name), ``every``/``limit`` (subset, see
    :meth:`Dataset.subset`), ``places`` (every :data:`PLACES_STEP`-th file, first ``places``;
    same as a ``name:places`` suffix), ``name`` (display name), plus the layout's own options
    (``radius`` metres; ``queries``, ``database``, ``tolerance`` for sequences).
    """
    path, name, suffix_places = _resolve(spec, data_root)
    opts = dict(options)
    adapter = DATASET_ADAPTERS.get(opts.pop("adapter")) if opts.get("adapter") else detect_layout(path)
    opts.pop("adapter", None)
    places = opts.pop("places", None) or suffix_places
    every = opts.pop("every", None)
    limit = opts.pop("limit", None)
    display = opts.pop("name", None) or (f"{name}:{places}" if places else name)
    unknown = sorted(set(opts) - set(adapter.options))
    if unknown:
        raise ConfigError(
            f"option(s) {', '.join(unknown)} not understood by the {adapter.name} layout; "
            f"it accepts {', '.join(COMMON_OPTIONS + adapter.options)}"
        )
    protocol_source = ""
    # The folder's name, or its parent's (nordland/test/ of a partitioned download), selects a protocol.
    protocol_names = [name.lower(), path.resolve().parent.name.lower()]
    for prefix, (layout, defaults, source) in NAMED_PROTOCOLS.items():
        if any(n.startswith(prefix) for n in protocol_names) and adapter.name == layout:
            folders = [f.name for f in _sequence_folders(path)]
            for key, value in defaults.items():
                if key in ("queries", "database"):
                    value = _match_folder(value, folders)
                    if value is None:
                        continue
                if key not in opts and callable(value):
                    value = value(path, opts)
                if key not in opts:
                    opts[key] = value
                    protocol_source = source
    if places is not None:
        if places < 1:
            raise ConfigError(f"places must be ≥ 1, got {places}")
        if adapter.name == "sequences" and "tolerance" not in options:
            opts["tolerance"] = PLACES_TOLERANCE
        every, limit = every or PLACES_STEP, limit or places
    dataset = adapter.load(path, **opts)
    if every or limit:
        dataset = dataset.subset(every or 1, limit)
        if places is not None and len(dataset.query_images) < places:
            raise DatasetError(
                f"{display}: asked for {places} places but only {len(dataset.query_images)} remain "
                f"after taking every {every}th image"
            )
    dataset.name = display
    dataset.layout = adapter.name
    if not dataset.ground_truth_rule:
        gt = dataset.ground_truth
        dataset.ground_truth_rule = (
            {"kind": "none"} if gt is None else dict(gt.rule or {"kind": "custom", "description": gt.source})
        )
    if protocol_source and dataset.ground_truth is not None:
        dataset.ground_truth_rule.setdefault("protocol", protocol_source)
    dataset.options = {**opts, **({"every": every} if every else {}), **({"limit": limit} if limit else {})}
    return dataset


def _match_folder(wanted: str, folders: list[str]) -> str | None:
    """``wanted`` if it is a folder, else the one folder whose name contains it (case-insensitive)."""
    if wanted in folders:
        return wanted
    hits = [f for f in folders if wanted.lower() in f.lower()]
    return hits[0] if len(hits) == 1 else None


def describe_adapters() -> str:
    """Every supported format, in detection order: what it expects on disk, its options and default ground truth."""
    lines = []
    for a in ordered_adapters():
        lines.append(f"  {a.name}: {a.summary}")
        if a.ground_truth:
            lines.append(f"      ground truth: {a.ground_truth}")
        if a.options:
            lines.append(f"      options: {', '.join(a.options)}")
    return "\n".join(lines)


def describe(dataset: Dataset | None = None) -> str:
    """``dataset.describe()`` for a dataset, else the list of supported layouts."""
    return dataset.describe() if dataset is not None else "dataset layouts (detection order):\n" + describe_adapters()
