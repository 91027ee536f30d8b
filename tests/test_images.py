"""Decoding images as a viewer shows them, bounded decoding, and listing folders without silent loss."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vprkit import images as images_module
from vprkit.errors import ConfigError, ImageReadError
from vprkit.images import (
    ALPHA_BACKGROUND,
    MAX_PREPARED_PIXELS,
    DecodeNote,
    ImageSpec,
    check_image_size,
    list_images,
    load_prepared,
    prepare_image,
    read_image,
    scan_images,
)

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(data: bytes, **kw) -> tuple[np.ndarray, list[DecodeNote]]:
    notes: list[DecodeNote] = []
    img = read_image(data, notes=notes, **kw)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr, notes


# --- decoding ------------------------------------------------------------------------------------


def test_sixteen_bit_png_is_scaled_by_its_range(tmp_path):
    # A 12-bit camera frame in a 16-bit PNG: PIL's convert("RGB") clips at 255 (99.7 % white).
    ramp = (np.arange(64 * 64).reshape(64, 64) % 4000).astype(np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    notes: list[DecodeNote] = []
    arr = np.asarray(read_image(path, notes=notes))
    assert (arr == 255).mean() < 0.01 and arr.min() == 0 and arr.max() == 255
    np.testing.assert_array_equal(arr[..., 0], np.round(ramp / 3999 * 255).astype(np.uint8))
    assert [n.kind for n in notes] == ["bit_depth"] and "0…3999" in notes[0].message and "depth.png" in str(notes[0])


def test_float_and_32_bit_images_use_their_range():
    f = np.linspace(-1.0, 3.0, 16, dtype=np.float32).reshape(4, 4)
    arr, notes = _rgb(_encode(Image.fromarray(f), "TIFF"))
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255 and notes[0].kind == "bit_depth"
    i32 = Image.fromarray(np.full((4, 4), 70000, dtype=np.int32))
    arr, _ = _rgb(_encode(i32, "TIFF"))
    assert (arr == 0).all()  # a constant image becomes black (documented), not white


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    exif = img.getexif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise
    path = tmp_path / "phone.jpg"
    img.save(path, quality=95, exif=exif.tobytes())
    notes: list[DecodeNote] = []
    shown = read_image(path, notes=notes)
    assert shown.size == (20, 40)  # width, height as a viewer shows it
    top = np.asarray(shown)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue band is now at the top
    assert [n.kind for n in notes] == ["orientation"]
    arr, geo = load_prepared(path, ImageSpec(size=(8, 4), resize="fixed"))
    assert geo.original_size == (40, 20) and arr.shape == (8, 4, 3)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_images_give_the_first_frame_and_a_note(fmt, caplog):
    frames = [Image.new("RGB", (16, 16), (200 * (i == 0), 200 * (i == 1), 200 * (i == 2))) for i in range(3)]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
    arr, notes = _rgb(data, name=f"anim.{fmt.lower()}")
    assert arr[8, 8, 0] > 150 and arr[8, 8, 1] < 50
    assert [n.kind for n in notes] == ["animated"] and notes[0].warning and "3 frames" in notes[0].message
    with caplog.at_level(logging.WARNING, logger="vprkit.images"):
        read_image(data, name=f"anim.{fmt.lower()}")  # no list given: logged instead
    assert f"anim.{fmt.lower()}: {fmt} with 3 frames: the first frame is used" in caplog.text


@pytest.mark.parametrize(
    "img, fmt, expected",
    [
        (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG", ALPHA_BACKGROUND),
        (Image.new("RGBA", (4, 4), (255, 0, 0, 255)), "PNG", (255, 0, 0)),
        (Image.new("LA", (4, 4), (0, 128)), "PNG", (127, 127, 127)),
        (Image.new("CMYK", (4, 4), (0, 255, 0, 0)), "JPEG", (255, 0, 255)),
        (Image.new("L", (4, 4), 77), "PNG", (77, 77, 77)),
        (Image.new("1", (4, 4), 1), "PNG", (255, 255, 255)),
    ],
)
def test_colour_modes(img, fmt, expected):
    arr, _ = _rgb(_encode(img, fmt))
    assert np.abs(arr[1, 1].astype(int) - expected).max() <= 2


def test_palette_with_transparency_is_composited():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    arr, notes = _rgb(_encode(img, "PNG", transparency=0))
    assert tuple(arr[0, 0]) == ALPHA_BACKGROUND and [n.kind for n in notes] == ["alpha"]


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width``×``height`` grey pixels, with (almost) no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_huge_images_and_bombs_are_one_clear_error(tmp_path):
    bomb = _png_claiming(20_000, 20_000)  # 400 Mpx declared: PIL's own bomb limit
    with pytest.raises(ImageReadError, match=r"bomb.png: refused as a decompression bomb"):
        read_image(bomb, name="bomb.png")
    big = tmp_path / "big.png"
    big.write_bytes(_png_claiming(12_100, 12_000))  # under PIL's limit, over MAX_PIXELS
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(ImageReadError, match=r"12100×12000 pixels is larger than vprkit decodes"),
    ):
        read_image(big)
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        load_prepared(tmp_path / "bomb.png", ImageSpec())


def test_absurd_resize_targets_are_refused(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (64, 48)).save(path)
    with pytest.raises(ImageReadError, match=r"resizing 48×64 to 75000×100000 \(keep_aspect\) is outside"):
        load_prepared(path, ImageSpec(size=(1, 100_000), resize="keep_aspect"))
    with pytest.raises(ConfigError, match="aspect ratio"):
        check_image_size((1, 100_000))
    with pytest.raises(ConfigError, match="patch size 14"):
        check_image_size((10, 640), multiple=14)
    with pytest.raises(ConfigError, match="more than vprkit feeds a backbone"):
        check_image_size((20_000, 20_000))
    check_image_size((240, 320), multiple=16)
    assert 240 * 320 < MAX_PREPARED_PIXELS


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        (b"", "not an image vprkit reads"),
        (b"hello, not an image", "not an image vprkit reads"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image vprkit reads"),  # EPS never tried
    ],
)
def test_read_errors(tmp_path, content, message):
    path = tmp_path / "x.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match=message):
        read_image(path)


def test_truncated_jpeg_is_an_image_read_error(tmp_path):
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageReadError, match="cannot decode image"):
        read_image(data[: len(data) // 2], name="cut.jpg")


# --- property-based: random and truncated inputs -------------------------------------------------


def _valid_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    out = [_encode(base, f) for f in ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "PPM")]
    out.append(_encode(base.convert("RGBA"), "PNG"))
    out.append(_encode(Image.fromarray((rng.integers(0, 4000, (24, 32))).astype(np.uint16)), "PNG"))
    return out


VALID = _valid_images()


def _decodes_or_read_error(data: bytes) -> None:
    try:
        img = read_image(data, notes=[])
    except ImageReadError as exc:
        assert "\n" not in str(exc)
        return
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3


@FAST
@given(st.binary(max_size=2048))
def test_random_bytes_give_an_image_or_image_read_error(data):
    _decodes_or_read_error(data)


@FAST
@given(
    st.sampled_from(range(len(VALID))),
    st.integers(min_value=0, max_value=4000),
    st.binary(max_size=8),
    st.integers(0, 4000),
)
def test_truncated_and_corrupted_images_give_an_image_or_image_read_error(which, cut, patch, where):
    data = bytearray(VALID[which][: max(cut, 1)])
    if patch and data:
        where %= len(data)
        data[where : where + len(patch)] = patch
    _decodes_or_read_error(bytes(data))


# --- listing folders ---------------------------------------------------------------------------


def _touch_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path, format="PNG")


def test_unreadable_sub_folder_is_reported(tmp_path, monkeypatch, caplog):
    _touch_image(tmp_path / "a.png")
    _touch_image(tmp_path / "locked" / "b.png")
    _touch_image(tmp_path / "ok" / "c.PNG")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):  # tests run as root, where chmod 000 does not stop reading
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(images_module.os, "scandir", scandir)
    seen = []
    with caplog.at_level(logging.WARNING, logger="vprkit.images"):
        keys = list_images(tmp_path, on_error=seen.append)
    assert keys == ["a.png", "ok/c.PNG"]
    assert [(p.path, p.kind) for p in seen] == [("locked", "unreadable_folder")]
    assert "locked: cannot list folder (Permission denied); its images are skipped" in caplog.text
    listing = scan_images(tmp_path)
    assert listing.unreadable_folders == ["locked"] and listing.to_dict()["problems"][0]["kind"] == "unreadable_folder"


def test_unreadable_root_is_an_error(tmp_path, monkeypatch):
    def scandir(path="."):
        raise PermissionError(13, "Permission denied", os.fspath(path))

    monkeypatch.setattr(images_module.os, "scandir", scandir)
    with pytest.raises(ImageReadError, match="cannot list it"):
        list_images(tmp_path)


def test_skipped_entries_are_reported(tmp_path):
    _touch_image(tmp_path / "a.jpg")
    _touch_image(tmp_path / "._a.jpg")
    (tmp_path / "dir.png").mkdir()  # a folder named like an image: listed into, not an image
    _touch_image(tmp_path / "dir.png" / "inner.png")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path)
    listing = scan_images(tmp_path)
    assert listing.keys == ["a.jpg", "dir.png/inner.png"]
    kinds = {p.path: p.kind for p in listing.problems}
    assert kinds == {"._a.jpg": "hidden_file", "gone.jpg": "broken_link", "loop": "folder_loop"}
    assert listing.ignored == {".txt": 1}
    assert list_images(tmp_path) == listing.keys


def test_symlinked_folders_are_followed_and_gif_is_an_image(tmp_path):
    _touch_image(tmp_path / "real" / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "real" / "y.gif")
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "link").symlink_to(tmp_path / "real")
    assert list_images(tmp_path / "top") == ["link/x.png", "link/y.gif"]


# Inputs found by scripts/fuzz_inputs.py (minimised, zlib + base64): Pillow 13 raised IndexError
# (GIF _seek), TypeError "Missing dimensions" (TIFF) and struct.error (GIF header), which escaped
# read_image as non-ImageReadError exceptions.
FUZZ_FINDINGS = {
    "IndexError": "eNpz93SzME9kgAAdBgEGHihbEQAqMQIQ",
    "TypeError": "eNrz9NRi4GBgYOBiYGBkYWAEsgSAmBHK5mEgDggC1dczkAnsGUbBgAAAQXgBzA==",
    "struct.error": "eNpz93SzME9kgAAdIBZg4IGwASoEAhs=",
}


@pytest.mark.parametrize("raised", sorted(FUZZ_FINDINGS))
def test_fuzz_findings_are_image_read_errors(raised):
    import base64
    import zlib

    data = zlib.decompress(base64.b64decode(FUZZ_FINDINGS[raised]))
    _decodes_or_read_error(data)


def test_a_link_to_a_listed_folder_does_not_duplicate_its_images(tmp_path):
    _touch_image(tmp_path / "b_real" / "x.png")
    (tmp_path / "a_link").symlink_to(tmp_path / "b_real")  # sorts first, but the real folder wins
    listing = scan_images(tmp_path)
    assert listing.keys == ["b_real/x.png"]
    assert [(p.path, p.kind) for p in listing.problems] == [("a_link", "folder_loop")]


def test_to_multiple_resize_rounds_each_side_to_the_nearest_multiple_as_megaloc():
    """MegaLoc resizes (not crops) an image to round(h/14)·14 × round(w/14)·14; Python's round, as its code."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    spec = ImageSpec(None, "none", to_multiple="resize")
    arr, geo = prepare_image(img, spec, multiple=14)
    assert arr.shape[:2] == (476, 644) and geo.crop == (0, 0)
    assert geo.scale == pytest.approx((476 / 480, 644 / 640))
    cropped, _ = prepare_image(img, ImageSpec(None, "none"), multiple=14)
    assert cropped.shape[:2] == (476, 630)


