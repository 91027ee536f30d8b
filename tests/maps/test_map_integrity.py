"""A map never lies: content-true entries, one writer, one set of settings, poses that follow the CSV.

Each case here used to give a wrong map with exit 0 (issue "A map never lies").
"""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from vprkit import pipeline
from vprkit.config import VocabularyConfig
from vprkit.errors import MapError, VocabularyMismatchError
from vprkit.images import ImageSpec
from vprkit.maps import MapStore
from vprkit.maps.lock import map_write_lock
from vprkit.presets import resolve

from helpers import make_images


@pytest.fixture(scope="module")
def config():
    return resolve("effnet-vlad").replace(
        image=ImageSpec((64, 64), "fixed"), vocabulary=VocabularyConfig(k=8), batch_size=4
    )


def _quiet(**kw):
    return dict(progress=False, log=lambda _: None, **kw)


def test_same_names_different_pictures_are_refused_or_reencoded(tmp_path, config):
    make_images(tmp_path / "a", 8, seed=0)
    make_images(tmp_path / "b", 8, seed=9)  # same names, other pictures
    pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())
    with pytest.raises(MapError, match="8 image.*differ.*--on-change reencode"):
        pipeline.build_map(tmp_path / "b", tmp_path / "map", config, **_quiet())
    info = pipeline.build_map(tmp_path / "b", tmp_path / "map", config, on_change="reencode", **_quiet())
    assert info["counts"]["images"] == 8 and info["last_build"]["reencoded"] == 8
    keys = MapStore(tmp_path / "map").keys()
    assert sorted(keys) == sorted(set(keys))  # replaced, not duplicated
    res = pipeline.localize(tmp_path / "map", [tmp_path / "b" / "img003.png"], top_k=1)
    assert res[0].matches[0].key == "img003.png" and res[0].matches[0].score == pytest.approx(1.0, abs=1e-3)


def test_an_unchanged_copy_in_another_folder_is_accepted_and_recorded_as_a_run(tmp_path, config):
    make_images(tmp_path / "a", 6)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    make_images(tmp_path / "more", 8, seed=0)
    pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())
    info = pipeline.build_map(tmp_path / "copy", tmp_path / "map", config, **_quiet())
    assert info["counts"]["images"] == 6 and info["last_build"]["new_images"] == 0
    shutil.copy(tmp_path / "more" / "img007.png", tmp_path / "copy" / "img007.png")
    info = pipeline.build_map(tmp_path / "copy", tmp_path / "map", config, **_quiet())
    assert [r["images_root"] for r in info["runs"]] == [str((tmp_path / d).resolve()) for d in ("a", "copy", "copy")]
    m = pipeline.open_map(tmp_path / "map", read_only=True)
    entries = m.store.read_entries()
    assert set(entries["run"].tolist()) == {0, 2} and all(len(h) == 64 for h in entries["content_sha256"])
    images = m.data.images  # each image from the folder of the run that added it
    assert images.path("img000.png").parent == tmp_path / "a" and images.path("img007.png").parent == tmp_path / "copy"


def test_a_second_build_while_one_holds_the_lock_is_refused(tmp_path, config):
    make_images(tmp_path / "a", 4)
    with map_write_lock(tmp_path / "map"):
        with pytest.raises(MapError, match="is being built by process"):
            pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())
    pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())  # released: builds


def test_concurrent_builds_with_different_presets_leave_one_consistent_map(tmp_path, config):
    make_images(tmp_path / "a", 8)
    other = config.replace(vocabulary=VocabularyConfig(k=16))
    errors = []

    def build(c):
        try:
            pipeline.build_map(tmp_path / "a", tmp_path / "map", c, **_quiet())
        except MapError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=build, args=(c,)) for c in (config, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and ("being built" in errors[0] or "other settings" in errors[0])
    info = json.loads((tmp_path / "map" / "map.json").read_text())
    assert info["vocabulary"]["k"] == info["config"]["vocabulary"]["k"]


def _interrupted_build(tmp_path, config, monkeypatch) -> None:
    """12 images into tmp_path/map, stopped after the first 4-image shard (as a kill would)."""
    make_images(tmp_path / "a", 12)
    monkeypatch.setattr(pipeline.build, "SHARD_IMAGES", 4)

    def interrupt(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.build_map(tmp_path / "a", tmp_path / "map", config, _after_shard=interrupt, **_quiet())


def test_resuming_an_interrupted_build_with_other_settings_is_refused_naming_them(tmp_path, config, monkeypatch):
    _interrupted_build(tmp_path, config, monkeypatch)
    assert not (tmp_path / "map" / "map.json").exists() and (tmp_path / "map" / "build.json").exists()
    with pytest.raises(MapError, match=r"interrupted build with other settings \(vocabulary\.k: 8 → 16"):
        pipeline.build_map(
            tmp_path / "a", tmp_path / "map", config.replace(vocabulary=VocabularyConfig(k=16)), **_quiet()
        )
    info = pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())  # the same settings resume
    assert info["counts"]["images"] == 12


def test_a_vocabulary_of_another_k_in_the_map_folder_is_refused(tmp_path, config):
    make_images(tmp_path / "a", 8)
    pipeline.build_map(
        tmp_path / "a", tmp_path / "other", config.replace(vocabulary=VocabularyConfig(k=16)), **_quiet()
    )
    (tmp_path / "map").mkdir()
    shutil.copy(tmp_path / "other" / "vocabulary.npz", tmp_path / "map" / "vocabulary.npz")
    with pytest.raises(VocabularyMismatchError, match="K=16.*K=8"):
        pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())


