"""Record the official CosPlace and EigenPlaces networks on seeded weights (run in ``.venv-ref``).

Exports both repositories from their mirrors (``/work/.mirror/gmberton+CosPlace/repo``,
``…+EigenPlaces/repo``, or ``--mirrors DIR``), imports their ``GeoLocalizationNet`` /
``GeoLocalizationNet_``, builds each recorded backbone × dim *without downloading anything* (CosPlace's
ImageNet start and EigenPlaces' torch.hub load of a CosPlace model are replaced by an untrained
torchvision network / nothing: the seeded weights overwrite every tensor anyway), fills its
``state_dict`` from ``seeded.seeded_state_dict`` (GeM's ``p`` = 3), loads it strictly, and runs it in eval
mode on ``seeded.seeded_images`` normalised as their test datasets do (``transforms.Normalize`` with
ImageNet mean/std on pixels in [0, 1]; no resize: ``--resize_test_imgs`` is off by default).

Writes ``tests/zoo/fixtures/cosplace.npz``: outputs keyed ``<method>/<Backbone>/<dim>/<H>x<W>``.
Usage: ``.venv-ref/bin/python scripts/zoo_reference/record_cosplace.py``
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "zoo" / "fixtures" / "cosplace.npz"
REPOSITORIES = {"cosplace": "gmberton+CosPlace", "eigenplaces": "gmberton+EigenPlaces"}
# (method, official backbone, fc_output_dim, weight seed)
RECORDED = (
    ("cosplace", "ResNet18", 512, 21),
    ("cosplace", "ResNet50", 2048, 22),
    ("cosplace", "VGG16", 512, 23),
    ("cosplace", "ResNet101", 256, 24),
    ("cosplace", "ResNet152", 128, 25),
    ("eigenplaces", "ResNet18", 256, 31),
    ("eigenplaces", "ResNet50", 2048, 32),
    ("eigenplaces", "VGG16", 512, 33),
    ("eigenplaces", "ResNet101", 1024, 34),
)
SIZES = {"resnet": ((224, 224), (200, 288)), "vgg": ((224, 224), (208, 288))}  # VGG16: sides multiple of 16
BATCH = 2
IMAGE_SEED = 1
P_KEY = "aggregation.1.p"
GEM_P = 3.0
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _seeded_module():
    spec = importlib.util.spec_from_file_location("seeded", ROOT / "tests" / "zoo" / "seeded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export(mirrors: Path, name: str, into: Path) -> str:
    """Export the mirror's HEAD into ``into``; returns the commit."""
    git_dir = mirrors / name / "repo"
    commit = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"], capture_output=True, text=True)
    archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD"], capture_output=True, check=True)
    into.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    sys.path.insert(0, str(into))
    return commit.stdout.strip()


def official_constructors():
    """``method → backbone, dim → module`` with the downloads of the official constructors stubbed out."""
    from cosplace_model import cosplace_network
    from eigenplaces_model import eigenplaces_network

    cosplace_network.get_pretrained_torchvision_model = lambda name: getattr(torchvision.models, name.lower())()

    class _NoHubModel:  # EigenPlaces starts from a CosPlace hub model; an empty one keeps torchvision's init
        def state_dict(self):
            return {}

    eigenplaces_network.torch.hub.load = lambda *args, **kwargs: _NoHubModel()
    return {"cosplace": cosplace_network.GeoLocalizationNet, "eigenplaces": eigenplaces_network.GeoLocalizationNet_}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirrors", type=Path, default=Path("/work/.mirror"))
    args = parser.parse_args()
    seeded = _seeded_module()
    tmp = Path(tempfile.mkdtemp(prefix="official-cosplace-"))
    commits = {m: export(args.mirrors, repo, tmp / m) for m, repo in REPOSITORIES.items()}
    constructors = official_constructors()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    outputs, models = {}, {}
    for method, backbone, dim, seed in RECORDED:
        net = constructors[method](backbone, dim).eval()
        shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
        weights = seeded.seeded_state_dict(shapes, seed, overrides={P_KEY: GEM_P})
        net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
        sizes = SIZES["vgg" if backbone == "VGG16" else "resnet"]
        key = f"{method}/{backbone}/{dim}"
        models[key] = {
            "seed": seed,
            "checksum": seeded.checksum(weights),
            "shapes": shapes,
            "sizes": [list(s) for s in sizes],
            "constructor": {"backbone": backbone, "fc_output_dim": dim},
        }
        with torch.no_grad():
            for (h, w), pixels in zip(sizes, seeded.seeded_images(sizes, batch=BATCH, seed=IMAGE_SEED)):
                outputs[f"{key}/{h}x{w}"] = net((torch.from_numpy(pixels) - mean) / std).numpy()
        print(key, "recorded")
    meta = {
        "repository": {m: f"https://github.com/{r.replace('+', '/')}" for m, r in REPOSITORIES.items()},
        "commit": commits,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "models": models,
        "overrides": {P_KEY: GEM_P},
        "batch": BATCH,
        "image_seed": IMAGE_SEED,
        "normalisation": {"mean": MEAN, "std": STD},
    }
    seeded.write_fixture(str(FIXTURE), meta, outputs)
    print("wrote", FIXTURE)


if __name__ == "__main__":
    main()
