"""Record hloc's NetVLAD (VGG16 + NetVLAD + whitening, read from Relja Arandjelović's MATLAB model) on seeded weights.

Run in ``.venv-ref`` (torch + torchvision) with hloc exported from its mirror::

    mkdir -p /tmp/official/hloc && git --git-dir=/work/.mirror/cvg+Hierarchical-Localization/repo archive HEAD \\
        | tar -x -C /tmp/official/hloc
    .venv-ref/bin/pip install packaging   # hloc/__init__.py imports it
    .venv-ref/bin/python scripts/zoo_reference/record_netvlad.py --hloc /tmp/official/hloc

The key → shape list is that of hloc's modules (torchvision's ``vgg16().features`` minus its last ReLU and
max-pool, hloc's ``NetVLADLayer``, the whitening ``Linear``), with the whitening's *output* reduced from 4096
to ``WHITEN_DIM``: hloc builds ``nn.Linear(32768, 4096)`` but then replaces its weight and bias by whatever
the ``.mat`` holds, so its code path runs unchanged at any output size, while the full 4096 × 32768 matrix
(540 MB as a ``.mat``) would be far too big for a test to regenerate. The seeded weights are written as a
``.mat`` in the struct layout hloc reads (``tests/zoo/netvlad_mat.py``, shared with the test), put where
hloc's ``NetVLAD`` looks for its checkpoint (``torch.hub.get_dir()/netvlad/<model_name>.mat``, so nothing is
downloaded), loaded by hloc's own ``_init`` and run by its ``_forward`` on [0, 1] images, as hloc's
``extract_features`` feeds them (no resize here: the sizes are multiples of 16, which vprkit's VGG16 needs).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "zoo"))
import netvlad_mat  # noqa: E402
import seeded  # noqa: E402

MIRROR = Path("/work/.mirror/cvg+Hierarchical-Localization/repo")
MODEL_NAME = "VGG16-NetVLAD-Pitts30K"
WHITEN_DIM = 128
SIZES = ((224, 224), (192, 288))
BATCH = 2
IMAGE_SEED = 1


def official_shapes(hloc_netvlad, whiten_dim: int = WHITEN_DIM) -> dict[str, list[int]]:
    """hloc's parameter names and shapes, built the way hloc's ``NetVLAD._init`` builds its modules."""
    import torchvision.models as models

    backbone = torch.nn.Sequential(*list(list(models.vgg16().children())[0].children())[:-2])
    layer = hloc_netvlad.NetVLADLayer()
    shapes = {f"backbone.{k}": list(v.shape) for k, v in backbone.state_dict().items()}
    shapes.update({f"netvlad.{k}": list(v.shape) for k, v in layer.state_dict().items()})
    shapes["whiten.weight"] = [whiten_dim, layer.output_dim]
    shapes["whiten.bias"] = [whiten_dim]
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hloc", default="/tmp/official/hloc", help="exported hloc work tree")
    parser.add_argument("--out", default=str(ROOT / "tests" / "zoo" / "fixtures" / "netvlad.npz"))
    parser.add_argument(
        "--whiten-dim", type=int, default=WHITEN_DIM, help="WPCA output (the released models: 4096; ~600 MB .mat)"
    )
    args = parser.parse_args()
    sys.path.insert(0, args.hloc)
    from hloc.extractors import netvlad as hloc_netvlad

    torch.set_grad_enabled(False)
    shapes = official_shapes(hloc_netvlad, args.whiten_dim)
    weights = netvlad_mat.seeded_netvlad_weights(shapes)
    with tempfile.TemporaryDirectory() as hub:
        torch.hub.set_dir(hub)
        checkpoint = Path(hub, "netvlad", MODEL_NAME + ".mat")  # where hloc looks before downloading
        checkpoint.parent.mkdir()
        netvlad_mat.write_netvlad_mat(checkpoint, weights)
        model = hloc_netvlad.NetVLAD({"model_name": MODEL_NAME, "whiten": True}).eval()
    loaded = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(loaded) == sorted(weights), (sorted(loaded), sorted(weights))
    for k, v in weights.items():  # the .mat writer is the exact inverse of hloc's reader
        np.testing.assert_array_equal(loaded[k].reshape(v.shape), v, err_msg=k)
    assert np.array_equal(np.asarray(model.preprocess["mean"]), netvlad_mat.average_image()[0, 0])
    outputs = {}
    for (h, w), images in zip(SIZES, seeded.seeded_images(SIZES, BATCH, IMAGE_SEED)):
        outputs[f"{h}x{w}"] = model({"image": torch.from_numpy(images)})["global_descriptor"].numpy()
    commit = subprocess.run(
        ["git", f"--git-dir={MIRROR}", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    meta = {
        "method": "netvlad",
        "repository": "cvg/Hierarchical-Localization",
        "file": "hloc/extractors/netvlad.py",
        "commit": commit,
        "model_name": MODEL_NAME,
        "whiten_dim": args.whiten_dim,
        "shapes": shapes,
        "weight_seed": netvlad_mat.WEIGHT_SEED,
        "assignment_scale": netvlad_mat.ASSIGNMENT_SCALE,
        "centre_scale": netvlad_mat.CENTRE_SCALE,
        "whiten_bias_scale": netvlad_mat.WHITEN_BIAS_SCALE,
        "average_image": netvlad_mat.average_image().tolist(),
        "image_seed": IMAGE_SEED,
        "sizes": [list(s) for s in SIZES],
        "batch": BATCH,
        "checksum": seeded.checksum(weights),
        "torch": torch.__version__,
    }
    seeded.write_fixture(args.out, meta, outputs)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in outputs.items()))


if __name__ == "__main__":
    main()
