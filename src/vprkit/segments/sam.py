"""SAM's automatic mask generator (``pip install vprkit[sam]``: segment-anything, which needs torchvision).

Paper (SegVLAD) settings are the library defaults: 32 points per side, 64 per batch, predicted
IoU ≥ 0.88, stability ≥ 0.95 (offset 1.0), box NMS 0.7, no crops, no minimum area. SAM sees the
prepared image at ``scale`` (0.5: half the feature-extraction resolution) and its masks are
upsampled (nearest) back to the prepared image, so they share the backbone's pixel frame.

The checkpoint is given by path (``checkpoint=``, or the ``VPRKIT_SAM_CHECKPOINT`` environment
variable when unset) with ``model_type`` vit_b / vit_l / vit_h. A
randomly initialised model (``checkpoint=None, allow_random=True``) exists only for tests: its
masks are meaningless, and its predicted IoU / stability scores are low, so those tests lower the
thresholds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, WeightsNotFoundError
from .base import SEGMENTERS, Segmenter

MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
# Used when no checkpoint is configured (the ``segvlad-sam`` preset leaves it unset).
CHECKPOINT_ENV = "VPRKIT_SAM_CHECKPOINT"


@SEGMENTERS.register("sam")
class SAMSegmenter(Segmenter):
    name = "sam"

    def __init__(
        self,
        checkpoint: str | None = None,
        model_type: str = "vit_h",
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        min_mask_region_area: int = 0,
        scale: float = 0.5,
        allow_random: bool = False,
        device: str = "cpu",
    ):
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"SAM model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        if checkpoint is None and not allow_random:
            checkpoint = os.environ.get(CHECKPOINT_ENV) or None
        if checkpoint is None and not allow_random:
            raise ConfigError(
                f"the 'sam' segmenter needs a SAM checkpoint (e.g. sam_vit_h_4b8939.pth): set segmenter_options.checkpoint "
                f"or the {CHECKPOINT_ENV} environment variable"
            )
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise WeightsNotFoundError(
                f"SAM checkpoint {checkpoint} not found; download it from the segment-anything release page"
            )
        if not 0 < scale <= 1:
            raise ConfigError(f"SAM scale must be in (0, 1], got {scale}")
        self.checkpoint = checkpoint
        self.model_type = model_type
        self.scale = float(scale)
        self.device = device
        self.generator_options = dict(
            points_per_side=int(points_per_side),
            points_per_batch=int(points_per_batch),
            pred_iou_thresh=float(pred_iou_thresh),
            stability_score_thresh=float(stability_score_thresh),
            stability_score_offset=float(stability_score_offset),
            box_nms_thresh=float(box_nms_thresh),
            min_mask_region_area=int(min_mask_region_area),
        )
        self._generator = None

    def _load(self):
        if self._generator is not None:
            return self._generator
        try:
            from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"the 'sam' segmenter needs segment-anything and torchvision (`pip install vprkit[sam] torchvision`): {exc}"
            ) from None
        if self.checkpoint is None:
            torch.manual_seed(0)
        model = sam_model_registry[self.model_type](checkpoint=self.checkpoint)
        model.to(self.device).eval()
        self._generator = SamAutomaticMaskGenerator(model, output_mode="binary_mask", **self.generator_options)
        return self._generator

    def segment(self, image, features=None, stride=None):
        gen = self._load()
        H, W = image.shape[:2]
        small = image
        if self.scale < 1:
            sw, sh = max(1, round(W * self.scale)), max(1, round(H * self.scale))
            small = np.asarray(Image.fromarray(image).resize((sw, sh), Image.BILINEAR))
        with torch.inference_mode():
            records = gen.generate(np.ascontiguousarray(small))
        if not records:
            return np.zeros((0, H, W), bool)
        masks = np.stack([np.asarray(r["segmentation"], bool) for r in records])
        sh, sw = masks.shape[1:]
        ys = np.minimum((np.arange(H) * sh / H).astype(np.int64), sh - 1)
        xs = np.minimum((np.arange(W) * sw / W).astype(np.int64), sw - 1)
        return masks[:, ys][:, :, xs]

    def identity(self):
        return {
            "segmenter": self.name,
            "model_type": self.model_type,
            "checkpoint": None if self.checkpoint is None else Path(self.checkpoint).name,
            "scale": self.scale,
            **self.generator_options,
        }
