"""Record AnyLoc's own VLAD (``demo/utilities.py`` ``VLAD``) on a seeded ``c_centers.pt`` and seeded descriptors.

Run in ``.venv-ref`` with AnyLoc's demo exported from its mirror and AnyLoc's pinned k-means package::

    mkdir -p /tmp/official/anyloc/demo && git --git-dir=/work/.mirror/AnyLoc+AnyLoc/repo show HEAD:demo/utilities.py \\
        > /tmp/official/anyloc/demo/utilities.py
    .venv-ref/bin/pip install fast-pytorch-kmeans==0.1.6   # AnyLoc's requirements.txt pin
    .venv-ref/bin/python scripts/zoo_reference/record_anyloc_domains.py

As AnyLoc's demo (``anyloc_vlad_generate.py``) does: the centres are ``torch.save``-d as ``c_centers.pt`` in a
cache folder laid out as AnyLoc's (``vocabulary/dinov2_vitg14/l31_value_c32/urban/``), ``VLAD(32,
desc_dim=None, cache_dir=that folder).fit(None)`` loads them, and ``generate`` encodes each image's
descriptors (hard assignment, cosine k-means ``predict``, ``norm_descs``, ``intra_norm``). The descriptors
stand in for DINOv2 ViT-G/14 layer-31 values (1536-d), whose extraction vprkit's DINOv2 tests cover.
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
import anyloc_centres  # noqa: E402
import seeded  # noqa: E402

MIRROR = Path("/work/.mirror/AnyLoc+AnyLoc/repo")
VOCABULARY_DIR = "vocabulary/dinov2_vitg14/l31_value_c32/urban"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anyloc", default="/tmp/official/anyloc", help="exported AnyLoc tree (demo/utilities.py)")
    parser.add_argument("--out", default=str(ROOT / "tests" / "zoo" / "fixtures" / "anyloc_domains.npz"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.anyloc) / "demo"))
    from utilities import VLAD

    centres = anyloc_centres.seeded_centres()
    outputs = {}
    with tempfile.TemporaryDirectory() as cache:
        folder = Path(cache, VOCABULARY_DIR)
        folder.mkdir(parents=True)
        torch.save(torch.from_numpy(centres), folder / "c_centers.pt")  # what VLAD.fit caches
        vlad = VLAD(anyloc_centres.NUM_CLUSTERS, desc_dim=None, cache_dir=str(folder))
        vlad.fit(None)
        for (h, w), descs in zip(anyloc_centres.GRIDS, anyloc_centres.seeded_descriptors(centres)):
            outputs[f"{h}x{w}"] = np.stack([vlad.generate(torch.from_numpy(d)).numpy() for d in descs])
    commit = subprocess.run(
        ["git", f"--git-dir={MIRROR}", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    meta = {
        "method": "anyloc-domain-vlad",
        "repository": "AnyLoc/AnyLoc",
        "file": "demo/utilities.py (VLAD)",
        "commit": commit,
        "fast_pytorch_kmeans": "0.1.6",
        "num_clusters": anyloc_centres.NUM_CLUSTERS,
        "dim": anyloc_centres.DIM,
        "centre_seed": anyloc_centres.CENTRE_SEED,
        "descriptor_seed": anyloc_centres.DESCRIPTOR_SEED,
        "grids": [list(g) for g in anyloc_centres.GRIDS],
        "batch": anyloc_centres.BATCH,
        "checksum": seeded.checksum({"c_centers": centres}),
        "torch": torch.__version__,
    }
    seeded.write_fixture(args.out, meta, outputs)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in outputs.items()))


if __name__ == "__main__":
    main()
