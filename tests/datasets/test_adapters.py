"""Layout detection and loading: real shared data (Corridor, Nordland, toy) and generated fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vprkit.datasets import DATASET_ADAPTERS, describe, detect_layout, load_dataset
from vprkit.datasets.adapters import PLACES_STEP
from vprkit.errors import ConfigError, DatasetError
from helpers import tiny_image

# The shared data sits beside the repository (../shared/datasets), also in CI's fresh clone.
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"
NORDLAND_FILES = 3576
CORRIDOR_IMAGES = 111


@pytest.fixture
def shared_root(monkeypatch):
    monkeypatch.setenv("VPRKIT_DATA", str(SHARED))
    return SHARED


def test_corridor_by_name_uses_the_csv(shared_root):
    ds = load_dataset("corridor")
    assert ds.layout == "vpr-bench" and ds.name == "corridor"
    assert len(ds.database_images) == len(ds.query_images) == CORRIDOR_IMAGES
    gt = ds.ground_truth
    assert gt.n_queries == CORRIDOR_IMAGES and gt.n_database == CORRIDOR_IMAGES
    # First row of the file: query/0000000.jpg,ref/0000000.jpg ref/0000001.jpg ref/0000002.jpg
    assert ds.query_images[0] == "0000000.jpg"
    assert [ds.database_images[i] for i in gt.positives[0]] == ["0000000.jpg", "0000001.jpg", "0000002.jpg"]
    assert gt.no_positive_queries.size == 0
    assert "corridor" in ds.describe()


def test_nordland_default_protocol_and_places(shared_root):
    ds = load_dataset("nordland-64x32")
    assert ds.queries_dir.name == "winter" and ds.database_dir.name == "summer"
    assert len(ds.query_images) == NORDLAND_FILES
    pos = ds.ground_truth.positives
    assert pos[0].tolist() == [0, 1] and pos[100].tolist() == [99, 100, 101]  # ±1 file
    exact = load_dataset("nordland-64x32", tolerance=0)
    assert exact.ground_truth.positives[100].tolist() == [100]

    for d600 in (load_dataset("nordland-64x32:600"), load_dataset("nordland-64x32", places=600)):
        assert d600.name == "nordland-64x32:600"
        assert len(d600.query_images) == len(d600.database_images) == 600
        assert d600.query_images[1] == "images-00050.png"  # every 4th file of images-00010, -00020, …
        assert all(p.tolist() == [i] for i, p in enumerate(d600.ground_truth.positives))  # exact frame

    swapped = load_dataset("nordland-64x32", queries="summer", database="winter")
    assert swapped.queries_dir.name == "summer"


def test_toy_is_unlabelled(shared_root):
    ds = load_dataset("toy-unlabelled")
    assert ds.ground_truth is None and ds.layout == "utm-filenames"
    assert (len(ds.database_images), len(ds.query_images)) == (17, 5)
    assert "unlabelled" in ds.describe()


def test_unknown_name_and_options(shared_root, tmp_path):
    with pytest.raises(DatasetError, match="not found.*available under"):
        load_dataset("no-such-set")
    with pytest.raises(ConfigError, match="not understood"):
        load_dataset("corridor", radius=10)


def test_utm_filename_layout(tmp_path):
    root = tmp_path / "street"
    for i, (e, n) in enumerate([(500000.0, 4000000.0), (500010.0, 4000000.0), (500100.0, 4000000.0)]):
        tiny_image(root / "database" / f"@{e:.2f}@{n:.2f}@33@T@@@@@@@@@@@{i}.jpg", i)
    tiny_image(root / "queries" / "@500005.00@4000000.00@33@T@@@@@@@@@@@q.jpg")
    assert detect_layout(root).name == "utm-filenames"
    ds = load_dataset(root)
    assert ds.ground_truth.positives[0].tolist() == [0, 1]
    np.testing.assert_allclose(ds.query_poses, [[500005.0, 4000000.0]])
    narrow = load_dataset(root, radius=4.0)
    assert narrow.ground_truth.positives[0].tolist() == []
    # Mixed names (some with coordinates, some without) are an error, not a silent half-labelling.
    tiny_image(root / "database" / "plain.jpg")
    with pytest.raises(DatasetError, match="lack @east@north@"):
        load_dataset(root)


def test_explicit_layout_with_poses_and_list(tmp_path):
    root = tmp_path / "explicit"
    for name in ("d0.png", "d1.png", "d2.png"):
        tiny_image(root / "database" / name)
    tiny_image(root / "queries" / "q0.png")
    (root / "poses.csv").write_text(
        "image,easting,northing\ndatabase/d0.png,0,0\ndatabase/d1.png,100,0\ndatabase/d2.png,20,0\nqueries/q0.png,1,0\n"
    )
    assert detect_layout(root).name == "explicit"
    ds = load_dataset(root)
    assert ds.ground_truth.positives[0].tolist() == [0, 2]
    assert ds.database_poses.shape == (3, 2)
    (root / "ground_truth.csv").write_text("query,positives\nqueries/q0.png,database/d1.png\n")
    assert load_dataset(root).ground_truth.positives[0].tolist() == [1]  # the list wins over poses


def test_explicit_layout_missing_pose(tmp_path):
    root = tmp_path / "explicit"
    tiny_image(root / "database" / "d0.png")
    tiny_image(root / "queries" / "q0.png")
    (root / "poses.csv").write_text("image,easting,northing\ndatabase/d0.png,0,0\n")
    with pytest.raises(DatasetError, match="no pose for queries/q0.png"):
        load_dataset(root)


def test_sequences_layout_generic(tmp_path):
    root = tmp_path / "seq"
    for season in ("autumn", "spring"):
        for i in range(5):
            tiny_image(root / season / f"{i:04d}.png")
    assert detect_layout(root).name == "sequences"
    ds = load_dataset(root, tolerance=0)
    assert ds.database_dir.name == "autumn" and ds.queries_dir.name == "spring"
    assert ds.ground_truth.positives[3].tolist() == [3]


def test_vpr_bench_pickle_only_is_refused(tmp_path):
    root = tmp_path / "bench"
    tiny_image(root / "ref" / "0.jpg")
    tiny_image(root / "query" / "0.jpg")
    (root / "ground_truth_new.npy").write_bytes(b"\x93NUMPY not really")
    with pytest.raises(DatasetError, match="pickle"):
        load_dataset(root)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(tmp_path / "empty")
    root = tmp_path / "noq"
    tiny_image(root / "database" / "d.jpg")
    (root / "queries").mkdir()
    with pytest.raises(DatasetError, match=r"no images found in .*queries"):
        load_dataset(root)
    odd = tmp_path / "odd"
    (odd / "stuff").mkdir(parents=True)
    with pytest.raises(DatasetError, match="unrecognised dataset layout"):
        load_dataset(odd)


def test_subset_keeps_ground_truth_consistent(shared_root):
    ds = load_dataset("corridor")
    sub = ds.subset(every=2)
    m_full = ds.ground_truth.to_matrix()
    np.testing.assert_array_equal(sub.ground_truth.to_matrix(), m_full[::2, ::2])
    assert sub.query_images == ds.query_images[::2]
    only_db = ds.subset(every=PLACES_STEP, which="database")
    assert len(only_db.query_images) == CORRIDOR_IMAGES
    assert only_db.ground_truth.n_database == len(only_db.database_images)


def test_registry_and_describe():
    assert {"vpr-bench", "explicit", "utm-filenames", "sequences"} <= set(DATASET_ADAPTERS.names())
    text = describe()
    assert text.index("explicit") < text.index("utm-filenames")
