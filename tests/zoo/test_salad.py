"""DINOv2 SALAD's published model: vprkit's ``salad`` preset equals the authors' ``VPRModel`` on seeded weights.

The fixture (``scripts/zoo_reference/record_salad.py``, run on serizba/salad's code with the official
facebookresearch/dinov2 ViT-B/14) holds the official descriptors at 322×322 (their evaluation size) and
224×308 (non-square: the position-embedding interpolation). Here the same seeded weights are saved as the
authors publish ``dino_salad.ckpt`` (a plain ``torch.save`` state dict of ``VPRModel``), loaded through the
preset and the zoo, and compared. Also: the head's own properties (Sinkhorn marginals, trainability), and the
zoo's Lightning reader on a checkpoint whose pickle holds classes vprkit does not have.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from vprkit.aggregation.options import AggregationOptions
from vprkit.aggregation.salad import SALAD, log_optimal_transport
from vprkit.aggregation.vocabulary import make_aggregator
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError, WeightsNotFoundError
from vprkit.pipeline.models import load_backbone
from vprkit.presets import resolve
from vprkit.zoo import ZOO_WEIGHTS, read_container
from vprkit.zoo.salad import salad_layout

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("zoo_seeded_salad", Path(__file__).parent / "seeded.py")
seeded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeded)
INERT = ("dustbin", "score.out.bias")  # no effect on the output, see test_salad.py
ENTRY = "dinov2-salad"


@pytest.fixture(scope="module")
def fixture():
    return seeded.read_fixture(str(FIXTURES / "salad.npz"))


@pytest.fixture(scope="module")
def official_weights(fixture) -> dict[str, torch.Tensor]:
    meta, _ = fixture
    weights = seeded.seeded_state_dict(meta["shapes"], meta["weight_seed"])
    assert seeded.checksum(weights) == meta["checksum"]
    return {k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, official_weights) -> Path:
    """The seeded weights as the authors publish them: ``torch.save(VPRModel.state_dict())`` named ``.ckpt``."""
    path = tmp_path_factory.mktemp("salad") / ZOO_WEIGHTS.get(ENTRY).filename
    torch.save(official_weights, path)
    return path


def build(preset: str, path: Path):
    config = resolve(preset, weights=path)
    backbone = load_backbone(config)
    return backbone, make_aggregator(AggregationOptions.from_config(config), backbone, None)


def test_preset_equals_the_official_model(fixture, official_file):
    meta, outputs = fixture
    backbone, aggregator = build("salad", official_file)
    assert aggregator.dim == 8448 and backbone.dim == 768
    images = seeded.seeded_images(meta["sizes"], batch=meta["batch"], seed=meta["image_seed"])
    for (h, w), pixels in zip(meta["sizes"], images):
        with torch.inference_mode():
            ours = aggregator(backbone(torch.from_numpy(pixels))).numpy()
        assert seeded.relative_difference(ours, outputs[f"{h}x{w}"]) <= seeded.REL_TOLERANCE, (h, w)


def test_a_megaloc_file_is_a_one_line_error(tmp_path, official_weights):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"aggregator.linear.weight": torch.zeros(2, 2), "backbone.cls_token": torch.zeros(1, 1, 768)}, path)
    with pytest.raises(WeightsNotFoundError) as err:
        build("salad", path)
    assert "\n" not in str(err.value) and ENTRY in str(err.value)


def test_head_trains_and_says_what_it_is(official_file):
    head = SALAD(768, zoo=ENTRY, weights=official_file)
    assert not any(p.requires_grad for p in head.parameters())
    assert head.identity() == {
        "aggregator": "salad",
        "dim": 8448,
        "variant": "salad",
        "num_clusters": 64,
        "cluster_dim": 128,
        "token_dim": 256,
        "sinkhorn_iterations": 3,
        "zoo": ENTRY,
    }
    head = SALAD(768, zoo=ENTRY, weights=official_file, trainable=True).train()
    features = DenseFeatures(torch.randn(2, 9, 10, 768), 14, (126, 140), torch.randn(2, 768))
    head(features).sum().backward()
    assert all(p.requires_grad and p.grad is not None for p in head.parameters())
    # the dustbin score and the score MLP's output bias move whole rows of the transport's scores, which the
    # row potentials absorb exactly (test_dustbin_and_score_bias_change_nothing): their gradients are rounding
    assert all(p.grad.abs().sum() > 0 for n, p in head.named_parameters() if n not in INERT)


def test_transport_plan_has_the_official_marginals():
    """After the last (column) scaling every token's mass, rescaled by n+m, sums to 1 over clusters + dustbin."""
    scores = torch.randn(3, 8, 20, dtype=torch.float64)
    plan = log_optimal_transport(scores, torch.tensor(0.7, dtype=torch.float64), 3).exp()
    assert plan.shape == (3, 9, 20)
    assert torch.allclose(plan.sum(dim=1), torch.ones(3, 20, dtype=torch.float64))
    converged = log_optimal_transport(scores, torch.tensor(0.7, dtype=torch.float64), 200).exp()
    rows = torch.full((9,), 1.0, dtype=torch.float64)
    rows[-1] = 20 - 8
    assert torch.allclose(converged.sum(dim=2), rows.expand(3, -1))
    with pytest.raises(ConfigError, match="more patch tokens than clusters"):
        log_optimal_transport(torch.randn(1, 8, 8), torch.tensor(1.0), 3)


