"""Zoo family: CosPlace (Berton, Masone & Caputo, CVPR 2022) and EigenPlaces (Berton et al., ICCV 2023), MIT.

Both projects train the same network (``GeoLocalizationNet``) on SF-XL and publish one ``.pth`` per
backbone × descriptor size on their GitHub v1.0 releases (the list is each ``hubconf.py``'s
``AVAILABLE_TRAINED_MODELS``; file ``<Backbone>_<dim>_<method>.pth``). Each file is the network's
``state_dict``:

- ``backbone.N.*``: an ``nn.Sequential`` of torchvision's children — for a ResNet
  ``(conv1, bn1, relu, maxpool, layer1..layer4)`` (positions 0, 1, 4–7 hold tensors), for VGG16
  ``features.children()[:-2]`` (conv5_3 before its ReLU, no last max-pool: vprkit's ``vgg16-conv5``
  with the same ``N``);
- ``aggregation.1.p`` (GeM's power) and ``aggregation.3.weight`` / ``.bias`` (the linear layer) of
  ``Sequential(L2Norm, GeM, Flatten, Linear, L2Norm)``: vprkit's ``gem-fc`` head (``p``, ``fc.*``).

Input rule (both ``eval.py`` / ``test.py`` by default): the dataset's images at their native size
(``--resize_test_imgs`` is off by default), ImageNet mean/std. The presets therefore keep the size
(``ImageSpec(None, "none")``); the ResNets run at any size as the official code does, VGG16 needs
sides that are multiples of 16 (the usual 480×640 / 512×512 test images are).

Neither README publishes a recall table (the numbers are in the papers), so ``reported`` says so.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..config import Config, ImageSpec
from .layouts import register_layout, renamed
from .weights import ZooWeights, register_weights

LICENCE = "MIT"
# method → (official repository, hub's available backbone → descriptor sizes); from each hubconf.py
METHODS: dict[str, tuple[str, dict[str, tuple[int, ...]]]] = {
    "cosplace": (
        "https://github.com/gmberton/CosPlace",
        {
            "VGG16": (64, 128, 256, 512),
            "ResNet18": (32, 64, 128, 256, 512),
            "ResNet50": (32, 64, 128, 256, 512, 1024, 2048),
            "ResNet101": (32, 64, 128, 256, 512, 1024, 2048),
            "ResNet152": (32, 64, 128, 256, 512, 1024, 2048),
        },
    ),
    "eigenplaces": (
        "https://github.com/gmberton/EigenPlaces",
        {
            "VGG16": (512,),
            "ResNet18": (256, 512),
            "ResNet50": (128, 256, 512, 1024, 2048),
            "ResNet101": (128, 256, 512, 1024, 2048),
        },
    ),
}
# official backbone name → (short name in presets, vprkit backbone, checkpoint layout)
BACKBONES = {
    "VGG16": ("vgg16", "vgg16-conv5", "cosplace-vgg16"),
    "ResNet18": ("r18", "resnet18", "cosplace-resnet"),
    "ResNet50": ("r50", "resnet50", "cosplace-resnet"),
    "ResNet101": ("r101", "resnet101", "cosplace-resnet"),
    "ResNet152": ("r152", "resnet152", "cosplace-resnet"),
}
PAPERS = {
    "cosplace": "CVPR 2022 paper 'Rethinking Visual Geo-localization for Large-Scale Applications'",
    "eigenplaces": "ICCV 2023 paper 'EigenPlaces: Training Viewpoint Robust Models for Visual Place Recognition'",
}
NATIVE_SIZE = ImageSpec(None, "none")

# the Sequential's positions that hold tensors → torchvision's ResNet names (2: ReLU, 3: max-pool)
_RESNET_POSITIONS = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_HEAD = {"aggregation.1.": "aggregator.", "aggregation.3.": "aggregator.fc."}


@register_layout("cosplace-resnet")
def cosplace_resnet_layout(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``backbone.<i>.*`` → the ResNet's torchvision names; ``aggregation.1.p`` → ``p``, ``aggregation.3.*`` → ``fc.*``."""
    prefixes = {f"backbone.{i}.": f"backbone.{name}." for i, name in _RESNET_POSITIONS.items()}
    return renamed(raw, {**prefixes, **_HEAD})


@register_layout("cosplace-vgg16")
def cosplace_vgg16_layout(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``backbone.N.*`` → ``vgg16-conv5``'s ``features.N.*`` (same indices); the head as for the ResNets."""
    return renamed(raw, {"backbone.": "backbone.features.", **_HEAD})


def entry_name(method: str, backbone: str, dim: int) -> str:
    """``<method>-<r18|r50|r101|r152|vgg16>-<dim>``: the zoo entry and its preset share this name."""
    return f"{method}-{BACKBONES[backbone][0]}-{dim}"


def _register(method: str, backbone: str, dim: int) -> Config:
    """Register one published checkpoint and return its preset."""
    source, _ = METHODS[method]
    short, vprkit_backbone, layout = BACKBONES[backbone]
    name = entry_name(method, backbone, dim)
    filename = f"{backbone}_{dim}_{method}.pth"
    register_weights(
        ZooWeights(
            name=name,
            filename=filename,
            urls=(f"{source}/releases/download/v1.0/{filename}",),
            format="torch",
            layout=layout,
            licence=LICENCE,
            source=source,
            reported=f"no recall table in the official README; see the {PAPERS[method]}",
            extra={"method": method, "backbone": backbone, "dim": dim},
        )
    )
    label = "CosPlace" if method == "cosplace" else "EigenPlaces"
    return Config(
        name=name,
        description=(
            f"{label} {backbone} (SF-XL), {dim}-d: L2 per location, GeM, linear, L2; images at their native "
            f"size, ImageNet normalisation (the official evaluation); official weights ({LICENCE})"
        ),
        backbone=vprkit_backbone,
        backbone_options={"zoo": name},
        image=NATIVE_SIZE,
        aggregator="gem-fc",
        aggregator_options={"out_dim": dim, "zoo": name},
    )


PRESETS: list[Config] = [
    _register(method, backbone, dim)
    for method, (_, available) in METHODS.items()
    for backbone, dims in available.items()
    for dim in dims
]
