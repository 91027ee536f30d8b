"""Patch-NetVLAD re-ranking benchmark: the recall–bytes–time table, per dataset and query set.

On Corridor and Nordland-600 (winter queries vs summer references, 224×112, exact frame) with the
default global preset, and on query sets made from them by :func:`vprkit.datasets.transforms.transformed_queries`
(rotated, zoomed, off-centre cropped queries; the database and the ground truth are unchanged).
For each re-ranking preset a map is built that stores the preset's patch descriptors (cached in
``--cache`` and reused by later runs); every query is re-ranked over the global shortlist with 2 threads.

Columns: Recall@1/5/10; ``dR@1``, the change of Recall@1 against the global ranking (the issue's
trust target: never below −0.01); ``s/query``, re-ranking seconds per query (matching and scoring
of the shortlist, excluding the query's own feature extraction, which global retrieval needs
anyway), its 90th percentile, and ``matched``, the mean number of candidates matched per query;
``bytes/image``, stored patch bytes per map image; ``bytes``/``time`` vs ``performance-reference``
(the paper's configuration): the issue's affordability target is ≤ 1/10 and ≤ 1/5.

    python benchmarks/bench_rerank.py                                 # everything (slow: about an hour on 2 cores)
    python benchmarks/bench_rerank.py --datasets nordland --transforms none rotate:15 --presets performance
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from common import NORDLAND_600, NORDLAND_SIZE, report, setup

from vprkit import pipeline
from vprkit.datasets import load_dataset
from vprkit.datasets.transforms import transformed_queries
from vprkit.evaluation.metrics import recall_at_n
from vprkit.images import ImageSpec
from vprkit.presets import get_preset, get_rerank_config
from vprkit.rerank import map_extensions_for
from vprkit.rerank.saved import state_digest

DATASETS = {"corridor": ("corridor", None), "nordland": (NORDLAND_600, NORDLAND_SIZE)}
NS = (1, 5, 10)
TRANSFORMS = ["none", "rotate:15", "rotate:30", "rotate:90", "zoom:1.3", "zoom:1.6", "crop:0.7"]
RERANKS = ["speed", "storage", "performance", "performance-reference"]
REFERENCE = "performance-reference"
CACHE = Path(os.environ.get("VPRKIT_CACHE", Path.home() / ".cache" / "vprkit")) / "bench_rerank"


def run_queries(m, ds, reranker, k: int) -> tuple[np.ndarray, list[int]]:
    """Ranked database indices (dataset order) per query, and the candidates matched per query."""
    db_index = {key: i for i, key in enumerate(ds.database_images)}
    row_to_db = np.array([db_index[key] for key in m.keys] + [-1])
    rows_all, matched = [], []
    for qb in pipeline.query_batches(m, ds.queries_dir, ds.query_images):
        if reranker is not None:
            reranker.candidate_sets = _counting(reranker.candidate_sets, matched)
        rows, _ = pipeline.search(m, qb, k, reranker)
        rows_all.append(row_to_db[rows])
    return np.concatenate(rows_all), matched


def _counting(fn, sink: list[int]):
    inner = getattr(fn, "__wrapped__", fn)

    def wrapper(rows):
        sink.append(len(rows))
        return inner(rows)

    wrapper.__wrapped__ = inner
    return wrapper


def query_sets(ds, transforms: list[str], limit: int | None, cache: Path):
    for t in transforms:
        if t == "none":
            yield ds
            continue
        kind, amount = t.split(":")
        tds = transformed_queries(ds, kind, float(amount), cache / "queries")
        yield tds.subset(1, limit, which="queries") if limit else tds


def cached_map(ds, base, rerank: str, cache: Path) -> Path:
    """A map of ``ds`` storing ``rerank``'s patches, built once into ``cache``."""
    settings = get_rerank_config(rerank)
    cfg = base.replace(extensions={**base.extensions, **map_extensions_for(settings, base)})
    digest = state_digest(cfg.extensions["patches"])
    out = cache / "maps" / f"{ds.name.replace(':', '_')}-{base.name}-{digest}"
    if not (out / "map.json").exists():
        t0 = time.perf_counter()
        pipeline.build_map(ds.database_dir, out, cfg, poses=ds.database_poses, keys=ds.database_images, progress=False,
                           log=lambda _: None)
        print(f"built {out.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="effnet2-vlad-ma4", help="global preset")
    ap.add_argument("--presets", nargs="+", default=RERANKS, help="re-ranking presets")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--transforms", nargs="+", default=TRANSFORMS, help="query sets: none, KIND:AMOUNT (rotate, zoom, crop)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N queries of the transformed sets")
    ap.add_argument("--cache", type=Path, default=CACHE, help="maps and transformed queries, reused by later runs")
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
        maps = {r: cached_map(ds, base, r, args.cache) for r in args.presets}
        for qs in query_sets(ds, args.transforms, args.limit, args.cache):
            gt = qs.ground_truth
            global_r1 = None
            for rerank in args.presets:
                m = pipeline.open_map(maps[rerank], read_only=True)
                if global_r1 is None:
                    g, _ = run_queries(m, qs, None, max(NS))
                    rec = recall_at_n(g, gt, NS)
                    global_r1 = rec["R@1"]
                    rows_out.append({"queries": qs.name, "method": f"global {args.preset}",
                                     **{f"R@{n}": round(rec[f"R@{n}"], 3) for n in NS}})
                reranker = pipeline.get_reranker(m, rerank, log=lambda _: None)
                assert reranker.stored, "the map should hold the preset's patches"
                r, matched = run_queries(m, qs, reranker, max(NS))
                rec = recall_at_n(r, gt, NS)
                timings = reranker.timings or [0.0]
                rows_out.append({
                    "queries": qs.name, "method": f"rerank {rerank}", **{f"R@{n}": round(rec[f"R@{n}"], 3) for n in NS},
                    "dR@1": round(rec["R@1"] - global_r1, 3),
                    "s/query": round(statistics.mean(timings), 4), "s_p90": round(float(np.percentile(timings, 90)), 4),
                    "matched": round(sum(matched) / max(1, len(qs.query_images)), 1),
                    "bytes/image": int(m.store.extra_bytes().get("patches", 0.0)),
                })
                reranker.close()
                print(f"{qs.name} {rerank}: R@1 {rec['R@1']:.3f} (global {global_r1:.3f})  {statistics.mean(timings):.3f} s/q",
                      file=sys.stderr, flush=True)
    ref = {(r["queries"]): r for r in rows_out if r["method"] == f"rerank {REFERENCE}"}
    for r in rows_out:
        base_row = ref.get(r["queries"])
        if "bytes/image" in r and base_row is not None and base_row["bytes/image"] and r["s/query"]:
            r["bytes vs ref"] = f"1/{base_row['bytes/image'] / max(1, r['bytes/image']):.1f}"
            r["time vs ref"] = f"1/{base_row['s/query'] / r['s/query']:.1f}"
    cols = ["queries", "method", "R@1", "R@5", "R@10", "dR@1", "s/query", "s_p90", "matched", "bytes/image",
            "bytes vs ref", "time vs ref"]
    report(args.name, rows_out, cols, {"global_preset": args.preset, "threads": 2,
                                       "presets": {p: get_rerank_config(p).to_dict() for p in args.presets}})


if __name__ == "__main__":
    main()
