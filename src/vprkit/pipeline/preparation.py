"""What every build does before it encodes: the request, the settings check, the models (vocabulary, fitted
map extensions). Shared by the single-process build (:mod:`.build`) and the Ray build (:mod:`.distributed`), so
both encode with the very same vocabulary and extension state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..aggregation import Aggregator, Vocabulary
from ..aggregation.options import AggregationOptions
from ..aggregation.vocabulary import make_aggregator
from ..backbones import Backbone
from ..backbones.extract import FeatureCache, extract, ignore_failures, memory_plan, sample_keys
from ..config import Config
from ..images import ImageSource
from ..io import clean_orphans
from ..maps import (
    EXTENSIONS_DIR,
    MAP_FILE,
    PENDING_DIR,
    MapExtension,
    MapStore,
    check_build_settings,
    read_build_record,
    read_map_info,
    write_build_record,
)
from .models import features_on_cpu, load_backbone, make_extensions
from .open import on_device
from .vocabularies import obtain_vocabulary, record_build_vocabulary

# Images a map extension fits its state on (a seeded sample of the build's images) unless it says otherwise.
DEFAULT_FIT_IMAGES = 500


@dataclass
class BuildRequest:
    """What a build was asked to do: settings, images, destination, poses and policies."""

    config: Config
    source: ImageSource
    keys: list[str]
    out: Path
    poses: str | os.PathLike | np.ndarray | None
    crs: str | dict | None
    on_change: str
    on_duplicate: str
    progress: bool
    log: Callable[[str], None]


@dataclass
class BuildModels:
    """The models a build encodes with: backbone, vocabulary, aggregator and fitted map extensions."""

    backbone: Backbone
    vocabulary: Vocabulary | None
    aggregator: Aggregator
    extensions: dict[str, MapExtension]
    cache: FeatureCache  # features of the vocabulary pass, kept for the encoding pass


def start_build(out: Path, config: Config) -> dict[str, Any]:
    """Under the map's lock: remove a dead build's leftovers, check the recorded settings; the previous ``map.json``."""
    for folder in (out, out / PENDING_DIR, out / EXTENSIONS_DIR):  # we hold the lock: leftovers are a dead build's
        clean_orphans(folder, older_than_s=0)
    check_build_settings(out, config)
    return read_map_info(out) if (out / MAP_FILE).exists() else {}


def store_has_poses(store: MapStore) -> bool:
    return bool(len(store)) and bool(np.isfinite(store.read_poses()).all(axis=1).any())


def prepare_build(
    config: Config,
    source: ImageSource,
    keys: list[str],
    out: Path,
    progress: bool,
    log: Callable[[str], None],
    cache: FeatureCache | None = None,
) -> BuildModels:
    """Record the settings (``build.json``), then obtain the vocabulary and fit the map extensions.

    The vocabulary is recorded before the first shard: a resumed build must encode with this very one.
    """
    backbone = load_backbone(config)
    record = read_build_record(out)
    write_build_record(
        out, {**(record.to_dict() if record else {}), "config": config.to_dict(), "vprkit_version": __version__}
    )
    cache = cache if cache is not None else FeatureCache(memory_plan(config, backbone).feature_cache_bytes)
    vocabulary = obtain_vocabulary(config, backbone, source, out, progress, log, cache)
    if vocabulary is not None:
        record_build_vocabulary(out, vocabulary)
    aggregator = on_device(make_aggregator(AggregationOptions.from_config(config), backbone, vocabulary), backbone)
    extensions = fitted_extensions(config, backbone, vocabulary, source, keys, out, progress)
    return BuildModels(backbone, vocabulary, aggregator, extensions, cache)


def fitted_extensions(
    config: Config,
    backbone: Backbone,
    vocabulary: Vocabulary | None,
    source: ImageSource,
    keys: list[str],
    out: Path,
    progress: bool,
) -> dict[str, MapExtension]:
    """The map's extensions with their state: loaded when the map has it (an interrupted build's), else
    fitted on the seeded sample of ``fit_images`` of the build's keys and saved into ``extensions/<group>.npz``.

    Shared by the single-process and the Ray build, so both encode with the very same state.
    """
    extensions = make_extensions(config, backbone, vocabulary)
    for ext in extensions.values():
        if ext.needs_fit and not ext.try_load_state(out):
            fit_keys = sample_keys(keys, int(ext.options.get("fit_images", DEFAULT_FIT_IMAGES)), config.vocabulary.seed)
            ext.fit(
                features_on_cpu(
                    extract(
                        backbone, config, source, fit_keys, progress and f"fit {ext.group}", on_failure=ignore_failures
                    )
                )
            )
            ext.save_state(out)
    return extensions
