"""What the re-ranking presets cost in storage: the affordable ``performance`` stores what its settings
say (patches × dims × bytes, measured on a real map) and, at the default preset's image sizes, at most
a tenth of ``performance-reference`` (the paper's 4096-d float16); the presets trust the global top-1."""

from __future__ import annotations

import pytest

from vprkit import pipeline
from vprkit.images import ImageSpec
from vprkit.presets import DEFAULT_PRESET, get_rerank_config, resolve
from vprkit.rerank.patches import PatchScale
from helpers import copy_first_images

ITEMSIZE = {"float16": 2, "float32": 4, "int8": 1}
GRID_BYTES = 2 * 4  # the stored feature grid (two int32)
# (height, width) the README measures at: the default preset's 320×240 and Nordland's 224×112
SIZES = [(240, 320), (112, 224)]


def _patches(settings, grid: tuple[int, int]) -> int:
    total = 0
    for size, stride in settings.scales:
        _, rows, cols = PatchScale(size, stride).effective(grid)
        total += rows * cols
    return total


def _bytes_per_image(settings, grid: tuple[int, int], raw_dim: int) -> int:
    return _patches(settings, grid) * min(settings.pca_dim or raw_dim, raw_dim) * ITEMSIZE[settings.dtype] + GRID_BYTES


@pytest.mark.parametrize("hw", SIZES)
def test_performance_stores_at_most_a_tenth_of_the_reference(hw):
    config = resolve(DEFAULT_PRESET)
    from vprkit.backbones.base import build_backbone

    backbone = build_backbone(config.backbone, **dict(config.backbone_options))
    raw_dim = config.vocabulary.k * backbone.dim  # the patch NetVLAD's K·D before PCA
    grid = (hw[0] // backbone.stride, hw[1] // backbone.stride)
    new, ref = get_rerank_config("performance"), get_rerank_config("performance-reference")
    assert _bytes_per_image(new, grid, raw_dim) * 10 <= _bytes_per_image(ref, grid, raw_dim)
    assert new.scales == ref.scales and new.scorer == ref.scorer == "ransac"  # same matching, cheaper descriptors


def test_every_fused_preset_guards_the_global_top1():
    for name in ("speed", "storage"):
        assert get_rerank_config(name).global_gap is not None
    performance = get_rerank_config("performance")  # the whole shortlist, but the top-1's place keeps its order
    assert performance.global_gap is None and performance.same_place is not None
    for name in ("performance-reference", "performance-patch-only", "speed-patch-only"):
        settings = get_rerank_config(name)
        assert settings.global_gap is None and settings.same_place is None  # the original's behaviour, for fidelity


def test_a_real_map_stores_what_the_performance_settings_say(shared_datasets, small_config, tmp_path):
    refs = copy_first_images(shared_datasets / "corridor" / "ref", tmp_path / "refs", 8)
    settings = get_rerank_config("performance")
    # 192×256: enough patches in 8 images (12×16 cells) to fit all of the 512 PCA dimensions
    config = small_config.replace(
        image=ImageSpec((192, 256), "fixed"), extensions={"patches": settings.extension_options()}
    )
    pipeline.build_map(refs, tmp_path / "map", config, progress=False, log=lambda _: None)
    m = pipeline.open_map(tmp_path / "map")
    ext = m.extensions["patches"]
    grid = (192 // ext.stride, 256 // ext.stride)
    assert ext.projection is not None and ext.projection.dim == settings.pca_dim
    assert m.store.extra_bytes()["patches"] == pytest.approx(_bytes_per_image(settings, grid, 10**9))
