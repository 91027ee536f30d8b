"""vprkit's ResNets against torchvision's: the same parameter names and shapes, the same dense maps.

Fixtures recorded from torchvision in ``.venv-ref`` by ``scripts/zoo_reference/record_resnet.py``;
this test needs neither torchvision nor a network.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from vprkit.backbones import build_backbone
from vprkit.errors import ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "zoo" / "fixtures"
_spec = importlib.util.spec_from_file_location("zoo_seeded", FIXTURES.parent / "seeded.py")
seeded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeded)

TORCHVISION_KEYS = json.loads((FIXTURES / "resnet_torchvision_keys.json").read_text())["models"]
CLASSIFIER = ("fc.",)  # torchvision's head, which the backbone does not build


@pytest.mark.parametrize("name", sorted(TORCHVISION_KEYS))
def test_state_dict_names_and_shapes_are_torchvisions(name):
    ours = [[k, list(v.shape)] for k, v in build_backbone(name, trainable=True, pretrained=False).state_dict().items()]
    theirs = [[k, s] for k, s in TORCHVISION_KEYS[name] if not k.startswith(CLASSIFIER)]
    assert ours == theirs


def test_layer3_cut_keeps_torchvisions_names_up_to_layer3():
    ours = list(build_backbone("resnet50", trainable=True, pretrained=False, cut="layer3").state_dict())
    theirs = [k for k, _ in TORCHVISION_KEYS["resnet50"] if not k.startswith(CLASSIFIER + ("layer4.",))]
    assert ours == theirs


@pytest.fixture(scope="module")
def recorded():
    return seeded.read_fixture(str(FIXTURES / "resnet.npz"))


def _seeded(name: str, meta: dict, cut: str, trainable: bool):
    model = meta["models"][name]
    weights = seeded.seeded_state_dict(model["shapes"], model["seed"])
    assert seeded.checksum(weights) == model["checksum"]
    net = build_backbone(name, trainable=True, pretrained=False, cut=cut)
    own = net.state_dict()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items() if k in own}, strict=True)
    return net.eval() if trainable else net.optimise_for_inference()


@pytest.mark.parametrize("trainable", [True, False], ids=["batchnorm", "folded"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("cut", ["layer3", "layer4"])
def test_dense_maps_equal_torchvisions(recorded, name, cut, trainable):
    meta, outputs = recorded
    net = _seeded(name, meta, cut, trainable)
    images = seeded.seeded_images(meta["sizes"], batch=meta["batch"], seed=meta["image_seed"])
    for (h, w), pixels in zip(meta["sizes"], images):
        with torch.inference_mode():
            feats = net(torch.from_numpy(pixels))
        official = outputs[f"{name}/{cut}/{h}x{w}"]
        assert feats.stride == (16 if cut == "layer3" else 32) and feats.image_size == (h, w)
        assert seeded.relative_difference(feats.patches.numpy(), official) <= seeded.REL_TOLERANCE


def test_trainable_graph_gets_gradients_and_freezes_by_block():
    net = build_backbone("resnet18", trainable=True, pretrained=False)
    assert net.num_trainable_blocks == 1 + 8  # the stem, then 2 + 2 + 2 + 2 basic blocks
    net.set_trainable(last_blocks=2)
    net.train()
    net(torch.rand(2, 3, 64, 64)).patches.sum().backward()
    trained = {n for n, p in net.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in net.named_parameters() if n.startswith("layer4.")}
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_identity_and_errors():
    net = build_backbone("resnet34", pretrained=False, cut="layer3")
    assert net.identity() == {"backbone": "resnet34", "dim": 256, "stride": 16, "cut": "layer3", "weights": None}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # folded for inference
    with pytest.raises(ConfigError, match="cut"):
        build_backbone("resnet18", pretrained=False, cut="layer2")


def test_imagenet_file_in_torchvisions_layout_loads(tmp_path, recorded):
    meta, outputs = recorded
    model = meta["models"]["resnet18"]
    weights = seeded.seeded_state_dict(model["shapes"], model["seed"])  # includes torchvision's fc.*
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)
    net = build_backbone("resnet18", weights=str(path))
    (h, w), pixels = meta["sizes"][0], seeded.seeded_images(meta["sizes"][:1], meta["batch"], meta["image_seed"])[0]
    with torch.inference_mode():
        patches = net(torch.from_numpy(pixels)).patches.numpy()
    assert seeded.relative_difference(patches, outputs[f"resnet18/layer4/{h}x{w}"]) <= seeded.REL_TOLERANCE
    assert net.identity()["weights"] == path.name


@pytest.mark.parametrize("name,last", [("resnet18", 3), ("resnet50", 1)])
def test_split_prefix_then_suffix_is_the_backbone(name, last):
    torch.manual_seed(0)
    net = build_backbone(name, trainable=True, pretrained=False).eval()
    prefix, suffix = net.split(last)
    x = torch.rand(2, 3, 72, 104)
    with torch.no_grad():
        whole, parts = net(x), suffix(prefix(x))
    assert torch.allclose(parts.patches, whole.patches, atol=1e-5) and parts.stride == whole.stride
    assert prefix.identity()["blocks"] == len(net.blocks()) - last and prefix.stride == (32 if last < 3 else 16)
    assert {id(p) for p in suffix.parameters()} <= {id(p) for p in net.parameters()}
    with pytest.raises(ConfigError, match="residual blocks"):
        net.split(len(net.blocks()))


def test_random_resnet_is_the_same_network_every_time_and_leaves_the_callers_rng():
    """A map built with pretrained=False in one process and queried in another must see the same network."""
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_backbone("resnet18", pretrained=False)
    after = torch.rand(1)
    b = build_backbone("resnet18", pretrained=False)
    assert torch.equal(before, after)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
