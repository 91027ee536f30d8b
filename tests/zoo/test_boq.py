"""BoQ's published models: vprkit's presets equal the authors' hub models on seeded weights.

The fixture (``scripts/zoo_reference/record_boq.py``, run on the official code: ``hubconf.VPRModel`` with
the ResNet-50 and DinoV2 wrappers, DINOv2 from facebookresearch/dinov2's own code) holds the official
descriptors at each model's evaluation size and at one non-square size. Here the same seeded weights
are saved as the authors publish them (``torch.save`` of the hub model's state dict, ``….pth``),
loaded through the presets and the zoo, and compared. Also: BoQ trains with vprkit's trainer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from vprkit.aggregation import AGGREGATORS
from vprkit.aggregation.boq import BoQ, attention_heads
from vprkit.aggregation.options import AggregationOptions
from vprkit.aggregation.vocabulary import make_aggregator
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError, WeightsNotFoundError
from vprkit.pipeline.models import load_backbone
from vprkit.presets import resolve
from vprkit.training import PlaceLabels
from vprkit.training.heads import build_head
from vprkit.training.trainer import Trainer, TrainSettings
from vprkit.zoo import ZOO_WEIGHTS

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("zoo_seeded", Path(__file__).parent / "seeded.py")
seeded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeded)

PRESET_OF = {"resnet50": "boq-r50", "dinov2": "boq-dinov2"}


@pytest.fixture(scope="module")
def fixture():
    return seeded.read_fixture(str(FIXTURES / "boq.npz"))


def official_file(folder: Path, meta: dict, backbone: str) -> Path:
    """The seeded weights in the authors' container and names (the hub ``VPRModel.state_dict()``, ``torch.save``)."""
    variant = meta["variants"][backbone]
    weights = seeded.seeded_state_dict(variant["shapes"], meta["weight_seed"])
    assert seeded.checksum(weights) == variant["checksum"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ZOO_WEIGHTS.get(PRESET_OF[backbone]).filename
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    return path


def build(preset: str, path: Path):
    config = resolve(preset, weights=path)
    backbone = load_backbone(config)
    return backbone, make_aggregator(AggregationOptions.from_config(config), backbone, None)


@pytest.mark.parametrize("backbone_name", ["resnet50", "dinov2"])
def test_preset_equals_the_official_model(tmp_path, fixture, backbone_name):
    meta, outputs = fixture
    preset = PRESET_OF[backbone_name]
    backbone, aggregator = build(preset, official_file(tmp_path, meta, backbone_name))
    assert aggregator.dim == meta["variants"][backbone_name]["constructor"]["output_dim"]
    sizes = meta["variants"][backbone_name]["sizes"]
    images = seeded.seeded_images(sizes, batch=meta["batch"], seed=meta["image_seed"])
    for (h, w), pixels in zip(sizes, images):
        with torch.inference_mode():
            ours = aggregator(backbone(torch.from_numpy(pixels))).numpy()
        official = outputs[f"{backbone_name}/{h}x{w}"]
        assert seeded.relative_difference(ours, official) <= seeded.REL_TOLERANCE, (preset, h, w)


def test_presets_follow_the_authors_input_rule():
    r50, dino = resolve("boq-r50"), resolve("boq-dinov2")
    assert (r50.image.size, r50.image.interpolation) == ((384, 384), "bicubic")
    assert (dino.image.size, dino.image.interpolation) == ((322, 322), "bicubic")
    assert dino.backbone_options["final_norm"] is False and r50.backbone_options["cut"] == "layer3"


@pytest.mark.parametrize("preset,other", [("boq-r50", "dinov2"), ("boq-dinov2", "resnet50")])
def test_another_variants_file_is_a_one_line_error(tmp_path, fixture, preset, other):
    meta, _ = fixture
    path = official_file(tmp_path, meta, other)
    with pytest.raises(WeightsNotFoundError) as err:
        build(preset, path)
    assert "\n" not in str(err.value) and preset in str(err.value)


def test_identity_dim_and_heads():
    head = AGGREGATORS.get("boq")(1024)
    assert head.dim == 512 * 32 and attention_heads(512) == 8 and attention_heads(384) == 6
    assert head.identity() == {
        "aggregator": "boq",
        "dim": 16384,
        "proj_channels": 512,
        "num_queries": 64,
        "num_layers": 2,
        "row_dim": 32,
    }
    assert not any(p.requires_grad for p in head.parameters())  # frozen unless trainable
    with pytest.raises(ConfigError, match="multiple"):
        BoQ(8, proj_channels=129)


def test_any_grid_and_descriptors_are_unit_length():
    torch.manual_seed(0)
    head = BoQ(16, proj_channels=64, num_queries=4, num_layers=2, row_dim=3)
    for grid in [(3, 5), (7, 2)]:
        out = head(DenseFeatures(torch.rand(2, *grid, 16), 16, (grid[0] * 16, grid[1] * 16)))
        assert out.shape == (2, 64 * 3) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_zoo_head_is_trainable(tmp_path, fixture):
    meta, _ = fixture
    path = official_file(tmp_path, meta, "dinov2")
    head = BoQ(768, proj_channels=384, zoo="boq-dinov2", weights=path, trainable=True)
    assert head.identity()["zoo"] == "boq-dinov2"
    head(DenseFeatures(torch.rand(2, 4, 3, 768), 14, (56, 42))).sum().backward()
    assert all(p.requires_grad and p.grad is not None for p in head.parameters())


H, W, D = 4, 3, 64


class RandomPlaces:
    """Two noisy views of each of 20 places (ids i and i + 20 are one place)."""

    def __init__(self, places: int = 20):
        g = torch.Generator().manual_seed(0)
        base = torch.rand(places, H, W, D, generator=g)
        self.x = torch.cat([base + 0.2 * torch.rand(places, H, W, D, generator=g) for _ in range(2)])
        self.grid = (H, W)

    def __len__(self):
        return len(self.x)

    def batch(self, ids):
        return DenseFeatures(self.x[torch.as_tensor(np.asarray(ids))], 16, (H * 16, W * 16))


def test_a_training_step_changes_the_head():
    torch.manual_seed(0)
    head = build_head("boq", D, (H, W), {"proj_channels": 64, "num_queries": 4, "num_layers": 2, "row_dim": 2})
    before = {k: v.clone() for k, v in head.state_dict().items()}
    settings = TrainSettings(epochs=1, places_per_batch=5, lr=1e-2, seed=0)
    labels = PlaceLabels.from_classes(np.r_[np.arange(20), np.arange(20)])
    Trainer(head, RandomPlaces(), labels, settings, progress=False).fit(max_steps=1)
    changed = [k for k, v in head.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.boqs.0.queries" in changed and "head.fc.weight" in changed and "head.proj_c.weight" in changed
