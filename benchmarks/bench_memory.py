"""Issue "AnyLoc, faithfully", item 6: vocabulary + map building in bounded memory.

    python benchmarks/bench_memory.py [--budgets 64 512 none] [--limit N] [--preset effnet-vlad] [--name memory]

For each budget (MB; ``none`` = no budget, the defaults), a fresh subprocess builds a VLAD
vocabulary and a map of Nordland's summer images with ``Config.memory_budget_mb`` set, and reports
its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the child, so every run's peak
is its own). A separate idle child that only imports vprkit + torch and builds the backbone gives
the baseline, so the part attributable to the build (and so to the budget) is visible. For
comparison, "AnyLoc keep-all" is what AnyLoc's reference code would hold: every patch descriptor
of the map (images × patches per image × dim × 4 bytes), on the real grid of the image size used.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA, setup

NORDLAND_SUMMER = DATA / "nordland-64x32" / "summer"
DEFAULT_BUDGETS = ["64", "512"]
NO_BUDGET = "none"
MB = 2**20
KB_PER_MB = 1024  # ru_maxrss is in kilobytes on Linux
FLOAT32_BYTES = 4
CHILD_TIMEOUT_S = 3600


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KB_PER_MB


def _config(preset: str, budget: str):
    from vprkit.presets import resolve

    config = resolve(preset)
    return config if budget == NO_BUDGET else config.replace(memory_budget_mb=int(budget))


def child_baseline(args: argparse.Namespace) -> dict:
    """Import vprkit + torch and build the backbone, nothing else; then (after measuring) probe the grid."""
    from vprkit import pipeline
    from vprkit.backbones.extract import extract
    from vprkit.images import list_images

    config = _config(args.preset, NO_BUDGET)
    backbone = pipeline.load_backbone(config)
    rss = _peak_rss_mb()
    # the real patch grid at this preset's image size (after the RSS reading, so it does not count)
    key = list_images(NORDLAND_SUMMER)[0]
    _, feats = next(iter(extract(backbone, config, NORDLAND_SUMMER, [key])))
    h, w = feats.grid
    return {"baseline_rss_mb": rss, "grid": [h, w], "dim": feats.dim, "image_size": list(feats.image_size)}


def child_build(args: argparse.Namespace) -> dict:
    """Build the map (vocabulary from the map's own images, then every image encoded) under one budget."""
    from vprkit import pipeline
    from vprkit.aggregation import Vocabulary
    from vprkit.backbones.extract import decode_prefetch_images
    from vprkit.maps import VOCAB_FILE
    from vprkit.images import list_images

    config = _config(args.preset, args.budget)
    keys = list_images(NORDLAND_SUMMER)
    keys = keys[: args.limit] if args.limit else keys
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        t0 = time.perf_counter()
        info = pipeline.build_map(
            NORDLAND_SUMMER, Path(tmp) / "map", config, keys=keys, progress=False, log=lambda _: None
        )
        wall = time.perf_counter() - t0
        peak = _peak_rss_mb()
        meta = Vocabulary.load(Path(tmp) / "map" / VOCAB_FILE).metadata
    plan = config.memory_plan()
    return {
        "peak_rss_mb": peak,
        "wall_s": wall,
        "images": info["counts"]["images"],
        "pool_bytes": meta["sample_bytes"],
        "pooled_descriptors": meta["pooled_descriptors"],
        "descriptors_seen": meta["descriptors_seen"],
        "vocabulary_images": meta["n_images"],
        "plan": plan.to_dict(),
        "decode_prefetch_images": decode_prefetch_images(config, plan),
        "map_descriptor_bytes": info["counts"]["images"] * info["descriptor_dim"] * FLOAT32_BYTES,
    }


def run_child(mode: str, args: argparse.Namespace, budget: str = NO_BUDGET) -> dict:
    """Run one measurement in a fresh interpreter (its ru_maxrss is its own) and parse its JSON line."""
    cmd = [sys.executable, __file__, "--child", mode, "--preset", args.preset, "--budget", budget]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=Path(__file__).parent)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run (budget {budget}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", nargs="+", default=DEFAULT_BUDGETS, help=f"MB per run; '{NO_BUDGET}' = the defaults")
    ap.add_argument("--limit", type=int, default=None, help="only the first N summer images (quick run)")
    ap.add_argument("--preset", default="effnet-vlad")
    ap.add_argument("--name", default="memory", help="results file: benchmarks/results/NAME.json")
    ap.add_argument("--child", choices=["baseline", "build"], help=argparse.SUPPRESS)
    ap.add_argument("--budget", default=NO_BUDGET, help=argparse.SUPPRESS)
    args = ap.parse_args()
    setup()
    if args.child:
        result = child_baseline(args) if args.child == "baseline" else child_build(args)
        print(json.dumps(result))
        return

    base = run_child("baseline", args)
    print(
        f"baseline (import + backbone): {base['baseline_rss_mb']:.0f} MB; grid {base['grid']} × {base['dim']}-d "
        f"at {base['image_size']}",
        file=sys.stderr,
        flush=True,
    )
    patches = base["grid"][0] * base["grid"][1]
    rows = []
    for budget in args.budgets:
        r = run_child("build", args, budget)
        keep_all = r["images"] * patches * base["dim"] * FLOAT32_BYTES
        plan = r["plan"]
        rows.append(
            {
                "budget_mb": budget,
                "images": r["images"],
                "peak_rss_mb": round(r["peak_rss_mb"]),
                "baseline_rss_mb": round(base["baseline_rss_mb"]),
                "above_baseline_mb": round(r["peak_rss_mb"] - base["baseline_rss_mb"]),
                "pool_held_mb": round(r["pool_bytes"] / MB, 1),
                "pool_cap_mb": round(plan["vocabulary_pool_bytes"] / MB, 1),
                "cache_cap_mb": round(plan["feature_cache_bytes"] / MB, 1),
                "decode_ahead_imgs": r["decode_prefetch_images"] or "all",
                "map_vectors_mb": round(r["map_descriptor_bytes"] / MB, 1),
                "anyloc_keep_all_mb": round(keep_all / MB, 1),
                "wall_s": round(r["wall_s"], 1),
                "pooled_descriptors": r["pooled_descriptors"],
                "descriptors_seen": r["descriptors_seen"],
                "vocabulary_images": r["vocabulary_images"],
            }
        )
        print(f"budget {budget}: peak RSS {r['peak_rss_mb']:.0f} MB, {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    cols = [
        "budget_mb",
        "images",
        "peak_rss_mb",
        "baseline_rss_mb",
        "above_baseline_mb",
        "pool_held_mb",
        "pool_cap_mb",
        "cache_cap_mb",
        "decode_ahead_imgs",
        "map_vectors_mb",
        "anyloc_keep_all_mb",
        "wall_s",
    ]
    from common import report

    report(
        args.name,
        rows,
        cols,
        {
            "preset": args.preset,
            "dataset": str(NORDLAND_SUMMER),
            "baseline": base,
            "keep_all_formula": "images × grid_h × grid_w × dim × 4 bytes",
        },
    )


if __name__ == "__main__":
    main()
