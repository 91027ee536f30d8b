"""VGG16 conv5 and NetVLAD / Patch-NetVLAD checkpoints, checked against reference formulations.

No real checkpoint can be downloaded here, so a synthetic one in the published layout
(``state_dict`` with ``encoder.N.*``, ``pool.conv.weight``, ``pool.centroids``, ``WPCA.0.*``) is
written with random weights, and every output is compared with the original's equations written
out in the test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_images

from vprkit import pipeline
from vprkit.aggregation.netvlad import NetVLAD
from vprkit.backbones import build_backbone
from vprkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from vprkit.backbones.vgg16 import VGG16_LAYOUT
from vprkit.checkpoints import is_netvlad_checkpoint, read_netvlad_checkpoint
from vprkit.config import VocabularyConfig
from vprkit.errors import WeightsNotFoundError
from vprkit.images import ImageSpec
from vprkit.presets import resolve, with_weights

K, D, P = 4, 512, 16
CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision's conv positions in vgg16().features


def _random_encoder(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random conv weights keyed like torchvision (``N.weight``), scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    state, cin = {}, 3
    convs = [c for c in VGG16_LAYOUT if c != "M"]
    for idx, cout in zip(CONV_INDICES, convs):
        state[f"{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
        state[f"{idx}.bias"] = torch.randn(cout, generator=g) * 0.01
        cin = cout
    return state


def _reference_conv5(pixels: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """conv5_3 before ReLU, written from VGG16's definition: 13 3×3 convs, ReLU, 4 max-pools."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (pixels - mean) / std
    pools_after = {CONV_INDICES[i] for i in (1, 3, 6, 9)}  # conv1_2, conv2_2, conv3_3, conv4_3
    for n, idx in enumerate(CONV_INDICES):
        x = F.conv2d(x, enc[f"{idx}.weight"], enc[f"{idx}.bias"], padding=1)
        if n == len(CONV_INDICES) - 1:
            break
        x = F.relu(x)
        if idx in pools_after:
            x = F.max_pool2d(x, 2, 2)
    return x


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    enc = _random_encoder()
    state = {f"module.encoder.{k}": v for k, v in enc.items()}  # as saved from DataParallel
    state["module.pool.conv.weight"] = torch.randn(K, D, 1, 1, generator=g)
    state["module.pool.centroids"] = torch.randn(K, D, generator=g)
    state["module.WPCA.0.weight"] = torch.randn(P, K * D, 1, 1, generator=g) * 0.05
    state["module.WPCA.0.bias"] = torch.randn(P, generator=g) * 0.01
    path = tmp_path_factory.mktemp("ckpt") / "pittsburgh_WPCA16.pth.tar"
    torch.save({"epoch": 3, "best_score": 0.9, "state_dict": state}, path)
    return path, enc, {k.replace("module.", ""): v for k, v in state.items() if "pool" in k or "WPCA" in k}


def test_random_vgg16_matches_reference_equations():
    torch.manual_seed(0)
    net = build_backbone("vgg16-conv5", pretrained=False)
    enc = {k: v.detach().clone() for k, v in net.features.state_dict().items()}
    pixels = torch.rand(2, 3, 64, 96)
    out = net(pixels)
    assert (net.stride, net.dim, out.grid) == (16, 512, (4, 6))
    ref = _reference_conv5(pixels, enc).permute(0, 2, 3, 1)
    torch.testing.assert_close(out.patches, ref, rtol=1e-4, atol=1e-4)
    assert (out.patches < 0).any(), "conv5_3 is read before its ReLU, as NetVLAD does"


def test_torchvision_layout_loads(tmp_path):
    enc = _random_encoder(seed=5)
    path = tmp_path / "vgg16-397923af.pth"
    tv = {f"features.{k}": v for k, v in enc.items()}
    tv["classifier.0.weight"] = torch.zeros(4, 4)  # ignored: only the encoder is used
    torch.save(tv, path)
    net = build_backbone("vgg16-conv5", weights=str(tmp_path))  # a folder holding the file works too
    torch.testing.assert_close(net.features[28].weight, enc["28.weight"])
    pixels = torch.rand(1, 3, 32, 48)
    torch.testing.assert_close(
        net(pixels).patches, _reference_conv5(pixels, enc).permute(0, 2, 3, 1), rtol=1e-4, atol=1e-4
    )
    assert not is_netvlad_checkpoint(path)
    encoder_only = with_weights(resolve("netvlad-vgg16"), str(path))
    assert "checkpoint" not in encoder_only.aggregator_options and pipeline.needs_vocabulary(encoder_only)
    with pytest.raises(WeightsNotFoundError, match="not a NetVLAD checkpoint"):
        read_netvlad_checkpoint(path)


