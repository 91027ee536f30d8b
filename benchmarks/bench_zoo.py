"""Cost of every model-zoo preset on this machine: ms/image, peak RSS, descriptor size and bytes per place.

Random weights cost the same as the published ones, so no download is needed: each preset loads a file of
seeded random weights in its official checkpoint layout (``tests/zoo/official_checkpoints.py``, kept under
``benchmarks/results/cache/zoo-weights``) through ``--weights``, exactly as a user's downloaded file; the
AnyLoc presets (a 4.4 GB ViT-G file) use the backbone's ``pretrained=False`` random network and a vocabulary
of the same size fitted on random descriptors. Each preset runs in its own process so its peak RSS is its own.
Timing: batch 1 at the preset's evaluation size, applied to a 480×640 camera frame for CNNs (CosPlace and
EigenPlaces keep its size, NetVLAD's shrink-only rule too) and 322×322 for ViTs (MegaLoc takes any size:
SALAD's and BoQ's evaluation size), ``--threads``
intra-op threads, median over ``--runs`` after ``--warmup`` runs.

    python benchmarks/bench_zoo.py [--presets megaloc boq-r50 …] [--threads 2] [--runs 5]

Prints a table and writes ``benchmarks/results/bench_zoo.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS_CACHE = RESULTS / "cache" / "zoo-weights"
TESTS_ZOO = Path(__file__).resolve().parent.parent / "tests" / "zoo"
ANY_SIZE_CNN = (480, 640)  # a preset that takes any size (CosPlace, EigenPlaces): a VGA camera frame
ANY_SIZE_VIT = (322, 322)  # MegaLoc: at SALAD's and BoQ's evaluation size
FLOAT_BYTES = {"float32": 4, "float16": 2}


def random_config(name: str):
    """The preset with random weights: its official-layout random file, or (AnyLoc) random networks."""
    from vprkit.presets import resolve
    from vprkit.zoo import zoo_entry_of

    config = resolve(name)
    entry = zoo_entry_of(config)
    if entry is not None and not entry.extra.get("archive"):
        sys.path.insert(0, str(TESTS_ZOO))
        from official_checkpoints import write_official_checkpoint

        folder = WEIGHTS_CACHE / name
        done = folder / "written"
        if not done.is_file():
            path = write_official_checkpoint(name, folder)
            done.write_text(str(path))
        return resolve(name, weights=done.read_text())
    backbone = {k: v for k, v in config.backbone_options.items() if k not in ("zoo", "weights")}
    if "pretrained" in _schema_options("backbone", config.backbone):
        backbone["pretrained"] = False
    aggregator = {k: v for k, v in config.aggregator_options.items() if k not in ("zoo", "weights", "checkpoint")}
    return config.replace(backbone_options=backbone, aggregator_options=aggregator)


def _schema_options(kind: str, name: str) -> set[str]:
    from vprkit.options import schema

    return {o.name for o in schema(kind, name).options}


def build_models(config):
    import numpy as np
    import torch

    from vprkit.aggregation import AGGREGATORS, fit_vocabulary
    from vprkit.aggregation.options import AggregationOptions
    from vprkit.aggregation.vocabulary import wants_vocabulary
    from vprkit.backbones import build_backbone

    backbone = build_backbone(config.backbone, **dict(config.backbone_options)).eval()
    options = dict(config.aggregator_options)
    if wants_vocabulary(AggregationOptions.from_config(config)):
        rng = np.random.default_rng(0)
        sample = rng.standard_normal((max(4096, 8 * config.vocabulary.k), backbone.dim)).astype(np.float32)
        options["vocabulary"] = fit_vocabulary(sample, k=config.vocabulary.k, centres=config.vocabulary.centres)
    aggregator = AGGREGATORS.get(config.aggregator)(backbone.dim, **options).eval()
    torch.manual_seed(0)
    return backbone, aggregator


def measure_one(name: str, threads: int, runs: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    config = random_config(name)
    backbone, aggregator = build_models(config)
    from vprkit.images import target_size

    m = backbone.size_multiple
    frame = ANY_SIZE_VIT if m == 14 else ANY_SIZE_CNN
    h, w = target_size(frame, config.image)  # fixed sizes as they are; max_side/keep_aspect applied to the frame
    h, w = (
        (max(m, round(v / m) * m) for v in (h, w)) if config.image.to_multiple == "resize" else (h // m * m, w // m * m)
    )
    x = torch.rand(1, 3, h, w)
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            descriptor = aggregator(backbone(x))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    dim = int(descriptor.shape[-1])
    return {
        "preset": name,
        "input": f"{w}x{h}",
        "ms_per_image": 1000 * statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "dim": dim,
        "bytes_per_place": dim * FLOAT_BYTES.get(config.store_dtype, 4),
        "threads": threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", help="default: every zoo preset")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.threads, args.runs, args.warmup)))
        return
    from vprkit.zoo import zoo_presets

    names = args.presets or [c.name for c in zoo_presets()]
    rows = []
    print(f"{'preset':<26} {'input':>9} {'ms/image':>9} {'peak RSS MB':>12} {'dim':>7} {'bytes/place':>12}")
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--threads", str(args.threads), "--runs", str(args.runs)]
        cmd += ["--warmup", str(args.warmup)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{name:<26} failed: {last}")
            rows.append({"preset": name, "error": last})
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"{name:<26} {r['input']:>9} {r['ms_per_image']:>9.0f} {r['peak_rss_mb']:>12.0f} {r['dim']:>7} "
            f"{r['bytes_per_place']:>12,}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_zoo.json"
    out.write_text(json.dumps({"threads": args.threads, "runs": args.runs, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
