"""Every zoo preset, end to end through the CLI, on a checkpoint file in its official container and layout.

For each preset of :func:`vprkit.zoo.zoo_presets` (so a new one is covered without editing this file):
``vprkit eval`` builds a map of a tiny Corridor subset with the preset, given seeded random weights written
as the authors publish them (:mod:`official_checkpoints`), prints Recall@N, and ``vprkit localize`` answers
one query against the map it built. Offline, with an empty cache, ``vprkit map build --preset P`` without
``--weights`` fails with one ``error:`` line naming the URL and the file.

Sizes are small (Corridor's 160×120 frames at their native size for the native-size presets; fixed-size
presets at 128×128, DINOv2 ones at 126×126: a 9×9 grid, more than SALAD's 64 clusters). NetVLAD's released
WPCA (4096 × 32768, a 600 MB ``.mat``) is written with 256 outputs: the aggregator sizes itself from the file.

AnyLoc's domain presets run DINOv2 ViT-G/14 (1.1 B parameters: too big for a test). What is covered: their
``c_centers.pt`` (the official 32×1536) is read as the preset's vocabulary with AnyLoc's identity; offline the
missing ViT-G weights are one error line naming the URL; and the whole vocabulary path runs through the CLI
with the preset's backbone replaced by a tiny ViT of the same name, layer and facet (32 blocks of 32-d, hub
layout ``--weights`` file) whose ``c_centers.pt`` sits where the zoo looks for ``zoo:anyloc-urban``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import official_checkpoints
import seeded
from helpers import assert_one_line_error, run_main
from vprkit.aggregation.vlad import Vocabulary
from vprkit.presets import resolve
from vprkit.zoo import ZOO_WEIGHTS, anyloc, cached_path, zoo_entry_of, zoo_presets
from vprkit.zoo.cosplace import entry_name as cosplace_entry

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = 8  # Corridor references and queries 0…7
CNN_SIDE = 128
VIT_PATCHES_ACROSS = 9  # 9×9 = 81 patches > SALAD's 64 clusters
NETVLAD_WHITEN_DIM = 256
PRESETS = [c.name for c in zoo_presets()]
NETWORK_PRESETS = [c.name for c in zoo_presets() if not c.name.startswith("anyloc-")]
ANYLOC_PRESETS = [c.name for c in zoo_presets() if c.name.startswith("anyloc-")]
# a stand-in for ViT-G/14 that keeps what the vocabulary checks (name, layer 31, value facet) and is tiny
TINY_VITG = {"embed_dim": 32, "depth": anyloc.LAYER + 1, "num_heads": 2}


@pytest.fixture(scope="module")
def corridor_subset(tmp_path_factory, shared_datasets: Path) -> Path:
    """``ref/`` and ``query/`` (symlinks to Corridor's first frames) and a ``ground_truth.csv`` restricted to them."""
    source = shared_datasets / "corridor"
    root = tmp_path_factory.mktemp("corridor-subset")
    names = [f"{i:07d}.jpg" for i in range(IMAGES)]
    for part in ("ref", "query"):
        (root / part).mkdir()
        for name in names:
            (root / part / name).symlink_to(source / part / name)
    kept = {f"ref/{name}" for name in names}
    rows = ["query,positives"]
    for line in (source / "ground_truth.csv").read_text().splitlines()[1:]:
        query, positives = line.split(",", 1)
        if Path(query).name in names:
            rows.append(f"{query},{' '.join(p for p in positives.split() if p in kept)}")
    (root / "ground_truth.csv").write_text("\n".join(rows) + "\n")
    return root


def small_size(preset: str) -> list[str]:
    """``--image-size`` for a fixed-size preset (native-size and max-side presets keep Corridor's 160×120)."""
    config = resolve(preset)
    if config.image.resize not in ("fixed", "resize_crop"):
        return []
    side = VIT_PATCHES_ACROSS * 14 if config.backbone.startswith("dinov2") else CNN_SIDE
    return ["--image-size", f"{side}x{side}"]


def checkpoint(preset: str, folder: Path) -> Path:
    whiten = NETVLAD_WHITEN_DIM if zoo_entry_of(resolve(preset)).format == "mat" else None
    return official_checkpoints.write_official_checkpoint(preset, folder, seed=0, whiten_dim=whiten)


# ---- the official key lists and the written files ---------------------------------------------------


def recorded_key_lists() -> dict[str, dict]:
    """Preset → the official key → shape list recorded from the official code (the fixtures' meta)."""
    out = {}
    cosplace = seeded.read_fixture(str(FIXTURES / "cosplace.npz"))[0]
    for key, model in cosplace["models"].items():
        method, backbone, dim = key.split("/")
        out[cosplace_entry(method, backbone, int(dim))] = model["shapes"]
    boq = seeded.read_fixture(str(FIXTURES / "boq.npz"))[0]
    out["boq-r50"], out["boq-dinov2"] = boq["variants"]["resnet50"]["shapes"], boq["variants"]["dinov2"]["shapes"]
    mixvpr = seeded.read_fixture(str(FIXTURES / "mixvpr.npz"))[0]
    out.update({f"mixvpr-r50-{dim}": v["shapes"] for dim, v in mixvpr["variants"].items()})
    out["salad"] = seeded.read_fixture(str(FIXTURES / "salad.npz"))[0]["shapes"]
    out["megaloc"] = seeded.read_fixture(str(FIXTURES / "megaloc.npz"))[0]["shapes"]
    return out


@pytest.mark.parametrize("preset", sorted(recorded_key_lists()))
def test_official_key_list_equals_the_recorded_one(preset):
    ours = {k: list(v) for k, v in official_checkpoints.official_shapes(preset).items()}
    assert ours == recorded_key_lists()[preset]
    official_checkpoints.check_inverse(preset)


def test_netvlad_key_list_equals_hlocs():
    meta = seeded.read_fixture(str(FIXTURES / "netvlad.npz"))[0]
    ours = {k: list(v) for k, v in official_checkpoints.official_shapes("netvlad-pitts30k").items()}
    assert ours["whiten.weight"] == [4096, ours["netvlad.centers"][0] * ours["netvlad.centers"][1]]
    ours["whiten.weight"][0] = ours["whiten.bias"][0] = meta["whiten_dim"]  # recorded with a smaller WPCA
    assert ours == meta["shapes"]


@pytest.mark.parametrize("preset", [p for p in NETWORK_PRESETS if zoo_entry_of(resolve(p)).format != "mat"])
def test_inverse_layout_round_trips(preset):
    official_checkpoints.check_inverse(preset)


@pytest.mark.parametrize("preset", ANYLOC_PRESETS)
def test_anyloc_centres_are_the_presets_vocabulary(tmp_path, preset):
    config = resolve(preset)
    path = official_checkpoints.write_official_checkpoint(preset, tmp_path)
    vocabulary = Vocabulary.from_anyloc(anyloc.vocabulary_file(config.vocabulary.source, tmp_path))
    assert vocabulary.centres.shape == (config.vocabulary.k, anyloc.EMBED_DIM) and vocabulary.kind == "raw"
    assert vocabulary.metadata["identity"] == {"backbone": config.backbone, "layer": 31, "facet": "value", "dim": 1536}
    assert path == tmp_path / ZOO_WEIGHTS.get(preset).filename


# ---- end to end through the CLI -----------------------------------------------------------------------


@pytest.mark.parametrize("preset", NETWORK_PRESETS)
def test_eval_and_localize_with_an_official_file(preset, corridor_subset, tmp_path, monkeypatch, capsys):
    weights = checkpoint(preset, tmp_path / "weights")
    out = tmp_path / "eval"
    args = ["eval", corridor_subset, "--preset", preset, "--weights", weights, "--out", out, "--device", "cpu"]
    code, stdout, stderr = run_main(monkeypatch, capsys, *args, *small_size(preset), "--quiet")
    assert code == 0, stderr
    assert "R@1" in stdout and "R@5" in stdout, stdout
    assert (out / "summary.json").is_file() and (out / "map" / "map.json").is_file()
    query = corridor_subset / "query" / "0000003.jpg"
    code, stdout, stderr = run_main(monkeypatch, capsys, "localize", out / "map", query, "--json", "--top-k", "3")
    assert code == 0, stderr
    (answer,) = json.loads(stdout)
    assert len(answer["matches"]) == 3 and answer["matches"][0]["image"].endswith(".jpg")
    shutil.rmtree(tmp_path / "weights")  # the large ones (MegaLoc: 870 MB) go as soon as they served


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "empty-cache"
    for var, value in {
        "VPRKIT_OFFLINE": "1",
        "VPRKIT_CACHE": cache,
        "TORCH_HOME": tmp_path / "torch",
        "HF_HOME": tmp_path / "hf",
        "HF_HUB_CACHE": tmp_path / "hf",
        "XDG_CACHE_HOME": tmp_path / "xdg",
    }.items():
        monkeypatch.setenv(var, str(value))
    return cache


@pytest.mark.parametrize("preset", PRESETS)
def test_offline_without_weights_is_one_line_naming_the_url(
    preset, corridor_subset, offline, tmp_path, monkeypatch, capsys
):
    args = ["map", "build", corridor_subset / "ref", "--out", tmp_path / "map", "--preset", preset]
    code, _, err = run_main(monkeypatch, capsys, *args)
    config = resolve(preset)
    if preset in ANYLOC_PRESETS:  # the DINOv2 ViT-G network is looked for first: DINOv2's own file and URL
        url = f"https://dl.fbaipublicfiles.com/dinov2/{config.backbone}/{config.backbone}_pretrain.pth"
        assert_one_line_error(code, err, url, f"{config.backbone}_pretrain.pth")
    else:
        entry = zoo_entry_of(config)
        assert_one_line_error(code, err, entry.urls[0], str(cached_path(entry)))


def tiny_anyloc_preset(folder: Path, preset: str) -> Path:
    """``preset`` with its ViT-G/14 replaced by :data:`TINY_VITG`, as a preset file the CLI takes (the JSON
    checkpoint format ``--preset`` reads: a Config and nothing else)."""
    config = resolve(preset)
    config = config.replace(backbone_options={**config.backbone_options, "config": TINY_VITG})
    path = folder / f"{preset}-tiny.ckpt"
    path.write_text(json.dumps({"format": "vprkit-checkpoint", "config": config.to_dict()}))
    return path


@pytest.mark.parametrize("preset", ANYLOC_PRESETS)
def test_anyloc_vocabulary_path_end_to_end(preset, corridor_subset, offline, tmp_path, monkeypatch, capsys):
    """An AnyLoc domain preset with a tiny ViT of ViT-G's name, layer and facet: the map encodes with the zoo's
    ``c_centers.pt`` (found in the cache where ``vprkit weights list`` says to put it), eval and localize run."""
    import torch

    config = resolve(preset)
    preset_file = tiny_anyloc_preset(tmp_path, preset)
    weights = official_checkpoints.write_dinov2_hub_checkpoint(tmp_path / "tiny_vitg14.pth", TINY_VITG, config.backbone)
    args = ["eval", corridor_subset, "--preset", preset_file, "--weights", weights, "--out", tmp_path / "eval"]
    args += ["--image-size", "126x126", "--device", "cpu", "--quiet"]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert_one_line_error(code, err, "cache.zip", ZOO_WEIGHTS.get(preset).extra["member"])  # not yet in the cache

    centres = torch.randn(config.vocabulary.k, TINY_VITG["embed_dim"], generator=torch.Generator().manual_seed(0))
    target = cached_path(ZOO_WEIGHTS.get(preset))
    target.parent.mkdir(parents=True)
    torch.save(centres, target)
    code, stdout, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "R@1" in stdout
    recorded = json.loads((tmp_path / "eval" / "map" / "map.json").read_text())["vocabulary"]
    assert recorded["source"] == config.vocabulary.source and recorded["k"] == config.vocabulary.k
    query = corridor_subset / "query" / "0000001.jpg"
    code, stdout, err = run_main(monkeypatch, capsys, "localize", tmp_path / "eval" / "map", query, "--json")
    assert code == 0, err
    assert json.loads(stdout)[0]["matches"]


OTHER_FILE_PRESET = "cosplace-r18-32"


@pytest.fixture(scope="module")
def another_variants_file(tmp_path_factory) -> Path:
    return checkpoint(OTHER_FILE_PRESET, tmp_path_factory.mktemp("other-variant"))


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != OTHER_FILE_PRESET])
def test_another_variants_file_is_one_error_line(
    preset, another_variants_file, corridor_subset, tmp_path, monkeypatch, capsys
):
    args = ["map", "build", corridor_subset / "ref", "--out", tmp_path / "map", "--preset", preset]
    code, _, err = run_main(monkeypatch, capsys, *args, "--weights", another_variants_file, *small_size(preset))
    assert_one_line_error(code, err)
    assert not (tmp_path / "map" / "map.json").exists()


def smallest_of_each_cnn_layout() -> list[str]:
    """One preset per checkpoint layout of the CNN families (the cache lookup is the same for every entry)."""
    chosen: dict[str, str] = {}
    for name in NETWORK_PRESETS:
        config = resolve(name)
        if not config.backbone.startswith("dinov2"):
            chosen.setdefault(zoo_entry_of(config).layout, name)
    return sorted(chosen.values())


@pytest.mark.parametrize("preset", smallest_of_each_cnn_layout())
def test_offline_with_the_file_in_the_cache(preset, corridor_subset, offline, tmp_path, monkeypatch, capsys):
    """Where the one-line error says to put the file, a build finds it without ``--weights``."""
    entry = zoo_entry_of(resolve(preset))
    written = checkpoint(preset, tmp_path / "download")
    cached_path(entry).parent.mkdir(parents=True)
    written.rename(cached_path(entry))
    args = ["map", "build", corridor_subset / "ref", "--out", tmp_path / "map", "--preset", preset, *small_size(preset)]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    query = corridor_subset / "query" / "0000002.jpg"
    code, stdout, err = run_main(monkeypatch, capsys, "localize", tmp_path / "map", query, "--json")
    assert code == 0, err
    assert json.loads(stdout)[0]["matches"]
