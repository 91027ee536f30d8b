"""Decoded frames in, the same answers out; one map read by several processes at once."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vprkit import pipeline
from vprkit.images import DecodedImages, FolderImages, ImageSpec, as_pil, iter_batches


@pytest.fixture(scope="module")
def folder_map(tmp_path_factory, small_config):
    from helpers import make_images

    root = tmp_path_factory.mktemp("decoded")
    make_images(root / "images", 12)
    pipeline.build_map(root / "images", root / "map", small_config, progress=False, log=lambda _: None)
    return root


def _frames(folder: Path, names) -> dict[str, np.ndarray]:
    return {n: np.asarray(Image.open(folder / n).convert("RGB")) for n in names}


def test_decoded_arrays_prepare_to_the_same_pixels_as_files(folder_map):
    names = ["img002.png", "img005.png"]
    spec = ImageSpec((48, 40), "fixed")
    from_files = next(iter_batches(FolderImages(folder_map / "images", names), None, spec, 8))
    from_frames = next(iter_batches(DecodedImages(_frames(folder_map / "images", names)), None, spec, 8))
    np.testing.assert_array_equal(from_files.pixels, from_frames.pixels)
    assert from_files.geometries == from_frames.geometries


def test_localize_accepts_arrays_and_pil_images_with_the_same_result(folder_map):
    m = pipeline.open_map(folder_map / "map", read_only=True)
    folder = folder_map / "images"
    paths = [folder / "img003.png", folder / "img008.png"]
    by_path = pipeline.localize(m, paths, top_k=4)
    frames = _frames(folder, ["img003.png", "img008.png"])
    by_array = pipeline.localize(m, list(frames.values()), top_k=4)
    by_pil = pipeline.localize(
        m, {"left": Image.fromarray(frames["img003.png"]), "right": frames["img008.png"]}, top_k=4
    )
    assert [r.query for r in by_array] == ["frame-000000", "frame-000001"]
    assert [r.query for r in by_pil] == ["left", "right"]
    for a, b, c in zip(by_path, by_array, by_pil):
        assert [x.key for x in a.matches] == [x.key for x in b.matches] == [x.key for x in c.matches]
        np.testing.assert_allclose([x.score for x in a.matches], [x.score for x in b.matches], atol=1e-6)
        np.testing.assert_allclose([x.score for x in a.matches], [x.score for x in c.matches], atol=1e-6)
    assert by_path[0].matches[0].key == "img003.png"


def test_a_map_can_be_built_from_decoded_frames(folder_map, small_config, tmp_path):
    frames = _frames(folder_map / "images", [f"img{i:03d}.png" for i in range(12)])
    info = pipeline.build_map(DecodedImages(frames), tmp_path / "map", small_config, progress=False, log=lambda _: None)
    assert info["images_root"] is None and info["counts"]["images"] == 12
    res = pipeline.localize(tmp_path / "map", [folder_map / "images" / "img006.png"], top_k=1)
    assert res[0].matches[0].key == "img006.png"


def test_decoded_frame_formats():
    gray16 = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    rgb = np.asarray(as_pil(gray16))
    assert (
        rgb.shape == (3, 4, 3)
        and rgb.dtype == np.uint8
        and rgb[0, 0, 0] == 0
        and rgb[-1, -1, 0] == round(55000 / 65535 * 255)
    )
    assert np.asarray(as_pil(np.full((2, 2, 3), 0.5, np.float32)))[0, 0, 0] == 128
    from vprkit.errors import ImageReadError

    with pytest.raises(ImageReadError, match="H×W"):
        as_pil(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(ImageReadError, match="finite"):
        as_pil(np.full((2, 2), np.nan))


def test_read_only_open_writes_nothing(folder_map, tmp_path):
    import shutil

    copy = tmp_path / "map"
    shutil.copytree(folder_map / "map", copy)
    (copy / "index.faiss").unlink()
    before = sorted(p.name for p in copy.rglob("*"))
    m = pipeline.open_map(copy, read_only=True)
    assert m.index.ntotal == 12  # rebuilt in memory
    assert sorted(p.name for p in copy.rglob("*")) == before
    pipeline.open_map(copy, read_only=False)
    assert (copy / "index.faiss").exists()


def _reader(map_dir: str, query: str, start, out) -> None:
    start.wait(timeout=60)
    res = pipeline.localize(pipeline.open_map(map_dir, read_only=True), [query], top_k=3)
    out.put((os.getpid(), [m.key for m in res[0].matches], [m.score for m in res[0].matches]))


def test_two_processes_read_one_map_at_once(folder_map):
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    query = str(folder_map / "images" / "img010.png")
    procs = [ctx.Process(target=_reader, args=(str(folder_map / "map"), query, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (pid_a, keys_a, scores_a), (pid_b, keys_b, scores_b) = results
    assert pid_a != pid_b and keys_a == keys_b and keys_a[0] == "img010.png"
    np.testing.assert_allclose(scores_a, scores_b)
