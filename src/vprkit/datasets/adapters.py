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

Named protocols: ``nordland*`` defaults to queries ``winter``, database ``summer``, ±1 file.
A ``:P`` suffix (``nordland-64x32:600``) or ``places=P`` keeps every :data:`PLACES_STEP`-th file
and the first ``P`` of those, with exact-frame ground truth unless ``tolerance`` is given — the
"600 places (every 4th file, exact-frame match only)" baseline of the shared data README. Note it
covers the first 2,400 files (~67 %) of the ride, not the whole ride.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, DatasetError
from ..images import list_images
from ..registry import Registry
from .ground_truth import DEFAULT_FRAME_TOLERANCE, DEFAULT_RADIUS_M, GroundTruth
from .poses import poses_from_filenames, read_poses

DATA_ROOT_ENV = "VPRKIT_DATA"
DEFAULT_DATA_ROOT = "./datasets"
GROUND_TRUTH_CSV = "ground_truth.csv"
POSES_CSV = "poses.csv"
VPR_BENCH_PICKLE = "ground_truth_new.npy"
# Take every PLACES_STEP-th file for "places=P" subsets (the README's Nordland-600 protocol).
PLACES_STEP = 4
# Tolerance used with places=P unless given: the README baseline is exact-frame.
PLACES_TOLERANCE = 0
# A folder counts as synchronised sequences when two sub-folders share at least this share of names.
MIN_SHARED_NAME_FRACTION = 0.5
# Named protocols: dataset-name prefix → default options.
NAMED_PROTOCOLS: dict[str, dict[str, Any]] = {
    "nordland": {"queries": "winter", "database": "summer", "tolerance": DEFAULT_FRAME_TOLERANCE},
}
# Options every load understands (adapters add their own).
COMMON_OPTIONS = ("adapter", "every", "limit", "places", "name")


@dataclass(eq=False)
class Dataset:
    """Images and ground truth of one evaluation set. Keys are relative to their folder."""

    name: str
    database_dir: Path
    database_images: list[str]
    queries_dir: Path
    query_images: list[str]
    ground_truth: GroundTruth | None  # None for unlabelled sets (toy)
    database_poses: np.ndarray | None = None  # N×2 metres if known
    query_poses: np.ndarray | None = None
    description: str = ""
    layout: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return self.ground_truth is not None

    def subset(self, every: int = 1, limit: int | None = None, which: str = "both") -> "Dataset":
        """Every ``every``-th image (then the first ``limit``) of queries and/or database.

        ``which`` is ``"both"`` (synchronised sequences: the same places on both sides),
        ``"queries"`` or ``"database"``. Ground truth is restricted to the kept images and renumbered,
        so a positive still means the same place; queries may lose all positives (see
        ``GroundTruth.no_positive_queries``).
        """
        if every < 1 or (limit is not None and limit < 1):
            raise ConfigError(f"subset needs every ≥ 1 and limit ≥ 1 (or None); got every={every}, limit={limit}")
        if which not in ("both", "queries", "database"):
            raise ConfigError(f"subset which={which!r} must be 'both', 'queries' or 'database'")

        def pick(n: int, apply: bool) -> np.ndarray:
            idx = np.arange(n)
            return idx[::every][:limit] if apply else idx

        qi = pick(len(self.query_images), which in ("both", "queries"))
        di = pick(len(self.database_images), which in ("both", "database"))
        gt = self.ground_truth.subset(qi, di) if self.ground_truth is not None else None
        return replace(
            self,
            database_images=[self.database_images[i] for i in di],
            query_images=[self.query_images[i] for i in qi],
            ground_truth=gt,
            database_poses=self.database_poses[di] if self.database_poses is not None else None,
            query_poses=self.query_poses[qi] if self.query_poses is not None else None,
            description=(self.description + f"; subset every {every}" + (f", first {limit}" if limit else "")).lstrip("; "),
            options=dict(self.options),
        )

    def describe(self) -> str:
        """One paragraph for logs and reports: sizes, folders and how ground truth was made."""
        lines = [
            f"dataset {self.name} ({self.layout or 'custom'} layout)",
            f"  database: {len(self.database_images)} images in {self.database_dir}",
            f"  queries:  {len(self.query_images)} images in {self.queries_dir}",
        ]
        if self.ground_truth is None:
            lines.append("  ground truth: none (unlabelled; localisation only, no recall)")
        else:
            s = self.ground_truth.summary()
            lines.append(
                f"  ground truth: {s['source']}; {s['mean_positives']:.1f} positives per query on average, "
                f"{s['n_no_positive']} queries without positive"
            )
        if self.description:
            lines.append(f"  {self.description}")
        return "\n".join(lines)


