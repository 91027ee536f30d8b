"""LiveMap's pieces without HTTP: pose parsing (UTM reference values), ids, upload decoding limits, the readers–writer lock."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from vprkit.errors import ConfigError, ImageReadError
from vprkit.pipeline.live import LiveMap, ReadWriteLock, check_key, decode_image, parse_pose

UTM32N = {"kind": "utm", "zone": 32, "hemisphere": "N", "epsg": 32632}
# Reference values of the transverse Mercator projection (UTM zone 32's central meridian is 9°E):
# on the meridian the easting is the false easting and the northing k0 × the meridian arc length.
EQUATOR_ON_MERIDIAN = (500_000.0, 0.0)
MERIDIAN_ARC_45_M = 4_984_944.378  # WGS84 meridian arc length from the equator to 45°N (standard tables)
LAT45_ON_MERIDIAN = (500_000.0, 0.9996 * MERIDIAN_ARC_45_M)
TOLERANCE_M = 0.01


def test_metric_and_geographic_poses():
    assert parse_pose({"easting": 3, "northing": "4", "heading": 725, "timestamp": 12}).__dict__ == {
        "xy": (3.0, 4.0),
        "heading": 5.0,
        "timestamp": 12.0,
    }
    assert parse_pose(None).xy is None and parse_pose({"heading": -90}).heading == 270.0
    for (lat, lon), expected in (((0.0, 9.0), EQUATOR_ON_MERIDIAN), ((45.0, 9.0), LAT45_ON_MERIDIAN)):
        xy = parse_pose({"lat": lat, "lon": lon}, UTM32N).xy
        assert np.allclose(xy, expected, atol=TOLERANCE_M)
    bad = [
        {"easting": 1},
        {"lat": 1},
        {"easting": 1, "northing": 2, "lat": 3, "lon": 4},
        {"easting": "x", "northing": 1},
        {"easting": float("nan"), "northing": 1},
        {"x": 1, "y": 2},
    ]
    for pose in bad:
        with pytest.raises(ConfigError):
            parse_pose(pose, UTM32N)
    with pytest.raises(ConfigError, match="no geographic frame"):
        parse_pose({"lat": 45, "lon": 9}, {"kind": "local", "unit": "m"})


def test_place_ids():
    for good in ("a.jpg", "walk/2024/img_01.png", "x-y.z"):
        assert check_key(good) == good
    for bad in (
        "",
        "/abs.jpg",
        "../up.jpg",
        "a/../b.jpg",
        "a//b.jpg",
        "./a.jpg",
        "a\\b.jpg",
        "a b.jpg",
        "x" * 201,
        "a/",
    ):
        with pytest.raises(ConfigError):
            check_key(bad)


def _encoded(width: int, height: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_uploads_are_checked_before_decoding():
    assert decode_image(_encoded(64, 48)).size == (64, 48)
    with pytest.raises(ImageReadError, match="more than this service decodes"):
        decode_image(_encoded(400, 300), max_pixels=100_000)  # refused from the header
    big_jpeg = _encoded(2000, 1500, "JPEG")  # decoded at reduced scale when the target size is known
    assert max(decode_image(big_jpeg, max_pixels=100_000, size_hint=(240, 320)).size) < 2000
    with pytest.raises(ImageReadError, match="more than this service decodes"):
        decode_image(big_jpeg, max_pixels=100_000)  # no target size: decoded in full, so the limit holds
    with pytest.raises(ImageReadError, match="empty upload"):
        decode_image(b"")
    with pytest.raises(ImageReadError, match="not an image"):
        decode_image(b"GIF89a but not really")


def test_a_writer_waits_for_readers_and_excludes_them():
    lock = ReadWriteLock()
    events: list[str] = []
    reading = threading.Event()
    release = threading.Event()

    def reader(name: str) -> None:
        with lock.read():
            events.append(f"{name} in")
            reading.set()
            release.wait()
            events.append(f"{name} out")

    def writer() -> None:
        with lock.write():
            events.append("write")

    r1 = threading.Thread(target=reader, args=("r1",))
    r1.start()
    reading.wait()
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.05)
    assert "write" not in events  # the reader holds it
    r2 = threading.Thread(target=reader, args=("r2",))
    r2.start()  # arrives while the writer waits: it must queue behind the writer
    time.sleep(0.05)
    assert "r2 in" not in events
    release.set()
    for t in (r1, w, r2):
        t.join(5)
    assert events.index("r1 out") < events.index("write") < events.index("r2 in")


def test_lat_lon_places_land_in_the_maps_utm_frame(map_dir, corridor_dir):
    info = json.loads((map_dir / "map.json").read_text())
    (map_dir / "map.json").write_text(json.dumps({**info, "crs": UTM32N}))  # as a map built from lat/lon poses records
    live = LiveMap.open(map_dir)
    place = live.add_place((corridor_dir / "query" / "0000030.jpg").read_bytes(), "geo.jpg", {"lat": 45.0, "lon": 9.0})
    assert np.allclose(
        [place["position"]["easting"], place["position"]["northing"]], LAT45_ON_MERIDIAN, atol=TOLERANCE_M
    )
    frame = np.asarray(Image.open(corridor_dir / "query" / "0000030.jpg"))
    generated = live.add_place(frame, None, None)["id"]
    assert (
        generated.endswith(".png") and (map_dir / "live-images" / generated).is_file()
    )  # a decoded frame is kept as PNG
    assert {m.key for m in live.localize({"q": frame}, top_k=2)[0].matches} == {
        "geo.jpg",
        generated,
    }  # the same picture twice


def test_concurrent_localisations_share_batches_and_equal_one_at_a_time(map_dir, corridor_dir, monkeypatch):
    import vprkit.pipeline.live as live_module

    live = LiveMap.open(map_dir)
    frames = [np.asarray(Image.open(corridor_dir / "query" / f"{i:07d}.jpg")) for i in range(0, 12, 3)]
    alone = [live.localize({"q": f}, top_k=3)[0] for f in frames]
    calls: list[int] = []
    real = live_module.localize

    def counted(m, named, **kw):
        calls.append(len(named))
        time.sleep(0.2)  # the first batch holds the model while the other calls queue up
        return real(m, named, **kw)

    monkeypatch.setattr(live_module, "localize", counted)
    together: list = [None] * len(frames)

    def call(i: int) -> None:
        together[i] = live.localize({"q": frames[i]}, top_k=3)[0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(frames))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(calls) == len(frames) and max(calls) > 1  # some calls were answered by one batch
    for a, b in zip(alone, together):
        assert b.query == "q" and [m.key for m in a.matches] == [m.key for m in b.matches]
        assert np.allclose([m.score for m in a.matches], [m.score for m in b.matches], atol=1e-4)


@pytest.mark.parametrize(
    "resize, size, hint",
    [
        ("fixed", (240, 320), (240, 320)),
        ("resize_crop", (480, 640), (480, 640)),
        ("keep_aspect", (240, 320), (320, 320)),
    ]
    + [("none", (240, 320), None)],
)
def test_uploads_are_reduced_toward_the_size_the_map_uses(resize, size, hint):
    """keep_aspect maps too let uploads decode reduced (a square of the longer side keeps both sides long enough)."""
    from types import SimpleNamespace

    from vprkit.config import ImageSpec

    holder = SimpleNamespace(map=SimpleNamespace(config=SimpleNamespace(image=ImageSpec(size=size, resize=resize))))
    assert LiveMap.size_hint(holder) == hint