def test_head_needs_the_cls_token():
    with pytest.raises(ConfigError, match="CLS token"):
        SALAD(16, num_clusters=2, cluster_dim=3, token_dim=4)(DenseFeatures(torch.randn(1, 3, 3, 16), 14, (42, 42)))


def test_layout_maps_the_official_names():
    raw = {
        "backbone.model.blocks.0.norm1.weight": torch.zeros(1),
        "backbone.model.mask_token": torch.zeros(1),
        "aggregator.token_features.2.weight": torch.zeros(3, 5),
        "aggregator.cluster_features.0.weight": torch.zeros(3, 5, 1, 1),
        "aggregator.score.3.bias": torch.zeros(3),
        "aggregator.dust_bin": torch.zeros(()),
    }
    out = salad_layout(raw)
    assert sorted(out) == [
        "aggregator.cluster_features.hidden.weight",
        "aggregator.dustbin",
        "aggregator.score.out.bias",
        "aggregator.token_features.out.weight",
        "backbone.blocks.0.norm1.weight",
        "backbone.mask_token",
    ]
    assert out["aggregator.cluster_features.hidden.weight"].shape == (3, 5)


def test_lightning_reader_needs_no_lightning(tmp_path, monkeypatch):
    """A Lightning ``.ckpt`` pickles Lightning's (and the project's) classes: read without them, state_dict only."""
    fake = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:  # pickled by reference to the fake module, as Lightning's own class is
        def __init__(self):
            self.monitor, self.best_model_score = "R1", torch.tensor(0.9)

    ModelCheckpoint.__module__ = fake.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", fake.__name__):
        monkeypatch.setitem(sys.modules, name, fake if name == fake.__name__ else types.ModuleType(name))
    state = {"aggregator.dust_bin": torch.tensor(0.5), "backbone.model.cls_token": torch.ones(1, 1, 4)}
    path = tmp_path / "epoch=3.ckpt"
    torch.save(
        {"epoch": 3, "state_dict": state, "callbacks": {"ModelCheckpoint": ModelCheckpoint()}, "hyper_parameters": {}},
        path,
    )
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", fake.__name__):
        monkeypatch.delitem(sys.modules, name)
    raw = read_container(path, "lightning")
    assert sorted(raw) == sorted(state) and torch.equal(raw["aggregator.dust_bin"], state["aggregator.dust_bin"])
    assert sorted(salad_layout(raw)) == ["aggregator.dustbin", "backbone.cls_token"]
    with pytest.raises(WeightsNotFoundError):
        read_container(path, "torch")  # the plain reader refuses pickled objects


def test_backbone_of_another_size_is_a_one_line_error(official_file):
    from vprkit.backbones import build_backbone

    with pytest.raises(WeightsNotFoundError) as err:
        build_backbone("dinov2_vits14", layer=11, facet="token", final_norm=True, zoo=ENTRY, weights=official_file)
    assert "\n" not in str(err.value) and ENTRY in str(err.value)


def test_dustbin_and_score_bias_change_nothing():
    """A fact of SALAD's transport (official code too): adding a constant to a whole row of the scores — the
    dustbin row (its score ``z``) or cluster ``j``'s row (bias ``j`` of the score MLP's last layer) — is absorbed
    by that row's potential in the first row scaling, so the plan, and the descriptor, do not change."""
    torch.manual_seed(0)
    head = SALAD(64, num_clusters=4, cluster_dim=8, token_dim=6).double()
    features = DenseFeatures(
        torch.randn(2, 9, 10, 64, dtype=torch.float64), 14, (126, 140), torch.randn(2, 64, dtype=torch.float64)
    )
    before = head(features)
    with torch.no_grad():
        head.dustbin += 3.0
        head.score.out.bias += torch.randn(4, dtype=torch.float64)
    assert torch.allclose(head(features), before, rtol=0, atol=1e-12)
