"""Issue 27 item 4 targets: sequence-mode answers carry an estimate, and it says "unknown" off the map.

    .venv/bin/python benchmarks/bench_sequence_unknown.py [--frames 300] [--start 1000] [--length 10]

1. **Foreign stream.** A Corridor map (default preset, its 111 reference frames) and a stream of ``--frames``
   consecutive Nordland winter frames (from file ``--start`` of ``nordland-64x32/winter``) through
   ``pipeline.sequences.localize_stream`` with ``--sequence-length`` L — what ``vprkit localize --frames
   --sequence-length`` prints. Reported: the share of frames with a confidence (target: all) and the share
   judged unknown (target ≥ 0.95); the same frames one by one (no sequence) for reference.
2. **Nordland-600 with sequences.** Winter queries vs the summer map (every 4th file, exact frame, 224×112,
   default preset), ``pipeline.evaluate(sequence_length=L)`` (offline, centre-anchored): R@1, the share of
   queries judged unknown, the share of accepted answers that are right (target ≥ 0.90) and of right
   answers that are accepted.

The numbers depend on the confidence of :func:`vprkit.pipeline.localization.estimate_for`. Maps are cached
under ``benchmarks/results/cache/sequence_unknown/`` (not committed); the table goes to
``benchmarks/results/sequence_unknown.json``.
"""

from __future__ import annotations

import argparse
import time

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
COLUMNS = ["case", "mode", "frames", "with_confidence", "unknown", "R@1", "accepted", "accepted_right", "s"]


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
    return {
        "case": "nordland winter → corridor map",
        "mode": "single image" if length is None else f"sequence L={length}",
        "frames": len(results),
        "with_confidence": sum(e is not None and e.confidence is not None for e in estimates),
        "unknown": round(float(np.mean([e is not None and e.unknown is True for e in estimates])), 4),
        "R@1": None,
        "accepted": sum(e is not None and e.unknown is False for e in estimates),
        "accepted_right": None,
        "s": round(time.perf_counter() - t0, 1),
    }


def nordland_600(length: int) -> dict:
    """Nordland-600 winter vs summer, sequence length ``length``: recall and the estimates against the truth."""
    t0 = time.perf_counter()
    config = resolve(None, image_size=NORDLAND_SIZE)
    summary = pipeline.evaluate(NORDLAND_600, config, out=CACHE / "nordland600", sequence_length=length, progress=False)
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
        "s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="consecutive Nordland winter frames to stream")
    parser.add_argument("--start", type=int, default=1000, help="the first of them (file index)")
    parser.add_argument("--length", type=int, default=10, help="sequence length")
    args = parser.parse_args()
    setup()
    CACHE.mkdir(parents=True, exist_ok=True)
    m = corridor_map()
    rows = [foreign_stream(m, args.start, args.frames, None), foreign_stream(m, args.start, args.frames, args.length)]
    rows.append(nordland_600(args.length))
    seq, n600 = rows[1], rows[2]
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
