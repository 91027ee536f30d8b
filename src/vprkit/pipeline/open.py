"""Opening a map: its data (:class:`~vprkit.maps.MapData`) plus the models that read queries for it.

A map on disk is read by :func:`vprkit.maps.open_map_data` (settings, vocabulary, store, index, keys,
poses — no model); :func:`open_map` adds the backbone, the aggregator, the map extensions and the
confidence's calibration, which is what :func:`vprkit.pipeline.localize` needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..aggregation import Aggregator
from ..aggregation.options import AggregationOptions
from ..aggregation.vocabulary import make_aggregator
from ..backbones import Backbone
from ..device import module_device
from ..errors import MapError
from ..maps import MapData, MapExtension, open_map_data
from ..retrieval import RETRIEVERS, Retriever, SearchSpace
from ..retrieval.estimate import Calibration, load_or_fit_calibration
from .models import load_backbone, make_extensions


@dataclass
class Map:
    """An opened map and the models that read queries for it (what :func:`localize` needs)."""

    data: MapData
    backbone: Backbone
    aggregator: Aggregator
    extensions: dict[str, MapExtension] = field(default_factory=dict)
    # the confidence's impostor distribution (retrieval.estimate); None until a localisation needs it
    calibration: Calibration | None = None
    # geometric verifiers by settings (pipeline.verify): the local-feature network and its map-feature cache
    verifiers: dict = field(default_factory=dict)

    # the map's data, for callers that read it directly
    dir = property(lambda self: self.data.dir)
    config = property(lambda self: self.data.config)
    info = property(lambda self: self.data.info)
    vocabulary = property(lambda self: self.data.vocabulary)
    store = property(lambda self: self.data.store)
    index = property(lambda self: self.data.index)
    keys = property(lambda self: self.data.keys)
    poses = property(lambda self: self.data.poses)
    images_root = property(lambda self: self.data.images_root)

    def search_space(self) -> SearchSpace:
        return SearchSpace(
            self.data.index,
            len(self.data.keys),
            self.data.store,
            self.extensions,
            None if self.data.read_only else self.data.dir,
        )

    def retriever(self) -> Retriever:
        return RETRIEVERS.get(self.config.retriever)(self.search_space(), self.config.retriever_options)


def on_device(aggregator: Aggregator, backbone: Backbone) -> Aggregator:
    """The aggregator on the backbone's device (an aggregator without parameters stays as it is)."""
    return aggregator.to(module_device(backbone)) if isinstance(aggregator, torch.nn.Module) else aggregator


def open_map(map_dir: str | os.PathLike, read_only: bool = False, device: str | None = None) -> Map:
    """Load a built map with its models: settings, backbone, vocabulary, aggregator, keys, poses and index.

    ``read_only=True`` writes nothing to the map directory (a stale index is rebuilt in memory),
    so several processes can share one map. ``device`` runs the models elsewhere than the map's
    recorded setting (it does not change the map).
    """
    data = open_map_data(map_dir, read_only=read_only)
    if data.info.get("imported") and data.config.backbone == "hloc-import":
        raise MapError(
            f"{data.dir} holds descriptors imported from {data.info['imported'].get('from')} by a model vprkit "
            f"does not run; query it with descriptors of that model (vprkit.maps.hloc.retrieve), or "
            f"re-import it with --preset NAME if a vprkit preset produced them"
        )
    if device is not None:
        data.config = data.config.replace(device=device)
    config = data.config
    backbone = load_backbone(config)
    aggregator = on_device(make_aggregator(AggregationOptions.from_config(config), backbone, data.vocabulary), backbone)
    extensions = make_extensions(config, backbone, data.vocabulary)
    for ext in extensions.values():
        if ext.needs_fit and not ext.try_load_state(data.dir):
            raise MapError(f"{data.dir} lacks the fitted state of '{ext.group}'; rebuild the map")
    # The confidence's calibration: read when fresh; a writable open fits and persists it (calibration.json),
    # a read-only one leaves it to the first localisation (fitted in memory, nothing written).
    calibration = load_or_fit_calibration(
        data.dir,
        data.index.search,
        data.store.read_global,
        data.keys,
        data.poses,
        write=not data.read_only,
        fit=not data.read_only,
        seed=config.vocabulary.seed,
    )
    return Map(data, backbone, aggregator, extensions, calibration)
