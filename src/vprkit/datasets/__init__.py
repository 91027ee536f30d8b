"""Evaluation datasets: folder layouts → image keys, poses and ground truth.

``load_dataset("corridor")`` is the usual entry point (``describe_adapters()`` lists every
supported format: VPR-Bench, Pittsburgh/Tokyo .mat, MSLS, Nordland, Baidu Mall, AnyLoc's sets, …); :class:`GroundTruth` is the one ground-truth
type every source produces; :mod:`.poses` reads positions and converts lat/lon to UTM.
"""

from .adapters import DATA_ROOT_ENV, data_root, describe, describe_adapters, detect_layout, load_dataset
from .base import DATASET_ADAPTERS, Dataset, DatasetAdapter, format_rule, register_adapter
from .ground_truth import DEFAULT_FRAME_TOLERANCE, DEFAULT_RADIUS_M, GroundTruth
from .poses import Poses, latlon_to_utm, parse_utm_filename, poses_from_filenames, read_poses, utm_zone

__all__ = [
    "DATA_ROOT_ENV",
    "DATASET_ADAPTERS",
    "DEFAULT_FRAME_TOLERANCE",
    "DEFAULT_RADIUS_M",
    "Dataset",
    "DatasetAdapter",
    "GroundTruth",
    "Poses",
    "data_root",
    "describe",
    "describe_adapters",
    "detect_layout",
    "format_rule",
    "register_adapter",
    "latlon_to_utm",
    "load_dataset",
    "parse_utm_filename",
    "poses_from_filenames",
    "read_poses",
    "utm_zone",
]
