"""Zoo presets work everywhere a preset does: re-ranking, SegVLAD, streams with sequences, compression, the
service, ``--device`` — one representative preset each, on seeded weights in the official checkpoint file
(:mod:`official_checkpoints`), small images and a 20-frame Corridor map, through the CLI.

- re-ranking on a CNN zoo preset (``cosplace-r18-512``) and a DINOv2 one (``salad``): the map stores the
  ``speed`` preset's patches, built from the zoo backbone's own dense map (the extension's feature
  backbone *is* the map's backbone, identified by its zoo entry), and ``localize`` re-ranks;
- SegVLAD on a DINOv2 zoo backbone (``boq-dinov2``'s ViT-B/14 with the ``segvlad-grid`` segments and
  retriever): a Config no named preset spells, given to the CLI as a preset file (``--preset FILE.ckpt``);
- ``localize --frames … --sequence-length 3``, ``vprkit map compress``, the HTTP service's ``/localize``;
- ``--device cpu`` recorded in ``map.json`` and ``build.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

import official_checkpoints
from helpers import assert_one_line_error, run_main
from vprkit import pipeline
from vprkit.pipeline.live import LiveMap
from vprkit.presets import PRESETS, resolve
from vprkit.service import BackgroundServer, create_app

MAP_IMAGES = 20  # Corridor references 0…19
QUERIES = 6  # Corridor queries 0…5 (a stream of frames)
CNN_PRESET = "cosplace-r18-512"  # native size: Corridor's 160×120
DINOV2_PRESET = "salad"
SEGVLAD_ZOO = "boq-dinov2"
SEGVLAD_SEGMENTS = "segvlad-grid"
VIT_SIZE = "126x126"  # 9×9 patches: more than SALAD's 64 clusters
RERANK = "speed"
SEQUENCE_LENGTH = 3
API_KEY = "zoo-key"


def corridor_folder(root: Path, source: Path, count: int) -> Path:
    """Symlinks to ``source``'s first ``count`` frames (sorted names: route order)."""
    root.mkdir(parents=True)
    for path in sorted(source.glob("*.jpg"))[:count]:
        (root / path.name).symlink_to(path)
    return root


@pytest.fixture(scope="module")
def corridor(tmp_path_factory, shared_datasets: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("zoo-corridor")
    source = shared_datasets / "corridor"
    return (
        corridor_folder(root / "ref", source / "ref", MAP_IMAGES),
        corridor_folder(root / "query", source / "query", QUERIES),
    )


def run(monkeypatch, capsys, *args) -> str:
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def reranked_maps(tmp_path_factory, corridor) -> dict[str, Path]:
    """``{preset: map}`` built through the CLI with ``--rerank speed --device cpu`` and the official file."""
    ref, _ = corridor
    maps = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for preset in (CNN_PRESET, DINOV2_PRESET):
            root = tmp_path_factory.mktemp(f"zoo-{preset}")
            weights = official_checkpoints.write_official_checkpoint(preset, root / "weights")
            size = [] if resolve(preset).image.resize == "none" else ["--image-size", VIT_SIZE]
            args = ["map", "build", ref, "--out", root / "map", "--preset", preset, "--weights", weights]
            code, err = _run_quiet(monkeypatch, *args, "--rerank", RERANK, "--device", "cpu", *size)
            assert code == 0, err
            maps[preset] = root / "map"
    return maps


def _run_quiet(monkeypatch, *args):
    """:func:`run_main` for fixtures (no ``capsys``): the exit code and what went to stderr."""
    import contextlib
    import io
    import sys

    from vprkit.cli import main

    monkeypatch.setattr(sys, "argv", ["vprkit", *map(str, args)])
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    return code, err.getvalue()


@pytest.mark.parametrize("preset", [CNN_PRESET, DINOV2_PRESET])
def test_rerank_with_patches_from_the_zoo_backbone(preset, reranked_maps, corridor, monkeypatch, capsys):
    opened = pipeline.open_map(reranked_maps[preset])
    patches = opened.extensions["patches"]
    assert patches.feature_backbone is opened.backbone  # the zoo backbone's dense map, one pass
    assert preset in json.dumps(opened.backbone.identity())  # … loaded from the zoo entry
    assert opened.config.rerank is not None and opened.config.rerank.name == RERANK
    query = corridor[1] / "0000003.jpg"
    (answer,) = json.loads(run(monkeypatch, capsys, "localize", reranked_maps[preset], query, "--json", "--top-k", "5"))
    assert answer["rerank"] is not None and len(answer["matches"]) == 5


def test_device_is_honoured_and_recorded(reranked_maps, corridor, monkeypatch, capsys):
    import torch

    if not torch.cuda.is_available():  # a device asked for is used, never silently replaced
        query = corridor[1] / "0000001.jpg"
        code, _, err = run_main(monkeypatch, capsys, "localize", reranked_maps[CNN_PRESET], query, "--device", "cuda")
        assert_one_line_error(code, err, "cuda")
    for map_dir in reranked_maps.values():
        assert json.loads((map_dir / "map.json").read_text())["config"]["device"] == "cpu"
        assert json.loads((map_dir / "build.json").read_text())["config"]["device"] == "cpu"
        assert next(pipeline.open_map(map_dir).backbone.parameters()).device.type == "cpu"


def test_stream_with_sequences(reranked_maps, corridor, monkeypatch, capsys):
    args = ["localize", reranked_maps[CNN_PRESET], "--frames", corridor[1], "--sequence-length", SEQUENCE_LENGTH]
    lines = run(monkeypatch, capsys, *args, "--json", "--rerank", "none").strip().splitlines()
    frames = [json.loads(line) for line in lines]
    assert len(frames) == QUERIES and all(f["matches"] for f in frames)
    assert frames[-1]["sequence_frames"] == SEQUENCE_LENGTH
    assert frames[-1]["matches"][0]["score_kind"] == "sequence_mean_cosine"


def test_compress_a_zoo_map(reranked_maps, corridor, tmp_path, monkeypatch, capsys):
    map_dir = Path(shutil.copytree(reranked_maps[CNN_PRESET], tmp_path / "map"))
    record = json.loads(
        run(monkeypatch, capsys, "map", "compress", map_dir, "--index", "SQ8", "--train-sample", 0, "--json")
    )
    assert "SQ8" in json.dumps(record)
    assert "SQ8" in (map_dir / "index.json").read_text()
    query = corridor[1] / "0000002.jpg"
    (answer,) = json.loads(run(monkeypatch, capsys, "localize", map_dir, query, "--json", "--rerank", "none"))
    assert answer["matches"]


def test_service_answers_on_a_zoo_map(reranked_maps, corridor, tmp_path):
    map_dir = Path(shutil.copytree(reranked_maps[DINOV2_PRESET], tmp_path / "map"))
    live = LiveMap.open(map_dir)
    with BackgroundServer(create_app(live, api_key=API_KEY)) as server:
        with httpx.Client(base_url=server.url, timeout=120.0) as client:
            image = (corridor[1] / "0000004.jpg").read_bytes()
            answer = client.post(
                "/localize",
                content=image,
                headers={"X-API-Key": API_KEY, "content-type": "image/jpeg"},
                params={"top_k": 3},
            )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["matches"]) == 3