def test_poses_given_for_an_existing_map_update_it(tmp_path, config):
    make_images(tmp_path / "a", 5)
    pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())
    rows = ["image,easting,northing"] + [f"img{i:03d}.png,{100 + i},{200 + i}" for i in range(5)]
    (tmp_path / "poses.csv").write_text("\n".join(rows) + "\n")
    info = pipeline.build_map(tmp_path / "a", tmp_path / "map", config, poses=tmp_path / "poses.csv", **_quiet())
    assert info["last_build"]["poses_updated"] == 5 and info["last_build"]["poses"]["n_matched"] == 5
    res = pipeline.localize(tmp_path / "map", [tmp_path / "a" / "img002.png"], top_k=1)
    assert res[0].matches[0].position == (102.0, 202.0)


def test_build_time_is_the_whole_build_and_an_unwritable_out_is_one_line(tmp_path, config):
    make_images(tmp_path / "a", 4)
    info = pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())
    assert info["last_build"]["seconds"] >= info["last_build"]["encode_seconds"] > 0
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(MapError, match="cannot write to"):
        pipeline.build_map(tmp_path / "a", tmp_path / "file" / "map", config, **_quiet())


def test_decoded_frames_record_their_pixels_hash(tmp_path, config):
    from vprkit.images import DecodedImages, frame_fingerprint

    frames = {f"f{i}": np.full((32, 32, 3), 40 * i, np.uint8) for i in range(3)}
    pipeline.build_map(
        DecodedImages(frames), tmp_path / "map", config.replace(aggregator="gem", aggregator_options={}), **_quiet()
    )
    entries = MapStore(tmp_path / "map").read_entries()
    assert entries["content_sha256"][1].decode() == frame_fingerprint(frames["f1"]).sha256
    assert entries["file_size"].tolist() == [-1, -1, -1]


def test_an_unreadable_sub_folder_is_recorded_in_failures_json(tmp_path, config, monkeypatch):
    import os

    from vprkit import images as images_module

    make_images(tmp_path / "a", 4)
    make_images(tmp_path / "a" / "locked", 2)
    real = images_module.os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(images_module.os, "scandir", scandir)
    info = pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())
    failures = json.loads((tmp_path / "map" / "failures.json").read_text())
    assert info["counts"]["images"] == 4 and info["counts"]["failed"] == 1
    assert failures == {"locked": "unreadable_folder: cannot list folder (Permission denied); its images are skipped"}


def test_leftover_temporary_files_are_removed_and_files_follow_the_umask(tmp_path, config):
    import os
    import stat

    make_images(tmp_path / "a", 4)
    pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())
    orphan = tmp_path / "map" / ".store.h5.k3j2h1g0.tmp"  # what a killed consolidation leaves
    orphan.write_bytes(b"half a store")
    old = os.umask(0o022)
    try:
        pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())  # nothing new to add
    finally:
        os.umask(old)
    assert not orphan.exists()
    for name in ("map.json", "store.h5", "index.faiss", "vocabulary.npz"):
        assert stat.S_IMODE((tmp_path / "map" / name).stat().st_mode) == 0o644, name


def test_a_vocabulary_swapped_during_an_interrupted_build_is_refused(tmp_path, config, monkeypatch):
    _interrupted_build(tmp_path, config, monkeypatch)
    recorded = json.loads((tmp_path / "map" / "build.json").read_text())["vocabulary"]
    assert recorded["k"] == 8 and len(recorded["checksum"]) == 16
    other = config.replace(vocabulary=VocabularyConfig(k=8, seed=5))
    pipeline.build_map(tmp_path / "a", tmp_path / "other", other, **_quiet())  # same K, another draw
    shutil.copy(tmp_path / "other" / "vocabulary.npz", tmp_path / "map" / "vocabulary.npz")
    with pytest.raises(VocabularyMismatchError, match="was being built with vocabulary"):
        pipeline.build_map(tmp_path / "a", tmp_path / "map", config, **_quiet())
