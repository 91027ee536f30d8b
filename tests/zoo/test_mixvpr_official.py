"""MixVPR's published models: vprkit's preset equals the authors' VPRModel on seeded weights.

The fixture (``scripts/zoo_reference/record_mixvpr.py``, run on the official code) holds the official
descriptors at 320×320 (the only size the official head runs at: its linear layers are sized for the
20×20 grid; vprkit's ``adapt_grid`` for other sizes is its own extension, tested for shape only). Here
the same seeded weights are saved as the authors publish them (a plain ``torch.save`` state dict named
``….ckpt``), loaded through the preset and the zoo, and compared.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from vprkit.aggregation.mixvpr import MixVPR
from vprkit.aggregation.options import AggregationOptions
from vprkit.aggregation.vocabulary import make_aggregator
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import WeightsNotFoundError
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


@pytest.fixture(scope="module")
def fixture():
    return seeded.read_fixture(str(FIXTURES / "mixvpr.npz"))


def official_file(folder: Path, meta: dict, dim: int) -> Path:
    """The seeded weights in the authors' container and names (``VPRModel.state_dict()`` via ``torch.save``)."""
    variant = meta["variants"][str(dim)]
    weights = seeded.seeded_state_dict(variant["shapes"], meta["weight_seed"])
    assert seeded.checksum(weights) == variant["checksum"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ZOO_WEIGHTS.get(f"mixvpr-r50-{dim}").filename
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    return path


def build(preset: str, path: Path):
    config = resolve(preset, weights=path)
    backbone = load_backbone(config)
    return backbone, make_aggregator(AggregationOptions.from_config(config), backbone, None)


@pytest.mark.parametrize("dim", [4096, 128])
def test_preset_equals_the_official_model(tmp_path, fixture, dim):
    meta, outputs = fixture
    backbone, aggregator = build(f"mixvpr-r50-{dim}", official_file(tmp_path, meta, dim))
    assert aggregator.dim == dim
    images = seeded.seeded_images(meta["sizes"], batch=meta["batch"], seed=meta["image_seed"])
    for (h, w), pixels in zip(meta["sizes"], images):
        with torch.inference_mode():
            ours = aggregator(backbone(torch.from_numpy(pixels))).numpy()
        official = outputs[f"{dim}/{h}x{w}"]
        assert seeded.relative_difference(ours, official) <= seeded.REL_TOLERANCE, (dim, h, w)


def test_other_sizes_run_through_adapt_grid(tmp_path, fixture):
    """Not the authors' protocol: another image size is pooled to the 20×20 grid (shape and norm only)."""
    meta, _ = fixture
    backbone, aggregator = build("mixvpr-r50-128", official_file(tmp_path, meta, 128))
    with torch.inference_mode():
        out = aggregator(backbone(torch.rand(1, 3, 256, 352)))
    assert out.shape == (1, 128) and torch.allclose(out.norm(dim=1), torch.ones(1), atol=1e-5)


def test_another_variants_file_is_a_one_line_error(tmp_path, fixture):
    meta, _ = fixture
    path = official_file(tmp_path, meta, 128)
    with pytest.raises(WeightsNotFoundError) as err:
        build("mixvpr-r50-4096", path)
    assert "\n" not in str(err.value) and "mixvpr-r50-4096" in str(err.value)


def test_head_trains_and_says_what_it_is(tmp_path, fixture):
    meta, _ = fixture
    path = official_file(tmp_path, meta, 128)
    head = MixVPR(1024, height=20, width=20, out_channels=64, out_rows=2, zoo="mixvpr-r50-128", weights=path)
    assert not any(p.requires_grad for p in head.parameters())
    assert head.identity() == {
        "aggregator": "mixvpr",
        "dim": 128,
        "grid": [20, 20],
        "depth": 4,
        "out_channels": 64,
        "out_rows": 2,
        "zoo": "mixvpr-r50-128",
    }
    head = MixVPR(
        1024, height=20, width=20, out_channels=64, out_rows=2, zoo="mixvpr-r50-128", weights=path, trainable=True
    )
    head(DenseFeatures(torch.rand(2, 20, 20, 1024), 16, (320, 320))).sum().backward()
    grads = [p.grad for p in head.parameters()]
    assert all(p.requires_grad for p in head.parameters()) and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_layout_maps_the_mixer_names():
    from vprkit.zoo.mixvpr import mixvpr_layout

    raw = {
        "backbone.model.layer3.5.bn3.weight": np.zeros(1),
        "aggregator.mix.2.mix.0.weight": np.zeros(1),
        "aggregator.mix.2.mix.1.bias": np.zeros(1),
        "aggregator.mix.2.mix.3.weight": np.zeros(1),
        "aggregator.channel_proj.weight": np.zeros(1),
    }
    assert sorted(mixvpr_layout(raw)) == [
        "aggregator.channel_proj.weight",
        "aggregator.mixers.2.fc1.bias",
        "aggregator.mixers.2.fc2.weight",
        "aggregator.mixers.2.norm.weight",
        "backbone.layer3.5.bn3.weight",
    ]


H, W, D = 4, 3, 16


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
    head = build_head("mixvpr", D, (H, W), {"out_channels": 8, "out_rows": 2})
    before = {k: v.clone() for k, v in head.state_dict().items()}
    settings = TrainSettings(epochs=1, places_per_batch=5, lr=1e-2, seed=0)
    labels = PlaceLabels.from_classes(np.r_[np.arange(20), np.arange(20)])
    Trainer(head, RandomPlaces(), labels, settings, progress=False).fit(max_steps=1)
    changed = {k for k, v in head.state_dict().items() if not torch.equal(v, before[k])}
    assert {"head.mixers.0.fc1.weight", "head.channel_proj.weight", "head.row_proj.weight"} <= changed
