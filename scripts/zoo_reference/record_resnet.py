"""Record torchvision's ResNets for vprkit's ``resnet*`` backbones (run in ``.venv-ref``: torch + torchvision).

Writes two fixtures under ``tests/zoo/fixtures/``:

- ``resnet_torchvision_keys.json``: torchvision's ``state_dict()`` name → shape list of every depth (``fc``
  included), so the test proves vprkit's tree has the same names in the same order without torchvision;
- ``resnet.npz``: ResNet-18 and ResNet-50 (``layer4`` and ``layer3``) dense maps on seeded weights and
  seeded images, computed by torchvision's modules in eval mode (ImageNet normalisation, as torchvision's
  ``transforms.Normalize`` does it), channels last like vprkit's ``DenseFeatures``.

Usage: ``.venv-ref/bin/python scripts/zoo_reference/record_resnet.py``
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "zoo" / "fixtures"
DEPTHS = (18, 34, 50, 101, 152)
RECORDED = {"resnet18": 11, "resnet50": 12}  # name → weight seed
SIZES = ((64, 96), (100, 68))
BATCH = 2
IMAGE_SEED = 1
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _seeded_module():
    spec = importlib.util.spec_from_file_location("seeded", ROOT / "tests" / "zoo" / "seeded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    seeded = _seeded_module()
    keys = {}
    for depth in DEPTHS:
        net = getattr(torchvision.models, f"resnet{depth}")()
        keys[f"resnet{depth}"] = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    meta_keys = {"torchvision": torchvision.__version__, "models": keys}
    (FIXTURES / "resnet_torchvision_keys.json").write_text(json.dumps(meta_keys, indent=0) + "\n")

    images = seeded.seeded_images(SIZES, batch=BATCH, seed=IMAGE_SEED)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    outputs, models = {}, {}
    for name, seed in RECORDED.items():
        net = getattr(torchvision.models, name)().eval()
        shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
        weights = seeded.seeded_state_dict(shapes, seed)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
        models[name] = {"seed": seed, "checksum": seeded.checksum(weights), "shapes": shapes}
        stem = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)
        with torch.no_grad():
            for (h, w), pixels in zip(SIZES, images):
                x = (torch.from_numpy(pixels) - mean) / std
                layer3 = net.layer3(stem(x))
                layer4 = net.layer4(layer3)
                outputs[f"{name}/layer3/{h}x{w}"] = layer3.permute(0, 2, 3, 1).numpy()
                outputs[f"{name}/layer4/{h}x{w}"] = layer4.permute(0, 2, 3, 1).numpy()
    meta = {
        "repository": "pytorch/vision (torchvision.models.resnet)",
        "commit": f"torchvision {torchvision.__version__}",
        "torch": torch.__version__,
        "models": models,
        "sizes": [list(s) for s in SIZES],
        "batch": BATCH,
        "image_seed": IMAGE_SEED,
        "normalisation": {"mean": MEAN, "std": STD},
    }
    seeded.write_fixture(str(FIXTURES / "resnet.npz"), meta, outputs)
    print("wrote", sorted(outputs))


if __name__ == "__main__":
    main()
