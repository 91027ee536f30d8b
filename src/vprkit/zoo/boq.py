"""Zoo family: BoQ (Ali-bey, Chaib-draa & Giguère, CVPR 2024) — the two published models (MIT).

The authors (github.com/amaralibey/Bag-of-Queries, ``hubconf.py``) publish two ``.pth`` files on the
repository's v1.0 release, each the ``state_dict`` of their hub ``VPRModel(backbone, aggregator)``:

- ``resnet50_16384.pth``: torchvision's ResNet-50 cut after ``layer3`` (1024 channels, stride 16), kept as
  ``nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3)`` — keys ``backbone.net.<0|1|4|5|6>.*``;
  BoQ with 512 projected channels, 64 queries, 2 blocks, 32 rows: 16384-d. Evaluated at 384×384.
- ``dinov2_12288.pth``: DINOv2 ViT-B/14 (all 12 blocks, CLS token dropped, *without* the final LayerNorm)
  — keys ``backbone.dino.<hub name>`` (its unused ``norm`` and ``mask_token`` are in the file and ignored);
  BoQ with 384 channels, 64 queries, 2 blocks, 32 rows: 12288-d. Evaluated at 322×322 (a 23×23 grid).

Input rule (README): resize to the size above with bicubic interpolation (antialiased), ImageNet
normalisation. The head accepts any grid, so another ``--image-size`` runs, but the reported recalls
are measured at these sizes.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..config import Config, ImageSpec
from .layouts import register_layout, renamed
from .weights import ZooWeights, register_weights

SOURCE = "https://github.com/amaralibey/Bag-of-Queries"
LICENCE = "MIT"
RELEASE = "https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/"
NUM_QUERIES = 64
NUM_LAYERS = 2
ROW_DIM = 32

# the hub ResNet's nn.Sequential positions → torchvision's names (2: ReLU and 3: max-pool hold no tensors)
_RESNET_POSITIONS = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}


@register_layout("boq-resnet")
def boq_resnet_layout(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``backbone.net.<i>.*`` → the ResNet's torchvision names; ``aggregator.*`` keeps its names."""
    prefixes = {f"backbone.net.{i}.": f"backbone.{name}." for i, name in _RESNET_POSITIONS.items()}
    return renamed(raw, {**prefixes, "aggregator.": "aggregator."})


@register_layout("boq-dinov2")
def boq_dinov2_layout(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``backbone.dino.*`` → DINOv2's hub names (vprkit's); ``aggregator.*`` keeps its names."""
    return renamed(raw, {"backbone.dino.": "backbone.", "aggregator.": "aggregator."})


register_weights(
    ZooWeights(
        name="boq-r50",
        filename="resnet50_16384.pth",
        urls=(RELEASE + "resnet50_16384.pth",),
        format="torch",
        layout="boq-resnet",
        licence=LICENCE,
        source=SOURCE,
        reported="R@1 MSLS-val 91.2, Pitts30k-test 92.4, Pitts250k-test 95.0, Nordland 70.7 (BoQ README)",
    )
)
register_weights(
    ZooWeights(
        name="boq-dinov2",
        filename="dinov2_12288.pth",
        urls=(RELEASE + "dinov2_12288.pth",),
        format="torch",
        layout="boq-dinov2",
        licence=LICENCE,
        source=SOURCE,
        reported="R@1 MSLS-val 93.8, Pitts30k-test 93.7, Pitts250k-test 96.6, Nordland 81.3 (BoQ README)",
    )
)


def _boq_options(proj_channels: int, zoo: str) -> dict[str, Any]:
    return {
        "proj_channels": proj_channels,
        "num_queries": NUM_QUERIES,
        "num_layers": NUM_LAYERS,
        "row_dim": ROW_DIM,
        "zoo": zoo,
    }


RESNET_PROJ_CHANNELS = 512
DINOV2_PROJ_CHANNELS = 384
DINOV2_LAST_BLOCK = 11  # ViT-B/14 has blocks 0..11: BoQ reads the last one's tokens

PRESETS: list[Config] = [
    Config(
        name="boq-r50",
        description=(
            f"BoQ (official ResNet-50 checkpoint), {RESNET_PROJ_CHANNELS * ROW_DIM}-d; images resized to 384×384 "
            "with bicubic interpolation as the authors evaluate"
        ),
        backbone="resnet50",
        backbone_options={"cut": "layer3", "zoo": "boq-r50"},
        image=ImageSpec(size=(384, 384), resize="fixed", interpolation="bicubic"),
        aggregator="boq",
        aggregator_options=_boq_options(RESNET_PROJ_CHANNELS, "boq-r50"),
    ),
    Config(
        name="boq-dinov2",
        description=(
            f"BoQ (official DINOv2 ViT-B/14 checkpoint, no final norm), {DINOV2_PROJ_CHANNELS * ROW_DIM}-d; "
            "images resized to 322×322 with bicubic interpolation as the authors evaluate"
        ),
        backbone="dinov2_vitb14",
        backbone_options={"layer": DINOV2_LAST_BLOCK, "facet": "token", "final_norm": False, "zoo": "boq-dinov2"},
        image=ImageSpec(size=(322, 322), resize="fixed", interpolation="bicubic"),
        aggregator="boq",
        aggregator_options=_boq_options(DINOV2_PROJ_CHANNELS, "boq-dinov2"),
    ),
]
