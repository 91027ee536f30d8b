"""CosPlace and EigenPlaces: vprkit's presets equal the official networks on seeded weights.

The fixture (``scripts/zoo_reference/record_cosplace.py``, run on the official ``GeoLocalizationNet`` /
``GeoLocalizationNet_`` of gmberton/CosPlace and gmberton/EigenPlaces with torchvision) holds the official
descriptors of ResNet-18/50/101/152 and VGG16 models at a square and a non-square size. Here the same
seeded weights are saved as the authors publish them (``torch.save`` of the network's ``state_dict``,
``<Backbone>_<dim>_<method>.pth``), loaded through ``presets.resolve(<preset>, weights=path)``, the
backbone and aggregator factories, and compared.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from vprkit.aggregation.options import AggregationOptions
from vprkit.aggregation.vocabulary import make_aggregator
from vprkit.errors import WeightsNotFoundError
from vprkit.pipeline.models import load_backbone
from vprkit.presets import resolve
from vprkit.zoo import ZOO_WEIGHTS, zoo_part
from vprkit.zoo.cosplace import METHODS, entry_name

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("zoo_seeded", Path(__file__).parent / "seeded.py")
seeded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeded)

FIXTURE = seeded.read_fixture(str(FIXTURES / "cosplace.npz"))
RECORDED = sorted(FIXTURE[0]["models"])
HEAVY = ("ResNet101", "ResNet152")
IMAGE_PART_TOLERANCE = 1e-3  # one size is enough to prove them (runtime)


def official_file(folder: Path, key: str) -> Path:
    """The seeded weights of ``key`` (``method/Backbone/dim``) in the authors' container, names and file name."""
    meta = FIXTURE[0]
    model = meta["models"][key]
    weights = seeded.seeded_state_dict(model["shapes"], model["seed"], overrides=meta["overrides"])
    assert seeded.checksum(weights) == model["checksum"]
    method, backbone, dim = key.split("/")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ZOO_WEIGHTS.get(entry_name(method, backbone, int(dim))).filename
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    return path


def build(preset: str, path: Path):
    config = resolve(preset, weights=path)
    backbone = load_backbone(config)
    return backbone, make_aggregator(AggregationOptions.from_config(config), backbone, None)


@pytest.mark.parametrize("key", RECORDED)
def test_preset_equals_the_official_model(tmp_path, key):
    meta, outputs = FIXTURE
    method, backbone_name, dim = key.split("/")
    preset = entry_name(method, backbone_name, int(dim))
    backbone, aggregator = build(preset, official_file(tmp_path, key))
    assert aggregator.dim == int(dim) and backbone.identity()["weights"] == preset
    sizes = meta["models"][key]["sizes"][: 1 if backbone_name in HEAVY else None]
    images = seeded.seeded_images(sizes, batch=meta["batch"], seed=meta["image_seed"])
    for (h, w), pixels in zip(sizes, images):
        with torch.inference_mode():
            ours = aggregator(backbone(torch.from_numpy(pixels))).numpy()
        official = outputs[f"{key}/{h}x{w}"]
        assert seeded.relative_difference(ours, official) <= seeded.REL_TOLERANCE, (preset, h, w)
        # Random weights make both images' descriptors alike (cosine ≈ 0.999+): their difference, the
        # image-dependent part, must match as well (measured ≤ 1e-4 of its size), not only the common part.
        assert seeded.relative_difference(ours[0] - ours[1], official[0] - official[1]) <= IMAGE_PART_TOLERANCE


def test_every_published_checkpoint_has_an_entry_and_a_preset():
    for method, (source, available) in METHODS.items():
        for backbone, dims in available.items():
            for dim in dims:
                name = entry_name(method, backbone, dim)
                entry = ZOO_WEIGHTS.get(name)
                assert entry.urls == (f"{source}/releases/download/v1.0/{backbone}_{dim}_{method}.pth",)
                assert entry.licence == "MIT"
                config = resolve(name)
                assert config.aggregator == "gem-fc" and config.aggregator_options["out_dim"] == dim
                assert config.image.resize == "none"  # the official evaluation: native size
    assert resolve("cosplace-r50-2048").backbone == "resnet50"
    assert resolve("eigenplaces-vgg16-512").backbone == "vgg16-conv5"


def test_another_variants_file_is_refused_in_one_line(tmp_path):
    r18 = official_file(tmp_path, "cosplace/ResNet18/512")
    with pytest.raises(WeightsNotFoundError) as info:
        build("cosplace-r50-2048", r18)
    assert "\n" not in str(info.value) and "cosplace-r50-2048" in str(info.value)


def test_the_head_part_is_trainable_and_identified(tmp_path):
    from vprkit.aggregation import AGGREGATORS

    path = official_file(tmp_path, "eigenplaces/ResNet18/256")
    head = AGGREGATORS.get("gem-fc")(512, out_dim=256, zoo="eigenplaces-r18-256", weights=str(path), trainable=True)
    assert set(zoo_part("eigenplaces-r18-256", path, "aggregator")) == {"p", "fc.weight", "fc.bias"}
    assert head.identity() == {"aggregator": "gem-fc", "dim": 256, "zoo": "eigenplaces-r18-256"}
    from vprkit.backbones.base import DenseFeatures

    feats = DenseFeatures(torch.rand(2, 3, 4, 512, requires_grad=True), 32, (96, 128))
    head(feats).sum().backward()
    assert all(p.grad is not None for p in head.parameters())
