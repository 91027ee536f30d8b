"""The ``device`` setting reaches the models: backbone and aggregator are placed where the configuration says.

No GPU here: placement is checked on the CPU and on PyTorch's ``meta`` device (tensors without data),
which is enough to see that every module and buffer follows the setting.
"""

from __future__ import annotations

import torch

from vprkit import pipeline
from vprkit.aggregation.vlad import fit_vocabulary
from vprkit.aggregation.vocabulary import make_aggregator
from vprkit.presets import get_preset


def _devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in list(module.parameters()) + list(module.buffers())}


def test_backbone_follows_the_device_setting(monkeypatch):
    config = get_preset("effnet-vlad").replace(device="cpu")
    assert _devices(pipeline.load_backbone(config)) == {"cpu"}
    asked = []

    def fake_resolve(name):
        asked.append(name)
        return torch.device("meta")

    monkeypatch.setattr(pipeline, "resolve_device", fake_resolve)
    backbone = pipeline.load_backbone(config.replace(device="cuda:1"))
    assert asked == ["cuda:1"] and _devices(backbone) == {"meta"}


def test_aggregator_is_moved_to_the_backbone_device():
    config = get_preset("effnet-vlad")
    backbone = pipeline.load_backbone(config.replace(device="cpu"))
    voc = fit_vocabulary(torch.randn(200, backbone.dim).numpy(), k=config.vocabulary.k,
                         metadata={"identity": {}}, centres=config.vocabulary.centres)
    aggregator = make_aggregator(config, backbone, voc)
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
