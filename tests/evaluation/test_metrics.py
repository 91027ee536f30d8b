"""Recall@N, precision–recall and per-query records on hand-made examples; report helpers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from vprkit.datasets import GroundTruth
from vprkit.errors import ConfigError, DatasetError
from vprkit.evaluation import (
    PeakMemory,
    Timer,
    first_positive_rank,
    format_table,
    hit_matrix,
    plot_pr_curve,
    precision_recall,
    query_records,
    recall_at_n,
    write_csv,
    write_json,
)

# 4 queries, 6 database images. Query 2 has no positive.
GT = GroundTruth([np.array([3]), np.array([0, 5]), np.array([], dtype=int), np.array([1])], n_database=6)
RANKED = np.array(
    [
        [3, 1, 2],  # hit at rank 1
        [1, 2, 5],  # hit at rank 3
        [0, 1, 2],  # no positive exists
        [4, -1, -1],  # positive never retrieved; empty slots
    ]
)


def test_hit_matrix_and_first_rank():
    hits = hit_matrix(RANKED, GT)
    expected = np.zeros(RANKED.shape, bool)
    expected[0, 0] = expected[1, 2] = True
    np.testing.assert_array_equal(hits, expected)
    assert first_positive_rank(RANKED, GT).tolist() == [0, 2, -1, -1]


def test_empty_slot_never_matches_previous_query_code():
    # -1 in row 1 encodes to 1·N − 1, which is query 0's code for database N − 1: must not count.
    gt = GroundTruth([np.array([2]), np.array([0])], n_database=3)
    assert not hit_matrix(np.array([[0], [-1]]), gt).any()


def test_recall_fail_policy():
    r = recall_at_n(RANKED, GT, ns=(1, 3, 5))
    assert r["R@1"] == pytest.approx(1 / 4)
    assert r["R@3"] == pytest.approx(2 / 4)
    assert r["R@5"] == pytest.approx(2 / 4)
    assert r["truncated_ns"] == [5] and r["k"] == 3
    assert (r["n_queries"], r["n_evaluated"], r["n_no_positive"], r["no_positive_policy"]) == (4, 4, 1, "fail")


def test_recall_skip_policy():
    r = recall_at_n(RANKED, GT, ns=(1, 3), no_positive="skip")
    assert r["R@1"] == pytest.approx(1 / 3)
    assert r["R@3"] == pytest.approx(2 / 3)
    assert (r["n_evaluated"], r["n_no_positive"], r["no_positive_policy"]) == (3, 1, "skip")


def test_recall_errors():
    with pytest.raises(ConfigError, match="no_positive"):
        recall_at_n(RANKED, GT, no_positive="ignore")
    with pytest.raises(ConfigError, match="queries"):
        recall_at_n(RANKED[:2], GT)
    with pytest.raises(ConfigError, match="indices"):
        recall_at_n(RANKED + 10, GT)
    with pytest.raises(DatasetError, match="no query can be evaluated"):
        recall_at_n(np.zeros((1, 1), int), GroundTruth([np.array([], int)], 1), no_positive="skip")


def test_recall_matches_loop_reference_on_random_data():
    rng = np.random.default_rng(0)
    q, n, k = 50, 40, 10
    m = rng.random((q, n)) < 0.05
    gt = GroundTruth.from_matrix(m)
    ranked = np.argsort(rng.random((q, n)), axis=1)[:, :k]
    r = recall_at_n(ranked, gt, ns=(1, 5, 10))
    for n_ in (1, 5, 10):
        ref = np.mean([m[i, ranked[i, :n_]].any() for i in range(q)])
        assert r[f"R@{n_}"] == pytest.approx(ref)


def test_precision_recall_hand_made():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([True, True, False, True, False])
    pr = precision_recall(scores, correct)
    np.testing.assert_allclose(pr["precision"], [1, 1, 2 / 3, 3 / 4, 3 / 5])
    np.testing.assert_allclose(pr["recall"], [0.2, 0.4, 0.4, 0.6, 0.6])
    assert pr["recall_at_100_precision"] == pytest.approx(0.4)
    assert pr["average_precision"] == pytest.approx(0.2 * 1 + 0.2 * 1 + 0.2 * 0.75)
    # Distances (lower is better) and ties: tied scores are accepted together.
    pr2 = precision_recall(np.array([0.1, 0.1, 0.3]), np.array([True, False, True]), higher_is_better=False)
    np.testing.assert_allclose(pr2["precision"], [0.5, 2 / 3])
    assert pr2["recall_at_100_precision"] == 0.0


def test_query_records():
    recs = query_records(["a", "b", "c", "d"], [f"db{i}" for i in range(6)], RANKED, RANKED * 0.1, GT)
    assert recs[0] == {
        "query": "a",
        "top1": "db3",
        "score": pytest.approx(0.3),
        "correct": True,
        "first_positive_rank": 1,
        "n_positives": 1,
    }
    assert recs[1]["first_positive_rank"] == 3 and recs[1]["correct"] is False
    assert recs[2]["first_positive_rank"] is None and recs[2]["n_positives"] == 0
    unl = query_records(["a"], ["x"], np.array([[0]]), None, None)
    assert unl[0]["correct"] is None and np.isnan(unl[0]["score"])


def test_report_files_and_table(tmp_path):
    with Timer() as t, PeakMemory() as mem:
        block = np.ones(1_000_000)
    assert t.seconds >= 0 and mem.peak_mb > 0 and block.size
    summary = {"recall@1": np.float32(0.5), "ns": np.array([1, 5]), "nan": float("nan"), "path": tmp_path}
    out = write_json(summary, tmp_path / "sub" / "summary.json")
    loaded = json.loads(out.read_text())
    assert loaded["recall@1"] == 0.5 and loaded["ns"] == [1, 5] and loaded["nan"] is None
    recs = query_records(["a", "b", "c", "d"], [f"db{i}" for i in range(6)], RANKED, None, GT)
    path = write_csv(recs, tmp_path / "queries.csv")
    rows = list(csv.DictReader(path.open()))
    assert rows[0]["top1"] == "db3" and rows[2]["first_positive_rank"] == ""
    assert not [p for p in tmp_path.rglob("*.tmp")]  # atomic writes leave no temporaries
    table = format_table(
        [{"method": "vlad", "recall@1": 0.9412}, {"method": "gem", "recall@1": 0.67}], ["method", "recall@1"]
    )
    lines = table.splitlines()
    assert lines[0].startswith("method") and "0.941" in lines[2] and len({len(line) for line in lines[2:]}) == 1


def test_plot_pr_curve(tmp_path):
    pr = precision_recall(np.array([0.9, 0.5, 0.1]), np.array([True, False, True]))
    path = plot_pr_curve({"vlad": pr}, tmp_path / "pr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_files_follow_the_umask_and_leave_the_backend_alone(tmp_path):
    import os
    import stat
    import sys

    backend = sys.modules["matplotlib"].get_backend() if "matplotlib" in sys.modules else None
    old = os.umask(0o022)
    try:
        written = [
            write_json({"a": 1}, tmp_path / "s.json"),
            write_csv([{"a": 1}], tmp_path / "q.csv"),
            plot_pr_curve(precision_recall(np.array([0.9, 0.1]), np.array([True, False])), tmp_path / "pr.png"),
        ]
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in written] == [0o644] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pr.png", "q.csv", "s.json"]
    if backend is not None:
        assert sys.modules["matplotlib"].get_backend() == backend
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
