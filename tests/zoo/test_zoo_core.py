"""The zoo core: finding, downloading and verifying weight files, reading their containers, converting layouts."""

from __future__ import annotations

import hashlib
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vprkit.errors import WeightsNotFoundError
from vprkit.zoo import formats, layouts, weights
from vprkit.zoo.weights import ZooWeights


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VPRKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VPRKIT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache" / "zoo"


def entry(tmp_path: Path, payload: bytes, *, published: bool, name: str = "toy", url: str | None = None) -> ZooWeights:
    src = tmp_path / "served" / "toy.pth"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(payload)
    return ZooWeights(
        name=name,
        filename="toy.pth",
        urls=(url or src.as_uri(),),
        format="torch",
        layout="toy-layout",
        licence="MIT",
        source="https://example.org/toy",
        sha256=hashlib.sha256(payload).hexdigest() if published else None,
    )


@pytest.fixture
def registered(monkeypatch):
    """Register entries for one test only."""

    def add(e: ZooWeights) -> ZooWeights:
        monkeypatch.setitem(weights.ZOO_WEIGHTS._items, e.name, e)
        return e

    return add


def test_download_is_verified_and_cached(tmp_path, cache, registered):
    e = registered(entry(tmp_path, b"\x80weights-bytes", published=True))
    path = weights.weights_path("toy")
    assert path == cache / "toy" / "toy.pth" and path.read_bytes() == b"\x80weights-bytes"
    assert weights.weights_status("toy", check=True).verdict.startswith("ok (published")
    # a damaged cached file is refused in one line naming the fix
    path.write_bytes(b"\x80weights-bytez")
    with pytest.raises(WeightsNotFoundError, match=r"SHA-256 .* expected .*vprkit weights fetch toy"):
        weights.weights_path("toy")
    assert "DAMAGED" in weights.weights_status("toy", check=True).verdict
    assert e.sha256


def test_a_download_with_the_wrong_hash_leaves_nothing(tmp_path, cache, registered):
    e = entry(tmp_path, b"\x80good", published=True)
    (tmp_path / "served" / "toy.pth").write_bytes(b"\x80tampered")  # the server now sends other bytes
    registered(e)
    with pytest.raises(WeightsNotFoundError, match="differs from the published"):
        weights.weights_path("toy")
    assert not (cache / "toy" / "toy.pth").exists()
    assert [p.name for p in (cache / "toy").iterdir()] == []


def test_unpublished_hash_is_recorded_at_first_download_then_checked(tmp_path, cache, registered):
    registered(entry(tmp_path, b"\x80first", published=False))
    path = weights.weights_path("toy")
    recorded = path.with_name("toy.pth.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(b"\x80first").hexdigest()
    assert "recorded at first download" in weights.weights_status("toy", check=True).verdict
    path.write_bytes(b"other")
    with pytest.raises(WeightsNotFoundError, match="recorded at first download"):
        weights.weights_path("toy")


def test_offline_error_is_one_line_naming_url_file_and_place(tmp_path, cache, registered, monkeypatch):
    registered(entry(tmp_path, b"x", published=False, url="https://example.org/models/toy.pth"))
    monkeypatch.setenv("VPRKIT_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        weights.weights_path("toy")
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("https://example.org/models/toy.pth", str(cache / "toy" / "toy.pth"), "--weights"):
        assert part in msg


def test_unreachable_url_names_it(tmp_path, cache, registered):
    registered(entry(tmp_path, b"x", published=False, url=(tmp_path / "nowhere.pth").as_uri()))
    with pytest.raises(WeightsNotFoundError, match="could not be downloaded .*nowhere.pth"):
        weights.weights_path("toy")


def test_explicit_file_or_folder(tmp_path, cache, registered):
    registered(entry(tmp_path, b"x", published=True))
    f = tmp_path / "mine" / "toy.pth"
    f.parent.mkdir()
    f.write_bytes(b"fine-tuned: another hash is fine")
    assert weights.weights_path("toy", f) == f
    assert weights.weights_path("toy", f.parent) == f
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        weights.weights_path("toy", tmp_path / "missing.pth")


# ---- containers -----------------------------------------------------------------------------------


def test_torch_container_unwraps_state_dict_and_module_prefix(tmp_path):
    p = tmp_path / "m.pth"
    torch.save({"state_dict": {"module.a.weight": torch.ones(2)}}, p)
    assert list(formats.read_container(p, "torch")) == ["a.weight"]


def test_torch_container_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"model": {"a": torch.ones(1)}, "obj": types.SimpleNamespace(x=1)}, p)
    with pytest.raises(WeightsNotFoundError, match="never runs code"):
        formats.read_container(p, "torch")