def test_patch_netvlad_checkpoint_loads_encoder_and_pool(checkpoint):
    path, enc, pool = checkpoint
    ck = read_netvlad_checkpoint(path)
    assert (ck.num_clusters, ck.dim) == (K, D)
    assert tuple(ck.assign_weight.shape) == (K, D) and tuple(ck.wpca_weight.shape) == (P, K * D)
    assert ck.assign_bias is None
    net = build_backbone("vgg16-conv5", weights=str(path))
    for idx in CONV_INDICES:
        torch.testing.assert_close(net.features[idx].weight, enc[f"{idx}.weight"])
    assert net.identity()["weights"] == path.name


def _reference_patch_netvlad(conv5: torch.Tensor, pool: dict[str, torch.Tensor]) -> torch.Tensor:
    """Patch-NetVLAD's NetVLAD + WPCA forward on ``B×D×H×W`` conv5 (its equations, as a conv net)."""
    x = F.normalize(conv5, p=2, dim=1)
    soft = F.softmax(F.conv2d(x, pool["pool.conv.weight"]).flatten(2), dim=1)  # B×K×N
    flat = x.flatten(2)  # B×D×N
    c = pool["pool.centroids"]
    vlad = torch.stack([((flat - c[k].view(1, -1, 1)) * soft[:, k : k + 1]).sum(-1) for k in range(K)], 1)
    vlad = F.normalize(F.normalize(vlad, dim=2).flatten(1), dim=1)
    y = F.conv2d(vlad.view(len(vlad), -1, 1, 1), pool["WPCA.0.weight"], pool["WPCA.0.bias"]).flatten(1)
    return F.normalize(y, dim=1)


def test_netvlad_aggregator_from_checkpoint_equals_reference(checkpoint):
    path, enc, pool = checkpoint
    net = build_backbone("vgg16-conv5", weights=str(path))
    agg = NetVLAD(net.dim, checkpoint=str(path))
    assert agg.dim == P and not NetVLAD.wants_vocabulary({"checkpoint": str(path)})
    feats = net(torch.rand(2, 3, 48, 64))
    ref = _reference_patch_netvlad(feats.patches.permute(0, 3, 1, 2), pool)
    torch.testing.assert_close(agg(feats), ref, rtol=1e-4, atol=1e-5)
    raw = NetVLAD(net.dim, checkpoint=str(path), wpca=False)
    assert raw.dim == K * D


def test_patches_extension_takes_netvlad_and_wpca_from_checkpoint(checkpoint):
    from vprkit.rerank.extension import PatchesExtension

    path, enc, pool = checkpoint
    net = build_backbone("vgg16-conv5", weights=str(path))
    ext = PatchesExtension({"checkpoint": str(path), "scales": [(2, 1)], "pca_dim": P}, net, None)
    assert not ext.needs_fit and ext.projection is not None and ext.projection.dim == P
    cells = net(torch.rand(1, 3, 64, 64)).patches[0]
    sets = ext.describe(cells, net.stride)
    assert sets[0].descriptors.shape == (9, P)  # 4×4 grid, 2×2 patches, stride 1


def test_preset_with_checkpoint_builds_map_without_vocabulary(checkpoint, tmp_path):
    path, _, _ = checkpoint
    config = with_weights(resolve("netvlad-vgg16"), str(path))
    assert config.aggregator_options["checkpoint"] == str(path) and not pipeline.needs_vocabulary(config)
    with pytest.raises(WeightsNotFoundError, match="missing.pth"):  # caught before any work starts
        with_weights(resolve("netvlad-vgg16"), str(path.parent / "missing.pth"))
    make_images(tmp_path / "db", 3, size=(48, 64))
    small = config.replace(image=ImageSpec((48, 64), "fixed"))
    pipeline.build_map(tmp_path / "db", tmp_path / "map", small, progress=False, log=lambda _: None)
    m = pipeline.open_map(tmp_path / "map")
    assert m.aggregator.dim == P and m.vocabulary is None
    res = pipeline.localize(m, [tmp_path / "db" / "img001.png"], top_k=1)
    assert res[0].matches[0].key == "img001.png"


def test_vocabulary_netvlad_preset_still_needs_vocabulary():
    config = resolve("netvlad-vgg16")
    assert pipeline.needs_vocabulary(config) and config.vocabulary == VocabularyConfig(k=64)


def test_missing_imagenet_weights_say_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.setenv("VPRKIT_OFFLINE", "1")
    monkeypatch.setenv("VPRKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsNotFoundError, match="vgg16-397923af.pth"):
        build_backbone("vgg16-conv5")


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsNotFoundError, match="broken.pth"):
        read_netvlad_checkpoint(bad)


def test_legacy_format_checkpoint_is_read(checkpoint, tmp_path):
    path, _, pool = checkpoint
    legacy = tmp_path / "legacy.pth.tar"
    torch.save(torch.load(path, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    ck = read_netvlad_checkpoint(legacy)  # cannot be memory-mapped: read the ordinary way
    torch.testing.assert_close(ck.centroids, pool["pool.centroids"])
