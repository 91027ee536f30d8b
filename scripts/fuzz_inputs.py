#!/usr/bin/env python
"""Short, time-bounded fuzz run of the untrusted-input readers: images, pose CSVs, ground-truth CSVs.

Each input goes to one target (chosen by its first byte):

- ``image``: :func:`vprkit.images.read_image` on the bytes — must return an RGB uint8 image or
  raise :class:`~vprkit.errors.ImageReadError`;
- ``poses``: :func:`vprkit.datasets.poses.read_poses` on the bytes written to a file;
- ``ground truth``: :func:`vprkit.datasets.ground_truth.read_ground_truth_csv` and
  ``GroundTruth.from_list`` — must return or raise :class:`~vprkit.errors.DatasetError`;
- ``map.json``, ``vocabulary``, ``store``, ``index``: one file of a small valid map replaced by the
  bytes, then the map opened read-only (:func:`vprkit.maps.open_map_data`) and its descriptors, entries
  and poses read — must work or raise a project error (:class:`~vprkit.errors.VPRKitError`).

Anything else (another exception type, or an image that is not RGB uint8) is a finding: the run
prints how many inputs it tried, per target, and each distinct finding (exception type, message,
where it was raised) with the first input that triggered it saved under ``--out``.

A second campaign, ``--campaign map-files``, damages the files of a real small map (built from Corridor
images with the library, like a served one: a compressed index in shards with ``descriptors.npy``, a
``calibration.json``, a place added live in ``live/append-*.h5``, saved re-ranking state) — the manifests
``map.json``, ``index.json``, ``build.json``, ``calibration.json`` and the derived files — by truncation,
bit flips, emptying, JSON edits, swaps with the same file of another map or of a map of another preset,
shard paths leading out of the map folder (``../x``, ``/etc/hostname``) and duplicated append files; then
opens the map (read-only or writable, as ``localize`` and ``serve`` do) and localises a map image. Every
outcome must be a one-line :class:`~vprkit.errors.VPRKitError` or the correct answer (the image finds
itself, no place twice, the pristine confidence, strict JSON); anything else — another exception, a
silent wrong answer — is a finding (see :mod:`map_file_fuzz`).

Engines: ``atheris`` (coverage-guided libFuzzer, Python code of PIL and vprkit instrumented) when
it is installed, else a seeded random-mutation loop over valid seed files (``--engine mutation``
forces it; the same ``--seed`` replays the same inputs). Run::

    .venv/bin/python scripts/fuzz_inputs.py --seconds 60
    .venv/bin/python scripts/fuzz_inputs.py --campaign map-files --seconds 60
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

TARGETS = ("image", "poses", "ground truth", "map.json", "vocabulary", "store", "index")
# The map file each map target replaces.
MAP_TARGET_FILES = {"map.json": "map.json", "vocabulary": "vocabulary.npz", "store": "store.h5", "index": "index.faiss"}
DEFAULT_SECONDS = 60.0
# libFuzzer limits for one input (a mutated header may declare a 12000×12000 image, 432 MB).
ATHERIS_RSS_LIMIT_MB = 4096
ATHERIS_INPUT_TIMEOUT_S = 30
MAX_INPUT_BYTES = 256 * 1024  # a small map's store.h5 is ~40 KB
# Tokens that matter to the CSV grammars and image headers, spliced in by the mutation loop.
TOKENS = [
    b",",
    b";",
    b"\t",
    b'"',
    b"\r\n",
    b"\n",
    b" ",
    b"nan",
    b"inf",
    b"1e999",
    b"-",
    b".",
    b"./",
    b"\\",
    b"\x00",
    b"\xff",
    b"\xef\xbb\xbf",
    b"query",
    b"positives",
    b"image",
    b"lat",
    b"lon",
    b"easting",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x00",
    b"\x7f\xff",
    b"\x80\x00\x00\x00",
]
QUERY_KEYS = ["a.jpg", "b.jpg", "query/c.jpg"]
DB_KEYS = ["r0.jpg", "r1.jpg", "ref/r2.jpg"]


def _seed_inputs() -> list[bytes]:
    """Valid files of every kind the readers accept, each prefixed with its target byte."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    images: list[bytes] = []

    def add(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        images.append(buf.getvalue())

    for fmt in ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "PPM"):
        add(rgb, fmt)
    add(rgb.convert("RGBA"), "PNG")
    add(rgb.convert("CMYK"), "JPEG")
    add(rgb.convert("P"), "PNG", transparency=0)
    add(Image.fromarray(rng.integers(0, 4000, (12, 16)).astype(np.uint16)), "PNG")
    add(Image.fromarray(rng.random((12, 16)).astype(np.float32)), "TIFF")
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    add(frames[0], "GIF", save_all=True, append_images=frames[1:])
    add(frames[0], "PNG", save_all=True, append_images=frames[1:])
    exif = rgb.getexif()
    exif[0x0112] = 6
    add(rgb, "JPEG", exif=exif.tobytes())
    poses = [
        b"image,easting,northing,heading,timestamp\na.jpg,10.5,20,90,1.5\nb.jpg,13,2.4e1,,\n",
        b"image;lat;lon\nq.jpg;48.8583;2.2945\nr.jpg;48.8584;2.2946\n",
        b"\xef\xbb\xbfIMAGE\tX\tY\r\n./a.jpg\t1\t2\r\n\r\nsub\\b.jpg\t3\t4\r\n",
        b'image,easting,northing\n"a,b.jpg",1,2\n',
    ]
    gts = [
        b"query,positives\nquery/c.jpg,ref/r2.jpg r0.jpg\na.jpg,r1.jpg\n",
        b"query,positives\na.jpg,r0.jpg,r1.jpg,ref/r2.jpg\nb.jpg,\n",
        b'query;positives\na.jpg;"r0.jpg,r1.jpg"\nb.jpg\n',
        b"\xef\xbb\xbfquery\tpositives\r\na.jpg\tr0.jpg; r1.jpg\r\n",
    ]
    out = [bytes([0]) + d for d in images] + [bytes([1]) + d for d in poses] + [bytes([2]) + d for d in gts]
    template = _template_map(Path(tempfile.mkdtemp(prefix="vprkit-fuzz-map-")))
    for target, name in MAP_TARGET_FILES.items():
        out.append(bytes([TARGETS.index(target)]) + (template / name).read_bytes())
    shutil.rmtree(template.parent, ignore_errors=True)
    return out


