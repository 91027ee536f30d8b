"""Record the official DINOv2 SALAD (serizba/salad) on seeded weights for ``tests/zoo/test_salad.py``.

Run in ``.venv-ref`` (torch + torchvision) with the official repositories exported as work trees::

    mkdir -p /tmp/official/serizba+salad /tmp/official/facebookresearch+dinov2
    git --git-dir=/work/.mirror/serizba+salad/repo archive HEAD models vpr_model.py | tar -x -C /tmp/official/serizba+salad
    git --git-dir=/work/.mirror/facebookresearch+dinov2/repo archive HEAD dinov2 | tar -x -C /tmp/official/facebookresearch+dinov2
    .venv-ref/bin/python scripts/zoo_reference/record_salad.py

The model is their ``VPRModel`` built exactly as their ``eval.py`` (``load_model``) does. Their DINOv2 wrapper
calls ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitb14')``: here that call returns the model built by
the official ``dinov2/hub/backbones.py`` of the exported work tree with ``pretrained=False`` (no network; the
weights are seeded). Training-only imports (``pytorch_lightning``, their ``utils`` with pytorch-metric-learning)
are stubbed: ``LightningModule`` becomes ``nn.Module`` (``save_hyperparameters`` a no-op), the loss and miner ``None`` (they hold no tensors).
Images: ``seeded_images`` in [0, 1], normalised as their ``input_transform`` (ImageNet mean / std); the sizes
are multiples of 14, so no resizing (their 322×322 evaluation size and a non-square one).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "zoo" / "fixtures" / "salad.npz"
OFFICIAL = Path("/tmp/official/serizba+salad")
DINOV2 = Path("/tmp/official/facebookresearch+dinov2")
MIRRORS = {"salad": "/work/.mirror/serizba+salad/repo", "dinov2": "/work/.mirror/facebookresearch+dinov2/repo"}
SIZES = ((322, 322), (224, 308))
BATCH = 2
WEIGHT_SEED = 28
IMAGE_SEED = 1
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKBONE_CONFIG = {"num_trainable_blocks": 4, "return_token": True, "norm_layer": True}  # their eval.py
AGG_CONFIG = {"num_channels": 768, "num_clusters": 64, "cluster_dim": 128, "token_dim": 256}


def _seeded_module():
    spec = importlib.util.spec_from_file_location("seeded", ROOT / "tests" / "zoo" / "seeded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stub_training_imports() -> None:
    lightning = types.ModuleType("pytorch_lightning")
    lightning.LightningModule = type("LightningModule", (torch.nn.Module,), {"save_hyperparameters": lambda self: None})
    utils = types.ModuleType("utils")
    utils.get_loss = lambda name: None
    utils.get_miner = lambda name, margin: None
    sys.modules["pytorch_lightning"] = lightning
    sys.modules["utils"] = utils


def _local_hub() -> None:
    """``torch.hub.load('facebookresearch/dinov2', name)`` → the official hub builder, no weights."""
    sys.path.insert(0, str(DINOV2))
    from dinov2.hub import backbones

    def load(repo: str, name: str, **kwargs):
        assert repo == "facebookresearch/dinov2", repo
        return getattr(backbones, name)(pretrained=False)

    torch.hub.load = load


def main() -> None:
    seeded = _seeded_module()
    _stub_training_imports()
    _local_hub()
    sys.path.insert(0, str(OFFICIAL))
    from vpr_model import VPRModel

    model = VPRModel(
        backbone_arch="dinov2_vitb14", backbone_config=BACKBONE_CONFIG, agg_arch="SALAD", agg_config=AGG_CONFIG
    )
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    weights = seeded.seeded_state_dict(shapes, WEIGHT_SEED)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}, strict=True)
    model.eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    outputs = {}
    with torch.no_grad():
        for (h, w), pixels in zip(SIZES, seeded.seeded_images(SIZES, batch=BATCH, seed=IMAGE_SEED)):
            outputs[f"{h}x{w}"] = model((torch.from_numpy(pixels) - mean) / std).numpy()
    commits = {
        k: subprocess.run(["git", "--git-dir", v, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        for k, v in MIRRORS.items()
    }
    meta = {
        "method": "dinov2-salad",
        "repository": "serizba/salad (vpr_model.VPRModel, models/); DINOv2 from facebookresearch/dinov2 hub code",
        "commit": commits["salad"],
        "dinov2_commit": commits["dinov2"],
        "torch": torch.__version__,
        "shapes": shapes,
        "weight_seed": WEIGHT_SEED,
        "image_seed": IMAGE_SEED,
        "sizes": [list(s) for s in SIZES],
        "batch": BATCH,
        "checksum": seeded.checksum(weights),
        "constructor": {"backbone_arch": "dinov2_vitb14", "backbone_config": BACKBONE_CONFIG, "agg_config": AGG_CONFIG},
        "normalisation": {"mean": MEAN, "std": STD},
    }
    seeded.write_fixture(str(FIXTURE), meta, outputs)
    print("wrote", FIXTURE, {k: v.shape for k, v in outputs.items()})


if __name__ == "__main__":
    main()
