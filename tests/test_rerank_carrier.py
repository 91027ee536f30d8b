"""Re-ranking has one carrier, ``Config.rerank``: a map built for a re-ranking is re-ranked with it by ``localize``,
the CLI and ``evaluate`` unless told otherwise (``none``), and any re-ranking settings — named or not — work everywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vprkit import pipeline
from vprkit.config import RerankConfig
from vprkit.presets import resolve

from helpers import run_cli

REFS = 8
QUERIES = 3
IMAGE_SIZE = (120, 160)  # height, width (the CLI's 160x120): small and quick
# An unnamed re-ranking (its name is RerankConfig's default, "custom"): no preset of that name exists.
UNNAMED = RerankConfig(scales=((3, 1),), weights=(1.0,), scorer="rapid", pca_dim=32, shortlist=REFS)


@pytest.fixture(scope="module")
def corridor_set(shared_datasets, tmp_path_factory) -> Path:
    """A tiny VPR-Bench layout of real Corridor images: ref/, query/ and ground_truth.csv (queries = their refs)."""
    root = tmp_path_factory.mktemp("carrier")
    refs = sorted((shared_datasets / "corridor" / "ref").iterdir())[:REFS]
    (root / "ref").mkdir()
    (root / "query").mkdir()
    for p in refs:
        shutil.copy(p, root / "ref" / p.name)
    lines = ["query,positives"]
    for p in refs[:QUERIES]:
        shutil.copy(p, root / "query" / p.name)
        lines.append(f"{p.name},{p.name}")
    (root / "ground_truth.csv").write_text("\n".join(lines) + "\n")
    return root


def _config(rerank):
    return resolve("effnet-vlad", rerank=rerank, image_size=IMAGE_SIZE, vocabulary={"k": 8})


@pytest.fixture(scope="module")
def speed_map(corridor_set, tmp_path_factory) -> Path:
    """A map built with ``vprkit map build --rerank speed``."""
    out = tmp_path_factory.mktemp("speed") / "map"
    result = run_cli(
        [
            "map",
            "build",
            corridor_set / "ref",
            "--out",
            out,
            "--preset",
            "effnet-vlad",
            "--rerank",
            "speed",
            "--image-size",
            "160x120",
        ]
    )
    assert result.exit_code == 0, result.output
    return out


def test_a_map_built_for_a_reranking_is_reranked_by_localize_without_a_flag(speed_map, corridor_set):
    query = str(corridor_set / "query" / sorted((corridor_set / "query").iterdir())[0].name)
    (result,) = pipeline.localize(speed_map, [query], top_k=3)
    assert result.rerank == "speed"
    assert {m.score_kind for m in result.matches} == {"fused_zscore"}
    assert result.matches[0].key == Path(query).name
    (plain,) = pipeline.localize(speed_map, [query], top_k=3, rerank="none")
    assert plain.rerank is None and {m.score_kind for m in plain.matches} == {"cosine"}


def test_the_cli_says_which_reranking_it_applied_and_none_switches_it_off(speed_map, corridor_set):
    query = sorted((corridor_set / "query").iterdir())[0]
    result = run_cli(["localize", speed_map, query, "--top-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    assert record["rerank"] == "speed" and record["matches"][0]["score_kind"] == "fused_zscore"
    assert "re-ranked with 'speed'" in result.stderr and "--rerank none" in result.stderr
    result = run_cli(["localize", speed_map, query, "--top-k", "2", "--json", "--rerank", "none"])
    (record,) = json.loads(result.stdout)
    assert record["rerank"] is None and record["matches"][0]["score_kind"] == "cosine"
    assert "re-ranked" not in result.stderr


def test_evaluate_with_an_unnamed_reranking_config_completes(corridor_set, tmp_path):
    summary = pipeline.evaluate(
        corridor_set, _config(UNNAMED), out=tmp_path / "run", progress=False, log=lambda _: None
    )
    assert summary["rerank"] == UNNAMED.name == "custom"
    assert summary["rerank_settings"]["pca_dim"] == UNNAMED.pca_dim
    assert summary["recall"]["R@1"] == 1.0  # each query is one of the map's own images
    # the same settings passed at query time, unnamed too, on the map that evaluation built
    (result,) = pipeline.localize(tmp_path / "run" / "map", [next((corridor_set / "query").iterdir())], rerank=UNNAMED)
    assert result.rerank == "custom" and result.matches[0].score_kind == "fused_zscore"


def test_evaluate_with_rerank_none_on_a_preset_with_a_reranking_uses_global_retrieval(corridor_set):
    summary = pipeline.evaluate(corridor_set, _config(UNNAMED), rerank="none", progress=False, log=lambda _: None)
    assert summary["rerank"] is None and "rerank_settings" not in summary


def test_rerank_true_is_refused_as_ambiguous():
    with pytest.raises(Exception, match="ambiguous"):
        pipeline.rerank_settings(_config(None), True)
