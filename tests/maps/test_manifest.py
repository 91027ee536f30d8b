"""The map folder's typed records (map.json, build.json, index.json): a real map's files round-trip, every kind
of bad field is one MapError naming the file and the field, and files written by older versions still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vprkit import pipeline
from vprkit.errors import MapError
from vprkit.maps import open_map_data
from vprkit.maps.manifest import (
    BUILD_FILE,
    INDEX_MANIFEST_FILE,
    MAP_FILE,
    BuildRecord,
    IndexManifest,
    MapManifest,
    read_build_record,
    read_index_manifest,
    read_manifest,
    read_map_info,
    write_build_record,
    write_index_manifest,
    write_manifest,
)
from vprkit.presets import resolve

SMALL_SIZE = (60, 80)


@pytest.fixture(scope="module")
def real_map(tmp_path_factory, shared_datasets) -> Path:
    """A small real Corridor map (VLAD: it records a vocabulary) built once for this module."""
    out = tmp_path_factory.mktemp("manifest") / "map"
    refs = sorted(p.name for p in (shared_datasets / "corridor" / "ref").glob("*.jpg"))[:12]
    config = resolve("effnet-vlad", image_size=SMALL_SIZE)
    pipeline.build_map(shared_datasets / "corridor" / "ref", out, config, keys=refs, progress=False)
    return out


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_a_real_maps_records_round_trip(real_map, tmp_path):
    raw = _json(real_map / MAP_FILE)
    manifest = MapManifest.from_dict(raw, real_map / MAP_FILE)
    assert manifest.to_dict() == raw
    assert manifest.counts.images == 12 and manifest.vocabulary.k >= 1 and manifest.runs[0].run == 0
    assert read_manifest(real_map).to_dict() == raw == read_map_info(real_map)
    assert manifest.settings().index == "Flat"
    build = read_build_record(real_map)
    assert build is not None and build.to_dict() == _json(real_map / BUILD_FILE)
    assert build.vocabulary.checksum == manifest.vocabulary.checksum
    write_manifest(tmp_path, manifest)
    write_build_record(tmp_path, build)
    assert _json(tmp_path / MAP_FILE) == raw and _json(tmp_path / BUILD_FILE) == _json(real_map / BUILD_FILE)
    assert read_index_manifest(real_map) is None or read_index_manifest(real_map).factory == "Flat"


def test_an_index_manifest_round_trips_and_reads_the_old_spelling(tmp_path):
    old = {
        "backend": "faiss",
        "factory": "IVF4,PQ4",
        "ntotal": 10,
        "generation": 2,
        "saved": "2024-01-01T00:00:00",
        "options": {
            "train_sample": 100,
            "seed": 3,
            "nprobe": 4,
            "efSearch": 32,
            "rescore": 0,
            "shard_rows": 0,
            "descriptors_dtype": "float16",
        },
        "trained_on": {"factory": "IVF4,PQ4", "sample": 10, "seed": 3, "rows": 10},
        "shards": [{"file": "index.faiss", "rows": 10}],
        "descriptors": None,
    }
    (tmp_path / INDEX_MANIFEST_FILE).write_text(json.dumps(old))
    manifest = read_index_manifest(tmp_path)
    assert manifest.options["ef_search"] == 32 and "efSearch" not in manifest.options
    assert manifest.shards[0].file == "index.faiss" and manifest.shards[0].rows == 10
    written = manifest.to_dict()
    assert written["options"]["ef_search"] == 32 and {k: v for k, v in written.items() if k != "options"} == {
        k: v for k, v in old.items() if k != "options"
    }
    write_index_manifest(tmp_path, written)  # a dict is checked, then written
    assert IndexManifest.from_dict(_json(tmp_path / INDEX_MANIFEST_FILE), "x").to_dict() == written


def test_old_layout_files_read_with_defaults(tmp_path):
    # the smallest map.json earlier versions wrote (tests' templates, maps before runs, CRS and counts)
    config = resolve("effnet-gem").to_dict()
    config["index_options"] = {"efSearch": 16}
    raw = {"config": config, "images_root": None, "index": {"factory": "Flat", "ntotal": 8}}
    manifest = MapManifest.from_dict(raw, MAP_FILE)
    assert manifest.runs == [] and manifest.crs is None and manifest.counts is None and manifest.vocabulary is None
    assert manifest.config["index_options"] == {"ef_search": 16}
    written = manifest.to_dict()
    assert written["images_root"] is None and written["index"] == {"factory": "Flat", "ntotal": 8}
    # unknown fields (a newer vprkit's) are kept as they were
    kept = MapManifest.from_dict(
        {**raw, "future": {"a": 1}, "runs": [{"run": 0, "images_root": "/x", "later": 2}]}, MAP_FILE
    ).to_dict()
    assert kept["future"] == {"a": 1} and kept["runs"][0]["later"] == 2
    # build.json before the vocabulary was recorded
    assert BuildRecord.from_dict({"config": config}, BUILD_FILE).vocabulary is None
    # an index.json with only what the first sharded versions wrote
    minimal = IndexManifest.from_dict({"factory": "Flat", "shards": [{"file": "index.faiss", "rows": 3}]}, "index.json")
    assert minimal.backend == "faiss" and minimal.generation == 0 and minimal.options == {}


BAD_MAP_FIELDS = [
    ({"counts": {"images": "x", "failed": 0}}, "field 'counts.images' must be an integer ≥ 0, got 'x'"),
    ({"counts": {"images": -1, "failed": 0}}, "field 'counts.images' must be an integer ≥ 0, got -1"),
    ({"counts": {"images": True, "failed": 0}}, "field 'counts.images' must be an integer ≥ 0, got True"),
    ({"counts": [1]}, "field 'counts' must be an object"),
    ({"config": "preset"}, "field 'config' must be an object"),
    ({"images_root": 3}, "field 'images_root' must be a string or null, got 3"),
    ({"runs": {"run": 0}}, "field 'runs' must be a list"),
    ({"runs": [{"run": "first"}]}, "field 'runs[0].run' must be an integer ≥ -1, got 'first'"),
    ({"runs": [{"images_root": "/x"}]}, "lacks 'runs[0].run'"),
    ({"crs": {"kind": "mercator"}}, "field 'crs.kind' must be one of 'utm', 'local', got 'mercator'"),
    ({"crs": {"kind": "utm", "zone": 61, "hemisphere": "N"}}, "field 'crs.zone' must be an integer ≥ 1 ≤ 60"),
    ({"crs": {"kind": "utm", "zone": 33, "hemisphere": "E"}}, "field 'crs.hemisphere' must be one of 'N', 'S'"),
    ({"vocabulary": {"checksum": 5}}, "field 'vocabulary.checksum' must be a string, got 5"),
    ({"vocabulary": {"checksum": "ab", "k": 0}}, "field 'vocabulary.k' must be an integer ≥ 1"),
    ({"descriptor_dim": 0}, "field 'descriptor_dim' must be an integer ≥ 1"),
    ({"extensions": ["patches", 2]}, "field 'extensions' must be a list of strings"),
    ({"index": {"factory": "Flat", "ntotal": 2.5}}, "field 'index.ntotal' must be an integer ≥ 0 or null, got 2.5"),
    ({"index": {"options": {"rescore": -1}}}, "field 'index.options.rescore' is not a valid index option"),
    ({"index": {"options": {"nprobes": 4}}}, "field 'index.options.nprobes' is not a valid index option"),
    ({"last_build": 7}, "field 'last_build' must be an object or null, got 7"),
]


@pytest.mark.parametrize("change,message", BAD_MAP_FIELDS)
def test_each_kind_of_bad_map_field_is_one_line_naming_it(change, message, tmp_path):
    raw = {"config": resolve("effnet-gem").to_dict(), "images_root": None, **change}
    (tmp_path / MAP_FILE).write_text(json.dumps(raw))
    with pytest.raises(MapError) as err:
        read_manifest(tmp_path)
    text = str(err.value)
    assert message in text and text.startswith(str(tmp_path / MAP_FILE)) and "\n" not in text, text


def test_missing_config_and_non_objects_are_named(tmp_path):
    with pytest.raises(MapError, match="map.json lacks 'config'"):
        MapManifest.from_dict({"images_root": None}, "map.json")
    with pytest.raises(MapError, match="map.json does not hold a JSON object"):
        MapManifest.from_dict([1, 2], "map.json")  # type: ignore[arg-type]
    with pytest.raises(MapError, match="build.json: field 'vocabulary.k' must be an integer ≥ 1"):
        BuildRecord.from_dict({"config": {}, "vocabulary": {"k": "64", "checksum": "ab"}}, "build.json")
    with pytest.raises(MapError, match="build.json lacks 'config'"):
        BuildRecord.from_dict({}, "build.json")
    with pytest.raises(MapError, match="is not a vprkit map"):
        read_manifest(tmp_path)
    assert read_build_record(tmp_path) is None and read_index_manifest(tmp_path) is None


@pytest.mark.parametrize(
    "change,message",
    [
        ({"backend": "annoy"}, "field 'backend' must be one of 'faiss', got 'annoy'"),
        ({"shards": [{"file": "../../etc/passwd", "rows": 1}]}, "field 'shards[0].file' must be a file name inside"),
        ({"shards": [{"file": "/tmp/x.faiss", "rows": 1}]}, "field 'shards[0].file' must be a file name inside"),
        ({"shards": [{"file": "index.faiss", "rows": "1"}]}, "field 'shards[0].rows' must be an integer ≥ 0"),
        (
            {"descriptors": {"file": "descriptors.npy", "dtype": "int8", "rows": 1}},
            "'descriptors.dtype' must be one of",
        ),
        (
            {"options": {"descriptors_dtype": "float64"}},
            "field 'options.descriptors_dtype' is not a valid index option",
        ),
        ({"options": {"ef_search": "wide"}}, "field 'options.ef_search' is not a valid index option"),
        ({"generation": -2}, "field 'generation' must be an integer ≥ 0"),
    ],
)
def test_each_kind_of_bad_index_field_is_named(change, message):
    raw = {"factory": "Flat", "shards": [{"file": "index.faiss", "rows": 1}], **change}
    with pytest.raises(MapError) as err:
        IndexManifest.from_dict(raw, "index.json")
    assert str(err.value).startswith("index.json: ") and message in str(err.value), str(err.value)


def test_a_damaged_index_manifest_only_costs_a_rebuild(real_map, tmp_path, caplog):
    d = tmp_path / "map"
    shutil.copytree(real_map, d, ignore=shutil.ignore_patterns(".lock"))
    (d / INDEX_MANIFEST_FILE).write_text(json.dumps({"factory": "Flat", "shards": [{"file": "../x", "rows": 1}]}))
    m = open_map_data(d)
    assert m.index.ntotal == len(m.keys) == 12 and "index.json" in caplog.text
