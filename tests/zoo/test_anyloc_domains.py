"""AnyLoc's published domain vocabularies (``c_centers.pt``) encode as AnyLoc's own VLAD does.

The fixture was recorded by ``scripts/zoo_reference/record_anyloc_domains.py``: AnyLoc's ``demo/utilities.py``
``VLAD`` loading a seeded 32×1536 ``c_centers.pt`` from a cache laid out as AnyLoc's, encoding seeded
descriptors (stand-ins for DINOv2 ViT-G/14 layer-31 values; the extraction is covered by the DINOv2 tests).
Here the same centres are ``torch.save``-d the same way, found through the zoo (``zoo:anyloc-urban`` with
AnyLoc's unzipped ``cache/vocabulary`` folder), read by ``Vocabulary.from_anyloc`` and encoded by the
``vlad`` aggregator the ``anyloc-urban`` preset builds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import anyloc_centres
import seeded
from vprkit import presets
from vprkit.aggregation.options import AggregationOptions
from vprkit.aggregation.vlad import Vocabulary
from vprkit.aggregation.vocabulary import make_aggregator
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import WeightsNotFoundError
from vprkit.zoo import anyloc

FIXTURE = Path(__file__).parent / "fixtures" / "anyloc_domains.npz"
PRESET = "anyloc-urban"
PATCH = 14


class ViTG14Layer31:
    """What the pipeline reads of the preset's backbone when it makes the aggregator (its identity and dim)."""

    dim = anyloc.EMBED_DIM

    def identity(self) -> dict:
        return {"backbone": anyloc.MODEL, "dim": self.dim, "stride": PATCH, "layer": anyloc.LAYER, "facet": "value"}


@pytest.fixture(scope="module")
def recorded():
    return seeded.read_fixture(str(FIXTURE))


@pytest.fixture(scope="module")
def anyloc_cache(recorded, tmp_path_factory):
    """AnyLoc's unzipped ``cache/vocabulary`` folder holding the seeded centres as ``urban``."""
    meta, _ = recorded
    centres = anyloc_centres.seeded_centres(meta["num_clusters"], meta["dim"], meta["centre_seed"])
    assert seeded.checksum({"c_centers": centres}) == meta["checksum"]
    root = tmp_path_factory.mktemp("cache") / "vocabulary"
    path = root / anyloc.relative_path("urban")
    path.parent.mkdir(parents=True)
    torch.save(torch.from_numpy(centres), path)  # as AnyLoc's VLAD.fit caches them
    return root, centres


def test_vlad_equals_anylocs_own(recorded, anyloc_cache):
    meta, outputs = recorded
    root, centres = anyloc_cache
    config = presets.resolve(PRESET)
    voc = Vocabulary.from_anyloc(anyloc.vocabulary_file(config.vocabulary.source, root))
    np.testing.assert_array_equal(voc.centres, centres)
    assert voc.kind == "raw" and voc.metadata["domain"] == "urban" and voc.k == config.vocabulary.k
    aggregator = make_aggregator(AggregationOptions.from_config(config), ViTG14Layer31(), voc)
    assert aggregator.dim == meta["num_clusters"] * meta["dim"]
    grids = [tuple(g) for g in meta["grids"]]
    assert len({h == w for h, w in grids}) == 2, "a square and a non-square grid"
    for (h, w), descs in zip(grids, anyloc_centres.seeded_descriptors(centres, grids, meta["batch"])):
        feats = DenseFeatures(torch.from_numpy(descs).reshape(len(descs), h, w, -1), PATCH, (h * PATCH, w * PATCH))
        ours = aggregator(feats).numpy()
        diff = seeded.relative_difference(ours, outputs[f"{h}x{w}"])
        print(f"anyloc urban {h}x{w}: max relative difference {diff:.2e}")
        assert diff <= seeded.REL_TOLERANCE, f"{h}x{w}: {diff:.2e}"


def test_the_vocabulary_refuses_other_descriptors(anyloc_cache):
    from vprkit.errors import VocabularyMismatchError

    root, _ = anyloc_cache
    voc = Vocabulary.from_anyloc(anyloc.vocabulary_file("zoo:anyloc-urban", root))
    assert voc.metadata["identity"] == {"backbone": "dinov2_vitg14", "layer": 31, "facet": "value", "dim": 1536}
    with pytest.raises(VocabularyMismatchError, match="layer"):
        voc.check_compatible({**ViTG14Layer31().identity(), "layer": 23})


def test_presets_entries_and_the_missing_file_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VPRKIT_CACHE", str(tmp_path))
    for domain in anyloc.DOMAINS:
        config = presets.resolve(f"anyloc-{domain}")
        assert config.vocabulary.source == f"zoo:anyloc-{domain}" and config.vocabulary.centres == "raw"
        assert config.aggregator == "vlad" and config.aggregator_options["centres"] == "raw"
        assert config.backbone_options == {"layer": 31, "facet": "value"} and config.backbone == "dinov2_vitg14"
        assert f"{anyloc.NUM_CLUSTERS * anyloc.EMBED_DIM}-d" in config.description
    with pytest.raises(WeightsNotFoundError) as err:
        anyloc.vocabulary_file("zoo:anyloc-indoor")  # never downloaded: the zip's member and where to put it
    message = str(err.value)
    assert "\n" not in message and "cache/vocabulary/dinov2_vitg14/l31_value_c32/indoor/c_centers.pt" in message
    assert str(tmp_path) in message
