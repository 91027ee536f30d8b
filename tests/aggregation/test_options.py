"""The aggregation stage's own options: read off a Config once (from_config), and all the stage reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vprkit.aggregation.options import AggregationOptions, VocabularyOptions
from vprkit.aggregation.vlad import VLAD, fit_vocabulary
from vprkit.aggregation.vocabulary import build_vocabulary, descriptor_identity, make_aggregator, wants_vocabulary
from vprkit.backbones.base import Backbone, DenseFeatures
from vprkit.backbones.extract import ExtractionOptions
from vprkit.config import MIB, Config, ImageSpec, VocabularyConfig
from vprkit.errors import ConfigError, VocabularyMismatchError
from vprkit.presets import resolve
from helpers import make_images

DIM = 8


class TinyBackbone(Backbone):
    """Average-pooled pixels (stride 8) repeated to DIM channels: features without weights."""

    name = "tiny"
    dim = DIM
    stride = 8
    size_multiple = 8

    def extract(self, x: torch.Tensor) -> DenseFeatures:
        pooled = torch.nn.functional.avg_pool2d(x, 8)  # B×3×h×w
        f = torch.cat([pooled, pooled**2, pooled[:, :2] - 0.5], 1).permute(0, 2, 3, 1).contiguous()
        return DenseFeatures(f, self.stride, tuple(x.shape[-2:]))


def test_aggregation_options_are_the_three_fields_the_stage_reads():
    config = resolve("effnet2-vlad-ma4", image_size=(64, 96))
    opts = AggregationOptions.from_config(config)
    assert (opts.aggregator, dict(opts.aggregator_options), opts.image) == ("vlad", {"assignments": 4}, config.image)
    assert wants_vocabulary(opts) and not wants_vocabulary(AggregationOptions("gem", {"p": 3.0}))
    assert not wants_vocabulary(AggregationOptions("netvlad", {"checkpoint": "/ck.pth"}))
    backbone = TinyBackbone()
    assert descriptor_identity(opts, backbone) == {
        **backbone.identity(),
        "image": {"size": [64, 96], "resize": "fixed"},
    }


def test_make_aggregator_checks_the_vocabulary_against_the_options():
    backbone = TinyBackbone()
    opts = AggregationOptions("vlad", {"assignments": 2}, ImageSpec((64, 64), "fixed"))
    voc = fit_vocabulary(
        np.random.default_rng(0).normal(size=(200, DIM)).astype(np.float32),
        4,
        {"identity": descriptor_identity(opts, backbone)},
    )
    agg = make_aggregator(opts, backbone, voc)
    assert isinstance(agg, VLAD) and agg.dim == 4 * DIM
    with pytest.raises(ConfigError, match="needs a vocabulary"):
        make_aggregator(opts, backbone, None)
    other = AggregationOptions("vlad", {}, ImageSpec((32, 32), "fixed"))
    with pytest.raises(VocabularyMismatchError):
        make_aggregator(other, backbone, voc)


def test_vocabulary_options_take_the_aggregators_requirements_and_the_memory_plan():
    config = Config(
        aggregator="vlad",
        aggregator_options={"vocabularies": 3, "centres": "raw"},
        vocabulary=VocabularyConfig(k=4, sets=1, centres="unit"),
        memory_budget_mb=64,
        image=ImageSpec((32, 32), "fixed"),
        batch_size=2,
    )
    opts = VocabularyOptions.from_config(config, TinyBackbone())
    assert (opts.sets, opts.centres) == (3, "raw")
    assert opts.pool_bytes == config.memory_plan().vocabulary_pool_bytes == 32 * MIB
    assert opts.extraction == ExtractionOptions(config.image, 2, config.workers, 16 * MIB)
    assert opts.vocabulary is config.vocabulary and opts.image == config.image
    plain = VocabularyOptions.from_config(Config(vocabulary=VocabularyConfig(k=4, sets=2)), TinyBackbone())
    assert (plain.sets, plain.centres) == (2, "unit")


def test_build_vocabulary_runs_on_its_options_alone(tmp_path):
    keys = make_images(tmp_path, 6, size=(32, 32))
    opts = VocabularyOptions(
        VocabularyConfig(k=4, seed=3),
        ExtractionOptions(ImageSpec((32, 32), "fixed"), 2, 1),
        pool_bytes=MIB,
        sets=2,
        centres="raw",
    )
    voc = build_vocabulary(TinyBackbone(), opts, [(tmp_path, keys)], name="t")
    assert voc.k == 4 and voc.metadata["sets"] == 2 and voc.metadata["centres"] == "raw"
    assert voc.metadata["n_images"] == 6 and voc.metadata["pool_max_bytes"] == MIB
    assert voc.metadata["identity"]["image"] == {"size": [32, 32], "resize": "fixed"}
