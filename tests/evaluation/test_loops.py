"""Loop-closure evaluation on constructed cases whose curve is known by hand."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from vprkit.errors import ConfigError, DatasetError
from vprkit.evaluation.loops import (
    best_earlier_matches,
    earlier_mask,
    loop_precision_recall,
    read_truth_matrix,
    truth_from_positions,
    without_recent,
    write_candidates_csv,
    write_pr_plot,
)
from vprkit.evaluation.plots import PNG_SIGNATURE


def _route_with_a_loop() -> np.ndarray:
    """Frames 0–9 along x, then 10–14 drive back over frames 2–6 (1 m spacing)."""
    first = np.c_[np.arange(10.0), np.zeros(10)]
    again = np.c_[np.arange(2.0, 7.0), np.full(5, 0.2)]
    return np.concatenate([first, again])


def test_truth_from_positions_keeps_earlier_frames_outside_the_window():
    truth = truth_from_positions(_route_with_a_loop(), radius=0.5, exclude_recent=3)
    assert truth[10, 2] and truth[14, 6] and not truth[2, 10]  # only earlier frames
    assert not truth[5, 4]  # within the window (and farther than the radius)
    assert truth.any(axis=1).tolist() == [False] * 10 + [True] * 5


def test_precision_recall_by_hand():
    """Five frames with a loop; candidates scored so that the ranking is right, wrong, right, right."""
    n = 15
    truth = truth_from_positions(_route_with_a_loop(), radius=0.5, exclude_recent=3)
    scores = np.zeros((n, n), np.float32)
    # frame 10→2 (right, 0.9), 11→0 (wrong, 0.8), 12→4 (right, 0.7), 13→5 (right, 0.6); frame 14 gets a wrong match at 0.1
    for i, j, s in ((10, 2, 0.9), (11, 0, 0.8), (12, 4, 0.7), (13, 5, 0.6), (14, 1, 0.1)):
        scores[i, j] = s
    cands = best_earlier_matches(scores, exclude_recent=3)
    assert cands.match[10] == 2 and cands.match[11] == 0 and (cands.match[:4] == -1).all()
    pr = loop_precision_recall(cands, truth)
    assert pr["n_with_loop"] == 5
    # thresholds 0.9, 0.8, 0.7, 0.6, …: precision 1, 1/2, 2/3, 3/4 …, recall 1/5, 1/5, 2/5, 3/5
    np.testing.assert_allclose(pr["precision"][:4], [1.0, 0.5, 2 / 3, 0.75])
    np.testing.assert_allclose(pr["recall"][:4], [0.2, 0.2, 0.4, 0.6])
    assert pr["recall_at_100_precision"] == pytest.approx(0.2)
    # average precision: Σ (Δ recall · precision) over the steps
    assert pr["average_precision"] == pytest.approx(0.2 * 1.0 + 0.2 * (2 / 3) + 0.2 * 0.75)


def test_a_perfect_detector_has_full_area_and_recall():
    truth = truth_from_positions(_route_with_a_loop(), radius=0.5, exclude_recent=3)
    scores = truth.astype(np.float32) + 0.01 * np.arange(15)[:, None]
    pr = loop_precision_recall(best_earlier_matches(scores, 3), truth)
    assert pr["average_precision"] == pytest.approx(1.0) and pr["recall_at_100_precision"] == pytest.approx(1.0)


def test_without_recent_hides_the_window():
    s = np.arange(16, dtype=np.float32).reshape(4, 4)
    out = without_recent(s, exclude_recent=1)
    allowed = earlier_mask(4, 1)
    assert (out[allowed] == s[allowed]).all()
    assert np.allclose(out[~allowed], s[allowed].mean())


def test_matrix_files_and_outputs(tmp_path):
    truth = np.zeros((15, 15), bool)
    truth[12, 3] = True
    np.save(tmp_path / "gt.npy", truth)
    np.savetxt(tmp_path / "gt.csv", truth.astype(int), fmt="%d", delimiter=",")
    a = read_truth_matrix(tmp_path / "gt.npy", 15, exclude_recent=2)
    b = read_truth_matrix(tmp_path / "gt.csv", 15, exclude_recent=2)
    assert (a == b).all() and a[12, 3] and not a[3, 12]
    with pytest.raises(DatasetError, match="14 frames"):
        read_truth_matrix(tmp_path / "gt.npy", 14)
    with pytest.raises(ConfigError):
        earlier_mask(3, -1)
    scores = np.random.default_rng(0).random((15, 15)).astype(np.float32)
    cands = best_earlier_matches(scores, 2)
    pr = loop_precision_recall(cands, a)
    keys = [f"{i:03d}.png" for i in range(15)]
    path = write_candidates_csv(tmp_path / "loops.csv", keys, cands, pr["correct"])
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 12 and rows[0]["frame"] and float(rows[0]["score"]) >= float(rows[-1]["score"])
    assert write_pr_plot(tmp_path / "pr.png", pr).read_bytes().startswith(PNG_SIGNATURE)


LOOP_FRAMES = 30  # Corridor frames per traversal in the loop test
LOOP_TOLERANCE = 2  # Corridor's ground truth: ±2 frames


def test_vprkit_loops_on_a_corridor_sequence_driven_twice(tmp_path, shared_datasets):
    """Frames 0–29 of the reference run, then 0–29 of the query run: the second half closes loops."""
    import json

    from helpers import run_cli

    frames = tmp_path / "frames"
    frames.mkdir()
    n = LOOP_FRAMES
    for i in range(n):
        (frames / f"{i:04d}.jpg").write_bytes((shared_datasets / "corridor" / "ref" / f"{i:07d}.jpg").read_bytes())
        (frames / f"{n + i:04d}.jpg").write_bytes(
            (shared_datasets / "corridor" / "query" / f"{i:07d}.jpg").read_bytes()
        )
    truth = np.zeros((2 * n, 2 * n), bool)
    for i in range(n):
        truth[n + i, max(0, i - LOOP_TOLERANCE) : i + LOOP_TOLERANCE + 1] = True
    np.save(tmp_path / "gt.npy", truth)
    common = [
        "loops",
        frames,
        "--exclude-recent",
        "25",
        "--ground-truth",
        tmp_path / "gt.npy",
        "--preset",
        "effnet-gem",
        "--image-size",
        "160x120",
        "--quiet",
    ]
    out = tmp_path / "out"
    single = run_cli(common + ["--out", out])
    assert single.exit_code == 0, single.output
    assert "average precision" in single.output and "recall at 100% precision" in single.output
    one = json.loads((out / "loops.json").read_text())
    seq = run_cli(common + ["--out", out, "--sequence-length", "4", "--json"])  # the frames' map is reused
    assert seq.exit_code == 0, seq.output
    summary = json.loads(seq.stdout)
    assert summary["score_kind"] == "sequence_mean_cosine" and summary["n_with_loop"] == n
    # measured: average precision 0.573 → 0.673, recall at 100 % precision 0.067 → 0.200, top-1 correct 22 → 23 of 30 (GeM)
    assert (
        summary["average_precision"] > one["average_precision"] and summary["n_correct_top1"] >= one["n_correct_top1"]
    )
    rows = list(csv.DictReader(open(out / "loops.csv")))
    assert len(rows) == summary["n_candidates"] == 2 * n - 26
    assert (out / "loops_pr.png").read_bytes().startswith(PNG_SIGNATURE)


NORDLAND_SLICE = slice(1000, 1160, 4)  # 40 places, every 4th file (the Nordland-600 spacing)
SLICE_SEQUENCE_R1_FLOOR = 0.85  # GeM at 128×64: single image 0.425, sequences of 8 measured 0.975


def test_eval_sequence_length_on_a_nordland_slice(tmp_path, shared_datasets):
    """`eval --sequence-length` on two synchronised traversals: the sequence beats the single image."""
    import re

    from helpers import run_cli

    root = tmp_path / "nordland-slice"
    names = sorted(p.name for p in (shared_datasets / "nordland-64x32" / "summer").iterdir())[NORDLAND_SLICE]
    for season in ("summer", "winter"):
        (root / season).mkdir(parents=True)
        for name in names:
            (root / season / name).write_bytes((shared_datasets / "nordland-64x32" / season / name).read_bytes())
    common = [
        "eval",
        root,
        "--queries",
        "winter",
        "--database",
        "summer",
        "--preset",
        "effnet-gem",
        "--image-size",
        "128x64",
        "--quiet",
    ]
    seq = run_cli(common + ["--sequence-length", "8"])
    assert seq.exit_code == 0, seq.output
    assert "sequence length 8" in seq.output
    r1 = float(re.search(r"R@1 ([0-9.]+)", seq.output).group(1))
    # measured on this slice: single image R@1 0.425 (the same command without --sequence-length), sequence 0.975
    assert r1 >= SLICE_SEQUENCE_R1_FLOOR
    # Corridor (ref/ + query/ whose names pair up) is accepted since issue 27; unpaired names are refused:
    # tests/test_sequence_eval.py
