"""Backbones: pixels → dense feature maps. One module per family, each registering its names.

To add a family, write a module that decorates a factory with ``@BACKBONES.register("name")``
and add its module name to ``_FAMILIES`` below.
"""

from __future__ import annotations

import importlib

from .base import BACKBONES, Backbone, DenseFeatures, build_backbone

_FAMILIES = ("efficientnet", "dinov2", "vgg16", "xfeat", "disk")


def _import_families() -> None:
    for fam in _FAMILIES:
        try:
            importlib.import_module(f"{__name__}.{fam}")
        except ModuleNotFoundError as exc:
            # Only a family module that does not exist is skipped. Family modules import their
            # optional dependencies inside the factory, so a missing extra gives its own clear error.
            if exc.name == f"{__name__}.{fam}":
                continue
            raise


_import_families()

__all__ = ["BACKBONES", "Backbone", "DenseFeatures", "build_backbone"]
