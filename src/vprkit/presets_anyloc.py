"""AnyLoc presets: DINOv2 dense features (value facet of an intermediate block) + hard VLAD / GeM, and CLS.

Image size follows AnyLoc's benchmarks: resize to 480×640, centre-crop to a multiple of 14
(476×630 → 34×45 patches). Descriptor sizes derive from the model table, not literals; each
preset's description states its bytes per image (float32; half with ``--float16``).
"""

from __future__ import annotations

from .backbones.dinov2 import ARCHS
from .config import Config, VocabularyConfig
from .images import ImageSpec
from .presets import register_preset

ANYLOC_IMAGE = ImageSpec((480, 640), "resize_crop")
ANYLOC_K = 32
FLOAT32_BYTES = 4
# The three families AnyLoc names in its results; ViT-L is included for completeness.
ANYLOC_ARCHS = ("vits14", "vitb14", "vitl14", "vitg14")


def _register_family(arch: str) -> None:
    cfg = ARCHS[arch]
    model = f"dinov2_{arch}"
    vlad_dim = ANYLOC_K * cfg.embed_dim
    layer_opts = {"layer": cfg.default_layer, "facet": "value"}
    register_preset(Config(
        name=f"anyloc-{arch}",
        description=(f"AnyLoc: DINOv2 {arch} layer {cfg.default_layer} value facet + hard VLAD K={ANYLOC_K}, "
                     f"480×640→crop/14; {vlad_dim}-d = {vlad_dim * FLOAT32_BYTES:,} B/image (needs DINOv2 weights)"),
        backbone=model, backbone_options=layer_opts, image=ANYLOC_IMAGE,
        aggregator="vlad", vocabulary=VocabularyConfig(k=ANYLOC_K), batch_size=2,
    ))
    register_preset(Config(
        name=f"anyloc-gem-{arch}",
        description=(f"AnyLoc GeM: DINOv2 {arch} layer {cfg.default_layer} value facet + signed GeM p=3; "
                     f"{cfg.embed_dim}-d = {cfg.embed_dim * FLOAT32_BYTES:,} B/image"),
        backbone=model, backbone_options=layer_opts, image=ANYLOC_IMAGE,
        aggregator="gem", aggregator_options={"p": 3.0, "signed": True}, batch_size=2,
    ))
    last = cfg.depth - 1
    register_preset(Config(
        name=f"dinov2-cls-{arch}",
        description=(f"DINOv2 {arch} CLS token (last block {last}, final LayerNorm); "
                     f"{cfg.embed_dim}-d = {cfg.embed_dim * FLOAT32_BYTES:,} B/image"),
        backbone=model, backbone_options={"layer": last, "facet": "token", "final_norm": True},
        image=ANYLOC_IMAGE, aggregator="cls", batch_size=2,
    ))


for _arch in ANYLOC_ARCHS:
    _register_family(_arch)
