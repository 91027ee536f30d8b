"""Memory of an upload is bounded by its decoded bytes (issue 26, item 4).

A 92 KB 16-bit 6300×6300 PNG (under the 40 Mpx pixel limit) cost +730 MB peak RSS per ``/localize`` and
4 in parallel 3.1 GB: the 16-bit scaling made full-size float64 copies and nothing bounded uploads
decoding at once. These tests pin down the header's decoded-bytes estimate, the refusal before any pixel
is decoded, the reduction right after decoding, the process-wide :class:`DecodeBudget` and the peak RSS of
4 parallel 16-bit PNGs, measured in a fresh interpreter (its own VmHWM: ru_maxrss carries the parent's peak).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vprkit import images as images_module
from vprkit import uploads
from vprkit.errors import ImageReadError
from vprkit.images import DecodeNote, decoded_size, prepare_image, read_image
from vprkit.config import ImageSpec
from vprkit.uploads import (
    DEFAULT_DECODE_BUDGET_BYTES,
    DecodeBudget,
    DecodeBusyError,
    decode_image,
)

REPO = Path(__file__).resolve().parents[1]
# The shared datasets (as tests/conftest.py finds them): real Corridor JPEGs and Nordland PNGs as uploads.
DATA = Path(os.environ.get("VPRKIT_DATA", REPO.parent / "shared" / "datasets")).resolve()
# The default preset's image size (height, width): what LiveMap.size_hint hands decode_image.
DEFAULT_SIZE_HINT = (240, 320)
ATTACK_SIDE = 6300  # 39.7 Mpx: under the 40 Mpx upload limit
MB = 1_000_000
# The stated bound (README, service section): 4 parallel 16-bit 6300² PNGs through decode_image raise the
# peak RSS by at most the decode budget (320 MB; the four 16-bit grey ones decode to 4 × 79.4 MB, which it
# holds at once) plus 80 MB for the interpreter's and zlib's working memory. Before: 4.1 GB.
FOUR_PARALLEL_PEAK_BOUND_BYTES = DEFAULT_DECODE_BUDGET_BYTES + 80 * MB
# read_image of the same 16-bit grey PNG at full size (a map build, no reduction): its 2 bytes a pixel, the
# 8-bit result (1) and its RGB copy (4), plus 64 MB. Before: 1 GB (float64 copies, 8 bytes a pixel each).
FULL_SIZE_GREY16_PEAK_BOUND_BYTES = 7 * ATTACK_SIDE**2 + 64 * MB
PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # samples per pixel → PNG colour type


def sixteen_bit_png(width: int, height: int, channels: int) -> bytes:
    """A 16-bit PNG (grey, grey + alpha, RGB or RGBA) of a vertical gradient, written by hand (PIL cannot write
    48-bit RGB): every row is one value, stored with the Sub filter, so 6300² compresses to ~100–270 KB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    pixel_bytes = 2 * channels
    compressor = zlib.compressobj(9)
    parts = []
    for y in range(height):
        value = (y * 65535) // max(1, height - 1)
        row = bytearray(1 + width * pixel_bytes)
        row[0] = 1  # Sub filter: the first pixel as it is, every other one a zero difference
        row[1 : 1 + pixel_bytes] = struct.pack(">H", value) * channels
        parts.append(compressor.compress(bytes(row)))
    parts.append(compressor.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _encoded(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def attack_pngs(tmp_path_factory) -> dict[str, Path]:
    """The issue's 16-bit 6300² PNGs: grey (I;16) and RGB, written once for the module."""
    folder = tmp_path_factory.mktemp("attack")
    paths = {}
    for name, channels in (("grey16", 1), ("rgb16", 3)):
        paths[name] = folder / f"{name}.png"
        paths[name].write_bytes(sixteen_bit_png(ATTACK_SIDE, ATTACK_SIDE, channels))
    return paths


# ---- peak RSS, measured in a fresh interpreter ----------------------------------------------------------
_MEASURE = """
import json, sys, threading
from vprkit.images import read_image
from vprkit.uploads import decode_image
args = json.loads(sys.argv[1])
data = open(args["path"], "rb").read()
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
results = []
def one():
    try:
        if args["full_size"]:
            results.append(list(read_image(data, name="attack").size))
        else:
            image = decode_image(data, "attack", size_hint=tuple(args["hint"]), max_decoded_bytes=args["limit"])
            results.append(list(image.size))
    except Exception as exc:
        results.append(f"{type(exc).__name__}: {exc}")
threads = [threading.Thread(target=one) for _ in range(args["parallel"])]
for t in threads:
    t.start()
for t in threads:
    t.join()
after = peak_kb()
print(json.dumps({"peak_increase_bytes": (after - before) * 1024, "results": results}))
"""


def _measure(path: Path, parallel: int, limit: int | None = None, full_size: bool = False) -> dict:
    """Peak RSS increase (VmHWM, bytes) of ``parallel`` threads decoding ``path`` in a fresh interpreter."""
    args = {"path": str(path), "parallel": parallel, "hint": DEFAULT_SIZE_HINT, "limit": limit, "full_size": full_size}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, json.dumps(args)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_four_parallel_sixteen_bit_grey_pngs_stay_under_the_stated_peak(attack_pngs):
    measured = _measure(attack_pngs["grey16"], parallel=4)
    assert measured["results"] == [[332, 332]] * 4  # reduced by 19 right after decoding, not refused
    assert measured["peak_increase_bytes"] < FOUR_PARALLEL_PEAK_BOUND_BYTES, measured


def test_four_parallel_sixteen_bit_rgb_pngs_are_serialised_by_the_budget(attack_pngs):
    # Each is 238 MB decoded (6 bytes a pixel in the file): admitted by a raised per-image limit, the 320 MB
    # budget lets one decode at a time, so four cost what one does.
    measured = _measure(attack_pngs["rgb16"], parallel=4, limit=250 * MB)
    assert measured["results"] == [[332, 332]] * 4
    assert measured["peak_increase_bytes"] < FOUR_PARALLEL_PEAK_BOUND_BYTES, measured


def test_a_full_size_sixteen_bit_decode_makes_no_float_copy(attack_pngs):
    measured = _measure(attack_pngs["grey16"], parallel=1, full_size=True)
    assert measured["results"] == [[ATTACK_SIDE, ATTACK_SIDE]]
    assert measured["peak_increase_bytes"] < FULL_SIZE_GREY16_PEAK_BOUND_BYTES, measured


# ---- decoded bytes from the header, refused before decoding ---------------------------------------------
def _claimed_png(width: int, height: int, bits: int, colour_type: int) -> bytes:
    """A PNG header announcing an image, with a few bytes of pixel data: decoding it could only fail."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bits, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


@pytest.mark.parametrize(
    ("data", "samples", "memory_bytes"),
    [
        (sixteen_bit_png(40, 30, 3), (3, 16), 4),
        (sixteen_bit_png(40, 30, 1), (1, 16), 2),
        (sixteen_bit_png(40, 30, 4), (4, 16), 4),
        (_encoded(Image.new("RGBA", (40, 30))), (4, 8), 4),
        (_encoded(Image.new("RGB", (40, 30))), (3, 8), 4),
        (_encoded(Image.fromarray((np.arange(1200) % 256).reshape(30, 40).astype(np.uint8)).convert("P")), (1, 8), 1),
        (_encoded(Image.new("P", (40, 30))), (1, 1), 1),  # PIL writes a two-colour palette with 1-bit indices
        (_encoded(Image.new("1", (40, 30))), (1, 1), 1),
        (_encoded(Image.new("CMYK", (40, 30)), "JPEG"), (4, 8), 4),
        (_encoded(Image.new("I;16", (40, 30)), "TIFF"), (1, 16), 2),
        (_encoded(Image.new("L", (40, 30)), "BMP"), (1, 8), 1),
    ],
    ids=[
        "png-rgb16",
        "png-grey16",
        "png-rgba16",
        "png-rgba",
        "png-rgb",
        "png-palette",
        "png-palette-1bit",
        "png-1bit",
        "jpeg-cmyk",
        "tiff-i16",
        "bmp-grey",
    ],
)
def test_decoded_size_reads_bit_depth_and_channels_from_the_header(data, samples, memory_bytes):
    size = decoded_size(data)
    assert (size.channels, size.bits_per_sample) == samples
    assert size.memory_bytes_per_pixel == memory_bytes
    file_bytes = size.pixels * samples[0] * samples[1] / 8
    assert size.nbytes >= max(file_bytes, size.pixels * memory_bytes)


def test_decoded_size_counts_draft_and_reduction():
    photo = _encoded(Image.new("RGB", (4000, 3000), (90, 120, 150)), "JPEG")
    drafted = decoded_size(photo, target_size=DEFAULT_SIZE_HINT, reduce_to=DEFAULT_SIZE_HINT)
    assert (drafted.width, drafted.height, drafted.file_size) == (500, 375, (4000, 3000))  # JPEG draft at 1/8
    big_grey16 = decoded_size(sixteen_bit_png(3000, 2000, 1), reduce_to=DEFAULT_SIZE_HINT)
    assert big_grey16.reduce_factor == 8  # min(3000 // 320, 2000 // 240)
    assert big_grey16.nbytes < 2.1 * 3000 * 2000  # its 2 bytes a pixel and the small reduced copy only
    palette = decoded_size(_encoded(Image.new("P", (3000, 2000))), reduce_to=DEFAULT_SIZE_HINT)
    assert palette.nbytes >= 5 * 3000 * 2000  # the full-size RGB copy that averaging colours needs


def test_too_many_decoded_bytes_are_refused_from_the_header_alone(monkeypatch):
    # 6300×6300 16-bit RGB: 238 MB decoded, over the 160 MB per image; the file holds 64 bytes of pixel data, so
    # any attempt to decode would end in another error.
    data = _claimed_png(ATTACK_SIDE, ATTACK_SIDE, 16, 2)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image refused by its header was decoded")

    monkeypatch.setattr(uploads, "read_image", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageReadError) as refused:
        decode_image(data, "big.png", size_hint=DEFAULT_SIZE_HINT)
    message = str(refused.value)
    assert "\n" not in message
    assert (
        "6300×6300 PNG of 3 × 16-bit samples decodes to 238.6 MB" in message
    )  # 238.1 MB of samples + the reduced copy
    assert "per image (160.0 MB)" in message
    # The same header at 8 bits is admitted by this check (and then fails to decode: no pixel data).
    monkeypatch.undo()
    with pytest.raises(ImageReadError, match="cannot decode|truncated|broken"):
        decode_image(_claimed_png(ATTACK_SIDE, ATTACK_SIDE, 8, 0), "grey.png", size_hint=DEFAULT_SIZE_HINT)


def test_the_per_image_limit_and_the_budget_are_configurable():
    small = _encoded(Image.new("RGB", (100, 80)))  # 32 kB decoded
    with pytest.raises(ImageReadError, match="per image"):
        decode_image(small, max_decoded_bytes=10_000)
    with pytest.raises(ImageReadError, match="whole decode budget") as too_big:
        decode_image(small, budget=DecodeBudget(10_000))
    assert not isinstance(too_big.value, DecodeBusyError)  # waiting would not help: 422, not 503
    saved = (uploads.default_budget(), uploads.default_max_decoded_bytes())
    try:
        budget = uploads.configure_decoding(budget_bytes=20_000, wait_s=0.05)
        assert uploads.default_budget() is budget and budget.limit_bytes == 20_000
        with pytest.raises(ImageReadError, match="whole decode budget"):
            decode_image(small)
        uploads.configure_decoding(budget_bytes=10 * MB, max_decoded_bytes=10_000)
        with pytest.raises(ImageReadError, match="per image"):
            decode_image(small)
    finally:
        uploads._default_budget, uploads._default_max_decoded_bytes = saved


# ---- the budget under threads ---------------------------------------------------------------------------
def _start(target) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run():
        try:
            target()
            outcome.append("done")
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_the_budget_blocks_until_bytes_are_released():
    budget = DecodeBudget(100, wait_s=10)
    budget.acquire(80)
    waiting, outcome = _start(lambda: budget.acquire(40))
    time.sleep(0.3)
    assert outcome == [] and budget.in_use == 80  # 80 + 40 > 100: it waits
    budget.release(80)
    waiting.join(5)
    assert outcome == ["done"] and budget.in_use == 40
    budget.release(40)
    assert budget.in_use == 0


def test_the_budget_refuses_as_busy_after_its_wait_and_keeps_nothing():
    budget = DecodeBudget(100, wait_s=0.2)
    with budget.reserve(80):
        started = time.monotonic()
        with pytest.raises(DecodeBusyError, match="busy") as busy:
            budget.acquire(40, "queued.png")
        assert time.monotonic() - started >= 0.2
        assert "\n" not in str(busy.value) and isinstance(busy.value, ImageReadError)
        assert budget.in_use == 80
    assert budget.in_use == 0
    with pytest.raises(ImageReadError, match="whole decode budget"):
        budget.acquire(101)  # alone larger than the budget: at once, not after the wait
    assert budget.in_use == 0


def test_the_budget_serves_in_order_so_a_large_image_is_not_starved():
    budget = DecodeBudget(100, wait_s=10)
    budget.acquire(80)
    large, large_outcome = _start(lambda: budget.acquire(100))
    time.sleep(0.2)
    small, small_outcome = _start(lambda: budget.acquire(10))  # would fit now, but the large one is first
    time.sleep(0.3)
    assert large_outcome == [] and small_outcome == []
    budget.release(80)
    large.join(5)
    assert large_outcome == ["done"] and small_outcome == [] and budget.in_use == 100
    budget.release(100)
    small.join(5)
    assert small_outcome == ["done"] and budget.in_use == 10


def test_the_budget_is_never_exceeded_under_many_threads():
    budget = DecodeBudget(1000, wait_s=30)
    peak = [0]
    lock = threading.Lock()
    rng = np.random.default_rng(26)
    sizes = rng.integers(1, 700, size=(8, 40))

    def worker(row):
        for nbytes in row:
            with budget.reserve(int(nbytes)):
                with lock:
                    peak[0] = max(peak[0], budget.in_use)
                time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(row,)) for row in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert 700 <= peak[0] <= 1000  # used, never exceeded
    assert budget.in_use == 0


def test_decode_image_releases_its_reservation_and_waits_for_the_budget():
    data = _encoded(Image.new("RGB", (100, 80)))
    budget = DecodeBudget(100_000, wait_s=0.1)
    decode_image(data, budget=budget)
    assert budget.in_use == 0
    with pytest.raises(ImageReadError):
        decode_image(b"\x89PNG\r\n\x1a\n broken", budget=budget)
    assert budget.in_use == 0
    with budget.reserve(90_000):
        with pytest.raises(DecodeBusyError):
            decode_image(data, "waits.png", budget=budget)


# ---- normal uploads decode exactly as before; big ones close to a full decode ---------------------------
def _normal_uploads() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(4)
    noise = Image.fromarray(rng.integers(0, 256, (450, 600, 3), dtype=np.uint8))
    rgba = np.dstack([np.asarray(noise), rng.integers(0, 256, (450, 600), dtype=np.uint8)])
    uploads_ = [
        ("noise.png", _encoded(noise)),
        ("noise.jpg", _encoded(noise, "JPEG", quality=90)),
        ("alpha.png", _encoded(Image.fromarray(rgba, "RGBA"))),
        ("palette.png", _encoded(noise.quantize(64))),
        ("photo.jpg", _encoded(noise.resize((4000, 3000)), "JPEG")),  # drafted as before
    ]
    for folder, pattern in (("corridor", "query/*.jpg"), ("nordland-64x32", "summer/*.png")):
        found = sorted((DATA / folder).glob(pattern))[:1]
        assert found, f"no {pattern} under {DATA / folder} (set VPRKIT_DATA)"
        uploads_ += [(path.name, path.read_bytes()) for path in found]
    return uploads_


@pytest.mark.parametrize(("name", "data"), _normal_uploads(), ids=lambda v: v if isinstance(v, str) else "")
def test_normal_uploads_decode_exactly_as_before(name, data):
    before = read_image(data, target_size=DEFAULT_SIZE_HINT, name=name)  # what decode_image returned before
    after = decode_image(data, name, size_hint=DEFAULT_SIZE_HINT)
    assert after.size == before.size
    assert np.array_equal(np.asarray(after), np.asarray(before))


def _prepared(img: Image.Image) -> np.ndarray:
    return prepare_image(img, ImageSpec(size=DEFAULT_SIZE_HINT, resize="fixed"))[0].astype(np.float64)


@pytest.mark.parametrize("kind", ["rgb", "grey16", "alpha", "palette"])
def test_reduced_uploads_feed_the_backbone_nearly_the_pixels_of_a_full_decode(kind):
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:1500, 0:2000]
    smooth = np.stack([x * 255 // 2000, y * 255 // 1500, (x + y) * 255 // 3500], -1).astype(np.uint8)
    smooth = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    images = {
        "rgb": lambda: Image.fromarray(smooth),
        "grey16": lambda: Image.fromarray((x * 30 + y * 3).astype(np.uint16)),
        "alpha": lambda: Image.fromarray(np.dstack([smooth, (x * 255 // 2000).astype(np.uint8)]), "RGBA"),
        "palette": lambda: Image.fromarray(smooth).quantize(128),
    }
    data = _encoded(images[kind]())
    notes: list[DecodeNote] = []
    reduced = read_image(data, reduce_to=DEFAULT_SIZE_HINT, notes=notes)
    assert (reduced.width, reduced.height) == (334, 250)  # reduced by 6 (1500 // 240)
    assert any(note.kind == "reduced" for note in notes)
    difference = np.abs(_prepared(reduced) - _prepared(read_image(data)))
    assert difference.mean() < 1.5 and np.percentile(difference, 99) < 8


def _scaled_all_at_once(img: Image.Image) -> np.ndarray:
    """The 8-bit scaling as it was before (the whole image as one float64 array)."""
    arr = np.asarray(img, dtype=np.float64)
    finite = np.isfinite(arr)
    lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
    out = np.zeros(arr.shape, dtype=np.uint8)
    if hi > lo:
        out[finite] = np.round((arr[finite] - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return out


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_strip_by_strip_scaling_gives_the_same_pixels(mode, monkeypatch):
    monkeypatch.setattr(images_module, "SCALE_STRIP_PIXELS", 1000)  # many strips of a 97×61 image
    rng = np.random.default_rng(3)
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    values = rng.integers(100, 60_000, (61, 97)).astype(dtype)
    if mode == "F":
        values[5, 7], values[40, 3] = np.nan, np.inf
    img = Image.fromarray(values)
    assert img.mode == mode
    scaled = images_module._scaled_to_8bit(img, "strips", [])
    assert np.array_equal(np.asarray(scaled)[..., 0], _scaled_all_at_once(img))


@pytest.mark.parametrize(("name", "data"), _normal_uploads()[:4], ids=lambda v: v if isinstance(v, str) else "")
def test_damaged_uploads_are_an_image_or_one_read_error(name, data):
    rng = np.random.default_rng(len(data))
    damaged = [data[:cut] for cut in (8, 16, 24, 33, 60, len(data) // 2)]
    for _ in range(20):
        flipped = bytearray(data)
        flipped[int(rng.integers(8, min(len(data), 200)))] ^= int(rng.integers(1, 256))
        damaged.append(bytes(flipped))
    budget = DecodeBudget(DEFAULT_DECODE_BUDGET_BYTES, wait_s=0)
    for variant in damaged:
        try:
            decode_image(variant, name, size_hint=DEFAULT_SIZE_HINT, budget=budget)
        except ImageReadError as exc:
            assert "\n" not in str(exc)
    assert budget.in_use == 0
