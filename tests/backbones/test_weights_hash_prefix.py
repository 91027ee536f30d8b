"""Downloads of files whose name publishes a SHA-256 prefix (torch.hub's convention, torchvision's ImageNet
weights: ``resnet50-0676ba61.pth``) are checked against it, as torch.hub does; nothing is kept on a mismatch."""

from __future__ import annotations

import hashlib

import pytest

from vprkit.backbones import weights
from vprkit.errors import WeightsNotFoundError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VPRKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("VPRKIT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "cache"


def served(tmp_path, payload: bytes, prefix: str) -> tuple[str, str]:
    name = f"resnet18-{prefix}.pth"
    (tmp_path / "served").mkdir(exist_ok=True)
    (tmp_path / "served" / name).write_bytes(payload)
    return name, (tmp_path / "served" / name).as_uri()


def test_name_hash_prefix():
    assert weights.name_hash_prefix("resnet50-0676ba61.pth") == "0676ba61"
    assert weights.name_hash_prefix("dinov2_vits14_pretrain.pth") is None


def test_matching_prefix_is_kept(tmp_path, cache):
    payload = b"\x80weights"
    name, url = served(tmp_path, payload, hashlib.sha256(payload).hexdigest()[:8])
    path = weights.resolve_weights("resnet18", name, url=url)
    assert path == cache / name and path.read_bytes() == payload


def test_a_download_that_is_not_the_named_file_is_refused_and_not_kept(tmp_path, cache):
    name, url = served(tmp_path, b"\x80not the published bytes", "0676ba61")
    with pytest.raises(WeightsNotFoundError, match="does not start with 0676ba61"):
        weights.resolve_weights("resnet18", name, url=url)
    assert not (cache / name).exists()
