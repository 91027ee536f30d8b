"""Patch-NetVLAD re-ranking benchmark: Recall@1/5/10 global-only vs each re-ranking preset.

On Corridor and Nordland-600 (winter queries vs summer references, exact frame), with the offline
backbone (EfficientNet-Lite0 VLAD). For each re-ranking preset a map is built that stores the
preset's patch descriptors; every query is re-ranked over the global top-100 with 2 threads.
Reports re-ranking seconds per query (matching + scoring of the shortlist, excluding the query's
own feature extraction, which global retrieval needs anyway), stored patch bytes per map image,
and the ratio of each preset's storage to ``performance``'s.

Targets (issue 4): speed ≤ 0.3 s/query, performance ≤ 3 s/query, a Recall@1 gain over global on at
least one dataset, storage ≤ 1/100 of performance per image.

    python benchmarks/bench_rerank.py [--presets speed storage performance ...] [--datasets corridor nordland]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import NORDLAND_600, NORDLAND_SIZE, report, setup

from vprkit import pipeline
from vprkit.datasets import load_dataset
from vprkit.evaluation.metrics import recall_at_n
from vprkit.images import ImageSpec
from vprkit.presets import get_preset
from vprkit.rerank import map_extensions_for

DATASETS = {"corridor": ("corridor", None), "nordland": (NORDLAND_600, NORDLAND_SIZE)}
NS = (1, 5, 10)


def run_queries(m, ds, reranker, k: int) -> np.ndarray:
    """Ranked database indices (dataset order) per query."""
    db_index = {key: i for i, key in enumerate(ds.database_images)}
    row_to_db = np.array([db_index[key] for key in m.keys] + [-1])
    rows_all = []
    for qb in pipeline.query_batches(m, ds.queries_dir, ds.query_images):
        rows, _ = pipeline.search(m, qb, k, reranker)
        rows_all.append(row_to_db[rows])
    return np.concatenate(rows_all)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="effnet-vlad", help="global preset")
    ap.add_argument("--presets", nargs="+", default=["speed", "storage", "performance"], help="re-ranking presets")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--name", default="rerank")
    args = ap.parse_args()
    setup()
    rows_out = []
    for dname in args.datasets:
        spec, size = DATASETS[dname]
        ds = load_dataset(spec)
        base = get_preset(args.preset)
        if size is not None:
            base = base.replace(image=ImageSpec(size, "fixed"))
        global_done = False
        for preset in args.presets:
            cfg = base.replace(extensions={**base.extensions, **map_extensions_for(preset)})
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                pipeline.build_map(ds.database_dir, Path(tmp) / "map", cfg, poses=ds.database_poses,
                                   keys=ds.database_images, progress=False, log=lambda _: None)
                build_s = time.perf_counter() - t0
                m = pipeline.open_map(Path(tmp) / "map")
                gt = ds.ground_truth
                if not global_done:
                    g = run_queries(m, ds, None, max(NS))
                    rec = recall_at_n(g, gt, NS)
                    rows_out.append({"dataset": ds.name, "method": f"global {args.preset}",
                                     **{f"R@{n}": round(rec[f"R@{n}"], 3) for n in NS}})
                    global_done = True
                reranker = pipeline.get_reranker(m, preset)
                assert reranker.stored, "the map should hold the preset's patches"
                r = run_queries(m, ds, reranker, max(NS))
                rec = recall_at_n(r, gt, NS)
                per_image = m.store.extra_bytes().get("patches", 0.0)
                rows_out.append({
                    "dataset": ds.name, "method": f"rerank {preset}", **{f"R@{n}": round(rec[f"R@{n}"], 3) for n in NS},
                    "rerank_s_per_query": round(statistics.mean(reranker.timings), 3),
                    "rerank_s_p90": round(float(np.percentile(reranker.timings, 90)), 3),
                    "patch_bytes_per_image": int(per_image), "map_build_s": round(build_s, 1),
                })
                reranker.close()
                print(f"{ds.name} {preset}: R@1 {rec['R@1']:.3f}  {statistics.mean(reranker.timings):.3f} s/q", file=sys.stderr, flush=True)
    perf = {r["dataset"]: r["patch_bytes_per_image"] for r in rows_out if r["method"] == "rerank performance"}
    for r in rows_out:
        if "patch_bytes_per_image" in r and r["dataset"] in perf and perf[r["dataset"]]:
            r["storage_vs_performance"] = f"1/{perf[r['dataset']] / max(1, r['patch_bytes_per_image']):.0f}"
    cols = ["dataset", "method", "R@1", "R@5", "R@10", "rerank_s_per_query", "rerank_s_p90", "patch_bytes_per_image",
            "storage_vs_performance", "map_build_s"]
    report(args.name, rows_out, cols, {"global_preset": args.preset, "shortlist": 100, "threads": 2})


if __name__ == "__main__":
    main()
