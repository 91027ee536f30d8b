"""One memory setting (Config.memory_budget_mb) bounds vocabulary and map building, whatever the map size."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from vprkit import pipeline
from vprkit.backbones import extract as extraction
from vprkit.cli import cli
from vprkit.config import (
    BUDGET_SHARE_DECODE_BUFFER,
    BUDGET_SHARE_FEATURE_CACHE,
    BUDGET_SHARE_VOCABULARY_POOL,
    DEFAULT_FEATURE_CACHE_BYTES,
    DEFAULT_VOCABULARY_MAX_BYTES,
    MIB,
    MIN_MEMORY_BUDGET_MB,
    Config,
    VocabularyConfig,
)
from vprkit.errors import ConfigError, MapError
from vprkit.images import ImageSpec
from vprkit.maps import MAP_FILE
from vprkit.aggregation.options import VocabularyOptions
from vprkit.aggregation.vocabulary import build_vocabulary
from vprkit.presets import resolve

from helpers import make_images

IMAGE_SIZE = (240, 320)  # the default preset's size: 15×20 patches of 112-d on EfficientNet-Lite0 block 10
N_IMAGES = 24
BATCH = 4
FLOAT32_BYTES = 4


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget") / "images"
    return root, make_images(root, N_IMAGES, size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def tight_config():
    """The smallest budget allowed: its descriptor pool is smaller than all patch descriptors of ``images``."""
    return resolve("effnet-vlad").replace(
        memory_budget_mb=MIN_MEMORY_BUDGET_MB, batch_size=BATCH, vocabulary=VocabularyConfig(k=8)
    )


@pytest.fixture(scope="module")
def backbone(tight_config):
    return pipeline.load_backbone(tight_config)


# ---- resolving the budget ------------------------------------------------------------------------
def test_budget_splits_into_the_sub_caps():
    plan = Config(memory_budget_mb=100).memory_plan()
    assert plan.budget_bytes == 100 * MIB
    assert plan.vocabulary_pool_bytes == int(100 * MIB * BUDGET_SHARE_VOCABULARY_POOL) == 50 * MIB
    assert plan.feature_cache_bytes == int(100 * MIB * BUDGET_SHARE_FEATURE_CACHE) == 25 * MIB
    assert plan.decode_buffer_bytes == int(100 * MIB * BUDGET_SHARE_DECODE_BUFFER) == 25 * MIB
    total = plan.vocabulary_pool_bytes + plan.feature_cache_bytes + plan.decode_buffer_bytes
    assert total <= plan.budget_bytes  # the shares never add up to more than the budget


def test_without_a_budget_the_defaults_are_unchanged():
    plan = Config().memory_plan()
    assert (plan.budget_bytes, plan.decode_buffer_bytes) == (None, None)
    assert plan.vocabulary_pool_bytes == DEFAULT_VOCABULARY_MAX_BYTES == 256 * MIB
    assert plan.feature_cache_bytes == DEFAULT_FEATURE_CACHE_BYTES == 512 * MIB
    assert extraction.decode_prefetch_images(Config(), plan) is None  # decode ahead as before


def test_explicit_pool_cap_wins_over_its_share():
    config = Config(memory_budget_mb=100, vocabulary=VocabularyConfig(max_bytes=7 * MIB))
    plan = config.memory_plan()
    assert plan.vocabulary_pool_bytes == 7 * MIB
    assert plan.feature_cache_bytes == 25 * MIB and plan.decode_buffer_bytes == 25 * MIB
    assert Config(vocabulary=VocabularyConfig(max_bytes=7 * MIB)).memory_plan().vocabulary_pool_bytes == 7 * MIB


def test_decode_prefetch_is_whole_batches_within_the_share():
    config = Config(memory_budget_mb=64, batch_size=8, image=ImageSpec(IMAGE_SIZE, "fixed"))
    n = extraction.decode_prefetch_images(config, config.memory_plan())
    per_image = IMAGE_SIZE[0] * IMAGE_SIZE[1] * 3
    assert n % 8 == 0 and n * per_image <= 16 * MIB < (n + 8) * per_image


def test_a_budget_below_the_floor_names_the_minimum():
    with pytest.raises(ConfigError, match=f"minimum is {MIN_MEMORY_BUDGET_MB} MB"):
        Config(memory_budget_mb=MIN_MEMORY_BUDGET_MB - 1)


def test_a_budget_too_small_for_one_batch_names_the_minimum():
    config = resolve("effnet-vlad").replace(memory_budget_mb=5, batch_size=8)
    fake_backbone = SimpleNamespace(dim=112, stride=16)  # memory_plan only needs the grid and the dimension
    batch_bytes = 8 * IMAGE_SIZE[0] * IMAGE_SIZE[1] * 3
    minimum = math.ceil(batch_bytes / BUDGET_SHARE_DECODE_BUFFER / MIB)
    assert minimum == 8
    with pytest.raises(ConfigError, match=f"minimum is {minimum} MB"):
        extraction.memory_plan(config, fake_backbone)
    assert extraction.memory_plan(config.replace(memory_budget_mb=minimum), fake_backbone).budget_bytes == minimum * MIB


def test_a_budget_too_small_for_one_image_of_descriptors_names_the_minimum():
    # a huge descriptor (e.g. a ViT-G facet on a fine grid): one image's patches outgrow the pool share
    fake_backbone = SimpleNamespace(dim=4096, stride=8)
    config = Config(memory_budget_mb=16, batch_size=1, image=ImageSpec(IMAGE_SIZE, "fixed"))
    one_image = (IMAGE_SIZE[0] // 8) * (IMAGE_SIZE[1] // 8) * 4096 * FLOAT32_BYTES
    minimum = math.ceil(one_image / BUDGET_SHARE_VOCABULARY_POOL / MIB)
    with pytest.raises(ConfigError, match=f"one image's patch descriptors; the minimum is {minimum} MB"):
        extraction.memory_plan(config, fake_backbone)


# ---- the caps hold in a real build ---------------------------------------------------------------
def test_vocabulary_pool_holds_at_most_the_budget_share(images, tight_config, backbone):
    root, keys = images
    pool_bytes = tight_config.memory_plan().vocabulary_pool_bytes
    capacity = pool_bytes // (FLOAT32_BYTES * backbone.dim)
    all_patches = N_IMAGES * (IMAGE_SIZE[0] // backbone.stride) * (IMAGE_SIZE[1] // backbone.stride)
    assert capacity < all_patches  # otherwise this test could not notice an ignored cap

    voc = build_vocabulary(backbone, VocabularyOptions.from_config(tight_config, backbone), [(root, keys)])
    meta = voc.metadata
    assert meta["descriptors_seen"] == all_patches
    assert meta["pooled_descriptors"] == capacity == meta["n_descriptors"]
    assert meta["sample_bytes"] <= pool_bytes == meta["pool_max_bytes"]


def test_without_the_budget_the_same_images_pool_every_descriptor(images, tight_config, backbone):
    root, keys = images
    unbounded = tight_config.replace(memory_budget_mb=None)
    voc = build_vocabulary(backbone, VocabularyOptions.from_config(unbounded, backbone), [(root, keys)])
    assert voc.metadata["pooled_descriptors"] == voc.metadata["descriptors_seen"]


def test_images_decoded_ahead_stay_within_the_decode_share(images, tight_config, backbone, monkeypatch):
    root, keys = images
    chunks: list[int] = []
    real = extraction.iter_batches

    def spy(source, keys, *a, **k):
        chunks.append(len(keys))
        return real(source, keys, *a, **k)

    monkeypatch.setattr(extraction, "iter_batches", spy)
    n = sum(len(b.keys) for b, _ in extraction.extract(backbone, tight_config, root, keys))
    prefetch = extraction.decode_prefetch_images(tight_config, tight_config.memory_plan())
    assert n == N_IMAGES and sum(chunks) == N_IMAGES
    assert max(chunks) == prefetch < N_IMAGES
    assert prefetch * IMAGE_SIZE[0] * IMAGE_SIZE[1] * 3 <= tight_config.memory_plan().decode_buffer_bytes


def test_a_map_resumes_under_another_budget_and_from_an_older_map_json(tmp_path, image_folder):
    config = resolve("effnet-vlad").replace(
        image=ImageSpec((64, 64), "fixed"), vocabulary=VocabularyConfig(k=8), batch_size=BATCH
    )
    pipeline.build_map(image_folder, tmp_path / "map", config, progress=False, log=lambda _: None)
    # a smaller machine: same map, another budget (the vocabulary already exists, results do not change)
    info = pipeline.build_map(
        image_folder, tmp_path / "map", config.replace(memory_budget_mb=16), progress=False, log=lambda _: None
    )
    assert info["counts"]["images"] == 12 and info["config"]["memory_budget_mb"] == 16
    # a map.json written before budgets existed: no memory_budget_mb, the old explicit 256 MiB pool
    path = tmp_path / "map" / MAP_FILE
    old = json.loads(path.read_text())
    old["config"].pop("memory_budget_mb")
    old["config"]["vocabulary"]["max_bytes"] = DEFAULT_VOCABULARY_MAX_BYTES
    path.write_text(json.dumps(old))
    assert (
        pipeline.build_map(image_folder, tmp_path / "map", config, progress=False, log=lambda _: None)["counts"][
            "images"
        ]
        == 12
    )
    # other settings still refuse
    with pytest.raises(MapError, match="other settings"):
        pipeline.build_map(
            image_folder,
            tmp_path / "map",
            config.replace(vocabulary=dataclasses.replace(config.vocabulary, k=4)),
            progress=False,
            log=lambda _: None,
        )


# ---- the command line ----------------------------------------------------------------------------
class _Captured(Exception):
    def __init__(self, config):
        self.config = config


def _capture(*args, **kwargs):
    config = next(a for a in (*args, *kwargs.values()) if isinstance(a, Config))
    raise _Captured(config)


@pytest.mark.parametrize(
    "command, target",
    [
        (["map", "build", "IMAGES", "--out", "MAP"], "build_map"),
        (["eval", "corridor"], "evaluate"),
        (["vocab", "build", "--domain", "d", "corridor"], "build_domain_vocabulary"),
    ],
)
def test_cli_memory_budget_reaches_the_config(command, target, monkeypatch, shared_datasets):
    monkeypatch.setenv("VPRKIT_DATA", str(shared_datasets))
    monkeypatch.setattr(pipeline, target, _capture)
    with pytest.raises(_Captured) as got:
        CliRunner().invoke(cli, [*command, "--memory-budget", "48"], catch_exceptions=False)
    assert got.value.config.memory_budget_mb == 48
    assert got.value.config.memory_plan().vocabulary_pool_bytes == 24 * MIB


def test_cli_too_small_budget_is_a_clear_error(tmp_path, image_folder):
    with pytest.raises(ConfigError, match=f"minimum is {MIN_MEMORY_BUDGET_MB} MB"):
        CliRunner().invoke(
            cli,
            ["map", "build", str(image_folder), "--out", str(tmp_path / "m"), "--memory-budget", "1"],
            catch_exceptions=False,
        )
