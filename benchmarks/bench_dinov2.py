"""Throughput of vprkit's DINOv2 ViT-S/14 on CPU: AnyLoc's layer-10 value facet vs the whole network.

Random weights (speed does not depend on them), float32, a fixed number of threads. For each
image size it times

* ``layer-10 value``: blocks 0–9 plus block 10's value projection (what AnyLoc uses), and
* ``full model``: all 12 blocks plus the final LayerNorm (``facet="token", final_norm=True``),

each with the fused oneDNN kernels and with the portable ``F.linear`` path (``VPRKIT_ONEDNN=0``
equivalent), prints a table and writes ``benchmarks/results/dinov2.json``. The machine's load
average is recorded too: other processes on a small box change the numbers.

Run: ``python benchmarks/bench_dinov2.py [--sizes 224 322] [--batch 4] [--seconds 5] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vprkit.backbones import build_backbone
from vprkit.backbones import dinov2 as dv2

MODEL = "dinov2_vits14"
RESULTS = Path(__file__).resolve().parent / "results" / "dinov2.json"


def variants(depth: int, default_layer: int) -> dict[str, dict]:
    return {
        f"layer-{default_layer} value": dict(layer=default_layer, facet="value"),
        f"full model ({depth} blocks + norm)": dict(layer=depth - 1, facet="token", final_norm=True),
    }


def throughput(model: torch.nn.Module, batch: torch.Tensor, seconds: float, repeats: int = 3) -> tuple[float, float]:
    """Median and best images/s over ``repeats`` timed windows of about ``seconds / repeats`` each."""
    model(batch)  # warm-up: oneDNN primitive creation, allocator
    rates = []
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            model(batch)
            n += len(batch)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / repeats:
                break
        rates.append(n / elapsed)
    return statistics.median(rates), max(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 322], help="square image sides (multiples of 14)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = dv2.model_config(MODEL)
    models = {
        name: build_backbone(MODEL, pretrained=False, **kw)
        for name, kw in variants(cfg.depth, cfg.default_layer).items()
    }
    onednn_available = dv2._onednn_linear_works()
    paths = {"oneDNN": True, "portable": False} if onednn_available else {"portable": False}
    load_before = os.getloadavg()
    rows = []
    for size in args.sizes:
        batch = torch.rand(args.batch, 3, size, size)
        for name, model in models.items():
            for path, flag in paths.items():
                dv2._ONEDNN = flag
                median, best = throughput(model, batch, args.seconds)
                rows.append(
                    dict(
                        size=size,
                        variant=name,
                        path=path,
                        images_per_s=round(median, 2),
                        best_images_per_s=round(best, 2),
                        ms_per_image=round(1000 / median, 1),
                    )
                )
                print(
                    f"{size:>4}×{size:<4} {name:<28} {path:<9} {median:7.2f} img/s  (best {best:6.2f}, {1000 / median:6.1f} ms/img)",
                    flush=True,
                )
    dv2._ONEDNN = None  # back to auto-detection

    print(f"\n{MODEL}, batch {args.batch}, {args.threads} threads, float32, random weights")
    header = f"{'size':>9}  {'variant':<28}" + "".join(f"{p:>12}" for p in paths)
    print(header + "\n" + "-" * len(header))
    for size in args.sizes:
        for name in models:
            cells = [
                next(r for r in rows if r["size"] == size and r["variant"] == name and r["path"] == p) for p in paths
            ]
            print(f"{size:>4}×{size:<4}  {name:<28}" + "".join(f"{c['images_per_s']:>8.2f} i/s" for c in cells))
    load_after = os.getloadavg()
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (on {os.cpu_count()} CPUs)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": MODEL,
                "batch": args.batch,
                "threads": args.threads,
                "dtype": "float32",
                "weights": "random",
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "onednn_available": onednn_available,
                "load_average_before": load_before,
                "load_average_after": load_after,
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
