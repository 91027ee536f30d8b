"""Record the official MegaLoc (gmberton/MegaLoc ``megaloc_model.MegaLoc``) on seeded weights for ``tests/zoo/test_megaloc.py``.

Run in ``.venv-ref`` (torch + torchvision) with the official repository exported as a work tree::

    mkdir -p /tmp/official/gmberton+MegaLoc
    git --git-dir=/work/.mirror/gmberton+MegaLoc/repo archive HEAD | tar -x -C /tmp/official/gmberton+MegaLoc
    .venv-ref/bin/python scripts/zoo_reference/record_megaloc.py

The model is built as their ``hubconf.get_trained_model`` builds it (``MegaLoc()``), without downloading: its
``state_dict()`` names and shapes are filled with seeded weights. Images: ``seeded_images`` in [0, 1] with
ImageNet normalisation (MegaLoc expects normalised tensors). Sizes: 322×322, a non-square multiple of 14
(224×308, which exercises the position-embedding fix of commit 4a23a2b), and 315×203, not a multiple of 14,
which MegaLoc's ``forward`` itself resizes to ``round(315/14)·14 × round(203/14)·14`` = 308×196 (Python's round:
22.5 → 22, 14.5 → 14) with ``torchvision.transforms.functional.resize(antialias=True)`` (bilinear) on the
normalised tensor.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "zoo" / "fixtures" / "megaloc.npz"
OFFICIAL = Path("/tmp/official/gmberton+MegaLoc")
MIRROR = "/work/.mirror/gmberton+MegaLoc/repo"
SIZES = ((322, 322), (224, 308), (315, 203))
BATCH = 2
WEIGHT_SEED = 29
IMAGE_SEED = 1
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _seeded_module():
    spec = importlib.util.spec_from_file_location("seeded", ROOT / "tests" / "zoo" / "seeded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    seeded = _seeded_module()
    sys.path.insert(0, str(OFFICIAL))
    from megaloc_model import MegaLoc

    model = MegaLoc()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    weights = seeded.seeded_state_dict(shapes, WEIGHT_SEED)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}, strict=True)
    model.eval()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    outputs = {}
    with torch.no_grad():
        for (h, w), pixels in zip(SIZES, seeded.seeded_images(SIZES, batch=BATCH, seed=IMAGE_SEED)):
            outputs[f"{h}x{w}"] = model((torch.from_numpy(pixels) - mean) / std).numpy()
    commit = subprocess.run(["git", "--git-dir", MIRROR, "rev-parse", "HEAD"], capture_output=True, text=True)
    meta = {
        "method": "megaloc",
        "repository": "gmberton/MegaLoc (megaloc_model.MegaLoc)",
        "commit": commit.stdout.strip(),
        "torch": torch.__version__,
        "shapes": shapes,
        "weight_seed": WEIGHT_SEED,
        "image_seed": IMAGE_SEED,
        "sizes": [list(s) for s in SIZES],
        "batch": BATCH,
        "checksum": seeded.checksum(weights),
        "constructor": {"feat_dim": 8448, "num_clusters": 64, "cluster_dim": 256, "token_dim": 256, "mlp_dim": 512},
        "normalisation": {"mean": MEAN, "std": STD},
    }
    seeded.write_fixture(str(FIXTURE), meta, outputs)
    print("wrote", FIXTURE, {k: v.shape for k, v in outputs.items()})


if __name__ == "__main__":
    main()