def test_interpolation_is_a_setting_and_older_settings_read_the_same():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (97, 131, 3), dtype=np.uint8))
    bilinear, _ = prepare_image(img, ImageSpec((60, 80), "fixed"))
    bicubic, _ = prepare_image(img, ImageSpec((60, 80), "fixed", interpolation="bicubic"))
    assert bilinear.shape == bicubic.shape and not np.array_equal(bilinear, bicubic)
    assert np.array_equal(bicubic, np.asarray(img.resize((80, 60), Image.BICUBIC)))
    assert ImageSpec((60, 80)).to_dict() == {"size": [60, 80], "resize": "fixed"}  # maps built before read the same
    spec = ImageSpec((60, 80), interpolation="bicubic", to_multiple="resize")
    assert ImageSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="interpolation 'nearest'"):
        ImageSpec((60, 80), interpolation="nearest")


def test_max_side_only_shrinks_as_hlocs_resize_max():
    big = Image.fromarray(np.zeros((1536, 2048, 3), dtype=np.uint8))
    small = Image.fromarray(np.zeros((480, 640, 3), dtype=np.uint8))
    spec = ImageSpec((1024, 1024), "max_side")
    assert prepare_image(big, spec, multiple=16)[0].shape[:2] == (768, 1024)
    assert prepare_image(small, spec, multiple=16)[0].shape[:2] == (480, 640)
    assert prepare_image(small, ImageSpec((1024, 1024), "keep_aspect"))[0].shape[:2] == (768, 1024)
