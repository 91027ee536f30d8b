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
    python benchmarks/bench_rerank.py --record                        # also save every query's shortlist scores
    python benchmarks/bench_rerank.py --replay                        # re-fuse the saved scores (seconds, no matching)

**Replay.** ``--record`` matches and spatially verifies every candidate of every query's whole
shortlist (whatever the preset's gap and ``verify``) and saves, per query set, patches and spatial
scorer, each query's shortlist (dataset indices), global scores, per-scale spatial scores and
per-scale mutual-nearest-neighbour counts in ``--cache``/replay. ``--replay`` then ranks every query
again as the preset would: its global gap and the candidates it matches
(:func:`vprkit.rerank.fusion.within_global_gap`, :func:`~vprkit.rerank.fusion.matched_candidates`),
its cascade (:func:`vprkit.rerank.cascade.select_for_verification` on the recorded counts, unverified
candidates filled as the live cascade fills them) and :func:`vprkit.rerank.fusion.rank_shortlist` —
the functions the live re-ranker uses — so one recording serves every preset that shares its patches
and scorer (``performance-reference``'s fusion, gap and cascade variants), fusion and cascade constants
are compared in seconds, and the result is the live Recall@N of the same preset (compare a live run's
table; recorded runs report the replayed ranking). Times are not replayed (a recording verifies more).
A preset whose cascade picks candidates by a fast spatial scorer (``prescorer``, e.g. ``performance``'s
``affine``) also replays from a recording by that scorer on the same patches: it needs a recording with
``scorer = "affine"`` too (``performance`` replays from its patches' ``ransac`` and ``affine`` recordings; this
script has no option to record the affine scorer yet).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import torch
from common import NORDLAND_600, NORDLAND_SIZE, THREADS, report, setup

from vprkit import pipeline
from vprkit.datasets import load_dataset
from vprkit.datasets.transforms import transformed_queries
from vprkit.evaluation.metrics import recall_at_n
from vprkit.images import ImageSpec
from vprkit.presets import get_rerank_config, map_extensions_for, resolve
from vprkit.rerank.cascade import fill_unverified, prescore, select_for_verification
from vprkit.rerank.fusion import fuse_scales, guard_options, matched_candidates, rank_shortlist, within_global_gap
from vprkit.rerank.places import RouteNeighbours, place_radius
from vprkit.rerank.reranker import ScoreRecord
from vprkit.rerank.saved import state_digest

DATASETS = {"corridor": ("corridor", None), "nordland": (NORDLAND_600, NORDLAND_SIZE)}
NS = (1, 5, 10)
TRANSFORMS = ["none", "rotate:15", "rotate:30", "rotate:90", "zoom:1.3", "zoom:1.6", "crop:0.7"]
RERANKS = ["speed", "storage", "performance", "performance-reference"]
REFERENCE = "performance-reference"
CACHE = Path(os.environ.get("VPRKIT_CACHE", Path.home() / ".cache" / "vprkit")) / "bench_rerank"


def run_queries(m, ds, reranker, k: int, record: list | None = None) -> tuple[np.ndarray, list[int]]:
    """Ranked database indices (dataset order) per query, and the candidates matched per query.

    With ``record`` (a list), the re-ranker matches and verifies the whole shortlist (no gap, a
    cascade that verifies everything, so the mutual-match counts are known) and each query's
    ``(shortlist as dataset indices, global scores, matched mask, spatial scores scales × matched,
    mutual-match counts scales × matched, map rows, each scale's perfect score)`` is appended.
    """
    db_index = {key: i for i, key in enumerate(ds.database_images)}
    row_to_db = np.array([db_index[key] for key in m.keys] + [-1])
    rows_all, matched = [], []

    def observe(r: ScoreRecord) -> None:
        matched.append(r.n_matched)
        if record is not None:
            record.append(
                (
                    row_to_db[r.rows],
                    np.asarray(r.global_scores),
                    np.asarray(r.matched),
                    r.spatial,
                    r.match_counts,
                    np.asarray(r.rows),
                    r.perfect,
                )
            )

    if reranker is not None:
        # recording: the whole shortlist, every candidate verified by a cascade (so its mutual-match counts are known)
        reranker.record_scores(observe, whole_shortlist=record is not None)
    for qb in pipeline.query_batches(m, ds.queries_dir, ds.query_images):
        rows, _ = pipeline.search(m, qb, k, reranker)
        rows_all.append(row_to_db[rows])
    return np.concatenate(rows_all), matched


def replay_path(cache: Path, queries: str, base, rerank: str, scorer: str | None = None) -> Path:
    """Where a recording goes: named by query set, spatial scorer (the preset's, or ``scorer``) and the
    digest of the patches it matched — every preset sharing those replays it."""
    settings = get_rerank_config(rerank)
    digest = state_digest(map_extensions_for(settings, base)["patches"])
    scorer = scorer or settings.scorer
    return cache / "replay" / f"{queries.replace(':', '_').replace('/', '_')}-{base.name}-{scorer}-{digest}.npz"


def save_record(path: Path, record: list, m) -> None:
    """Per-query shortlists (dataset indices and map rows), global scores, spatial scores and
    mutual-match counts (NaN where not matched), padded to the longest shortlist (−1 / NaN), and each
    scale's perfect score per query (``min_agreement``); and the map's size and poses, from which a
    replay finds the top-1's place (``same_place``)."""
    n = max(len(r[0]) for r in record)
    scales = max(r[3].shape[0] for r in record if r[3] is not None)
    heads = np.full((len(record), n), -1, np.int64)
    rows = np.full((len(record), n), -1, np.int64)
    glob = np.full((len(record), n), np.nan)
    spatial = np.full((len(record), scales, n), np.nan)
    counts = np.full((len(record), scales, n), np.nan)
    perfect = np.full((len(record), scales), np.nan)
    for i, (h, g, matched, p, c, r, best) in enumerate(record):
        heads[i, : len(h)], glob[i, : len(h)], rows[i, : len(h)], perfect[i] = h, g, r, best
        if p is not None:
            spatial[i, :, np.flatnonzero(matched)] = p.T
            counts[i, :, np.flatnonzero(matched)] = c.T
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        heads=heads,
        rows=rows,
        global_scores=glob,
        spatial=spatial,
        counts=counts,
        perfect=perfect,
        n_rows=len(m.store),
        poses=m.store.read_poses(),
        place_radius=place_radius(lambda r: m.store.read_global(r), len(m.store)),
    )


def load_recording(path: Path) -> dict[str, np.ndarray]:
    """A recording's arrays, read and decompressed once per file version (a grid of replays,
    ``bench_rerank_lodo.py``, re-fuses one recording hundreds of times)."""
    return _load_recording(Path(path), Path(path).stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_recording(path: Path, mtime_ns: int) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def replay(
    path: Path, settings, guard: dict | None = None, n_rows: int | None = None, first_path: Path | None = None
) -> np.ndarray:
    """Ranked dataset indices per query from a whole-shortlist recording, as ``settings`` rank live:
    the candidates its gap keeps plus those its guard matches for statistics; with ``verify``, the
    cascade's choice by mutual-match counts among them, the rest at the lowest verified score; with
    ``same_place``, the top-1's place from the recorded map rows and poses (``"auto"`` is replayed with the
    map's fixed lag radius, :func:`~vprkit.rerank.places.place_radius` — an approximation: live, each top-1's
    place reaches as far as its neighbours look alike, which needs the map's descriptors); fused by
    :func:`~vprkit.rerank.fusion.rank_shortlist` (``guard`` overrides
    :func:`~vprkit.rerank.fusion.guard_options`). Recordings made before map rows were kept take the
    dataset indices as rows (the benchmark's maps are built in dataset order) and need ``n_rows``.
    A preset with a ``prescorer`` also needs ``first_path``, a recording of the same query set and
    patches by that scorer: its scores pick the candidates to verify and stand for the others.
    A preset's ``fine_budget`` is not replayed: a recording holds every candidate's finest scale, and
    the replay uses them all (live, only the candidates within the budget are matched there)."""
    data = load_recording(path)
    first = None
    if settings.verify is not None and settings.prescorer is not None:
        if first_path is None or not first_path.exists():
            raise ValueError(
                f"replaying {settings.name} needs a recording by its prescorer {settings.prescorer!r} "
                f"({first_path}); record a preset with scorer = {settings.prescorer!r} and the same patches"
            )
        first = load_recording(first_path)
        if not np.array_equal(first["heads"], data["heads"]):
            raise ValueError(f"{first_path.name} and {path.name} recorded different shortlists")
        first = first["spatial"]
    if "counts" not in data:
        raise ValueError(f"{path.name} is an older partial recording; run --record again")
    if settings.min_agreement is not None and "perfect" not in data:
        raise ValueError(
            f"{path.name} was recorded before perfect scores were kept, which {settings.name}'s "
            "min_agreement needs; run --record again"
        )
    perfects = data["perfect"] if "perfect" in data else [None] * len(data["heads"])
    guard = guard or guard_options(settings.global_gap)
    places = None
    if settings.same_place is not None:
        radius = settings.same_place
        if radius == "auto":
            if "place_radius" not in data:
                raise ValueError(f"{path.name} was recorded before the map's place radius was kept; run --record again")
            radius = int(data["place_radius"])
        if "rows" in data:
            places = RouteNeighbours(int(data["n_rows"]), radius, data["poses"])
        elif n_rows is not None:
            places = RouteNeighbours(n_rows, radius)
        else:
            raise ValueError(f"{path.name} has no map rows: pass n_rows (the map's size) to replay same_place")
    all_rows = data["rows"] if "rows" in data else data["heads"]
    out = []
    firsts = first if first is not None else [None] * len(data["heads"])
    for heads, rows, g, spatial, counts, pre, perfect in zip(
        data["heads"], all_rows, data["global_scores"], data["spatial"], data["counts"], firsts, perfects
    ):
        valid = heads >= 0
        heads, rows, g, spatial, counts = heads[valid], rows[valid], g[valid], spatial[:, valid], counts[:, valid]
        keep = within_global_gap(g, settings.global_gap)
        matched = matched_candidates(g, keep, guard["minimum"])
        per_scale = spatial[:, matched] if keep.sum() >= 2 else None
        if per_scale is not None and settings.verify is not None and pre is not None:
            pre = pre[:, valid][:, matched]
            chosen = select_for_verification(fuse_scales(list(pre), settings.weights), settings.verify)
            per_scale = np.where(chosen[None, :], per_scale, pre)
        elif per_scale is not None and settings.verify is not None:
            chosen = select_for_verification(prescore(counts[:, matched], settings.weights), settings.verify)
            per_scale = fill_unverified(per_scale, chosen)
        same_place = None if places is None else places.mask(rows)
        fused = rank_shortlist(
            per_scale,
            g,
            keep,
            settings.weights,
            settings.global_weight,
            matched,
            guard["alpha"],
            same_place,
            perfect,
            settings.min_agreement,
        )
        out.append(heads[np.argsort(-fused, kind="stable")][: max(NS)])
    return np.stack(out)


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
        pipeline.build_map(
            ds.database_dir,
            out,
            cfg,
            poses=ds.database_poses,
            keys=ds.database_images,
            progress=False,
            log=lambda _: None,
        )
        print(f"built {out.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def _recall_row(queries: str, method: str, rec: dict, global_r1: float | None = None, **extra) -> dict:
    row = {"queries": queries, "method": method, **{f"R@{n}": round(rec[f"R@{n}"], 3) for n in NS}}
    if global_r1 is not None:
        row["dR@1"] = round(rec["R@1"] - global_r1, 3)
    return {**row, **extra}


def replayed_rows(args, qs, base, rerank: str, global_r1: float | None) -> tuple[list[dict], float | None]:
    """Rows of ``rerank`` replayed from a recording of query set ``qs`` (and the global row, the first time)."""
    settings = get_rerank_config(rerank)
    path = replay_path(args.cache, qs.name, base, rerank)
    if not path.exists():
        print(f"{qs.name} {rerank}: no recording ({path}); run --record first", file=sys.stderr)
        return [], global_r1
    rows = []
    if global_r1 is None:
        rec = recall_at_n(np.load(path)["heads"][:, : max(NS)], qs.ground_truth, NS)  # recorded in global order
        global_r1 = rec["R@1"]
        rows.append(_recall_row(qs.name, f"global {args.preset}", rec))
    if settings.fine_budget is not None:
        print(
            f"{qs.name} {rerank}: its fine_budget is not replayed (every recorded candidate's finest scale is used)",
            file=sys.stderr,
        )
    first = replay_path(args.cache, qs.name, base, rerank, settings.prescorer) if settings.prescorer else None
    rec = recall_at_n(replay(path, settings, n_rows=len(qs.database_images), first_path=first), qs.ground_truth, NS)
    rows.append(_recall_row(qs.name, f"replay {rerank}", rec, global_r1))
    return rows, global_r1


def live_rows(args, qs, base, rerank: str, map_dir: Path, global_r1: float | None) -> tuple[list[dict], float | None]:
    """Rows of ``rerank`` re-ranking query set ``qs`` live (recording it with ``--record``), and the global row."""
    settings = get_rerank_config(rerank)
    m = pipeline.open_map(map_dir, read_only=True)
    rows = []
    if global_r1 is None:
        g, _ = run_queries(m, qs, None, max(NS))
        rec = recall_at_n(g, qs.ground_truth, NS)
        global_r1 = rec["R@1"]
        rows.append(_recall_row(qs.name, f"global {args.preset}", rec))
    reranker = pipeline.get_reranker(m, rerank, log=lambda _: None)
    assert reranker.stored, "the map should hold the preset's patches"
    record: list | None = [] if args.record else None
    r, matched = run_queries(m, qs, reranker, max(NS), record)
    if record is not None:
        path = replay_path(args.cache, qs.name, base, rerank)
        save_record(path, record, m)
        # the preset's ranking (its gap applied to the whole-shortlist scores); a prescorer's cascade
        # needs that scorer's recording too, else the exact scorer's whole-shortlist ranking is shown
        first = replay_path(args.cache, qs.name, base, rerank, settings.prescorer) if settings.prescorer else None
        if first is not None and not first.exists():
            print(
                f"{qs.name} {rerank}: no {settings.prescorer} recording yet, showing every candidate verified",
                file=sys.stderr,
            )
            settings, first = settings.replace(verify=None, prescorer=None), None
        r = replay(path, settings, first_path=first)
    rec = recall_at_n(r, qs.ground_truth, NS)
    timings = reranker.timings or [0.0]
    rows.append(
        _recall_row(
            qs.name,
            f"{'record' if args.record else 'rerank'} {rerank}",
            rec,
            global_r1,
            **{
                "s/query": round(statistics.mean(timings), 4),
                "s_p90": round(float(np.percentile(timings, 90)), 4),
                "matched": round(sum(matched) / max(1, len(qs.query_images)), 1),
                "bytes/image": int(m.store.extra_bytes().get("patches", 0.0)),
            },
        )
    )
    reranker.close()
    print(
        f"{qs.name} {rerank}: R@1 {rec['R@1']:.3f} (global {global_r1:.3f})  {statistics.mean(timings):.3f} s/q",
        file=sys.stderr,
        flush=True,
    )
    return rows, global_r1


def compare_with_reference(rows_out: list[dict]) -> None:
    """Each live row's bytes and time as a fraction of ``performance-reference``'s on the same queries."""
    ref = {(r["queries"]): r for r in rows_out if r["method"] == f"rerank {REFERENCE}"}
    for r in rows_out:
        base_row = ref.get(r["queries"])
        if r.get("bytes/image") and base_row is not None and base_row["bytes/image"] and r["s/query"]:
            r["bytes vs ref"] = f"1/{base_row['bytes/image'] / max(1, r['bytes/image']):.1f}"
            r["time vs ref"] = f"1/{base_row['s/query'] / r['s/query']:.1f}"


def dataset_and_settings(dname: str, preset: str | None):
    """A benchmark dataset and the global settings its maps are built with (Nordland at its 224×112)."""
    spec, size = DATASETS[dname]
    base = resolve(preset)
    if size is not None:
        base = base.replace(image=ImageSpec(size, "fixed"))
    return load_dataset(spec), base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="effnet2-vlad-ma4", help="global preset")
    ap.add_argument("--presets", nargs="+", default=RERANKS, help="re-ranking presets")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument(
        "--transforms", nargs="+", default=TRANSFORMS, help="query sets: none, KIND:AMOUNT (rotate, zoom, crop)"
    )
    ap.add_argument("--limit", type=int, default=None, help="only the first N queries of the transformed sets")
    ap.add_argument("--cache", type=Path, default=CACHE, help="maps and transformed queries, reused by later runs")
    ap.add_argument("--name", default="rerank")
    ap.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="torch threads; on a machine shared with other jobs use 1 (two threads that wait for "
        "each other's core made the small matching products 20× slower under load)",
    )
    ap.add_argument("--record", action="store_true", help="match whole shortlists and save the scores for --replay")
    ap.add_argument("--replay", action="store_true", help="re-fuse recorded scores instead of matching (no times)")
    args = ap.parse_args()
    setup()
    torch.set_num_threads(args.threads)
    rows_out = []
    for dname in args.datasets:
        ds, base = dataset_and_settings(dname, args.preset)
        maps = {} if args.replay else {r: cached_map(ds, base, r, args.cache) for r in args.presets}
        for qs in query_sets(ds, args.transforms, args.limit, args.cache):
            global_r1 = None
            for rerank in args.presets:
                if args.replay:
                    rows, global_r1 = replayed_rows(args, qs, base, rerank, global_r1)
                else:
                    rows, global_r1 = live_rows(args, qs, base, rerank, maps[rerank], global_r1)
                rows_out += rows
    compare_with_reference(rows_out)
    cols = [
        "queries",
        "method",
        "R@1",
        "R@5",
        "R@10",
        "dR@1",
        "s/query",
        "s_p90",
        "matched",
        "bytes/image",
        "bytes vs ref",
        "time vs ref",
    ]
    report(
        args.name,
        rows_out,
        cols,
        {
            "global_preset": args.preset,
            "threads": args.threads,
            "load_average": os.getloadavg(),
            "presets": {p: get_rerank_config(p).to_dict() for p in args.presets},
        },
    )


if __name__ == "__main__":
    main()
