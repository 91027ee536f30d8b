"""Issue 26, item 4: peak memory of decoding uploads, before and after the decoded-bytes bound.

    python benchmarks/bench_upload_memory.py [--before-rev 26c6c21] [--parallel 1 4] [--name upload_memory]

Every case runs in a fresh interpreter that reads the file, then decodes it in ``parallel`` threads at once
through ``vprkit.uploads.decode_image`` with the default preset's size hint (240×320, what
``LiveMap.decode`` passes); the peak RSS increase is the child's own peak RSS after the decodes
(``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs`` once the file is read) minus
its RSS before them (``ru_maxrss`` would carry the parent's peak across fork and exec). Files: the issue's 16-bit 6300×6300 PNGs (grey ``I;16``, ~100 KB, and RGB,
~270 KB; vertical gradients written by hand, as PIL cannot write 48-bit RGB) and a normal 4000×3000 JPEG
(a phone photo). Code versions:

- ``before``: the code at ``--before-rev`` (exported with ``git archive`` to a temporary folder, first on
  ``PYTHONPATH``): no decoded-bytes limit, no budget, full-size float64 copies when scaling 16 bits.
- ``after, no budget``: this tree with the budget and the per-image limit set out of the way (a
  ``DecodeBudget`` of 1 TB and no per-image limit): what the reduction right after decoding and the
  strip-wise 16-bit scaling do alone.
- ``after``: this tree with its defaults (160 MB per image, 320 MB budget, 10 s wait).
- ``after, 250 MB per image``: the defaults with the per-image limit raised so that the 16-bit RGB PNG
  (238 MB decoded) is admitted: the budget then lets one decode at a time.

Prints a table and writes ``benchmarks/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# The last commit before issue 26's decoded-bytes bound (uploads.py and images.py as they were).
BASELINE_REV = "26c6c21"
SIZE_HINT = (240, 320)  # the default preset's image size (height, width)
ATTACK_SIDE = 6300  # 39.7 Mpx: under the 40 Mpx upload limit
PHOTO_SIZE = (4000, 3000)
MB = 1_000_000
KB = 1024  # /proc/self/status counts in kibibytes
UNLIMITED_BYTES = 10**12
CHILD_TIMEOUT_S = 600
PNG_COLOUR_TYPES = {1: 0, 3: 2}  # samples per pixel → PNG colour type (grey, RGB)
RAISED_PER_IMAGE_BYTES = 250 * MB  # admits the 238 MB 16-bit RGB PNG; the 320 MB budget then holds one at a time
# Code version → (source tree, decode_image options: a budget's bytes and the per-image limit; None = default).
VERSIONS = {
    "before": ("before", {}),
    "after, no budget": ("after", {"budget_bytes": UNLIMITED_BYTES, "max_decoded_bytes": UNLIMITED_BYTES}),
    "after": ("after", {}),
    "after, 250 MB per image": ("after", {"max_decoded_bytes": RAISED_PER_IMAGE_BYTES}),
}

_CHILD = """
import json, sys, threading, time
from vprkit import uploads
args = json.loads(sys.argv[1])
data = open(args["path"], "rb").read()
options = {}
if "budget_bytes" in args["options"]:
    options["budget"] = uploads.DecodeBudget(args["options"]["budget_bytes"])
if "max_decoded_bytes" in args["options"]:
    options["max_decoded_bytes"] = args["options"]["max_decoded_bytes"]
def peak_kb():
    # VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's peak over fork and exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
try:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak so far becomes the current RSS
except OSError:
    pass  # then the peak of reading the file is the baseline
before = peak_kb()
outcomes = []
def one():
    try:
        outcomes.append("x".join(map(str, uploads.decode_image(data, "upload", size_hint=tuple(args["hint"]), **options).size)))
    except Exception as exc:
        outcomes.append(f"{type(exc).__name__}: {exc}")
