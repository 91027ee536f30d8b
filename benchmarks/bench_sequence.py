"""Sequence matching (SeqSLAM-style) on real data: Recall@1 against sequence length, trajectory and options.

    .venv/bin/python benchmarks/bench_sequence.py [--precomputed DIR] [--seeds 3] [--timing-queries 200]

- Nordland-600 (``nordland-64x32:600``: winter queries vs summer map, every 4th file, exact frame,
  224×112, default preset): single image vs sequences of L ∈ {1, 3, 5, 8, 10} with straight lines
  over velocities 1–3 rows/query, with and without SeqSLAM's contrast normalisation (R = 10);
  the true velocity alone (1) and fractional velocities for reference; flexible trajectories.
- Variable speed: the winter queries with 0–2 frames dropped at random (seeded) between consecutive
  queries — speed 1–3 rows per query, changing every frame, not known to the matcher.
- Corridor (default preset, 320×240): the queries in order against the reference run, ±2 frames.
- Every sequence row twice: the query at the end of its window (causal, what a stream does) and in
  its centre (offline: evaluation and loop closure).
- Cost per query of the sequence step on a 3,576-place map (full Nordland summer): the online
  matcher's ``push`` of one similarity row, median ms, and the similarity row itself (N×D product).

Descriptors are computed with vprkit from ../shared/datasets and cached in
benchmarks/results/cache/ (not committed); ``--precomputed DIR`` reads ``{corridor,nordland600,nordland}-default.npz``
(keys map, query, positives) computed elsewhere with the same preset instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, NORDLAND_600, NORDLAND_SIZE, RESULTS, report, setup  # noqa: E402

from vprkit.retrieval.sequence import (
    OnlineSequenceMatcher,
    SequenceSettings,  # noqa: E402
    sequence_scores,
)

CACHE = RESULTS / "cache" / "sequence"
LENGTHS = (1, 3, 5, 8, 10)
SEQSLAM_R = 10
TURN = 0.02  # the turn penalty compared with the default (none) for flexible trajectories
DROP_MAX = 2  # frames dropped between consecutive queries in the variable-speed run: 0 … DROP_MAX
TARGETS = {"nordland_L10": 0.95, "nordland_L5": 0.85, "variable_L10": 0.90, "corridor": 0.99, "ms_per_query": 5.0}
COLUMNS = ["data", "method", "anchor", "L", "contrast", "hub", "velocities", "R@1", "R@5"]
ANCHORS = ("end", "centre")


def _descriptors(name: str, precomputed: Path | None) -> dict[str, np.ndarray]:
    """map, query (L2-normalised, time/route order) and positives (list of arrays) for a data set."""
    if precomputed is not None:
        z = np.load(precomputed / f"{name}-default.npz")
        out = {"map": z["map"].astype(np.float32), "query": z["query"].astype(np.float32), "map_keys": z["map_keys"]}
        out["positives"] = [np.array([int(x) for x in s.split(",") if x], np.int64) for s in z["positives"]]
        return out
    path = CACHE / f"{name}.npz"
    if not path.exists():
        _compute(name, path)
    z = np.load(path)
    return {
        "map": z["map"],
        "query": z["query"],
        "map_keys": z["map_keys"],
        "positives": [np.array([int(x) for x in s.split(",") if x], np.int64) for s in z["positives"]],
    }


def _compute(name: str, path: Path) -> None:
    """Build the default-preset map of the data set and describe its queries with it (vprkit's own pipeline)."""
    from vprkit import pipeline
    from vprkit.datasets import load_dataset
    from vprkit.images import FolderImages
    from vprkit.io import atomic_savez
    from vprkit.presets import resolve

    specs = {
        "corridor": (str(DATA / "corridor"), None),
        "nordland600": (NORDLAND_600, NORDLAND_SIZE),
        "nordland": (str(DATA / "nordland-64x32"), NORDLAND_SIZE),
    }
    spec, size = specs[name]
    ds = load_dataset(spec)
    config = resolve(None, image_size=size)
    map_dir = CACHE / f"{name}-map"
    pipeline.build_map(FolderImages(ds.database_dir, ds.database_images), map_dir, config, progress=True)
    m = pipeline.open_map(map_dir, read_only=True)
    got: dict[str, np.ndarray] = {}
    for qb in pipeline.query_batches(m, FolderImages(ds.queries_dir, ds.query_images), progress=True):
        got.update(zip(qb.keys, qb.global_descriptors))
    row = {k: i for i, k in enumerate(m.keys)}
    order = [row[k] for k in ds.database_images]  # ground truth refers to the dataset's database order
    gt = ds.ground_truth
    atomic_savez(
        path,
        map=m.store.read_global().astype(np.float32)[order],
        map_keys=np.array(ds.database_images),
        query=np.stack([got[k] for k in ds.query_images]),
        positives=np.array([",".join(map(str, gt.positives[i])) for i in range(len(ds.query_images))]),
    )


def _recall(scores: np.ndarray, positives: list[np.ndarray], n: int) -> float:
    top = np.argsort(-scores, axis=1)[:, :n]
    return float(np.mean([np.isin(top[i], positives[i]).any() for i in range(len(positives))]))


def _row(data: str, method: str, settings: SequenceSettings | None, sim: np.ndarray, positives) -> dict:
    scores = sim if settings is None else sequence_scores(sim, settings)
    v = "-" if settings is None else ",".join(f"{x:g}" for x in settings.velocities)
    return {
        "data": data,
        "method": method,
        "anchor": "-" if settings is None else settings.anchor,
        "L": 1 if settings is None else settings.length,
        "contrast": "-" if settings is None or not settings.contrast_window else f"R={settings.contrast_window}",
        "hub": "-" if settings is None else ("on" if settings.hub_correction else "off"),
        "velocities": v
        if settings is None or settings.trajectory == "line"
        else f"steps {int(settings.min_velocity)}-{int(settings.max_velocity)}, turn {settings.turn_penalty:g}",
        "R@1": round(_recall(scores, positives, 1), 3),
        "R@5": round(_recall(scores, positives, 5), 3),
    }


def nordland_rows(d: dict) -> list[dict]:
    sim = d["query"] @ d["map"].T
    pos = d["positives"]
    rows = [_row("nordland-600", "single image", None, sim, pos)]
    for anchor in ANCHORS:
        for contrast in (None, SEQSLAM_R):
            for L in LENGTHS[1:]:
                for hub in (True, False):
                    rows.append(
                        _row(
                            "nordland-600",
                            "line",
                            SequenceSettings(length=L, contrast_window=contrast, anchor=anchor, hub_correction=hub),
                            sim,
                            pos,
                        )
                    )
    for anchor in ANCHORS:
        for L in (5, 10):
            rows.append(
                _row(
                    "nordland-600",
                    "line, true velocity only",
                    SequenceSettings(length=L, min_velocity=1, max_velocity=1, anchor=anchor),
                    sim,
                    pos,
                )
            )
            rows.append(
                _row(
                    "nordland-600",
                    "line, fractional velocities",
                    SequenceSettings(length=L, min_velocity=0.5, max_velocity=3, velocity_step=0.5, anchor=anchor),
                    sim,
                    pos,
                )
            )
            rows.append(
                _row(
                    "nordland-600",
                    "flexible",
                    SequenceSettings(length=L, trajectory="flexible", anchor=anchor),
                    sim,
                    pos,
                )
            )
            rows.append(
                _row(
                    "nordland-600",
                    "flexible",
                    SequenceSettings(length=L, trajectory="flexible", anchor=anchor, turn_penalty=TURN),
                    sim,
                    pos,
                )
            )
    return rows


def variable_speed_rows(d: dict, seeds: int) -> list[dict]:
    sim_all = d["query"] @ d["map"].T
    rows = []
    methods = [("single image", None)]
    for anchor in ANCHORS:
        for L in (5, 10):
            methods += [
                ("line", SequenceSettings(length=L, anchor=anchor)),
                ("flexible", SequenceSettings(length=L, trajectory="flexible", anchor=anchor)),
                ("flexible", SequenceSettings(length=L, trajectory="flexible", anchor=anchor, hub_correction=False)),
                ("flexible", SequenceSettings(length=L, trajectory="flexible", turn_penalty=TURN, anchor=anchor)),
            ]
    for name, settings in methods:
        per_seed = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            steps = 1 + rng.integers(0, DROP_MAX + 1, size=len(sim_all))
            idx = np.concatenate([[0], np.cumsum(steps)])
            idx = idx[idx < len(sim_all)]
            per_seed.append(
                _row("nordland-600 variable speed", name, settings, sim_all[idx], [d["positives"][i] for i in idx])
            )
        row = dict(per_seed[0])
        for key in ("R@1", "R@5"):
            row[key] = round(float(np.mean([r[key] for r in per_seed])), 3)
        row["method"] = f"{name} (mean of {seeds} seeds)"
        rows.append(row)
    return rows


def corridor_rows(d: dict) -> list[dict]:
    sim = d["query"] @ d["map"].T
    rows = [_row("corridor", "single image", None, sim, d["positives"])]
    for anchor in ANCHORS:
        for L in (3, 5, 10):
            for hub in (True, False):
                rows.append(
                    _row(
                        "corridor",
                        "line",
                        SequenceSettings(length=L, anchor=anchor, hub_correction=hub),
                        sim,
                        d["positives"],
                    )
                )
    return rows


def timing_rows(d: dict, n_queries: int) -> list[dict]:
    """Median ms per query of the online sequence step (and of the similarity row) on the full map."""
    m = d["map"]
    q = d["query"][:n_queries]
    rows = []
    t_sim = []
    sims = []
    for g in q:
        t = time.perf_counter()
        sims.append(m @ g)
        t_sim.append(time.perf_counter() - t)
    for name, settings in (
        ("line", SequenceSettings(length=10)),
        ("line + contrast", SequenceSettings(length=10, contrast_window=SEQSLAM_R)),
        ("flexible", SequenceSettings(length=10, trajectory="flexible")),
    ):
        online = OnlineSequenceMatcher(settings)
        times = []
        for s in sims:
            t = time.perf_counter()
            online.push(s)
            times.append(time.perf_counter() - t)
        rows.append(
            {
                "map rows": len(m),
                "method": name,
                "L": 10,
                "sequence step ms/query (median)": round(1000 * float(np.median(times)), 3),
                "similarity row ms/query (median)": round(1000 * float(np.median(t_sim)), 3),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--precomputed", type=Path, default=None, help="Folder with {corridor,nordland600,nordland}-default.npz"
    )
    ap.add_argument("--seeds", type=int, default=3, help="Seeds of the variable-speed query sequence.")
    ap.add_argument("--timing-queries", type=int, default=200, help="Queries timed on the full Nordland map.")
    args = ap.parse_args()
    setup()
    CACHE.mkdir(parents=True, exist_ok=True)
    n600 = _descriptors("nordland600", args.precomputed)
    rows = (
        nordland_rows(n600)
        + variable_speed_rows(n600, args.seeds)
        + corridor_rows(_descriptors("corridor", args.precomputed))
    )
    report("sequence", rows, COLUMNS, extra={"targets": TARGETS})
    timing = timing_rows(_descriptors("nordland", args.precomputed), args.timing_queries)
    print()
    report("sequence_timing", timing, list(timing[0]))


if __name__ == "__main__":
    main()
