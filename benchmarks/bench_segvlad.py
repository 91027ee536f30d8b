"""SegVLAD vs global VLAD on Corridor and Nordland-600 with the offline EfficientNet-Lite0 backbone.

Run: ``/work/venv/bin/python benchmarks/bench_segvlad.py [--quick]``. Writes
``benchmarks/results/segvlad.json`` and ``benchmarks/results/explain_corridor.png``.

Protocol
- Corridor: 111 references (``ref/``) vs 111 queries (``query/``), 320×240, positives from
  ``ground_truth.csv`` (±2 frames). Nordland-600: winter queries vs summer references, every 4th
  file, first 600, exact-frame match only, 224×112. Queries without positives count as failures.
- Backbone: EfficientNet-Lite0 block 10 (112-d, stride 16); hard VLAD K = 32 fitted on each map's
  own reference patches. The backbone runs once per image; every variant reuses those features
  (and each segmenter's masks are computed once and reused for all orders).
- SegVLAD variants: segmenter ∈ {slic, felzenszwalb, features, grid} × order o ∈ {0..3}, VLAD → PCA
  512 (no whitening, fitted on the references' SuperSegments), ≤ 64 SuperSegments per image
  (most distinctive), float16 storage; top K′ = 50 segments per query SuperSegment; the same
  retrieval table scored by weighted voting, MaxSeg and MaxSim. Plus SAP (segment-average
  pooling) at o = 1, whitening ablations and fusion with the global score for the best segmenter.
- Seconds per query = backbone (shared) + segmentation + SuperSegment description + search + vote.
  Bytes per image = stored SuperSegment descriptors (float16) + packed patch sets, as in a map.
Finally the ``segvlad-slic`` preset is run through ``pipeline.build_map / localize`` on Corridor
(the numbers a user gets) and one explanation picture is drawn.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vprkit.aggregation.vlad import fit_vocabulary, hard_vlad
from vprkit.backbones import build_backbone
from vprkit.images import ImageSpec, iter_batches
from vprkit.segments import build_segmenter
from vprkit.segments.graph import supersegments
from vprkit.segments.retriever import SegmentIndex, batch_images, rank_candidates, segment_graph
from vprkit.segments.supersegments import PCA, select_distinctive, supersegment_sap, supersegment_vlad
from vprkit.segments.voting import vote

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
RESULTS = ROOT / "benchmarks" / "results"

SEGMENTERS = {
    "slic": {"n_segments": 25, "compactness": 10.0},
    "felzenszwalb": {},
    "features": {"k": 8},
    "grid": {"cells_across": 6},
}
K_PRIME = 50
PCA_DIM = 512
MAX_SEGMENTS = 64


# ---- data ----------------------------------------------------------------------------------------
def corridor():
    root = DATA / "corridor"
    refs = sorted(p.name for p in (root / "ref").glob("*.jpg"))
    queries = sorted(p.name for p in (root / "query").glob("*.jpg"))
    ref_idx = {k: i for i, k in enumerate(refs)}
    pos = {}
    with open(root / "ground_truth.csv") as f:
        for r in csv.DictReader(f):
            pos[r["query"].split("/")[-1]] = {ref_idx[p.split("/")[-1]] for p in r["positives"].split()}
    return dict(
        name="corridor",
        ref_root=root / "ref",
        query_root=root / "query",
        refs=refs,
        queries=queries,
        positives=[pos.get(q, set()) for q in queries],
        spec=ImageSpec((240, 320), "fixed"),
    )


def nordland(n=600, step=4):
    root = DATA / "nordland-64x32"
    names = sorted(p.name for p in (root / "summer").glob("*.png"))[::step][:n]
    names = [k for k in names if (root / "winter" / k).exists()]
    return dict(
        name="nordland-600",
        ref_root=root / "summer",
        query_root=root / "winter",
        refs=names,
        queries=names,
        positives=[{i} for i in range(len(names))],
        spec=ImageSpec((112, 224), "fixed"),
    )


def recall(ranked: list[np.ndarray], positives: list[set], ns=(1, 5)) -> dict[str, float]:
    out = {}
    for n in ns:
        out[f"R@{n}"] = float(np.mean([bool(set(r[:n].tolist()) & p) for r, p in zip(ranked, positives)]))
    return out


# ---- features ------------------------------------------------------------------------------------
def extract(backbone, root, keys, spec):
    images, feats = [], []
    t0 = time.perf_counter()
    for batch in iter_batches(root, keys, spec, backbone.size_multiple, 16, 2):
        assert not batch.failures, batch.failures
        with torch.inference_mode():
            f = backbone(torch.from_numpy(batch.pixels))
        images.extend(batch_images(batch))
        feats.extend(f.patches.float().numpy())
    return images, np.stack(feats), (time.perf_counter() - t0) / len(keys), f.stride


# ---- SegVLAD on cached features -------------------------------------------------------------------
def segment_all(name, opts, images, feats, stride, uncovered="nearest"):
    seg = build_segmenter(name, **opts)
    graphs, t = [], []
    for img, f in zip(images, feats):
        t0 = time.perf_counter()
        masks = seg(img, f, stride)
        sp, cents, a = segment_graph(masks, f.shape[:2], stride, uncovered)
        t.append(time.perf_counter() - t0)
        graphs.append((sp, a, len(masks)))
    return graphs, np.array(t)


def describe_all(graphs, feats, centres, order, pooling):
    out, t = [], []
    for (sp, a, _), f in zip(graphs, feats):
        t0 = time.perf_counter()
        members = supersegments(sp, a, order)
        x = f.reshape(-1, f.shape[-1])
        d = supersegment_vlad(x, members, centres) if pooling == "vlad" else supersegment_sap(x, members)
        t.append(time.perf_counter() - t0)
        out.append((d, members))
    return out, np.array(t)


def project_select(described, pca):
    res, t = [], []
    for d, members in described:
        t0 = time.perf_counter()
        y = pca.transform(d) if pca is not None else d
        keep = select_distinctive(y, members.sum(1), MAX_SEGMENTS)
        y16 = y[keep].astype(np.float16).astype(np.float32)  # what a float16 map stores
        t.append(time.perf_counter() - t0)
        res.append((y16, members[keep]))
    return res, np.array(t)


def evaluate_segments(ds, ref_sets, query_sets, g_ref, g_query, votings=("weighted", "maxseg", "maxsim"), fuse=0.0):
    n = len(ref_sets)
    vec = np.concatenate([d for d, _ in ref_sets])
    image = np.concatenate([np.full(len(d), i) for i, (d, _) in enumerate(ref_sets)])
    local = np.concatenate([np.arange(len(d)) for d, _ in ref_sets])
    index = SegmentIndex.from_vectors(vec, image, local, n)
    gsims = g_query @ g_ref.T
    ranked = {v: [] for v in votings}
    t_search = []
    for (d, _), gs in zip(query_sets, gsims):
        t0 = time.perf_counter()
        _, img, sims = index.search(d, K_PRIME)
        for v in votings:
            order, _ = rank_candidates(vote(img, sims, n, v), gs, fuse)
            ranked[v].append(order[:5])
        t_search.append((time.perf_counter() - t0) / len(votings))
    bytes_per_image = float(
        np.mean(
            [
                d.shape[0] * d.shape[1] * 2 + m.shape[0] * ((m.shape[1] + 7) // 8) + 4 * d.shape[0] + 8
                for d, m in ref_sets
            ]
        )
    )
    segs = float(np.mean([len(d) for d, _ in ref_sets]))
    return {v: recall(r, ds["positives"]) for v, r in ranked.items()}, float(np.mean(t_search)), bytes_per_image, segs


def run_dataset(ds, backbone, quick=False, log=print):
    res = {"dataset": ds["name"], "n_refs": len(ds["refs"]), "n_queries": len(ds["queries"]), "rows": []}
    t0 = time.perf_counter()
    ref_imgs, ref_f, t_bb_ref, stride = extract(backbone, ds["ref_root"], ds["refs"], ds["spec"])
    q_imgs, q_f, t_bb_q, _ = extract(backbone, ds["query_root"], ds["queries"], ds["spec"])
    log(f"[{ds['name']}] features {ref_f.shape} + {q_f.shape} in {time.perf_counter() - t0:.1f}s")
    voc = fit_vocabulary(ref_f.reshape(-1, ref_f.shape[-1]), 32, seed=0)
    centres = voc.centres
    ct = torch.from_numpy(centres)

    def gvlad(f):
        with torch.inference_mode():
            return torch.cat(
                [
                    hard_vlad(torch.from_numpy(f[i : i + 32].reshape(len(f[i : i + 32]), -1, f.shape[-1])), ct)
                    for i in range(0, len(f), 32)
                ]
            ).numpy()

    t1 = time.perf_counter()
    g_ref, g_q = gvlad(ref_f), gvlad(q_f)
    t_g = (time.perf_counter() - t1) / (len(ref_f) + len(q_f))
    t1 = time.perf_counter()
    g_rank = [np.argsort(-s, kind="stable")[:5] for s in g_q @ g_ref.T]
    t_gs = (time.perf_counter() - t1) / len(q_f)
    base = {
        "method": "global VLAD",
        "segmenter": "-",
        "order": None,
        "pooling": "vlad",
        "voting": "-",
        **recall(g_rank, ds["positives"]),
        "s_per_query": t_bb_q + t_g + t_gs,
        "bytes_per_image": g_ref.shape[1] * 4,
        "segments_per_image": 0,
    }
    res["rows"].append(base)
    log(f"[{ds['name']}] global VLAD R@1 {base['R@1']:.3f} R@5 {base['R@5']:.3f}")

    segmenters = ["slic", "grid"] if quick else list(SEGMENTERS)
    orders = [1] if quick else [0, 1, 2, 3]
    best = None
    for name in segmenters:
        t1 = time.perf_counter()
        ref_g, t_seg_r = segment_all(name, SEGMENTERS[name], ref_imgs, ref_f, stride)
        q_g, t_seg_q = segment_all(name, SEGMENTERS[name], q_imgs, q_f, stride)
        n_seg = float(np.mean([n for _, _, n in ref_g]))
        log(f"[{ds['name']}] {name}: {n_seg:.1f} segments/image, {np.mean(t_seg_q) * 1000:.0f} ms/image")
        for order in orders:
            for pooling in ["vlad", "sap"] if order == 1 else ["vlad"]:
                ref_d, _ = describe_all(ref_g, ref_f, centres, order, pooling)
                q_d, t_desc = describe_all(q_g, q_f, centres, order, pooling)
                pca = None
                if pooling == "vlad":
                    pool = np.concatenate([d for d, _ in ref_d])
                    if len(pool) > 50_000:
                        pool = pool[np.random.default_rng(0).choice(len(pool), 50_000, replace=False)]
                    pca = PCA.fit(pool, PCA_DIM)
                ref_s, _ = project_select(ref_d, pca)
                q_s, t_proj = project_select(q_d, pca)
                recs, t_search, bpi, segs = evaluate_segments(ds, ref_s, q_s, g_ref, g_q)
                spq = t_bb_q + float(np.mean(t_seg_q) + np.mean(t_desc) + np.mean(t_proj)) + t_search
                for v, r in recs.items():
                    row = {
                        "method": "SegVLAD",
                        "segmenter": name,
                        "order": order,
                        "pooling": pooling,
                        "voting": v,
                        **r,
                        "s_per_query": spq,
                        "bytes_per_image": bpi,
                        "segments_per_image": segs,
                    }
                    res["rows"].append(row)
                    if (
                        v == "weighted"
                        and pooling == "vlad"
                        and (best is None or (r["R@1"], r["R@5"]) > (best[0]["R@1"], best[0]["R@5"]))
                    ):
                        best = (row, ref_d, q_d, ref_s, q_s)
                w = recs["weighted"]
                log(
                    f"[{ds['name']}] {name} o={order} {pooling}: weighted R@1 {w['R@1']:.3f} R@5 {w['R@5']:.3f} | "
                    f"maxseg {recs['maxseg']['R@1']:.3f} | maxsim {recs['maxsim']['R@1']:.3f} | {segs:.1f} seg/img "
                    f"{bpi / 1024:.1f} KiB/img {spq * 1000:.0f} ms/q  ({time.perf_counter() - t1:.0f}s)"
                )
    # ablations on the best weights-free configuration: whitening and fusion with the global score
    row, ref_d, q_d, ref_s, q_s = best
    pool = np.concatenate([d for d, _ in ref_d])
    for label, whiten, reg in (("PCA+whitening", True, 0.0), ("PCA+reg. whitening (0.1)", True, 0.1)):
        pca = PCA.fit(pool, PCA_DIM, whiten=True, reg=reg)
        rs, _ = project_select(ref_d, pca)
        qs, _ = project_select(q_d, pca)
        recs, *_ = evaluate_segments(ds, rs, qs, g_ref, g_q, votings=("weighted",))
        res["rows"].append({**row, "method": f"SegVLAD {label}", **recs["weighted"]})
        log(f"[{ds['name']}] best + {label}: R@1 {recs['weighted']['R@1']:.3f}")
    for fuse in (0.5, 1.0):
        recs, *_ = evaluate_segments(ds, ref_s, q_s, g_ref, g_q, votings=("weighted",), fuse=fuse)
        res["rows"].append({**row, "method": f"SegVLAD fused (w={fuse})", **recs["weighted"]})
        log(
            f"[{ds['name']}] best fused with global (w={fuse}): R@1 {recs['weighted']['R@1']:.3f} R@5 {recs['weighted']['R@5']:.3f}"
        )
    res["best_segvlad"] = {k: row[k] for k in ("segmenter", "order", "pooling", "voting", "R@1", "R@5")}
    res["global_vlad"] = {k: base[k] for k in ("R@1", "R@5")}
    res["seconds"] = time.perf_counter() - t0
    return res


def pipeline_run(log=print):
    """The segvlad-slic preset through the public pipeline on Corridor, plus the explanation picture."""
    import tempfile

    from vprkit import pipeline
    from vprkit.pipeline import explain

    ds = corridor()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pipeline.build_map(ds["ref_root"], tmp, "segvlad-slic", progress=False, log=lambda m: None)
        build_s = time.perf_counter() - t0
        m = pipeline.open_map(tmp)
        t0 = time.perf_counter()
        results = pipeline.localize(m, [ds["query_root"] / q for q in ds["queries"]], top_k=5)
        spq = (time.perf_counter() - t0) / len(results)
        ref_idx = {k: i for i, k in enumerate(m.keys)}
        ranked = [np.array([ref_idx[x.key] for x in r.matches]) for r in results]
        rec = recall(ranked, ds["positives"])
        extra = m.store.extra_bytes()
        idx = m.extensions["segments"].index(m.store, len(m.keys), m.dir)
        out = RESULTS / "explain_corridor.png"
        exp = explain(m, ds["query_root"] / "0000050.jpg", out=out, top=5)
        for line in exp.lines():
            log(line)
    row = {
        "preset": "segvlad-slic",
        **rec,
        "s_per_query": spq,
        "build_seconds": build_s,
        "bytes_per_image": extra,
        "segments_per_image": idx.ntotal / idx.n_images,
    }
    log(
        f"[pipeline] segvlad-slic on Corridor: R@1 {rec['R@1']:.3f} R@5 {rec['R@5']:.3f}, {spq:.3f} s/query, "
        f"{row['segments_per_image']:.1f} segments/image, bytes/image {extra}"
    )
    return row


def print_table(results):
    print(
        f"\n{'dataset':<13}{'method':<41}{'seg':<13}{'o':>2} {'pool':<5}{'voting':<9}{'R@1':>6}{'R@5':>6}{'ms/q':>7}{'KiB/img':>9}{'seg/img':>8}"
    )
    for res in results:
        for r in res["rows"]:
            o = "-" if r["order"] is None else str(r["order"])
            print(
                f"{res['dataset']:<13}{r['method']:<41}{r['segmenter']:<13}{o:>2} {r['pooling']:<5}{r['voting']:<9}"
                f"{r['R@1']:>6.3f}{r['R@5']:>6.3f}{r['s_per_query'] * 1000:>7.0f}{r['bytes_per_image'] / 1024:>9.1f}"
                f"{r['segments_per_image']:>8.1f}"
            )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="slic + grid at o = 1 only (smoke run)")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "segvlad.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    backbone = build_backbone("efficientnet-lite0", block=10)
    results = [run_dataset(ds, backbone, args.quick) for ds in (corridor(), nordland())]
    pipe = None if args.skip_pipeline else pipeline_run()
    print_table(results)
    for res in results:
        b, g = res["best_segvlad"], res["global_vlad"]
        print(
            f"{res['dataset']}: best SegVLAD ({b['segmenter']}, o={b['order']}) R@1 {b['R@1']:.3f} vs global VLAD {g['R@1']:.3f}"
        )
    total = time.perf_counter() - t0
    print(f"total {total:.0f}s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "protocol": __doc__,
        "datasets": results,
        "pipeline": pipe,
        "total_seconds": total,
        "backbone": "efficientnet-lite0 block 10",
        "k_prime": K_PRIME,
        "pca_dim": PCA_DIM,
        "max_segments": MAX_SEGMENTS,
        "recall_convention": "queries without positives count as failures (none here)",
    }
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