def test_safetensors_container(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "m.safetensors"
    save_file({"x.weight": torch.arange(3.0)}, str(p))
    assert torch.equal(formats.read_container(p, "safetensors")["x.weight"], torch.arange(3.0))


class _Callback:  # pickled under a fake Lightning module name below
    def __init__(self):
        self.monitor = "R1"


def test_lightning_checkpoint_read_without_lightning(tmp_path, monkeypatch):
    fake = types.ModuleType("pytorch_lightning.callbacks.fake")
    monkeypatch.setattr(_Callback, "__module__", fake.__name__)
    fake._Callback = _Callback
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", fake.__name__):
        monkeypatch.setitem(sys.modules, name, fake if name == fake.__name__ else types.ModuleType(name))
    p = tmp_path / "last.ckpt"
    torch.save(
        {
            "epoch": 3,
            "pytorch-lightning_version": "2.1.0",
            "state_dict": {"backbone.model.w": torch.ones(2)},
            "callbacks": {"ModelCheckpoint": _Callback()},
            "hyper_parameters": {"agg_config": {"num_clusters": 64}},
        },
        p,
    )
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", fake.__name__):
        monkeypatch.delitem(sys.modules, name)  # reading must not need Lightning or the class
    state = formats.read_container(p, "lightning")
    assert list(state) == ["backbone.model.w"]
    with pytest.raises(WeightsNotFoundError, match="Lightning checkpoint: it has no 'state_dict'"):
        torch.save({"other": torch.ones(1)}, tmp_path / "x.ckpt")
        formats.read_container(tmp_path / "x.ckpt", "lightning")


def test_lightning_reader_never_calls_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("ran code",))

    p = tmp_path / "boom.ckpt"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": {}, "x": Boom()}, f)
    with pytest.raises(WeightsNotFoundError):
        formats.read_container(p, "lightning")


def test_mat_container(tmp_path):
    from scipy.io import savemat

    p = tmp_path / "net.mat"
    savemat(p, {"net": {"layers": np.arange(3.0)}})
    assert np.array_equal(formats.read_container(p, "mat")["net"].layers, np.arange(3.0))


def test_unreadable_container_is_one_line(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"not a checkpoint")
    for fmt in formats.READERS:
        with pytest.raises(WeightsNotFoundError) as info:
            formats.read_container(p, fmt)
        assert "\n" not in str(info.value) and str(p) in str(info.value)


# ---- layouts and loading --------------------------------------------------------------------------


def test_renamed_refuses_foreign_keys():
    assert layouts.renamed({"model.w": 1, "head.b": 2}, {"model.": "backbone.", "head.": "aggregator."}) == {
        "backbone.w": 1,
        "aggregator.b": 2,
    }
    with pytest.raises(WeightsNotFoundError, match="unexpected parameters"):
        layouts.renamed({"other.w": 1}, {"model.": "backbone."})


def test_load_part_fills_a_module_and_refuses_another_shape(tmp_path, cache, registered, monkeypatch):
    e = entry(tmp_path, b"", published=False)
    registered(e)
    net = nn.Linear(3, 2)
    ckpt = tmp_path / "toy.pth"
    torch.save({"model.weight": torch.ones(2, 3), "model.bias": torch.zeros(2)}, ckpt)
    monkeypatch.setitem(layouts.LAYOUTS._items, "toy-layout", lambda raw: layouts.renamed(raw, {"model.": "backbone."}))
    layouts.load_part(net, "toy", ckpt, "backbone")
    assert torch.equal(net.weight, torch.ones(2, 3))
    with pytest.raises(WeightsNotFoundError, match="does not fit this backbone"):
        layouts.load_part(nn.Linear(4, 2), "toy", ckpt, "backbone")
    with pytest.raises(WeightsNotFoundError, match="missing"):
        layouts.load_part(nn.Linear(3, 2), "toy", ckpt, "aggregator")


def test_a_web_page_instead_of_the_file_is_refused_and_not_recorded(tmp_path, cache, registered):
    """Google Drive's quota notice or a share page must not become a checkpoint with a recorded hash."""
    registered(entry(tmp_path, b"<!DOCTYPE html><html>quota exceeded</html>", published=False))
    with pytest.raises(WeightsNotFoundError, match="web page"):
        weights.weights_path("toy")
    assert not any((cache / "toy").iterdir())


@pytest.mark.parametrize(
    "fmt, head, ok",
    [
        ("torch", b"PK\x03\x04rest", True),
        ("torch", b"\x80\x02}q", True),
        ("torch", b"garbage", False),
        ("safetensors", b'\x10\x00\x00\x00\x00\x00\x00\x00{"a"', True),
        ("safetensors", b"PK\x03\x04", False),
        ("mat", b"MATLAB 5.0 MAT-file", True),
        ("mat", b"\x80\x02", False),
    ],
)
def test_container_sniffing(fmt, head, ok):
    assert (weights.container_problem(fmt, head) is None) == ok
