"""The ``device`` setting reaches the models: backbone and aggregator are placed where the configuration says.

No GPU here: placement is checked on the CPU and on PyTorch's ``meta`` device (tensors without data),
which is enough to see that every module and buffer follows the setting.
"""

from __future__ import annotations

import pytest
import torch

from vprkit import pipeline
from vprkit.aggregation.options import AggregationOptions
from vprkit.aggregation.vlad import fit_vocabulary
from vprkit.aggregation.vocabulary import make_aggregator
from vprkit.presets import resolve


def _devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in list(module.parameters()) + list(module.buffers())}


def test_backbone_follows_the_device_setting(monkeypatch):
    config = resolve("effnet-vlad").replace(device="cpu")
    assert _devices(pipeline.load_backbone(config)) == {"cpu"}
    asked = []

    def fake_resolve(name):
        asked.append(name)
        return torch.device("meta")

    monkeypatch.setattr(pipeline.models, "resolve_device", fake_resolve)
    backbone = pipeline.load_backbone(config.replace(device="cuda:1"))
    assert asked == ["cuda:1"] and _devices(backbone) == {"meta"}


def test_aggregator_is_moved_to_the_backbone_device():
    config = resolve("effnet-vlad")
    backbone = pipeline.load_backbone(config.replace(device="cpu"))
    voc = fit_vocabulary(
        torch.randn(200, backbone.dim).numpy(),
        k=config.vocabulary.k,
        metadata={"identity": {}},
        centres=config.vocabulary.centres,
    )
    aggregator = make_aggregator(AggregationOptions.from_config(config), backbone, voc)
    assert isinstance(aggregator, torch.nn.Module) and _devices(aggregator) == {"cpu"}
    assert _devices(aggregator.to(torch.device("meta"))) == {"meta"}  # its centres move with it


def test_patch_matching_runs_on_the_given_device(monkeypatch):
    from vprkit.rerank import matching

    seen = []
    real = matching._mutual_one

    def spy(query, candidate):
        seen.append((query.device.type, candidate.device.type, query.dtype))
        return real(query, candidate)

    monkeypatch.setattr(matching, "_mutual_one", spy)
    q = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    cands = [torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1) for _ in range(2)]
    on_cpu = matching.mutual_nn_grouped(q, cands, device="cpu")
    default = matching.mutual_nn_grouped(q, cands)
    assert seen == [("cpu", "cpu", torch.float64)] * 4  # dtype kept, placement as asked
    for a, b in zip(on_cpu, default):
        assert (a.query == b.query).all() and (a.candidate == b.candidate).all()


def test_training_follows_the_device_setting(monkeypatch):
    import numpy as np

    from vprkit.backbones.base import DenseFeatures
    from vprkit.errors import ConfigError
    from vprkit.training import trainer as trainer_module
    from vprkit.training.labels import PlaceLabels
    from vprkit.training.trainer import Trainer, TrainSettings

    class Features:  # 8 places × 2 images of 2×2×4 features
        def batch(self, ids):
            g = torch.Generator().manual_seed(0)
            base = torch.randn(16, 2, 2, 4, generator=g)
            return DenseFeatures(base[torch.as_tensor(np.asarray(ids))], 16, (32, 32))

    head = _MeanHead()
    places = PlaceLabels.from_classes(np.repeat(np.arange(8), 2))
    with pytest.raises(ConfigError, match="unknown device"):
        Trainer(_MeanHead(), Features(), places, TrainSettings(places_per_batch=4, device="gpu"), progress=False)
    asked = []
    monkeypatch.setattr(trainer_module, "resolve_device", lambda name: asked.append(name) or torch.device("cpu"))
    t = Trainer(head, Features(), places, TrainSettings(epochs=1, places_per_batch=4, device="cuda:0"), progress=False)
    assert asked == ["cuda:0"] and _devices(t.head) == {"cpu"}
    t.train_step()


class _MeanHead(torch.nn.Module):
    dim = 4

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, feats):
        return torch.nn.functional.normalize(self.proj(feats.flat().mean(1)), dim=1)