# --- adapters ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetAdapter:
    """A folder layout: ``detect(path)`` says whether it applies, ``load(path, **options)`` reads it.

    ``priority``: lower is tried first; more specific layouts must come before general ones
    (``explicit`` before ``utm-filenames``, which share ``database/`` + ``queries/``).
    """

    name: str
    priority: int
    detect: Callable[[Path], bool]
    load: Callable[..., Dataset]
    options: tuple[str, ...] = ()
    summary: str = ""


DATASET_ADAPTERS: Registry[DatasetAdapter] = Registry("dataset layout")


def _adapter(name: str, priority: int, options: tuple[str, ...], summary: str):
    def wrap(cls_detect_load):
        detect, load = cls_detect_load()
        DATASET_ADAPTERS.register(name, DatasetAdapter(name, priority, detect, load, options, summary))
        return cls_detect_load

    return wrap


def ordered_adapters() -> list[DatasetAdapter]:
    """Adapters in detection order."""
    return sorted((a for _, a in DATASET_ADAPTERS.items()), key=lambda a: a.priority)


def _images(folder: Path, role: str) -> list[str]:
    if not folder.is_dir():
        raise DatasetError(f"{role} folder {folder} does not exist")
    keys = list_images(folder)
    if not keys:
        raise DatasetError(f"no images found in {folder} ({role}); add images or point to the right folder")
    return keys


def _unpickled_npy_error(path: Path) -> DatasetError:
    return DatasetError(
        f"{path.parent} has only {VPR_BENCH_PICKLE}, VPR-Bench's pickled ground truth, which vprkit does not "
        f"load (unpickling can run arbitrary code). Convert it once, in an environment you trust, to "
        f"{GROUND_TRUTH_CSV} with header query,positives (positives space-separated, e.g. "
        f"'query/0000.jpg,ref/0000.jpg ref/0001.jpg')"
    )


@_adapter("vpr-bench", 10, (), "ref/ + query/ + ground_truth.csv (VPR-Bench / Corridor)")
def _vpr_bench():
    def detect(path: Path) -> bool:
        return (path / "ref").is_dir() and (path / "query").is_dir()

    def load(path: Path) -> Dataset:
        db = _images(path / "ref", "database")
        q = _images(path / "query", "query")
        csv_path = path / GROUND_TRUTH_CSV
        if csv_path.is_file():
            gt = GroundTruth.from_list(csv_path, q, db, query_prefix="query", db_prefix="ref")
        elif (path / VPR_BENCH_PICKLE).is_file():
            raise _unpickled_npy_error(path / VPR_BENCH_PICKLE)
        else:
            gt = None
        return Dataset(path.name, path / "ref", db, path / "query", q, gt, layout="vpr-bench")

    return detect, load


@_adapter("explicit", 20, ("radius",), "database/ + queries/ + ground_truth.csv or poses.csv")
def _explicit():
    def detect(path: Path) -> bool:
        return (
            (path / "database").is_dir()
            and (path / "queries").is_dir()
            and ((path / GROUND_TRUTH_CSV).is_file() or (path / POSES_CSV).is_file())
        )

    def load(path: Path, radius: float = DEFAULT_RADIUS_M) -> Dataset:
        db = _images(path / "database", "database")
        q = _images(path / "queries", "query")
        db_xy = q_xy = None
        if (path / POSES_CSV).is_file():
            poses = read_poses(path / POSES_CSV)
            db_xy = poses.lookup([f"database/{k}" for k in db])
            q_xy = poses.lookup([f"queries/{k}" for k in q])
            for role, keys, xy in (("database", db, db_xy), ("queries", q, q_xy)):
                missing = [f"{role}/{keys[i]}" for i in np.flatnonzero(np.isnan(xy[:, 0]))]
                if missing:
                    shown = ", ".join(missing[:5]) + (f" … ({len(missing)} in total)" if len(missing) > 5 else "")
                    raise DatasetError(
                        f"{path / POSES_CSV}: no pose for {shown}; every image needs a row "
                        f"(image paths relative to {path}, e.g. database/<name>)"
                    )
        if (path / GROUND_TRUTH_CSV).is_file():
            gt = GroundTruth.from_list(path / GROUND_TRUTH_CSV, q, db, query_prefix="queries", db_prefix="database")
        else:
            gt = GroundTruth.from_radius(q_xy, db_xy, radius)
        return Dataset(path.name, path / "database", db, path / "queries", q, gt, db_xy, q_xy, layout="explicit")

    return detect, load