def test_segvlad_on_a_dinov2_zoo_backbone(corridor, tmp_path, monkeypatch, capsys):
    """``--segments segvlad-grid``: SegVLAD's segment retrieval, with that preset's settings, on BoQ's DINOv2."""
    ref, queries = corridor
    weights = official_checkpoints.write_official_checkpoint(SEGVLAD_ZOO, tmp_path / "weights")
    args = ["--preset", SEGVLAD_ZOO, "--weights", weights, "--image-size", VIT_SIZE, "--segments", SEGVLAD_SEGMENTS]
    run(monkeypatch, capsys, "map", "build", ref, "--out", tmp_path / "map", *args)
    segvlad = PRESETS.get(SEGVLAD_SEGMENTS)
    built = json.loads((tmp_path / "map" / "map.json").read_text())["config"]
    assert built["retriever"] == "segvlad" and built["extensions"]["segments"] == json.loads(
        json.dumps(segvlad.extensions["segments"])
    )
    (answer,) = json.loads(run(monkeypatch, capsys, "localize", tmp_path / "map", queries / "0000005.jpg", "--json"))
    assert answer["matches"] and answer["matches"][0]["score_kind"] == "segvlad_vote"
    opened = pipeline.open_map(tmp_path / "map")
    assert SEGVLAD_ZOO in json.dumps(opened.backbone.identity()) and "segments" in opened.extensions
    code, _, err = run_main(monkeypatch, capsys, "map", "build", ref, "--out", tmp_path / "m2", "--segments", "speed")
    assert code == 2 and "not a SegVLAD preset" in err and "segvlad-grid" in err


def test_a_relative_weights_path_still_loads_from_elsewhere(corridor, tmp_path, monkeypatch, capsys):
    ref, queries = corridor
    weights = official_checkpoints.write_official_checkpoint("cosplace-r18-32", tmp_path / "weights")
    monkeypatch.chdir(weights.parent)
    args = ["map", "build", ref, "--out", tmp_path / "map", "--preset", "cosplace-r18-32", "--weights", weights.name]
    run(monkeypatch, capsys, *args)
    monkeypatch.chdir(tmp_path)
    (answer,) = json.loads(run(monkeypatch, capsys, "localize", tmp_path / "map", queries / "0000001.jpg", "--json"))
    assert answer["matches"]


def test_patch_netvlad_on_relja_netvlad_uses_its_layer_and_whitening(corridor, tmp_path, monkeypatch, capsys):
    """Patch-NetVLAD over a zoo NetVLAD (.mat): the patches are described by the file's trained layer and
    whitening, as the global descriptor is (no vocabulary or PCA fitted on the map)."""
    ref, queries = corridor
    weights = official_checkpoints.write_official_checkpoint("netvlad-pitts30k", tmp_path / "w", whiten_dim=64)
    args = ["--preset", "netvlad-pitts30k", "--weights", weights, "--image-size", "128x160", "--rerank", RERANK]
    run(monkeypatch, capsys, "map", "build", ref, "--out", tmp_path / "map", *args)
    opened = pipeline.open_map(tmp_path / "map")
    patches = opened.extensions["patches"]
    assert patches.options["zoo"] == "netvlad-pitts30k" and not patches.needs_fit and patches.state() == {}
    global_layer = opened.aggregator.layer
    assert torch.equal(patches.layer.centroids, global_layer.centroids)
    assert patches.projection.components.shape[0] == 64  # the file's whitening, not a PCA of the map
    (answer,) = json.loads(run(monkeypatch, capsys, "localize", tmp_path / "map", queries / "0000002.jpg", "--json"))
    assert answer["rerank"] is not None and answer["matches"]