started = time.perf_counter()
threads = [threading.Thread(target=one) for _ in range(args["parallel"])]
for t in threads:
    t.start()
for t in threads:
    t.join()
seconds = time.perf_counter() - started
after = peak_kb()
print(json.dumps({"peak_increase_kb": after - before, "seconds": seconds, "outcomes": outcomes}))
"""


def sixteen_bit_png(width: int, height: int, channels: int) -> bytes:
    """A 16-bit grey or RGB PNG of a vertical gradient (each row one value, Sub filter: compresses ~1000:1)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    pixel_bytes = 2 * channels
    compressor = zlib.compressobj(9)
    parts = []
    for y in range(height):
        row = bytearray(1 + width * pixel_bytes)
        row[0] = 1  # Sub filter
        row[1 : 1 + pixel_bytes] = struct.pack(">H", (y * 65535) // max(1, height - 1)) * channels
        parts.append(compressor.compress(bytes(row)))
    parts.append(compressor.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def phone_photo() -> bytes:
    """A 4000×3000 JPEG of smooth colours and noise (a normal upload)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(26)
    height, width = PHOTO_SIZE[1], PHOTO_SIZE[0]
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _files(folder: Path) -> dict[str, Path]:
    made = {
        "16-bit grey PNG 6300²": sixteen_bit_png(ATTACK_SIDE, ATTACK_SIDE, 1),
        "16-bit RGB PNG 6300²": sixteen_bit_png(ATTACK_SIDE, ATTACK_SIDE, 3),
        "JPEG 4000×3000": phone_photo(),
    }
    paths = {}
    for index, (label, data) in enumerate(made.items()):
        paths[label] = folder / f"upload-{index}.bin"
        paths[label].write_bytes(data)
    return paths


def _export(rev: str, folder: Path) -> Path:
    """``src`` of ``rev`` under ``folder`` (git archive), for the ``before`` runs."""
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


def _run(path: Path, parallel: int, version: str, before_src: Path) -> dict:
    """One case in a fresh interpreter."""
    args = {
        "path": str(path),
        "parallel": parallel,
        "hint": SIZE_HINT,
        "options": VERSIONS[version][1],
    }
    src = before_src if VERSIONS[version][0] == "before" else REPO / "src"
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
    )
    if child.returncode != 0:
        raise SystemExit(f"{version} {path.name} ×{parallel} failed:\n{child.stderr}")
    return json.loads(child.stdout)


def _outcome(outcomes: list[str]) -> str:
    """``4 × 332x332`` or the first refusal, shortened."""
    kinds = sorted(set(outcomes))
    return ", ".join(f"{outcomes.count(kind)} × {kind[:70]}" for kind in kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before-rev", default=BASELINE_REV)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--name", default="upload_memory")
    options = parser.parse_args()
    from vprkit.evaluation.report import format_table, write_json

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        folder = Path(tmp)
        before_src = _export(options.before_rev, folder)
        for label, path in _files(folder).items():
            for parallel in options.parallel:
                for version in VERSIONS:
                    measured = _run(path, parallel, version, before_src)
                    rows.append(
                        {
                            "file": label,
                            "file_kb": round(path.stat().st_size / 1000),
                            "parallel": parallel,
                            "code": version,
                            "peak_rss_increase_mb": round(measured["peak_increase_kb"] * KB / MB),
                            "seconds": round(measured["seconds"], 2),
                            "outcome": _outcome(measured["outcomes"]),
                        }
                    )
                    print(format_table(rows[-1:]), file=sys.stderr)
    columns = ["file", "file_kb", "parallel", "code", "peak_rss_increase_mb", "seconds", "outcome"]
    print(format_table(rows, columns))
    extra = {
        "protocol": __doc__,
        "size_hint": SIZE_HINT,
        "before_rev": options.before_rev,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = write_json({"rows": rows, **extra}, RESULTS / f"{options.name}.json")
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
