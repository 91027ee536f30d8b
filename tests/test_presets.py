"""Every preset resolves and documents itself; AnyLoc presets run end to end with random DINOv2 weights."""

import pytest

from vprkit import pipeline
from vprkit.config import Config, VocabularyConfig
from vprkit.errors import ConfigError, WeightsNotFoundError
from vprkit.images import ImageSpec
from vprkit.presets import list_presets, resolve

TINY_VIT = {"embed_dim": 32, "depth": 3, "num_heads": 2, "default_layer": 1}


def test_all_presets_resolve_and_roundtrip():
    names = [c.name for c in list_presets()]
    for expected in (
        "effnet-vlad",
        "effnet-gem",
        "anyloc-vits14",
        "anyloc-vitb14",
        "anyloc-vitg14",
        "anyloc-gem-vits14",
        "dinov2-cls-vits14",
    ):
        assert expected in names
    for c in list_presets():
        assert c.description, c.name
        assert Config.from_dict(c.to_dict()) == c


def test_every_family_is_declared_in_presets_py():
    from pathlib import Path

    import vprkit

    names = {c.name for c in list_presets()}
    assert {
        "segvlad-slic",
        "segvlad-grid",
        "segvlad-sam",
        "netvlad-vgg16",
        "effnet2-vlad-x3",
        "dinov2-cls-vitl14",
    } <= names
    for old in ("presets_anyloc.py", "segments/presets.py"):  # folded into vprkit/presets.py
        assert not (Path(vprkit.__file__).parent / old).exists()
    seg = resolve("segvlad-sam").extensions["segments"]
    assert (seg["segmenter"], seg["order"], seg["pca_dim"]) == ("sam", 3, 1024)


def test_anyloc_descriptor_sizes_are_documented():
    assert "12288-d = 49,152 B/image" in resolve("anyloc-vits14").description
    assert "49152-d = 196,608 B/image" in resolve("anyloc-vitg14").description
    p = resolve("anyloc-vitg14")
    assert p.backbone_options == {"layer": 31, "facet": "value"} and p.image.resize == "resize_crop"


def test_unknown_preset_and_bad_override():
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve("anyloc-vitx14")
    with pytest.raises(ConfigError):
        resolve("effnet-vlad", store_dtype="int8")


@pytest.mark.parametrize("preset", ["anyloc-vits14", "anyloc-gem-vits14", "dinov2-cls-vits14"])
def test_anyloc_presets_end_to_end_with_random_tiny_vit(preset, tmp_path, image_folder):
    base = resolve(preset)
    opts = {**base.backbone_options, "pretrained": False, "config": TINY_VIT, "layer": TINY_VIT["default_layer"]}
    if preset.startswith("dinov2-cls"):
        opts["layer"] = TINY_VIT["depth"] - 1
    config = base.replace(
        backbone_options=opts, image=ImageSpec((56, 70), "resize_crop"), vocabulary=VocabularyConfig(k=4)
    )
    info = pipeline.build_map(image_folder, tmp_path / "map", config, progress=False, log=lambda s: None)
    expected_dim = {"anyloc-vits14": 4 * 32}.get(preset, 32)
    assert info["descriptor_dim"] == expected_dim
    res = pipeline.localize(tmp_path / "map", [image_folder / "img003.png"], top_k=12)
    # a random tiny ViT's features are dominated by position embeddings, so images may tie; the
    # query's own image must still score as high as the best (identical descriptor, cosine 1)
    scores = {m.key: m.score for m in res[0].matches}
    assert scores["img003.png"] == pytest.approx(max(scores.values()), abs=1e-5)
    assert scores["img003.png"] == pytest.approx(1.0, abs=1e-4)


def test_anyloc_without_weights_says_where_to_put_them(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("VPRKIT_OFFLINE", "1")
    monkeypatch.setenv("VPRKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError, match="dinov2_vits14_pretrain.pth"):
        pipeline.build_map(image_folder, tmp_path / "map", "anyloc-vits14", progress=False)
