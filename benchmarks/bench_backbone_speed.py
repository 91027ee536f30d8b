"""Backbone forward throughput alone (no decoding, no aggregation): EfficientNet-Lite0 block 10 and Lite2 block 14.

Protocol: 64 real Corridor images (falls back to random pixels without the data), decoded and resized
to 320×240 *before* timing, batches of 8, 2 threads, float32 on CPU, under ``torch.inference_mode()``,
the inference-optimised backbone (``build_backbone`` default / ``optimise_for_inference()``). One
warm-up batch, then ``--passes`` timed passes over all images; the median pass gives images/s.

Each run is stored under a label (``--label before`` / ``--label after``; other labels are kept) in
``benchmarks/results/backbone_speed.json``, and the table printed compares every stored label.

Run: ``python benchmarks/bench_backbone_speed.py --label after [--passes 3] [--images 64]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "backbone_speed.json"
DATA = Path(os.environ.get("VPRKIT_DATA", REPO.parent / "shared" / "datasets")).resolve()
MODELS = [("efficientnet-lite0", 10), ("efficientnet-lite2", 14)]
WIDTH, HEIGHT = 320, 240
BATCH = 8
THREADS = 2


def load_pixels(n: int) -> tuple[torch.Tensor, str]:
    """``n×3×240×320`` float pixels in [0, 1]: Corridor reference images, or random when absent."""
    folder = DATA / "corridor" / "ref"
    files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if not files:
        return torch.rand(n, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0)), "random"
    from PIL import Image

    out = []
    for i in range(n):
        with Image.open(files[i % len(files)]) as img:
            arr = np.asarray(img.convert("RGB").resize((WIDTH, HEIGHT), Image.BILINEAR), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out), f"corridor/ref ({len(files)} files)"


def time_model(model: torch.nn.Module, pixels: torch.Tensor, passes: int) -> list[float]:
    """Seconds per pass over all ``pixels`` in batches of ``BATCH``."""
    batches = list(pixels.split(BATCH))
    times = []
    with torch.inference_mode():
        model(batches[0])  # warm-up: oneDNN primitives, allocator
        for _ in range(passes):
            start = time.perf_counter()
            for b in batches:
                model(b)
            times.append(time.perf_counter() - start)
    return times


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src/vprkit/backbones"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return rev + ("+edits" if dirty else "")
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="after", help="name of this measurement in the JSON (e.g. before / after)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--output", type=Path, default=RESULTS, help="JSON file holding the labelled runs")
    args = ap.parse_args()
    results = args.output

    torch.set_num_threads(args.threads)
    from vprkit.backbones import build_backbone

    pixels, source = load_pixels(args.images)
    rows = []
    for name, block in MODELS:
        model = build_backbone(name, block=block)
        optimise = getattr(model, "optimise_for_inference", None)
        if optimise is not None:
            model = optimise()
        times = time_model(model, pixels, args.passes)
        med = statistics.median(times)
        rows.append(
            {
                "model": name,
                "block": block,
                "img_per_s": round(len(pixels) / med, 1),
                "best_img_per_s": round(len(pixels) / min(times), 1),
                "ms_per_batch": round(1000 * med * BATCH / len(pixels), 1),
                "passes_s": [round(t, 3) for t in times],
            }
        )

    stored = json.loads(results.read_text()) if results.is_file() else {}
    stored.setdefault("runs", {})[args.label] = {
        "rows": rows,
        "revision": git_revision(),
        "images": len(pixels),
        "source": source,
        "size": f"{WIDTH}x{HEIGHT}",
        "batch": BATCH,
        "threads": args.threads,
        "passes": args.passes,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(stored, indent=2) + "\n")

    runs = stored["runs"]
    labels = list(runs)
    header = f"{'model':<20} {'block':>5} " + " ".join(f"{lab + ' img/s':>14}" for lab in labels)
    if len(labels) > 1:
        header += f" {'change':>8}"
    print(
        f"backbone forward only: {WIDTH}x{HEIGHT}, batch {BATCH}, {args.threads} threads, median of {args.passes} passes over {len(pixels)} images ({source})"
    )
    print(header)
    for name, block in MODELS:
        vals = []
        for lab in labels:
            match = [r for r in runs[lab]["rows"] if r["model"] == name and r["block"] == block]
            vals.append(match[0]["img_per_s"] if match else float("nan"))
        line = f"{name:<20} {block:>5} " + " ".join(f"{v:>14.1f}" for v in vals)
        if len(labels) > 1:
            line += f" {100 * (vals[-1] / vals[0] - 1):>+7.1f}%"
        print(line)
    print(f"\nwrote {results} (label {args.label!r}, load average {runs[args.label]['loadavg_1min']})", file=sys.stderr)


if __name__ == "__main__":
    main()