def _template_map(folder: Path) -> Path:
    """A small valid map (8 rows, 16-d, a K=4 vocabulary) written with the stores' own writers, no model."""
    import json

    import numpy as np

    from vprkit.aggregation.vlad import fit_vocabulary
    from vprkit.maps import FaissIndex, MapStore
    from vprkit.presets import resolve

    d = folder / "map"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((8, 16)).astype(np.float32)
    store = MapStore(d)
    store.write_shard(
        [f"img{i}.jpg" for i in range(8)],
        vectors,
        rng.random((8, 2)) * 100,
        entries={"content_sha256": np.array([b"a" * 64] * 8), "run": np.zeros(8)},
    )
    store.consolidate()
    FaissIndex.build(vectors).save(d / "index.faiss")
    fit_vocabulary(rng.standard_normal((64, 16)).astype(np.float32), k=4).save(d / "vocabulary.npz")
    config = resolve("effnet-gem").to_dict()
    (d / "map.json").write_text(json.dumps({"config": config, "images_root": None, "runs": []}))
    return d


class Harness:
    """Runs one input against its target and records findings (non-project exceptions)."""

    def __init__(self, out: Path | None):
        from vprkit.datasets.ground_truth import GroundTruth, read_ground_truth_csv
        from vprkit.datasets.poses import read_poses
        from vprkit.errors import VPRKitError
        from vprkit.images import read_image

        self.read_image, self.read_poses = read_image, read_poses
        self.read_gt, self.GroundTruth = read_ground_truth_csv, GroundTruth
        self.project_error = VPRKitError
        self.counts = dict.fromkeys(TARGETS, 0)
        self.project_errors = dict.fromkeys(TARGETS, 0)
        self.findings: dict[tuple[str, str, str], dict] = {}
        self.out = out
        self.tmp = Path(tempfile.mkdtemp(prefix="vprkit-fuzz-"))
        self.csv_path = self.tmp / "input.csv"
        from vprkit.maps import open_map_data

        self.open_map_data = open_map_data
        self.template = _template_map(self.tmp / "template")
        self.map_dir = self.tmp / "map"

    def run(self, data: bytes) -> None:
        if not data:
            return
        target = TARGETS[data[0] % len(TARGETS)]
        body = data[1:MAX_INPUT_BYTES]
        self.counts[target] += 1
        try:
            if target == "image":
                import numpy as np

                img = self.read_image(body, notes=[], name="fuzz-input")
                arr = np.asarray(img)
                if img.mode != "RGB" or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                    raise AssertionError(f"read_image returned mode {img.mode}, array {arr.dtype} {arr.shape}")
            elif target in MAP_TARGET_FILES:
                shutil.rmtree(self.map_dir, ignore_errors=True)
                shutil.copytree(self.template, self.map_dir)
                (self.map_dir / MAP_TARGET_FILES[target]).write_bytes(body)
                m = self.open_map_data(self.map_dir, read_only=True)
                m.store.read_global()
                m.store.read_entries()
                m.index.search(m.store.read_global()[:1], 3) if len(m) else None
            else:
                self.csv_path.write_bytes(body)
                if target == "poses":
                    self.read_poses(self.csv_path)
                else:
                    self.read_gt(self.csv_path)
                    self.GroundTruth.from_list(self.csv_path, QUERY_KEYS, DB_KEYS, "query", "ref")
        except self.project_error:
            self.project_errors[target] += 1
        except Exception as exc:  # the finding: anything that is not the project's own error class
            self._record(target, exc, data)

    def _record(self, target: str, exc: Exception, data: bytes) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno} in {tb[-1].name}" if tb else "?"
        key = (target, type(exc).__name__, where)
        if key in self.findings:
            self.findings[key]["count"] += 1
            return
        saved = ""
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            saved = str(
                self.out / f"{target.replace(' ', '_')}-{type(exc).__name__}-{hashlib.sha1(data).hexdigest()[:10]}.bin"
            )
            Path(saved).write_bytes(data)
        self.findings[key] = {"count": 1, "message": str(exc)[:200], "saved": saved}

    def report(self, engine: str, seconds: float) -> int:
        shutil.rmtree(self.tmp, ignore_errors=True)
        total = sum(self.counts.values())
        per = ", ".join(f"{t}: {self.counts[t]} ({self.project_errors[t]} project errors)" for t in TARGETS)
        print(f"fuzz_inputs [{engine}]: tried {total} inputs in {seconds:.1f} s — {per}")
        if not self.findings:
            print("no exception other than the project's own error classes (VPRKitError) and no invalid image")
            return 0
        print(f"{len(self.findings)} distinct finding(s) (not a VPRKitError):")
        for (target, name, where), info in sorted(self.findings.items()):
            print(
                f"  [{target}] {name} at {where} ×{info['count']}: {info['message']}"
                + (f" — input {info['saved']}" if info["saved"] else "")
            )
        return 1


