"""Bad input through the real entry point: one line on stderr, a non-zero exit, never a traceback;
``--json`` output is JSON only; good queries are answered when others are unreadable."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest


from helpers import make_images, run_main as run, assert_one_line_error as one_line_error

SMALL = ["--preset", "effnet-gem", "--image-size", "64x64", "--quiet"]


@pytest.fixture
def small_map(tmp_path, monkeypatch, capsys):
    make_images(tmp_path / "images", 6)
    code, _, err = run(monkeypatch, capsys, "map", "build", tmp_path / "images", "--out", tmp_path / "map", *SMALL)
    assert code == 0, err
    return tmp_path / "map"


def test_damaged_map_files_are_one_line_errors(small_map, tmp_path, monkeypatch, capsys):
    (small_map / "map.json").write_text("{}")
    code, _, err = run(monkeypatch, capsys, "map", "info", small_map)
    one_line_error(code, err, "lacks 'config'")


def test_corrupt_store_is_one_line(small_map, monkeypatch, capsys):
    (small_map / "store.h5").write_bytes(b"not hdf5 at all")
    code, _, err = run(monkeypatch, capsys, "map", "info", small_map)
    one_line_error(code, err, "store.h5", "not a readable map store")


def test_truncated_index_is_rebuilt_with_a_warning(small_map, tmp_path, monkeypatch, capsys):
    data = (small_map / "index.faiss").read_bytes()
    (small_map / "index.faiss").write_bytes(data[: len(data) // 2])
    code, out, err = run(monkeypatch, capsys, "localize", small_map, tmp_path / "images" / "img002.png", "--top-k", "1")
    assert code == 0 and "img002.png" in out and "not a readable FAISS index" in err and "Traceback" not in err


def test_unwritable_out_and_absurd_image_size_are_refused_before_work(tmp_path, monkeypatch, capsys):
    make_images(tmp_path / "images", 3)
    (tmp_path / "file").write_text("x")
    code, _, err = run(
        monkeypatch, capsys, "map", "build", tmp_path / "images", "--out", tmp_path / "file" / "m", *SMALL
    )
    one_line_error(code, err, "cannot write to")
    code, _, err = run(
        monkeypatch, capsys, "map", "build", tmp_path / "images", "--out", tmp_path / "m", "--image-size", "1x100000"
    )
    one_line_error(code, err, "aspect ratio")


def test_a_pickle_as_weights_and_a_crafted_vocabulary_are_refused(tmp_path, monkeypatch, capsys):
    make_images(tmp_path / "images", 3)
    (tmp_path / "w.pth").write_bytes(pickle.dumps({"not": "weights"}))
    code, _, err = run(
        monkeypatch,
        capsys,
        "map",
        "build",
        tmp_path / "images",
        "--out",
        tmp_path / "m1",
        *SMALL,
        "--weights",
        tmp_path / "w.pth",
    )
    one_line_error(code, err, "w.pth")
    import zipfile

    from vprkit.aggregation.vlad import fit_vocabulary

    fit_vocabulary(np.random.default_rng(0).random((64, 8)).astype("float32"), k=4).save(tmp_path / "v.npz")
    header = np.lib.format
    import io

    buf = io.BytesIO()
    header.write_array(buf, np.zeros((2, 8), np.float32))
    crafted = buf.getvalue().replace(b"(2, 8)", b"(1000000000, 8)")
    with zipfile.ZipFile(tmp_path / "v.npz") as src, zipfile.ZipFile(tmp_path / "bad.npz", "w") as dst:
        for item in src.infolist():
            dst.writestr(item.filename, crafted if item.filename == "centres.npy" else src.read(item))
    code, _, err = run(
        monkeypatch,
        capsys,
        "map",
        "build",
        tmp_path / "images",
        "--out",
        tmp_path / "m2",
        "--preset",
        "effnet-vlad",
        "--image-size",
        "64x64",
        "--quiet",
        "--vocab",
        tmp_path / "bad.npz",
    )
    one_line_error(code, err, "bad.npz", "claims")


def test_json_output_is_json_and_good_queries_are_answered(small_map, tmp_path, monkeypatch, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    queries = [tmp_path / "images" / f"img00{i}.png" for i in range(3)] + [
        tmp_path / "broken.jpg",
        tmp_path / "gone.png",
    ]
    code, out, err = run(monkeypatch, capsys, "localize", small_map, *queries, "--json", "--top-k", "1")
    results = json.loads(out)  # nothing but JSON on stdout
    assert code == 1 and [r["query"] for r in results] == [str(q) for q in queries]
    assert [r["matches"][0]["image"] for r in results[:3]] == ["img000.png", "img001.png", "img002.png"]
    assert "error" in results[3] and "error" in results[4] and not results[3]["matches"]
    assert "broken.jpg" in err and "gone.png" in err


def test_an_internal_error_shows_its_traceback_and_asks_for_a_report(tmp_path, monkeypatch, capsys):
    from vprkit import pipeline

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline, "map_info", boom)
    code, _, err = run(monkeypatch, capsys, "map", "info", tmp_path)
    assert code == 3 and "Traceback" in err and "please report it" in err


class _Trap:
    """Unpickling this object would create ``path``: the test fails if any loader runs it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_weights_never_run_code_even_when_torch_is_told_to_allow_it(tmp_path, monkeypatch, capsys):
    import torch

    make_images(tmp_path / "images", 3)
    marker = tmp_path / "code-ran"
    torch.save({"_conv_stem.weight": _Trap(marker)}, tmp_path / "evil.pth")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    code, _, err = run(
        monkeypatch,
        capsys,
        "map",
        "build",
        tmp_path / "images",
        "--out",
        tmp_path / "m",
        *SMALL,
        "--weights",
        tmp_path / "evil.pth",
    )
    one_line_error(code, err, "evil.pth", "never runs code")
    assert not marker.exists()


def test_a_radius_for_a_list_ground_truth_is_one_line(monkeypatch, capsys, shared_datasets):
    code, _, err = run(
        monkeypatch,
        capsys,
        "eval",
        "corridor",
        "--data-root",
        shared_datasets,
        "--positive-dist-threshold",
        "10",
        *SMALL,
    )
    one_line_error(code, err, "positive_dist_threshold", "vpr-bench")


def test_the_radius_reaches_a_positional_layout(tmp_path, monkeypatch, capsys):
    from PIL import Image

    for role, names in (("database", ["@0@0@.png", "@15@0@.png", "@100@0@.png"]), ("queries", ["@14@0@.png"])):
        (tmp_path / "set" / role).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.fromarray(np.full((32, 32, 3), 60 * i + 20, np.uint8)).save(tmp_path / "set" / role / name)
    from vprkit.datasets import load_dataset

    near = load_dataset(tmp_path / "set", positive_dist_threshold=5)
    wide = load_dataset(tmp_path / "set", positive_dist_threshold=20)

    def names(ds):
        return sorted(ds.database_images[i] for i in ds.ground_truth.positives[0])

    assert names(near) == ["@15@0@.png"] and names(wide) == ["@0@0@.png", "@15@0@.png"]  # the query is at 14 m
    code, out, err = run(monkeypatch, capsys, "eval", tmp_path / "set", "--positive-dist-threshold", "5", *SMALL)
    assert code == 0 and "R@1" in out, err
