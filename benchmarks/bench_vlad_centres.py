"""Issue 10 (5a): unit (vprkit's spherical k-means) vs raw (AnyLoc's plain cluster means) VLAD centres.

    python benchmarks/bench_vlad_centres.py [--seeds 4] [--first-seed 0] [--presets effnet-vlad …] [--out NAME]

For vprkit's two EfficientNet VLAD presets, extract the features of Corridor (320×240, ref vs
query, ``ground_truth.csv``) and Nordland-600 (``nordland-64x32:600``: winter queries vs summer
references, every 4th file, first 600, exact frame; 224×112) once, then for each vocabulary seed build
the map vocabulary from the database's own descriptors (all patches, as the pipeline does below
2,000 images) with ``centres="unit"`` and ``centres="raw"`` (same k-means run: the raw centres are
the plain means of the normalised descriptors nearest to each unit centre) and report Recall@1/5.

- effnet2-vlad-ma4: EfficientNet-Lite2 block 14, K = 96, multiple assignment m = 4;
- effnet-vlad: EfficientNet-Lite0 block 10, K = 32, m = 1.

Does not use ``vprkit.pipeline``; runs under ``torch.inference_mode()``. Writes
``benchmarks/results/vlad_centres.json`` (or ``--out NAME``).

Measured (2-core CPU, Recall@1 mean over seeds; 2026-12-02):

- effnet2-vlad-ma4 (seeds 0–3): Corridor unit 0.957 vs raw 0.941; Nordland-600 unit 0.410 vs raw
  0.393 — unit better or equal on every seed: keep ``unit`` for the default preset.
- effnet-vlad (seeds 0–11): Corridor unit 0.920 vs raw 0.920; Nordland-600 unit 0.193 vs raw 0.216,
  raw better on all 12 seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from vprkit.aggregation.vlad import VLAD, DescriptorSampler, fit_vocabulary  # noqa: E402
from vprkit.backbones import build_backbone  # noqa: E402
from vprkit.backbones.base import DenseFeatures  # noqa: E402
from vprkit.datasets import load_dataset  # noqa: E402
from vprkit.evaluation.metrics import recall_at_n  # noqa: E402
from vprkit.images import ImageSpec, iter_batches  # noqa: E402

DATA = Path(os.environ.get("VPRKIT_DATA", REPO.parent / "shared" / "datasets")).resolve()
os.environ["VPRKIT_DATA"] = str(DATA)
RESULTS = REPO / "benchmarks" / "results"
THREADS = 2
BATCH = 16
TOP = 20

PRESETS = {  # name → backbone, K, assignments
    "effnet2-vlad-ma4": ("efficientnet-lite2", 96, 4),
    "effnet-vlad": ("efficientnet-lite0", 32, 1),
}
DATASETS = {  # name → load spec, (height, width)
    "corridor": ("corridor", (240, 320)),
    "nordland-600": ("nordland-64x32:600", (112, 224)),
}


def extract(backbone, root: Path, keys: list[str], size: tuple[int, int]) -> torch.Tensor:
    """``N×h×w×D`` features of ``keys`` (in order)."""
    out = []
    for batch in iter_batches(root, keys, ImageSpec(size, "fixed"), multiple=backbone.size_multiple, batch_size=BATCH):
        if batch.failures:
            raise RuntimeError(f"unreadable images: {batch.failures}")
        if batch.keys:
            out.append(backbone(torch.from_numpy(batch.pixels)).patches.clone())
    return torch.cat(out)


def encode(agg: VLAD, feats: torch.Tensor, stride: int, size: tuple[int, int]) -> np.ndarray:
    return agg(DenseFeatures(feats, stride, size)).numpy()


def recall(db: np.ndarray, q: np.ndarray, gt) -> dict:
    ranked = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :TOP]
    r = recall_at_n(ranked, gt, ns=(1, 5))
    return {"R@1": r["R@1"], "R@5": r["R@5"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4, help="how many vocabulary seeds (first-seed … first-seed + N − 1)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=list(PRESETS))
    ap.add_argument("--out", default="vlad_centres", help="results file name (benchmarks/results/NAME.json)")
    args = ap.parse_args()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    torch.set_num_threads(THREADS)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows, runs = [], []
    with torch.inference_mode():
        for preset in args.presets:
            bb_name, k, m = PRESETS[preset]
            backbone = build_backbone(bb_name)
            for ds_name, (spec, size) in DATASETS.items():
                ds = load_dataset(spec)
                t = time.time()
                db = extract(backbone, ds.database_dir, ds.database_images, size)
                q = extract(backbone, ds.queries_dir, ds.query_images, size)
                print(
                    f"[{time.time() - t0:6.1f}s] {preset} {ds_name}: features db {tuple(db.shape)} q {tuple(q.shape)} "
                    f"in {time.time() - t:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
                sampler = DescriptorSampler(backbone.dim, max_bytes=db.numel() * 4 + 4 * backbone.dim)
                sampler.add(DenseFeatures(db, backbone.stride, size))
                per_kind: dict[str, list[dict]] = {"unit": [], "raw": []}
                for seed in seeds:
                    for kind in ("unit", "raw"):
                        voc = fit_vocabulary(sampler.pool, k, seed=seed, centres=kind)
                        agg = VLAD(backbone.dim, voc, assignments=m)
                        r = recall(
                            encode(agg, db, backbone.stride, size),
                            encode(agg, q, backbone.stride, size),
                            ds.ground_truth,
                        )
                        norms = np.linalg.norm(voc.centres, axis=1)
                        run = {
                            "preset": preset,
                            "dataset": ds_name,
                            "seed": seed,
                            "centres": kind,
                            **r,
                            "centre_norm_mean": float(norms.mean()),
                            "centre_norm_min": float(norms.min()),
                            "empty_clusters": int((norms == 0).sum()),
                        }
                        runs.append(run)
                        per_kind[kind].append(r)
                        print(
                            f"[{time.time() - t0:6.1f}s]   seed {seed} {kind:4s}: R@1 {r['R@1']:.3f} R@5 {r['R@5']:.3f} "
                            f"(|c| mean {norms.mean():.3f})",
                            file=sys.stderr,
                            flush=True,
                        )
                for kind, rs in per_kind.items():
                    r1 = [x["R@1"] for x in rs]
                    rows.append(
                        {
                            "preset": preset,
                            "dataset": ds_name,
                            "centres": kind,
                            "R@1 mean": round(statistics.mean(r1), 4),
                            "R@1 min": round(min(r1), 4),
                            "R@1 max": round(max(r1), 4),
                            "R@5 mean": round(statistics.mean(x["R@5"] for x in rs), 4),
                            "R@1 per seed": " ".join(f"{v:.3f}" for v in r1),
                        }
                    )
    cols = ["preset", "dataset", "centres", "R@1 mean", "R@1 min", "R@1 max", "R@5 mean", "R@1 per seed"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))
    out = RESULTS / f"{args.out}.json"
    out.write_text(
        json.dumps(
            {
                "rows": rows,
                "runs": runs,
                "seeds": seeds,
                "threads": THREADS,
                "seconds": round(time.time() - t0, 1),
                "protocol": "map vocabulary from all database patches; cosine ranking; "
                "Corridor 320×240 ground_truth.csv; Nordland-600 224×112 exact frame",
            },
            indent=2,
        )
    )
    print(f"\nwrote {out} ({time.time() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
