"""MegaLoc's published model: vprkit's ``megaloc`` preset equals gmberton/MegaLoc's ``MegaLoc`` on seeded weights.

The fixture (``scripts/zoo_reference/record_megaloc.py``, run on the official ``megaloc_model.py``) holds the
official descriptors at 322×322, 224×308 (non-square: the position embeddings as fixed in MegaLoc's commit
4a23a2b, which equal the hub's interpolation) and 315×203 (not a multiple of 14: MegaLoc resizes inside its
``forward`` to 308×196). The same seeded weights are saved as the authors publish them (``model.safetensors``,
their parameter names), loaded through the preset and the zoo, and compared. For 315×203 the test resizes the
pixels as MegaLoc does (bilinear, antialiased, to ``round(side / 14) · 14``) and checks that vprkit's image
preparation for the preset picks that same size.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vprkit.aggregation.options import AggregationOptions
from vprkit.aggregation.salad import SALAD
from vprkit.aggregation.vocabulary import make_aggregator
from vprkit.errors import WeightsNotFoundError
from vprkit.images import prepare_image
from vprkit.pipeline.models import load_backbone
from vprkit.presets import resolve
from vprkit.zoo import ZOO_WEIGHTS
from vprkit.zoo.salad import megaloc_layout

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("zoo_seeded_megaloc", Path(__file__).parent / "seeded.py")
seeded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeded)
INERT = ("dustbin", "score.out.bias")  # no effect on the output, see test_salad.py
ENTRY = "megaloc"
PATCH = 14


@pytest.fixture(scope="module")
def fixture():
    return seeded.read_fixture(str(FIXTURES / "megaloc.npz"))


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, fixture) -> Path:
    """The seeded weights as the authors publish them: ``model.safetensors`` with ``MegaLoc``'s names."""
    from safetensors.torch import save_file

    meta, _ = fixture
    weights = seeded.seeded_state_dict(meta["shapes"], meta["weight_seed"])
    assert seeded.checksum(weights) == meta["checksum"]
    path = tmp_path_factory.mktemp("megaloc") / ZOO_WEIGHTS.get(ENTRY).filename
    save_file({k: torch.as_tensor(np.asarray(v)).contiguous() for k, v in weights.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def model(official_file):
    config = resolve("megaloc", weights=official_file)
    backbone = load_backbone(config)
    return config, backbone, make_aggregator(AggregationOptions.from_config(config), backbone, None)


def megaloc_size(h: int, w: int) -> tuple[int, int]:
    """MegaLoc's rule: both sides to the nearest multiple of 14 (Python's round) unless both already are."""
    if h % PATCH == 0 and w % PATCH == 0:
        return h, w
    return round(h / PATCH) * PATCH, round(w / PATCH) * PATCH


def test_preset_equals_the_official_model(fixture, model):
    meta, outputs = fixture
    _, backbone, aggregator = model
    assert aggregator.dim == 8448
    images = seeded.seeded_images(meta["sizes"], batch=meta["batch"], seed=meta["image_seed"])
    for (h, w), pixels in zip(meta["sizes"], images):
        x = torch.from_numpy(pixels)
        if megaloc_size(h, w) != (h, w):
            x = F.interpolate(x, size=megaloc_size(h, w), mode="bilinear", align_corners=False, antialias=True)
        with torch.inference_mode():
            ours = aggregator(backbone(x)).numpy()
        assert seeded.relative_difference(ours, outputs[f"{h}x{w}"]) <= seeded.REL_TOLERANCE, (h, w)


@pytest.mark.parametrize("size", [(315, 203), (322, 300), (480, 640), (224, 308)])
def test_image_preparation_rounds_sides_as_megaloc(model, size):
    config, _, _ = model
    h, w = size
    arr, _ = prepare_image(Image.new("RGB", (w, h)), config.image, multiple=PATCH)
    assert arr.shape[:2] == megaloc_size(h, w)


def test_a_salad_file_is_a_one_line_error(tmp_path):
    """DINOv2 SALAD's names (``backbone.model.*``, no projection) in MegaLoc's container: refused in one line."""
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"backbone.model.cls_token": torch.zeros(1, 1, 768), "aggregator.dust_bin": torch.zeros(())}, str(path))
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone(resolve("megaloc", weights=path))
    assert "\n" not in str(err.value) and ENTRY in str(err.value)


def test_head_trains_and_says_what_it_is(official_file):
    head = SALAD(768, variant="megaloc", cluster_dim=256, zoo=ENTRY, weights=official_file)
    assert head.identity() == {
        "aggregator": "salad",
        "dim": 8448,
        "variant": "megaloc",
        "num_clusters": 64,
        "cluster_dim": 256,
        "token_dim": 256,
        "sinkhorn_iterations": 3,
        "out_dim": 8448,
        "zoo": ENTRY,
    }
    assert head.salad_dim == 64 * 256 + 256
    head = SALAD(768, variant="megaloc", cluster_dim=256, zoo=ENTRY, weights=official_file, trainable=True).train()
    from vprkit.backbones.base import DenseFeatures

    head(DenseFeatures(torch.randn(2, 9, 10, 768), 14, (126, 140), torch.randn(2, 768))).sum().backward()
    assert all(p.requires_grad and p.grad is not None for p in head.parameters())
    # the dustbin score and the score MLP's output bias move whole rows of the transport's scores, which the
    # row potentials absorb exactly (test_dustbin_and_score_bias_change_nothing): their gradients are rounding
    assert all(p.grad.abs().sum() > 0 for n, p in head.named_parameters() if n not in INERT)


def test_layout_maps_the_official_names():
    raw = {
        "backbone.blocks.3.attn.qkv.weight": torch.zeros(1),
        "aggregator.agg.score.0.weight": torch.zeros(4, 6, 1, 1),
        "aggregator.agg.dust_bin": torch.zeros(()),
        "aggregator.linear.bias": torch.zeros(2),
    }
    out = megaloc_layout(raw)
    assert sorted(out) == [
        "aggregator.dustbin",
        "aggregator.projection.bias",
        "aggregator.score.hidden.weight",
        "backbone.blocks.3.attn.qkv.weight",
    ]
    assert out["aggregator.score.hidden.weight"].shape == (4, 6)
