"""SegVLAD presets on the offline EfficientNet-Lite0 backbone (block 10, 320×240, hard VLAD K = 32).

Segment settings come from ``benchmarks/bench_segvlad.py``: SuperSegments of order 1 (best or
near-best for every weights-free segmenter on Corridor and Nordland-600; the paper's o = 3 was
worse with these small CNN features), VLAD → PCA 512 with "auto" whitening (only when the map
gives ≥ 20 fitted segments per dimension: whitening a PCA fitted on a small map collapses recall,
on a larger one it helps), ≤ 64 SuperSegments per image in float16, weighted voting over the top
50 segments of each query SuperSegment.
"""

from __future__ import annotations

from ..config import Config, VocabularyConfig
from ..images import ImageSpec
from ..presets import register_preset

_BASE = dict(
    backbone="efficientnet-lite0", backbone_options={"block": 10}, image=ImageSpec((240, 320), "fixed"),
    aggregator="vlad", vocabulary=VocabularyConfig(k=32), retriever="segvlad",
    retriever_options={"k_prime": 50, "voting": "weighted"},
)
_SEGMENTS = {"order": 1, "pooling": "vlad", "pca_dim": 512, "whiten": "auto", "max_segments": 64, "storage": "float16"}


def _preset(name: str, description: str, segmenter: str, options: dict, **segments) -> Config:
    return register_preset(Config(
        name=name, description=description, **_BASE,
        extensions={"segments": {**_SEGMENTS, "segmenter": segmenter, "segmenter_options": options, **segments}},
    ))


_preset("segvlad-slic", "SegVLAD: SLIC superpixels (~25), SuperSegments o=1, VLAD→PCA 512, weighted voting; EfficientNet-Lite0",
        "slic", {"n_segments": 25, "compactness": 10.0})
_preset("segvlad-felzenszwalb", "SegVLAD: Felzenszwalb regions, SuperSegments o=1, VLAD→PCA 512; EfficientNet-Lite0",
        "felzenszwalb", {})
_preset("segvlad-features", "SegVLAD: k-means on the backbone's features + position → components, o=1; EfficientNet-Lite0",
        "features", {"k": 8})
_preset("segvlad-grid", "SegVLAD: regular grid of square cells (6 across), o=1; EfficientNet-Lite0",
        "grid", {"cells_across": 6})
# The paper's segment settings: SAM ViT-H masks, o = 3, PCA to 1024 (whitened once the map offers
# ≥ 20 fitted segments per dimension, as the paper's 50,000-segment fit does).
_preset("segvlad-sam", "SegVLAD: SAM automatic masks (paper settings, ViT-H; checkpoint from VPRKIT_SAM_CHECKPOINT or "
        "segmenter_options.checkpoint), o=3, VLAD→PCA 1024", "sam", {"checkpoint": None, "model_type": "vit_h"},
        order=3, pca_dim=1024)