def _mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1) if buf else 0
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(1, len(buf)) if len(buf) > 1 else 0
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte to an interesting value
            i = rng.randrange(1, len(buf)) if len(buf) > 1 else 0
            buf[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op == 2:  # insert a token
            buf[max(pos, 1) : max(pos, 1)] = rng.choice(TOKENS)
        elif op == 3 and len(buf) > 2:  # delete a range
            j = min(len(buf), pos + rng.randint(1, 64))
            del buf[max(pos, 1) : j]
        elif op == 4 and len(buf) > 2:  # truncate
            del buf[rng.randrange(1, len(buf)) :]
        elif op == 5 and len(buf) > 2:  # duplicate a chunk
            i = rng.randrange(1, len(buf))
            chunk = buf[i : i + rng.randint(1, 128)]
            buf[pos:pos] = chunk
        elif op == 6:  # splice the tail of another seed
            other = rng.choice(seeds)
            buf[max(pos, 1) :] = other[rng.randrange(1, len(other)) :]
        elif op == 7 and buf:  # overwrite with random bytes
            n = rng.randint(1, 16)
            buf[max(pos, 1) : max(pos, 1) + n] = bytes(rng.randrange(256) for _ in range(n))
    return bytes(buf[:MAX_INPUT_BYTES])


def run_mutation(harness: Harness, seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    seeds = _seed_inputs()
    for s in seeds:
        harness.run(s)
    pool = list(seeds)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        child = _mutate(rng, rng.choice(pool), seeds)
        harness.run(child)
        if rng.random() < 0.05 and len(pool) < 2000:
            pool.append(child)  # keep some mutants as parents: deeper mutations over time


def run_atheris(harness_factory, seconds: float, seed: int, out: Path | None) -> None:
    import atheris

    with atheris.instrument_imports(include=["PIL", "vprkit", "csv"]):
        import PIL.Image  # noqa: F401
        import vprkit.datasets.ground_truth  # noqa: F401
        import vprkit.images  # noqa: F401
        import vprkit.maps  # noqa: F401
    harness = harness_factory()
    atheris_dirs: list[Path] = []  # seed corpus (libFuzzer also writes new inputs there)
    start = time.monotonic()
    deadline = start + seconds

    def one_input(data: bytes) -> None:
        if time.monotonic() > deadline:
            code = harness.report("atheris", time.monotonic() - start)
            for d in atheris_dirs:
                shutil.rmtree(d, ignore_errors=True)
            sys.stdout.flush()
            os._exit(code)  # libFuzzer exits without running Python's atexit handlers
        harness.run(data)

    corpus = Path(tempfile.mkdtemp(prefix="vprkit-fuzz-corpus-"))
    atheris_dirs.append(corpus)
    for i, s in enumerate(_seed_inputs()):
        (corpus / f"seed-{i:03d}").write_bytes(s)
    args = [
        sys.argv[0],
        f"-seed={seed or 1}",
        f"-rss_limit_mb={ATHERIS_RSS_LIMIT_MB}",
        f"-timeout={ATHERIS_INPUT_TIMEOUT_S}",
        f"-max_len={MAX_INPUT_BYTES}",
        f"-max_total_time={int(seconds) + 60}",
        "-print_final_stats=0",
        str(corpus),
    ]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="how long to fuzz (default 60)")
    parser.add_argument("--engine", choices=("auto", "atheris", "mutation"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="random seed (mutation loop; libFuzzer -seed)")
    parser.add_argument("--out", type=Path, default=None, help="folder to save the first input of each finding")
    parser.add_argument(
        "--campaign",
        choices=("inputs", "map-files"),
        default="inputs",
        help="inputs: byte-level fuzzing of the readers (default); map-files: damaged files of a real map",
    )
    parser.add_argument("--data", type=Path, default=None, help="map-files: datasets folder holding corridor/")
    parser.add_argument("--json-out", type=Path, default=None, help="map-files: write every outcome as JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning / truncated-file warnings
    import logging

    logging.disable(logging.CRITICAL)  # the library's warnings about each broken input are expected here
    if args.campaign == "map-files":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from map_file_fuzz import run_map_file_campaign

        return run_map_file_campaign(args.seconds, args.seed, args.data, args.json_out)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "mutation"
    if engine == "atheris":
        run_atheris(lambda: Harness(args.out), args.seconds, args.seed, args.out)
        return 0  # not reached: the time check in one_input exits
    harness = Harness(args.out)
    start = time.monotonic()
    run_mutation(harness, args.seconds, args.seed)
    return harness.report("mutation loop", time.monotonic() - start)


if __name__ == "__main__":
    sys.exit(main())
