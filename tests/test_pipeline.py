"""End to end through the library: build (resume, bad images), open, localise."""

import json
import shutil

import pytest

from vprkit import pipeline
from vprkit.errors import ImageReadError, MapError
from vprkit.maps import VOCAB_FILE

from helpers import make_images


def test_build_and_localise_finds_the_same_image(tmp_path, image_folder, small_config):
    info = pipeline.build_map(image_folder, tmp_path / "map", small_config, progress=False)
    assert info["counts"] == {"images": 12, "failed": 0}
    assert info["descriptor_dim"] == 8 * 112
    m = pipeline.open_map(tmp_path / "map")
    res = pipeline.localize(m, [image_folder / "img005.png", image_folder / "img007.png"], top_k=3)
    assert [r.matches[0].key for r in res] == ["img005.png", "img007.png"]
    assert res[0].matches[0].score == pytest.approx(1.0, abs=1e-3)
    assert res[0].matches[0].score >= res[0].matches[1].score  # higher is better
    saved = json.loads((tmp_path / "map" / "map.json").read_text())
    assert saved["config"]["name"] == "effnet-vlad" and saved["vocabulary"]["k"] == 8


def test_resume_after_interrupt_has_no_duplicates_or_losses(tmp_path, image_folder, small_config, monkeypatch):
    monkeypatch.setattr(pipeline.build, "SHARD_IMAGES", 4)

    def interrupt(n):
        if n == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.build_map(image_folder, tmp_path / "map", small_config, progress=False, _after_shard=interrupt)
    from vprkit.maps import MapStore

    partial = MapStore(tmp_path / "map").keys(include_pending=True)
    assert len(partial) == 8 and not (tmp_path / "map" / "map.json").exists()
    extracted = []
    real_extract = pipeline.build.extract

    def spy(backbone, config, source, keys, *a, **k):
        extracted.extend(keys)
        return real_extract(backbone, config, source, keys, *a, **k)

    monkeypatch.setattr(pipeline.build, "extract", spy)
    info = pipeline.build_map(image_folder, tmp_path / "map", small_config, progress=False)
    assert sorted(extracted) == sorted(set(f"img{i:03d}.png" for i in range(12)) - set(partial))
    keys = MapStore(tmp_path / "map").keys()
    assert sorted(keys) == [f"img{i:03d}.png" for i in range(12)] and info["counts"]["images"] == 12
    # adding images later appends without re-extracting the old ones
    make_images(tmp_path / "more", 14, seed=5)  # two new images (the first twelve names are taken)
    for name in ("img012.png", "img013.png"):
        shutil.copy(tmp_path / "more" / name, image_folder / name)
    extracted.clear()
    info = pipeline.build_map(image_folder, tmp_path / "map", small_config, progress=False)
    assert info["counts"]["images"] == 14 and sorted(extracted) == ["img012.png", "img013.png"]


def test_unreadable_images_are_reported_and_skipped(tmp_path, image_folder, small_config):
    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    png = (image_folder / "img000.png").read_bytes()
    (image_folder / "truncated.png").write_bytes(png[: len(png) // 2])
    logs = []
    info = pipeline.build_map(image_folder, tmp_path / "map", small_config, progress=False, log=logs.append)
    assert info["counts"] == {"images": 12, "failed": 2}
    failures = json.loads((tmp_path / "map" / "failures.json").read_text())
    assert set(failures) == {"broken.jpg", "truncated.png"}
    assert any("broken.jpg" in line for line in logs)


def test_clear_errors(tmp_path, image_folder, small_config):
    with pytest.raises(ImageReadError, match="does not exist"):
        pipeline.build_map(tmp_path / "nope", tmp_path / "map", small_config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MapError, match="no images"):
        pipeline.build_map(tmp_path / "empty", tmp_path / "map", small_config)
    pipeline.build_map(image_folder, tmp_path / "map", small_config, progress=False)
    with pytest.raises(MapError, match="other settings"):
        pipeline.build_map(
            image_folder,
            tmp_path / "map",
            small_config.replace(aggregator="gem", aggregator_options={}),
            progress=False,
        )
    with pytest.raises(MapError, match="not a vprkit map"):
        pipeline.open_map(tmp_path)
    with pytest.raises(ImageReadError, match="not found"):
        pipeline.localize(tmp_path / "map", [tmp_path / "missing.jpg"])


def test_stale_index_is_rebuilt(tmp_path, image_folder, small_config):
    pipeline.build_map(image_folder, tmp_path / "map", small_config, progress=False)
    (tmp_path / "map" / "index.faiss").unlink()
    m = pipeline.open_map(tmp_path / "map", read_only=False)
    assert m.index.ntotal == 12 and (tmp_path / "map" / "index.faiss").exists()


def test_map_with_poses_csv(tmp_path, image_folder, small_config):
    rows = ["image,easting,northing"] + [f"img{i:03d}.png,{500000 + i},{4000000 + 2 * i}" for i in range(12)]
    (tmp_path / "poses.csv").write_text("\n".join(rows) + "\n")
    pipeline.build_map(image_folder, tmp_path / "map", small_config, poses=tmp_path / "poses.csv", progress=False)
    res = pipeline.localize(tmp_path / "map", [image_folder / "img003.png"], top_k=1)
    assert res[0].matches[0].position == (500003.0, 4000006.0)


def test_multi_vocabulary_map_builds_all_centre_sets_and_reopens(tmp_path, image_folder, small_config):
    from vprkit.aggregation.vlad import Vocabulary

    config = small_config.replace(aggregator_options={"vocabularies": 2})  # sets come from the aggregator's need
    info = pipeline.build_map(image_folder, tmp_path / "map", config, progress=False)
    assert info["descriptor_dim"] == 2 * 8 * 112
    voc = Vocabulary.load(tmp_path / "map" / VOCAB_FILE)
    assert voc.sets == 2 and voc.k == 8
    m = pipeline.open_map(tmp_path / "map")
    res = pipeline.localize(m, [image_folder / "img003.png"], top_k=2)
    assert res[0].matches[0].key == "img003.png" and res[0].matches[0].score == pytest.approx(1.0, abs=1e-3)
