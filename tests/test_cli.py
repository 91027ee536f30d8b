"""The command line, end to end: map build → info → localize, eval on the real Corridor data."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image
from click.testing import CliRunner

from helpers import run_cli
from vprkit.cli import cli, main

# Measured 0.93 on Corridor with effnet-vlad (see benchmarks/bench_core.py); the floor leaves room
# for k-means seed variation (0.90–0.95 over seeds) without letting a real regression through.
CORRIDOR_R1_FLOOR = 0.88


run = run_cli


def test_eval_corridor_end_to_end(tmp_path, shared_datasets, monkeypatch):
    monkeypatch.setenv("VPRKIT_DATA", str(shared_datasets))
    r = run(["eval", "corridor", "--preset", "effnet-vlad", "--out", tmp_path / "run", "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["recall"]["R@1"] >= CORRIDOR_R1_FLOOR
    assert summary["recall"]["R@5"] >= summary["recall"]["R@1"]
    assert summary["config"]["name"] == "effnet-vlad"  # resolved settings recorded with the run
    rows = list(csv.DictReader(open(tmp_path / "run" / "per_query.csv")))
    assert len(rows) == 111
    assert "R@1" in r.output and "ms/query" in r.output


def _positional_set(folder) -> None:
    """A tiny dataset of the positional layout (``@easting@northing@`` names): three places, one query at 14 m."""
    for role, names in (("database", ["@0@0@.png", "@15@0@.png", "@100@0@.png"]), ("queries", ["@14@0@.png"])):
        (folder / role).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.fromarray(np.full((32, 32, 3), 60 * i + 20, np.uint8)).save(folder / role / name)


def test_data_root_reaches_the_library_as_an_argument_not_through_the_environment(tmp_path, monkeypatch):
    """`eval` and `compare` find a named dataset under --data-root and leave os.environ as it was."""
    _positional_set(tmp_path / "root" / "tiny")
    monkeypatch.setenv("VPRKIT_DATA", str(tmp_path / "elsewhere"))  # not where the dataset is
    small = ["--image-size", "64x64", "--quiet"]
    for args in (
        ["eval", "tiny", "--preset", "effnet-gem", *small],
        ["compare", "tiny", "--presets", "effnet-gem", *small],
    ):
        before = dict(os.environ)
        r = run([*args, "--data-root", tmp_path / "root"])
        assert r.exit_code == 0 and "R@1" in r.output, r.output
        assert dict(os.environ) == before, args[0]


def test_map_build_info_localize(tmp_path, image_folder):
    r = run(["map", "build", image_folder, "--out", tmp_path / "map", "--preset", "effnet-gem", "--quiet", "--float16"])
    assert r.exit_code == 0, r.output
    assert "12 images" in r.output
    r = run(["map", "info", tmp_path / "map"])
    assert "images: 12" in r.output and "float16" in r.output
    r = run(["localize", tmp_path / "map", image_folder / "img004.png", "--top-k", "3", "--json"])
    out = json.loads(r.stdout)
    assert out[0]["matches"][0]["image"] == "img004.png" and len(out[0]["matches"]) == 3
    r = run(["localize", tmp_path / "map", image_folder / "img004.png", "--top-k", "2"])
    assert "1. img004.png" in r.output


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["vprkit", "map", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and "Traceback" not in err
    monkeypatch.setattr("sys.argv", ["vprkit", "eval", "corridor", "--preset", "no-such-preset"])
    with pytest.raises(SystemExit):
        main()
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err


def test_presets_listed():
    r = run(["presets"])
    assert "effnet-vlad" in r.output and "effnet-gem" in r.output
    default_line = next(line for line in r.output.splitlines() if line.startswith("effnet2-vlad-ma4 "))
    assert "multiple assignment" in default_line and default_line.endswith("[default]")
    assert sum(line.endswith("[default]") for line in r.output.splitlines()) == 1


def test_image_size_option_overrides_the_preset_size(tmp_path, image_folder):
    r = run(
        [
            "map",
            "build",
            image_folder,
            "--out",
            tmp_path / "map",
            "--preset",
            "effnet-gem",
            "--image-size",
            "96x64",
            "--quiet",
        ]
    )
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "map" / "map.json").read_text())
    assert saved["config"]["image"] == {"size": [64, 96], "resize": "fixed"}  # (height, width), mode kept
    # queries are resized as the map was built
    r = run(["localize", tmp_path / "map", image_folder / "img003.png", "--top-k", "1", "--json"])
    assert json.loads(r.stdout)[0]["matches"][0]["image"] == "img003.png"
    for bad in ("96", "96xABC", "0x64"):
        r = CliRunner().invoke(
            cli, ["map", "build", str(image_folder), "--out", str(tmp_path / "m2"), "--image-size", bad]
        )
        assert r.exit_code == 2 and "--image-size" in r.output


def test_library_logs_follow_the_current_stderr(monkeypatch):
    """A command run in-process may replace stderr (click's runner, a notebook): the CLI's log handler writes to
    the stderr of the moment, never to a stream closed since it was set up."""
    import io
    import logging
    import sys

    from vprkit.cli import show_library_logs

    show_library_logs()
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logging.getLogger("vprkit.test").info("to the first")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("vprkit.test").info("to the second")
    assert second.getvalue() == "to the second\n"
