"""What every dataset layout produces and how layouts register: :class:`Dataset`, :class:`DatasetAdapter`.

The lower half of the dataset loader: the built-in layouts (:mod:`.adapters`) and the standard
benchmark formats (:mod:`.formats`, one module per format) both build :class:`Dataset` objects and
register themselves in :data:`DATASET_ADAPTERS` with :func:`register_adapter`; :func:`vprkit.datasets.load_dataset`
picks one. Kept apart from :mod:`.adapters` so the formats and the entry point import it, not each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, DatasetError
from ..images import list_images
from ..registry import Registry
from .ground_truth import DEFAULT_RADIUS_M, GroundTruth
from .poses import poses_from_filenames

GROUND_TRUTH_CSV = "ground_truth.csv"
POSES_CSV = "poses.csv"
RADIUS_OPTIONS = ("positive_dist_threshold", "radius")


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
    # How positives were decided, machine-readable (for reports), e.g. {"kind": "radius", "meters": 25.0};
    # {"kind": "none"} for unlabelled sets. Filled from the ground truth by load_dataset if an adapter
    # does not set a richer one (e.g. with the protocol's source).
    ground_truth_rule: dict[str, Any] = field(default_factory=dict)
    # Per-image extras a format ships (MSLS night/panorama flags, timestamps …): name → array per side.
    query_metadata: dict[str, Any] = field(default_factory=dict)
    database_metadata: dict[str, Any] = field(default_factory=dict)

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
            query_metadata={k: _take(v, qi) for k, v in self.query_metadata.items()},
            database_metadata={k: _take(v, di) for k, v in self.database_metadata.items()},
            ground_truth_rule=dict(self.ground_truth_rule),
            description=(self.description + f"; subset every {every}" + (f", first {limit}" if limit else "")).lstrip(
                "; "
            ),
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
        if self.ground_truth_rule:
            lines.append(f"  ground-truth rule: {format_rule(self.ground_truth_rule)}")
        if self.description:
            lines.append(f"  {self.description}")
        return "\n".join(lines)


def _take(values: Any, idx: np.ndarray) -> np.ndarray:
    return np.asarray(values)[idx]


def format_rule(rule: dict[str, Any]) -> str:
    """A ground-truth rule as one short phrase: ``radius 25 m (source: …)``."""
    kind = rule.get("kind", "?")
    if kind == "radius":
        text = f"radius {rule['meters']:g} m"
        if "max_heading_diff_deg" in rule:
            text += f" and heading ≤ {rule['max_heading_diff_deg']:g}°"
    elif kind == "frames":
        text = f"{'same file name' if rule.get('match') == 'name' else 'frame number'} ±{rule['tolerance']}"
    elif kind == "list":
        text = f"list {rule.get('file', '')}".strip()
    else:
        text = kind
    extra = {
        k: v
        for k, v in rule.items()
        if k not in ("kind", "meters", "max_heading_diff_deg", "tolerance", "match", "file")
    }
    return text + (f" ({', '.join(f'{k}: {v}' for k, v in extra.items())})" if extra else "")


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
    ground_truth: str = ""  # the default ground-truth rule, for describe_adapters()


DATASET_ADAPTERS: Registry[DatasetAdapter] = Registry("dataset layout")


def register_adapter(name: str, priority: int, options: tuple[str, ...], summary: str, ground_truth: str = ""):
    """Decorator for a function returning ``(detect, load)``: registers the layout under ``name``."""

    def wrap(cls_detect_load):
        detect, load = cls_detect_load()
        DATASET_ADAPTERS.register(name, DatasetAdapter(name, priority, detect, load, options, summary, ground_truth))
        return cls_detect_load

    return wrap


def radius_option(
    positive_dist_threshold: float | None, radius: float | None, default: float = DEFAULT_RADIUS_M
) -> float:
    """The positive radius in metres: ``positive_dist_threshold`` (or its older name ``radius``), else ``default``."""
    if positive_dist_threshold is not None and radius is not None and float(positive_dist_threshold) != float(radius):
        raise ConfigError(f"positive_dist_threshold={positive_dist_threshold} and radius={radius} disagree; give one")
    value = positive_dist_threshold if positive_dist_threshold is not None else radius
    value = default if value is None else float(value)
    if not value > 0:
        raise ConfigError(f"positive_dist_threshold must be > 0 metres, got {value}")
    return value


def ordered_adapters() -> list[DatasetAdapter]:
    """Adapters in detection order."""
    return sorted((a for _, a in DATASET_ADAPTERS.items()), key=lambda a: a.priority)


def image_keys(folder: Path, role: str) -> list[str]:
    """The images of a layout's ``role`` folder (database, query), refusing a missing or empty folder."""
    if not folder.is_dir():
        raise DatasetError(f"{role} folder {folder} does not exist")
    keys = list_images(folder)
    if not keys:
        raise DatasetError(f"no images found in {folder} ({role}); add images or point to the right folder")
    return keys


def load_utm_folders(path: Path, db_dir: Path, q_dir: Path, radius: float, layout: str) -> Dataset:
    """Database and query folders whose file names carry ``@east@north@`` (VPR-methods-evaluation)."""
    db = image_keys(db_dir, "database")
    q = image_keys(q_dir, "query")
    db_xy, q_xy = poses_from_filenames(db), poses_from_filenames(q)
    have = np.concatenate([np.isfinite(db_xy[:, 0]), np.isfinite(q_xy[:, 0])])
    if not have.any():
        return Dataset(
            path.name,
            db_dir,
            db,
            q_dir,
            q,
            None,
            description="file names carry no coordinates: unlabelled",
            layout=layout,
        )
    if not have.all():
        names = [k for k, ok in zip(db + q, have) if not ok]
        raise DatasetError(
            f"{path}: {len(names)} image(s) lack @east@north@ coordinates in their names (e.g. {names[0]!r}) "
            f"while others have them; rename them or add {POSES_CSV}"
        )
    gt = GroundTruth.from_radius(q_xy, db_xy, radius)
    return Dataset(path.name, db_dir, db, q_dir, q, gt, db_xy, q_xy, layout=layout)
