"""Record the official BoQ models' descriptors on seeded weights and images (run in ``.venv-ref``).

Builds the authors' hub ``VPRModel`` (github.com/amaralibey/Bag-of-Queries, ``hubconf.py``: the
``src/backbones.py`` ResNet / DinoV2 wrappers and ``src/boq.py``) with the constructor arguments of
``get_trained_boq`` — without downloading anything: the ResNet is built with ``pretrained=False``, and
the DinoV2 wrapper's ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitb14')`` is answered by the
official DINOv2 code's own hub constructor (``dinov2.hub.backbones.dinov2_vitb14(pretrained=False)``)
from an exported working tree of facebookresearch/dinov2. Its ``state_dict`` is filled with
:func:`seeded.seeded_state_dict`; the model runs in eval mode on :func:`seeded.seeded_images`,
normalised as the README's transform does (ImageNet mean/std on pixels in [0, 1]; no resizing here).

Sizes: each model's evaluation size and one non-square size the head accepts.

    .venv-ref/bin/python scripts/zoo_reference/record_boq.py /tmp/official/boq /tmp/official/dinov2
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MIRRORS = {
    "boq": "/work/.mirror/amaralibey+Bag-of-Queries/repo",
    "dinov2": "/work/.mirror/facebookresearch+dinov2/repo",
}
SIZES = {"resnet50": [(384, 384), (256, 352)], "dinov2": [(322, 322), (224, 308)]}
OUTPUT_DIMS = {"resnet50": 16384, "dinov2": 12288}
BATCH = 2
WEIGHT_SEED = 28
IMAGE_SEED = 1
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _load_seeded():
    spec = importlib.util.spec_from_file_location("seeded", ROOT / "tests/zoo/seeded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commit(name: str) -> str:
    return subprocess.check_output(["git", "--git-dir", MIRRORS[name], "rev-parse", "HEAD"], text=True).strip()


def _offline_dinov2_hub(dinov2_tree: Path) -> None:
    """``torch.hub.load('facebookresearch/dinov2', NAME)`` → the official constructor, no weights."""
    sys.path.insert(0, str(dinov2_tree))
    from dinov2.hub import backbones as dinov2_hub

    def load(repo: str, model: str, *args, **kwargs):
        assert repo == "facebookresearch/dinov2", repo
        return getattr(dinov2_hub, model)(pretrained=False)

    torch.hub.load = load


def build_official(boq_tree: Path, dinov2_tree: Path, backbone: str) -> torch.nn.Module:
    """``hubconf.get_trained_boq(backbone, dim)`` without its final ``load_state_dict`` (no download)."""
    _offline_dinov2_hub(dinov2_tree)
    sys.path.insert(0, str(boq_tree))
    import hubconf
    from backbones import DinoV2, ResNet
    from boq import BoQ

    dim = OUTPUT_DIMS[backbone]
    if backbone == "dinov2":
        net = DinoV2()
        proj = 384
    else:
        net = ResNet(backbone_name=backbone, pretrained=False, crop_last_block=True)
        proj = 512
    head = BoQ(in_channels=net.out_channels, proj_channels=proj, num_queries=64, num_layers=2, row_dim=dim // proj)
    return hubconf.VPRModel(backbone=net, aggregator=head).eval()


def record(boq_tree: Path, dinov2_tree: Path, seeded, backbone: str) -> tuple[dict, dict]:
    model = build_official(boq_tree, dinov2_tree, backbone)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    weights = seeded.seeded_state_dict(shapes, WEIGHT_SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    outputs = {}
    with torch.no_grad():
        for (h, w), pixels in zip(SIZES[backbone], seeded.seeded_images(SIZES[backbone], BATCH, IMAGE_SEED)):
            descriptors, _ = model((torch.from_numpy(pixels) - mean) / std)
            outputs[f"{backbone}/{h}x{w}"] = descriptors.numpy()
    meta = {
        "constructor": {"backbone_name": backbone, "output_dim": OUTPUT_DIMS[backbone]},
        "shapes": shapes,
        "checksum": seeded.checksum(weights),
        "sizes": SIZES[backbone],
    }
    return meta, outputs


def main() -> None:
    boq_tree = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/official/boq")
    dinov2_tree = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/official/dinov2")
    seeded = _load_seeded()
    torch.set_num_threads(2)
    meta = {
        "method": "boq",
        "repository": "https://github.com/amaralibey/Bag-of-Queries",
        "commit": _commit("boq"),
        "dinov2_repository": "https://github.com/facebookresearch/dinov2",
        "dinov2_commit": _commit("dinov2"),
        "weight_seed": WEIGHT_SEED,
        "image_seed": IMAGE_SEED,
        "batch": BATCH,
        "torch": torch.__version__,
        "variants": {},
    }
    outputs = {}
    for backbone in SIZES:
        variant_meta, variant_outputs = record(boq_tree, dinov2_tree, seeded, backbone)
        meta["variants"][backbone] = variant_meta
        outputs.update(variant_outputs)
    path = ROOT / "tests/zoo/fixtures/boq.npz"
    seeded.write_fixture(str(path), meta, outputs)
    print(path, {k: v.shape for k, v in outputs.items()})


if __name__ == "__main__":
    main()
