"""How much RANSAC inlier counts depend on the homography's direction and the order of the matches.

The Patch-NetVLAD reference (``patchnetvlad/tools/patch_matcher.py``, ``compare_two_ransac``) fits
``cv2.findHomography(candidate centres, query centres, RANSAC, 1.5 × patch step)`` with the mutual
matches listed by candidate patch index; vprkit now does the same (``ransac_score``). Before, vprkit
fitted query → candidate with the matches in query order. OpenCV's RANSAC draws its minimal samples
from a generator seeded the same way on every call, so both the direction and the order of the
points change which samples are drawn, hence the inlier count.

On real patch descriptors — EfficientNet-Lite0 block 10, NetVLAD K = 32 and PCA 256 fitted on 30
reference images, the performance preset's patch sizes 2, 5, 8 (stride 1) at the reference's 640×480
(30×40 cells) — for ~50 Corridor queries, each paired with a true match (its middle ground-truth
positive) and with a wrong place (the reference image half the route away), this counts inliers
with four variants:

- ``ref``: candidate → query, candidate order (the reference; vprkit's ``ransac_score``),
- ``old``: query → candidate, query order (vprkit before this change),
- ``dir``: query → candidate, candidate order (direction only),
- ``ord``: candidate → query, query order (order only),

and reports, per pair kind and patch size, the mean and max relative difference
``|n_variant − n_ref| / n_ref`` (pairs with n_ref > 0), the share of pairs whose count changes, and
for how many queries the true match and the wrong place swap order (score = inliers / query patches).

    python benchmarks/bench_ransac_direction.py [--pairs 50] [--size 480 640]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time

import cv2
import numpy as np
import torch

from common import DATA, report, setup

from vprkit.backbones import build_backbone
from vprkit.images import Batch, ImageSpec, load_prepared
from vprkit.rerank.extension import PatchesExtension
from vprkit.rerank.matching import mutual_nn
from vprkit.rerank.scoring import (
    HOMOGRAPHY_MIN_MATCHES,
    RANSAC_CONFIDENCE,
    RANSAC_MAX_ITERS,
    RANSAC_THRESHOLD_STEPS,
    ransac_score,
)

SCALES = [[2, 1], [5, 1], [8, 1]]
FIT_IMAGES = 30
PCA_DIM = 256  # the PCA projection of every patch dominates the run time
VARIANTS = ("old", "dir", "ord")


def load(paths, spec, multiple, backbone):
    """Prepared pixels and dense features of image files, in batches of 8."""
    out = []
    for i in range(0, len(paths), 8):
        chunk = paths[i : i + 8]
        prepared = [load_prepared(p, spec, multiple) for p in chunk]
        pixels = np.stack([a for a, _ in prepared]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        batch = Batch([str(p) for p in chunk], pixels, [g for _, g in prepared])
        with torch.inference_mode():
            out.append((batch, backbone(torch.from_numpy(pixels))))
    return out


def inliers(src, dst, threshold):
    if len(src) < HOMOGRAPHY_MIN_MATCHES:
        return 0
    _, mask = cv2.findHomography(
        src.astype(np.float32),
        dst.astype(np.float32),
        cv2.RANSAC,
        threshold,
        maxIters=RANSAC_MAX_ITERS,
        confidence=RANSAC_CONFIDENCE,
    )
    return 0 if mask is None else int(mask.sum())


def variants(q, c, m):
    """Inlier counts of the four (direction, order) variants of one pair at one scale."""
    s = ransac_score(q, c, m)
    n_ref = int(s.inliers.sum())
    thr = RANSAC_THRESHOLD_STEPS * q.step_px
    by_c, by_q = np.argsort(m.candidate, kind="stable"), np.argsort(m.query, kind="stable")
    qc, cc = q.centres[m.query], c.centres[m.candidate]
    # the scorer itself must agree with an explicit call in the reference's argument order
    assert n_ref == inliers(cc[by_c], qc[by_c], thr), "ransac_score is not the reference's call"
    return {
        "ref": n_ref,
        "old": inliers(qc[by_q], cc[by_q], thr),
        "dir": inliers(qc[by_c], cc[by_c], thr),
        "ord": inliers(cc[by_q], qc[by_q], thr),
        "matches": len(m),
        "n_query": len(q),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=50, help="queries (each gives a true and a wrong pair)")
    ap.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    ap.add_argument("--name", default="ransac_direction")
    args = ap.parse_args()
    setup()
    t0 = time.perf_counter()
    root = DATA / "corridor"
    with open(root / "ground_truth.csv") as f:
        gt = [(r["query"], r["positives"].split()) for r in csv.DictReader(f)]
    refs = sorted(p.name for p in (root / "ref").iterdir())
    picks = np.linspace(0, len(gt) - 1, min(args.pairs, len(gt))).round().astype(int)
    pairs = []
    for i in picks:
        qname, pos = gt[i]
        true = pos[len(pos) // 2]
        wrong = f"ref/{refs[(refs.index(true.split('/')[-1]) + len(refs) // 2) % len(refs)]}"
        pairs.append((qname, true, wrong))

    backbone = build_backbone("efficientnet-lite0", block=10).eval()
    spec = ImageSpec(size=tuple(args.size), resize="fixed")
    ext = PatchesExtension(
        {"scales": SCALES, "pca_dim": PCA_DIM, "k": 32, "fit_images": FIT_IMAGES, "fit_patches": 5000}, backbone, None
    )
    fit_refs = [root / "ref" / r for r in refs[:: max(1, len(refs) // FIT_IMAGES)]][:FIT_IMAGES]
    ext.fit(load(fit_refs, spec, backbone.size_multiple, backbone))
    print(f"fitted NetVLAD + PCA on {len(fit_refs)} images: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    names = sorted({n for p in pairs for n in p})
    sets = {}
    for batch, feats in load([root / n for n in names], spec, backbone.size_multiple, backbone):
        for key, s in zip(batch.keys, ext.describe_batch(batch, feats)):
            sets[str(key)[len(str(root)) + 1 :]] = s
    print(f"described {len(names)} images: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    counts = {(kind, sc[0]): [] for kind in ("true", "wrong") for sc in SCALES}
    for qname, true, wrong in pairs:
        for kind, cname in (("true", true), ("wrong", wrong)):
            for si, sc in enumerate(SCALES):
                q, c = sets[qname][si], sets[cname][si]
                m = mutual_nn(q.descriptors, c.descriptors)[0]
                counts[(kind, sc[0])].append(variants(q, c, m))

    rows = []
    for sc in SCALES:
        for kind in ("true", "wrong", "all"):
            recs = counts[("true", sc[0])] + counts[("wrong", sc[0])] if kind == "all" else counts[(kind, sc[0])]
            ok = [r for r in recs if r["ref"] > 0]
            row = {
                "patch": sc[0],
                "pairs": kind,
                "n": len(recs),
                "matches": float(np.mean([r["matches"] for r in recs])),
                "inliers_ref": float(np.mean([r["ref"] for r in recs])),
            }
            for v in VARIANTS:
                rel = np.array([abs(r[v] - r["ref"]) / r["ref"] for r in ok])
                row[f"{v}_mean_rel"] = float(rel.mean()) if len(rel) else 0.0
                row[f"{v}_max_rel"] = float(rel.max()) if len(rel) else 0.0
                row[f"{v}_changed"] = float(np.mean([r[v] != r["ref"] for r in recs]))
            rows.append(row)
        # does the true match stay above the wrong place? (one scale's inlier score decides)
        t, w = counts[("true", sc[0])], counts[("wrong", sc[0])]
        flips = sum((a["ref"] > b["ref"]) != (a["old"] > b["old"]) for a, b in zip(t, w))
        rows[-1]["true_vs_wrong_swaps_old"] = int(flips)
    columns = [
        "patch",
        "pairs",
        "n",
        "matches",
        "inliers_ref",
        "old_mean_rel",
        "old_max_rel",
        "old_changed",
        "dir_mean_rel",
        "dir_max_rel",
        "ord_mean_rel",
        "ord_max_rel",
        "true_vs_wrong_swaps_old",
    ]
    elapsed = time.perf_counter() - t0
    report(
        args.name,
        rows,
        columns,
        {
            "dataset": "corridor",
            "image_size": list(args.size),
            "backbone": "efficientnet-lite0 block 10",
            "patch_descriptors": f"NetVLAD K=32 and PCA {PCA_DIM} fitted on {len(fit_refs)} reference images",
            "scales": SCALES,
            "threshold_px": RANSAC_THRESHOLD_STEPS * backbone.stride,
            "queries": len(pairs),
            "variants": {
                "ref": "candidate→query, candidate order (reference; vprkit ransac_score)",
                "old": "query→candidate, query order (vprkit before)",
                "dir": "query→candidate, candidate order",
                "ord": "candidate→query, query order",
            },
            "relative_difference": "|n_variant - n_ref| / n_ref over pairs with n_ref > 0; *_changed = share of pairs whose count differs",
            "seconds": round(elapsed, 1),
        },
    )
    print(f"{elapsed:.0f} s")


if __name__ == "__main__":
    main()
