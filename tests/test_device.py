"""Device selection without a GPU: ``auto`` preference order, validation of explicit names, dtypes."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from vprkit import device as dev
from vprkit.errors import ConfigError


@pytest.fixture
def no_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)


def test_auto_is_cpu_without_accelerators(no_accelerators):
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device() == torch.device("cpu")
    assert dev.resolve_device(None) == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(no_accelerators, monkeypatch):
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("cuda")


def test_mps_probe_follows_torch_backends(no_accelerators, monkeypatch):
    monkeypatch.undo()  # the real probe, with torch.backends.mps patched instead
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("mps")
    assert dev.resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu ", torch.device("cpu")])
def test_explicit_cpu(name, no_accelerators):
    assert dev.resolve_device(name) == torch.device("cpu")


def test_explicit_cuda_is_checked(no_accelerators, monkeypatch):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        dev.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve_device("cuda") == torch.device("cuda")
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        dev.resolve_device("cuda:2")


def test_explicit_mps_is_checked(no_accelerators, monkeypatch):
    with pytest.raises(ConfigError, match="MPS is not available"):
        dev.resolve_device("mps")
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.resolve_device("mps") == torch.device("mps")
    with pytest.raises(ConfigError, match="only one MPS"):
        dev.resolve_device("mps:1")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:", "cpu:0", "auto:1", "", "tpu", "cuda:-1", "1"])
def test_malformed_names_raise_config_error(name, no_accelerators):
    with pytest.raises(ConfigError, match="unknown device"):
        dev.resolve_device(name)


def test_autocast_dtype(monkeypatch):
    assert dev.autocast_dtype("cpu") is None
    assert dev.autocast_dtype(torch.device("mps")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.autocast_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dev.autocast_dtype("cuda:0") == torch.float16


def test_module_device_dtype_and_to_module():
    m = nn.Linear(2, 2).double()
    assert dev.module_device(m) == torch.device("cpu") and dev.module_dtype(m) == torch.float64
    assert dev.module_device(nn.ReLU()) == torch.device("cpu") and dev.module_dtype(nn.ReLU()) == torch.float32
    x = dev.to_module(torch.ones(3, 2), m)
    assert x.dtype == torch.float64
    meta = nn.Linear(2, 2).to("meta")
    assert dev.to_module(torch.ones(3, 2), meta).device.type == "meta"
