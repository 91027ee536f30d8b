"""NetVLAD from Relja Arandjelović's MATLAB models equals hloc's port (``hloc/extractors/netvlad.py``).

The fixture was recorded by ``scripts/zoo_reference/record_netvlad.py``: seeded weights written as a
``.mat`` in the struct layout hloc reads (``netvlad_mat.py``, shared with this test), loaded and run by
hloc's own ``NetVLAD`` module. Here the same ``.mat`` is rebuilt from the fixture's shapes and seed and
loaded through vprkit's ``netvlad-pitts30k`` preset (``vgg16-conv5`` with ``input_norm="matconvnet"`` and
the ``netvlad`` aggregator, both ``zoo=`` the entry, ``weights=`` the file). The whitening's output is 128
instead of the released 4096 (see the record script): vprkit sizes its layer from the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import netvlad_mat
import seeded
from vprkit import presets
from vprkit.aggregation.options import AggregationOptions
from vprkit.aggregation.vocabulary import make_aggregator
from vprkit.errors import WeightsNotFoundError
from vprkit.pipeline.models import load_backbone, needs_vocabulary

FIXTURE = Path(__file__).parent / "fixtures" / "netvlad.npz"
PRESET = "netvlad-pitts30k"


@pytest.fixture(scope="module")
def recorded():
    return seeded.read_fixture(str(FIXTURE))


@pytest.fixture(scope="module")
def weights(recorded):
    meta, _ = recorded
    w = netvlad_mat.seeded_netvlad_weights(meta["shapes"], meta["weight_seed"])
    assert seeded.checksum(w) == meta["checksum"], "the seeded weights differ from the recorded ones"
    return w


@pytest.fixture(scope="module")
def mat_file(weights, tmp_path_factory):
    return netvlad_mat.write_netvlad_mat(tmp_path_factory.mktemp("netvlad") / "Pitts30K_struct.mat", weights)


@pytest.fixture(scope="module")
def model(mat_file):
    config = presets.resolve(PRESET, weights=mat_file, device="cpu")
    backbone = load_backbone(config).eval()
    return config, backbone, make_aggregator(AggregationOptions.from_config(config), backbone, None).eval()


def test_descriptors_equal_hlocs(recorded, model):
    meta, outputs = recorded
    config, backbone, aggregator = model
    assert not needs_vocabulary(config)
    sizes = [tuple(s) for s in meta["sizes"]]
    assert len({h == w for h, w in sizes}) == 2, "a square and a non-square size"
    for (h, w), images in zip(sizes, seeded.seeded_images(sizes, meta["batch"], meta["image_seed"])):
        with torch.no_grad():
            ours = aggregator(backbone(torch.from_numpy(images))).numpy()
        official = outputs[f"{h}x{w}"]
        diff = seeded.relative_difference(ours, official)
        print(f"netvlad {h}x{w}: max relative difference {diff:.2e}")
        assert diff <= seeded.REL_TOLERANCE, f"{h}x{w}: {diff:.2e}"


def test_identity_dim_and_preset(recorded, model):
    meta, _ = recorded
    config, backbone, aggregator = model
    k, dim = meta["shapes"]["netvlad.score_proj.weight"][:2]
    assert aggregator.dim == meta["whiten_dim"]  # sized from the file (the released one: 4096)
    ident = aggregator.identity()
    assert ident["netvlad"] == PRESET and ident["k"] == k and ident["wpca"] is True
    assert backbone.identity()["input_norm"] == "matconvnet" and backbone.dim == dim
    assert config.backbone_options["zoo"] == config.aggregator_options["zoo"] == PRESET
    assert "4096-d" in presets.PRESETS.get("netvlad-tokyotm").description


def test_trainable_head_gets_gradients(mat_file):
    from vprkit.aggregation import AGGREGATORS
    from vprkit.backbones.base import DenseFeatures

    agg = AGGREGATORS.get("netvlad")(512, zoo=PRESET, weights=str(mat_file), trainable=True)
    feats = DenseFeatures(torch.randn(2, 3, 4, 512), 16, (48, 64))
    agg(feats).square().sum().backward()
    for name, p in agg.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_mean_colour_is_the_backbones():
    from vprkit.backbones.vgg16 import MATCONVNET_MEAN
    from vprkit.zoo import netvlad as zoo_netvlad

    assert zoo_netvlad.MATCONVNET_MEAN == MATCONVNET_MEAN
    assert tuple(netvlad_mat.average_image()[0, 0].tolist()) == pytest.approx(MATCONVNET_MEAN)


def test_wrong_files_are_one_line_errors(weights, tmp_path):
    from scipy.io import savemat

    other = tmp_path / "other.mat"
    net = netvlad_mat.netvlad_struct(weights)
    net["meta"]["normalization"]["averageImage"] = netvlad_mat.average_image() + 10  # another mean colour
    savemat(str(other), {"net": net})
    config = presets.resolve(PRESET, weights=other)  # resolving reads nothing; loading does
    with pytest.raises(WeightsNotFoundError, match="mean colour") as err:
        load_backbone(config)
    assert "\n" not in str(err.value)
    torch_file = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, torch_file)
    with pytest.raises(WeightsNotFoundError) as err:
        load_backbone(presets.resolve(PRESET, weights=torch_file))
    assert "\n" not in str(err.value)
    truncated = tmp_path / "truncated.mat"
    net = netvlad_mat.netvlad_struct(weights)
    net["layers"] = net["layers"][:, :20]
    savemat(str(truncated), {"net": net})
    with pytest.raises(WeightsNotFoundError, match="layers") as err:
        load_backbone(presets.resolve(PRESET, weights=truncated))
    assert "\n" not in str(err.value)
