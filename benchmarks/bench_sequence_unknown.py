"""Issue 27 item 4 targets: sequence-mode answers carry an estimate, and it says "unknown" off the map.

    .venv/bin/python benchmarks/bench_sequence_unknown.py [--frames 300] [--start 1000] [--length 10] [--single]

1. **Foreign stream.** A Corridor map (default preset, its 111 reference frames) and a stream of ``--frames``
   consecutive Nordland winter frames (from file ``--start`` of ``nordland-64x32/winter``) through
   ``pipeline.sequences.localize_stream`` with ``--sequence-length`` L — what ``vprkit localize --frames
   --sequence-length`` prints. Reported: the share of frames with a confidence (target: all) and the share
   judged unknown (target ≥ 0.95); with ``--single``, the same frames one by one (no sequence) for reference.
2. **Nordland-600 with sequences.** Winter queries vs the summer map (every 4th file, exact frame, 224×112,
   default preset), ``pipeline.evaluate(sequence_length=L)`` (offline, centre-anchored): R@1, the share of
   queries judged unknown, the share of accepted answers that are right (target ≥ 0.90) and of right
   answers that are accepted, and the ROC AUC (right vs wrong top-1) of the confidence and of the sequence
   support alone.

The numbers depend on the confidence of :func:`vprkit.pipeline.localization.estimate_for`. Maps are cached
under ``benchmarks/results/cache/sequence_unknown/`` (not committed); the table goes to
``benchmarks/results/sequence_unknown.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from common import DATA, NORDLAND_600, NORDLAND_SIZE, RESULTS, report, setup
from vprkit import pipeline
from vprkit.images import list_images
from vprkit.pipeline.sequences import localize_stream
from vprkit.presets import resolve

CACHE = RESULTS / "cache" / "sequence_unknown"
TARGET_UNKNOWN = 0.95
TARGET_ACCEPTED_RIGHT = 0.90
TOP_K = 10
COLUMNS = [
    "case",
    "mode",
    "frames",
    "with_confidence",
    "unknown",
    "R@1",
    "accepted",
    "accepted_right",
    "AUC conf r/w",
    "AUC support r/w",
    "support p50/p95",
    "s",
]


def corridor_map():
    """The Corridor reference map (default preset), built once into the cache."""
    out = CACHE / "corridor-map"
    if not (out / "map.json").exists():
        pipeline.build_map(DATA / "corridor" / "ref", out, resolve(None), progress=False)
    return pipeline.open_map(out, read_only=True)


def foreign_stream(m, start: int, frames: int, length: int | None) -> dict:
    """Nordland winter frames streamed against the Corridor map: how many carry a confidence, how many are unknown."""
    winter = DATA / "nordland-64x32" / "winter"
    names = list_images(winter)[start : start + frames]
    t0 = time.perf_counter()
    results = list(localize_stream(m, [winter / n for n in names], top_k=TOP_K, sequence_length=length))
    estimates = [r.estimate for r in results]
    mode = "single" if length is None else f"L{length}"
    with open(CACHE / f"foreign_stream_{mode}.jsonl", "w", encoding="utf-8") as f:  # for fitting a sequence model
        f.writelines(json.dumps({"query": r.query, "estimate": r.to_dict().get("estimate")}) + "\n" for r in results)
    support = [e.evidence.get("sequence", {}).get("support") for e in estimates if e is not None]
    support = np.array([v for v in support if v is not None], np.float64)
    return {
        "case": "nordland winter → corridor map",
        "mode": "single image" if length is None else f"sequence L={length}",
        "frames": len(results),
        "with_confidence": sum(e is not None and e.confidence is not None for e in estimates),
        "unknown": round(float(np.mean([e is not None and e.unknown is True for e in estimates])), 4),
        "R@1": None,
        "accepted": sum(e is not None and e.unknown is False for e in estimates),
        "accepted_right": None,
        "support p50/p95": None if not support.size else f"{np.median(support):.2f}/{np.percentile(support, 95):.2f}",
        "s": round(time.perf_counter() - t0, 1),
    }


def auc(scores: np.ndarray, right: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` for right vs wrong answers (Mann–Whitney, ties half); None without both kinds."""
    pos, neg = scores[right], scores[~right]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return round(float(greater + ties / 2), 4)


def right_vs_wrong(run: Path) -> dict:
    """AUC of the confidence and of the sequence support for right vs wrong top-1, from a run's files."""
    with open(run / "per_query.csv", encoding="utf-8") as f:
        right_of = {r["query"]: r["correct"] == "True" for r in csv.DictReader(f)}
    lines = [json.loads(x) for x in (run / "estimates.jsonl").read_text().splitlines()]
    right = np.array([right_of[x["query"]] for x in lines], bool)
    conf = np.array([np.nan if x["estimate"]["confidence"] is None else x["estimate"]["confidence"] for x in lines])
    support = np.array([x["estimate"]["evidence"]["sequence"]["support"] for x in lines], np.float64)
    return {"AUC conf r/w": auc(np.nan_to_num(conf, nan=-1.0), right), "AUC support r/w": auc(support, right)}


def support_quantiles(run: Path) -> str:
    """Median and 95th percentile of the sequence support of a run's queries."""
    lines = [json.loads(x) for x in (run / "estimates.jsonl").read_text().splitlines()]
    support = np.array([x["estimate"]["evidence"]["sequence"]["support"] for x in lines], np.float64)
    return f"{np.median(support):.2f}/{np.percentile(support, 95):.2f}"


def nordland_600(length: int) -> dict:
    """Nordland-600 winter vs summer, sequence length ``length``: recall and the estimates against the truth."""
    t0 = time.perf_counter()
    config = resolve(None, image_size=NORDLAND_SIZE)
    run = CACHE / "nordland600"
    summary = pipeline.evaluate(NORDLAND_600, config, out=run, sequence_length=length, progress=False)
    e = summary["estimates"]
    return {
        "case": "nordland-600 winter → summer",
        "mode": f"sequence L={length}",
        "frames": e["frames"],
        "with_confidence": e["with_confidence"],
        "unknown": e["unknown_share"],
        "R@1": round(summary["recall"]["R@1"], 4),
        "accepted": e["accepted"],
        "accepted_right": e["accepted_correct_share"],
        "right_accepted": e["correct_accepted_share"],
        **right_vs_wrong(run),
        "support p50/p95": support_quantiles(run),
        "s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="consecutive Nordland winter frames to stream")
    parser.add_argument("--start", type=int, default=1000, help="the first of them (file index)")
    parser.add_argument("--length", type=int, default=10, help="sequence length")
    parser.add_argument("--single", action="store_true", help="also stream the frames one by one (reference)")
    args = parser.parse_args()
    setup()
    CACHE.mkdir(parents=True, exist_ok=True)
    m = corridor_map()
    rows = [foreign_stream(m, args.start, args.frames, None)] if args.single else []
    seq = foreign_stream(m, args.start, args.frames, args.length)
    n600 = nordland_600(args.length)
    rows += [seq, n600]
    verdict = {
        "foreign_stream_all_have_confidence": seq["with_confidence"] == seq["frames"],
        "foreign_stream_unknown_share": seq["unknown"],
        "foreign_stream_unknown_target_met": seq["unknown"] >= TARGET_UNKNOWN,
        "nordland600_accepted_right": n600["accepted_right"],
        "nordland600_accepted_right_target_met": (n600["accepted_right"] or 0.0) >= TARGET_ACCEPTED_RIGHT,
    }
    report("sequence_unknown", rows, COLUMNS, {"targets": verdict, "args": vars(args)})
    for k, v in verdict.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