@_adapter("utm-filenames", 30, ("radius",), "database/ + queries/ with @east@north@…@.jpg names (or none: unlabelled)")
def _utm_filenames():
    def detect(path: Path) -> bool:
        return (path / "database").is_dir() and (path / "queries").is_dir()

    def load(path: Path, radius: float = DEFAULT_RADIUS_M) -> Dataset:
        db = _images(path / "database", "database")
        q = _images(path / "queries", "query")
        db_xy, q_xy = poses_from_filenames(db), poses_from_filenames(q)
        have = np.concatenate([np.isfinite(db_xy[:, 0]), np.isfinite(q_xy[:, 0])])
        if not have.any():
            return Dataset(
                path.name, path / "database", db, path / "queries", q, None,
                description="file names carry no coordinates: unlabelled", layout="utm-filenames",
            )
        if not have.all():
            names = [k for k, ok in zip(db + q, have) if not ok]
            raise DatasetError(
                f"{path}: {len(names)} image(s) lack @east@north@ coordinates in their names (e.g. {names[0]!r}) "
                f"while others have them; rename them or add {POSES_CSV}"
            )
        gt = GroundTruth.from_radius(q_xy, db_xy, radius)
        return Dataset(path.name, path / "database", db, path / "queries", q, gt, db_xy, q_xy, layout="utm-filenames")

    return detect, load


def _sequence_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


@_adapter("sequences", 40, ("queries", "database", "tolerance"), "sub-folders of identically named frames (Nordland)")
def _sequences():
    def detect(path: Path) -> bool:
        folders = _sequence_folders(path)
        if len(folders) < 2:
            return False
        a, b = (set(list_images(f)) for f in folders[:2])
        smaller = min(len(a), len(b))
        return smaller > 0 and len(a & b) >= MIN_SHARED_NAME_FRACTION * smaller

    def load(
        path: Path,
        queries: str | None = None,
        database: str | None = None,
        tolerance: int = DEFAULT_FRAME_TOLERANCE,
    ) -> Dataset:
        names = [f.name for f in _sequence_folders(path)]
        if queries is None or database is None:
            if len(names) != 2:
                raise ConfigError(
                    f"{path} has sequences {', '.join(names)}; choose with queries=… and database=…"
                )
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
        db = _images(path / database, "database")
        q = _images(path / queries, "query")
        gt = GroundTruth.from_frames(q, db, tolerance=tolerance)
        return Dataset(
            path.name, path / database, db, path / queries, q, gt,
            description=f"queries {queries}, database {database}, same file name ±{tolerance} file(s)",
            layout="sequences",
        )

    return detect, load


# --- entry point ---------------------------------------------------------------------------------

def data_root() -> Path:
    """Folder that dataset names are looked up in: ``$VPRKIT_DATA`` or ``./datasets``."""
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def _resolve(spec: str | os.PathLike) -> tuple[Path, str, int | None]:
    """(folder, display name, places from a ':P' suffix)."""
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
    for candidate in (Path(base), data_root() / base):
        if candidate.is_dir():
            return candidate, candidate.resolve().name, places
    root = data_root()
    available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    hint = f"available under {root}: {', '.join(available)}" if available else (
        f"the data root {root.resolve()} {'is empty' if root.is_dir() else 'does not exist'}"
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


def load_dataset(spec: str | os.PathLike, **options: Any) -> Dataset:
    """Load a dataset by path or by name under the data root, detecting its layout.

    Options: ``adapter`` (force a layout by name), ``every``/``limit`` (subset, see
    :meth:`Dataset.subset`), ``places`` (every :data:`PLACES_STEP`-th file, first ``places``;
    same as a ``name:places`` suffix), ``name`` (display name), plus the layout's own options
    (``radius`` metres; ``queries``, ``database``, ``tolerance`` for sequences).
    """
    path, name, suffix_places = _resolve(spec)
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
    for prefix, defaults in NAMED_PROTOCOLS.items():
        if name.lower().startswith(prefix) and adapter.name == "sequences":
            folders = {f.name for f in _sequence_folders(path)}
            for key, value in defaults.items():
                if key in ("queries", "database") and value not in folders:
                    continue
                opts.setdefault(key, value)
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
    dataset.options = {**opts, **({"every": every} if every else {}), **({"limit": limit} if limit else {})}
    return dataset


def describe_adapters() -> str:
    """The supported layouts, in detection order (for error messages and ``--help``)."""
    return "\n".join(
        f"  {a.name}: {a.summary}" + (f" [options: {', '.join(a.options)}]" if a.options else "")
        for a in ordered_adapters()
    )


def describe(dataset: Dataset | None = None) -> str:
    """``dataset.describe()`` for a dataset, else the list of supported layouts."""
    return dataset.describe() if dataset is not None else "dataset layouts (detection order):\n" + describe_adapters()
