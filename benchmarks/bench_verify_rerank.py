"""Issue 27 item 6: local-feature verification as a re-ranker, on query sets it was never tuned on.

    .venv/bin/python benchmarks/bench_verify_rerank.py [--datasets corridor nordland600] [--top-n 5]
        [--transforms none rotate:15 rotate:30 rotate:90 zoom:1.3 zoom:1.6 crop:0.7]

For each dataset (default preset; Nordland-600 at 224×112) a map of its database is built once (cached in
``benchmarks/results/cache/verify_rerank``), and every query set — the original queries and the
rotated / zoomed / off-centre cropped versions of :func:`vprkit.datasets.transforms.transformed_queries` — is
localised twice through ``pipeline.localize``: global retrieval, and with ``verify=VerifySettings(top_n,
rerank=True)`` (XFeat; the checked head reordered by ``cosine + 0.5·n/(n + 50)``). The fusion constants are
fixed by principle in :mod:`vprkit.rerank.verification`, never fitted on these sets. Columns: Recall@1/5 of
both, ``dR@1``, the ROC AUC of each answer's confidence for right vs wrong top-1 (issue 27's right-vs-wrong
target on the transformed sets) and the verified re-ranking's seconds per query.
Writes ``benchmarks/results/verify_rerank.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import DATA, NORDLAND_600, NORDLAND_SIZE, RESULTS, report, setup
from vprkit import pipeline
from vprkit.datasets import load_dataset
from vprkit.datasets.transforms import transformed_queries
from vprkit.evaluation.metrics import recall_at_n
from vprkit.images import FolderImages
from vprkit.presets import resolve

CACHE = RESULTS / "cache" / "verify_rerank"
DATASETS = {"corridor": (str(DATA / "corridor"), None), "nordland600": (NORDLAND_600, NORDLAND_SIZE)}
TRANSFORMS = ["none", "rotate:15", "rotate:30", "rotate:90", "zoom:1.3", "zoom:1.6", "crop:0.7"]
NS = (1, 5)
TOP_K = 10


def ranked(
    m: pipeline.Map, queries: FolderImages, row_of: dict[str, int], verify
) -> tuple[np.ndarray, float, np.ndarray]:
    """Q×TOP_K dataset rows of each query's ranking, seconds per query, and each answer's confidence."""
    t0 = time.perf_counter()
    results = pipeline.localize(m, queries, top_k=TOP_K, verify=verify)
    seconds = (time.perf_counter() - t0) / max(1, len(results))
    rows = np.full((len(results), TOP_K), -1, np.int64)
    confidence = np.array([np.nan if r.estimate.confidence is None else r.estimate.confidence for r in results])
    for i, r in enumerate(results):
        found = [row_of[x.key] for x in r.matches]
        rows[i, : len(found)] = found
    return rows, seconds, confidence


def _auc_right_wrong(rows: np.ndarray, confidence: np.ndarray, truth) -> float | None:
    """ROC AUC of the confidence for right vs wrong top-1 answers (None when all are right or all wrong)."""
    right = np.array([int(rows[i, 0]) in set(map(int, truth.positives[i])) for i in range(len(rows))])
    pos, neg = confidence[right], confidence[~right]
    if not len(pos) or not len(neg):
        return None
    return round(float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["corridor"], choices=list(DATASETS))
    ap.add_argument("--transforms", nargs="+", default=TRANSFORMS)
    ap.add_argument("--top-n", type=int, default=5)
    args = ap.parse_args()
    setup()
    verify = pipeline.VerifySettings(top_n=args.top_n, rerank=True)
    rows = []
    for name in args.datasets:
        spec, size = DATASETS[name]
        ds = load_dataset(spec)
        map_dir = CACHE / name / "map"
        source = FolderImages(ds.database_dir, ds.database_images)
        pipeline.build_map(source, map_dir, resolve(None, image_size=size) if size else None, progress=False)
        m = pipeline.open_map(map_dir, read_only=True)
        row_of = {k: i for i, k in enumerate(ds.database_images)}
        for t in args.transforms:
            qs = (
                ds
                if t == "none"
                else transformed_queries(ds, t.split(":")[0], float(t.split(":")[1]), CACHE / "queries")
            )
            queries = FolderImages(qs.queries_dir, qs.query_images)
            g, _, conf_g = ranked(m, queries, row_of, None)
            v, seconds, conf_v = ranked(m, queries, row_of, verify)
            rg, rv = recall_at_n(g, qs.ground_truth, NS), recall_at_n(v, qs.ground_truth, NS)
            rows.append(
                {
                    "dataset": name,
                    "queries": t,
                    "global R@1": round(rg["R@1"], 3),
                    "global R@5": round(rg["R@5"], 3),
                    f"verify{args.top_n} R@1": round(rv["R@1"], 3),
                    f"verify{args.top_n} R@5": round(rv["R@5"], 3),
                    "dR@1": round(rv["R@1"] - rg["R@1"], 3),
                    "AUC conf r/w global": _auc_right_wrong(g, conf_g, qs.ground_truth),
                    f"AUC conf r/w verify{args.top_n}": _auc_right_wrong(v, conf_v, qs.ground_truth),
                    "s/query": round(seconds, 3),
                }
            )
            print(rows[-1], flush=True)
    report("verify_rerank", rows, list(rows[0]), {"top_n": args.top_n})


if __name__ == "__main__":
    main()
