"""Comparing runs: the table, per-query fixes and breaks, the files; plus one small real run on Corridor."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from vprkit.datasets import GroundTruth
from vprkit.errors import ConfigError
from vprkit.evaluation.compare import (
    RunRecord,
    comparison_rows,
    load_run,
    markdown_table,
    pairwise_changes,
    query_changes,
    record_from_summary,
    render_markdown,
    write_comparison,
)
from vprkit.evaluation.run import Rankings, write_run

# 5 queries, database of 6; positive of query q is database q.
GT = GroundTruth([np.array([i]) for i in range(5)], n_database=6)
Q = [f"q{i}" for i in range(5)]
DB = [f"d{i}" for i in range(6)]
A = np.array([[0, 1, 2], [2, 1, 0], [5, 4, 3], [3, 0, 1], [0, 1, 2]])  # q0 ✓@1, q1 @2, q2 ✗, q3 ✓@1, q4 ✗
B = np.array([[1, 0, 2], [1, 0, 2], [2, 1, 0], [3, 0, 1], [5, 3, 2]])  # q0 @2, q1 ✓@1, q2 ✓@1, q3 ✓@1, q4 ✗


def _record(ranked, preset, rerank=None, dataset="toy", bytes_per_image=None):
    r = Rankings(Q, DB, DB, ranked.shape[1])
    r.add(Q, ranked, np.linspace(1, 0.5, ranked.shape[1])[None].repeat(len(Q), 0).astype(np.float32))
    summary = {
        "dataset": dataset,
        "preset": preset,
        "rerank": rerank,
        "recall": r.recall(GT, ns=(1, 2, 3)),
        "timing": {"ms_per_query": 12.5, "search_ms_per_query": 0.5},
    }
    return record_from_summary(summary, r.records(GT), bytes_per_image or {"global": 448})


def test_query_changes_fixed_and_broken():
    a, b = _record(A, "gem"), _record(B, "vlad", "speed")
    assert b.label == "vlad + speed"
    c = query_changes(a, b, n=1)
    assert [x["query"] for x in c["fixed"]] == ["q1", "q2"] and [x["query"] for x in c["broken"]] == ["q0"]
    assert c["fixed"][0] == {"query": "q1", "rank_a": 2, "rank_b": 1}
    assert c["fixed"][1] == {"query": "q2", "rank_a": None, "rank_b": 1}
    assert (c["both_right"], c["both_wrong"], c["net"], c["common"]) == (1, 1, 1, 5)
    # the net change equals the difference in Recall@1, in queries
    assert c["net"] == round((b.recall["R@1"] - a.recall["R@1"]) * 5)
    c2 = query_changes(a, b, n=2)
    assert [x["query"] for x in c2["fixed"]] == ["q2"] and c2["broken"] == []
    with pytest.raises(ConfigError):
        query_changes(a, b, n=0)


def test_table_rows_and_markdown():
    runs = [_record(A, "gem"), _record(B, "vlad", bytes_per_image={"global": 14336, "patches": 18440.5})]
    rows = comparison_rows(runs, ns=(1, 2))
    assert rows[0] == {
        "dataset": "toy",
        "method": "gem",
        "R@1": 0.4,
        "R@2": 0.6,
        "bytes/place": 448,
        "bytes/place (all)": 448,
        "ms/query": 12.5,
        "search ms/query": 0.5,
        "queries": 5,
    }
    assert rows[1]["bytes/place (all)"] == 32776
    md = markdown_table(rows)
    lines = md.splitlines()
    assert (
        lines[0].startswith("| dataset | method | R@1")
        and len(lines) == 4
        and "| toy | vlad | 0.600 | 0.800 | 14336 | 32776 |" in md
    )
    changes = pairwise_changes(runs)
    assert len(changes) == 1 and changes[0]["a"] == "gem" and changes[0]["b"] == "vlad"
    assert pairwise_changes(runs, baseline="vlad")[0]["b"] == "gem"
    with pytest.raises(ConfigError, match="baseline"):
        pairwise_changes(runs, baseline="nope")
    text = render_markdown(runs, changes, ns=(1, 2))
    assert "fixed" in text and "`q2` (–→1)" in text
    assert "`q2`" not in render_markdown(runs, changes, ns=(1, 2), list_queries=False)


def test_pairs_only_within_a_dataset():
    runs = [
        _record(A, "gem", dataset="x"),
        _record(B, "vlad", dataset="x"),
        _record(A, "gem", dataset="y"),
        _record(B, "vlad", dataset="y"),
    ]
    changes = pairwise_changes(runs)
    assert [(c["dataset"], c["a"], c["b"]) for c in changes] == [("x", "gem", "vlad"), ("y", "gem", "vlad")]


def test_write_comparison_and_load_run(tmp_path):
    folders = []
    for name, ranked in (("gem", A), ("vlad", B)):
        r = Rankings(Q, DB, DB, 3)
        r.add(Q, ranked, np.tile(np.array([0.9, 0.8, 0.7], np.float32), (5, 1)))
        s = {
            "dataset": "toy",
            "preset": name,
            "rerank": None,
            "recall": r.recall(GT, ns=(1, 2, 3)),
            "timing": {"ms_per_query": 3.0},
        }
        write_run(tmp_path / name, s, r, GT, report=False)
        folders.append(tmp_path / name)
    runs = [load_run(f, {"global": 100}) for f in folders]
    assert runs[1].first_positive == {"q0": 2, "q1": 1, "q2": 1, "q3": 1, "q4": None}
    changes = pairwise_changes(runs)
    files = write_comparison(tmp_path / "cmp", runs, changes, ns=(1, 2))
    assert sorted(p.name for p in files) == [
        "changes.csv",
        "comparison.csv",
        "comparison.html",
        "comparison.json",
        "comparison.md",
    ]
    rows = list(csv.DictReader((tmp_path / "cmp" / "changes.csv").open()))
    assert [(r["change"], r["query"], r["rank_a"], r["rank_b"]) for r in rows] == [
        ("fixed", "q1", "2", "1"),
        ("fixed", "q2", "", "1"),
        ("broken", "q0", "1", "2"),
    ]
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert data["runs"][0]["folder"] == str(folders[0]) and data["changes"][0]["net"] == 1

    class P(HTMLParser):
        ids, ext = [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "section":
                self.ids.append(a["id"])
            if tag in ("script", "link") or any(k in ("src", "href") for k in a):
                self.ext.append(tag)

    p = P()
    p.feed((tmp_path / "cmp" / "comparison.html").read_text())
    assert p.ids == ["table", "changes"] and p.ext == []
    with pytest.raises(ConfigError, match="not an evaluation run"):
        load_run(tmp_path / "cmp")


def test_real_compare_on_corridor(tmp_path, shared_datasets, monkeypatch):
    """One cheap real run end to end: effnet-gem at 128×96 on Corridor, through pipeline.compare."""
    from vprkit import pipeline

    monkeypatch.setenv("VPRKIT_DATA", str(shared_datasets))

    res = pipeline.compare(
        ["corridor"],
        ["effnet-gem"],
        [None],
        out=tmp_path,
        progress=False,
        resolve_options={"image_size": (96, 128)},
        save_predictions=3,
        log=lambda _: None,
    )
    (row,) = res["rows"]
    run = Path(res["runs"][0])
    summary = json.loads((run / "summary.json").read_text())
    assert row["R@1"] == pytest.approx(summary["recall"]["R@1"]) and 0.3 < row["R@1"] <= 1.0
    assert row["bytes/place"] == 448 and row["ms/query"] > 0 and row["queries"] == 111
    assert summary["recall_curve"][0] == pytest.approx(summary["recall"]["R@1"], abs=1e-6)
    assert summary["recall_curve"][4] == pytest.approx(summary["recall"]["R@5"], abs=1e-6)
    assert summary["ground_truth"]["n_queries"] == 111 and summary["software"]["faiss"]
    assert (run / "report.html").is_file() and len(list((run / "predictions").glob("*.png"))) > 0
    assert (tmp_path / "comparison.md").read_text().count("| corridor | effnet-gem |") == 1
    # per-query changes against a copy of the run with two queries flipped
    a = load_run(run)
    b = RunRecord(**{**a.__dict__, "preset": "flipped", "first_positive": dict(a.first_positive)})
    wrong = [q for q, r in a.first_positive.items() if r != 1][:1]
    right = [q for q, r in a.first_positive.items() if r == 1][:1]
    b.first_positive.update({wrong[0]: 1, right[0]: None})
    c = query_changes(a, b)
    assert [x["query"] for x in c["fixed"]] == wrong and [x["query"] for x in c["broken"]] == right


def test_real_compare_two_presets_on_two_shared_datasets(tmp_path, shared_datasets, monkeypatch):
    """The issue's case: two presets × two shared datasets (Corridor and Nordland-600) in one call, small
    images to stay cheap. Each dataset's per-query changes must account exactly for its Recall@1 gap."""
    from vprkit import pipeline

    monkeypatch.setenv("VPRKIT_DATA", str(shared_datasets))
    res = pipeline.compare(
        ["corridor", "nordland-64x32:600"],
        ["effnet-gem", "effnet-vlad"],
        [None],
        out=tmp_path,
        progress=False,
        resolve_options={"image_size": (64, 128)},
        log=lambda _: None,
    )
    rows = {(r["dataset"], r["method"]): r for r in res["rows"]}
    assert set(rows) == {(d, m) for d in ("corridor", "nordland-64x32:600") for m in ("effnet-gem", "effnet-vlad")}
    assert {r["queries"] for k, r in rows.items() if k[0] == "corridor"} == {111}
    assert {r["queries"] for k, r in rows.items() if k[0] != "corridor"} == {600}
    assert rows[("corridor", "effnet-gem")]["bytes/place"] == 448  # 112-d float32; VLAD: K = 32 × 112
    assert rows[("corridor", "effnet-vlad")]["bytes/place"] == 32 * 112 * 4
    for run in res["runs"]:
        summary = json.loads((Path(run) / "summary.json").read_text())
        assert rows[(summary["dataset"], load_run(run).label)]["R@1"] == pytest.approx(summary["recall"]["R@1"])
    assert [(c["dataset"], c["a"], c["b"]) for c in res["changes"]] == [
        ("corridor", "effnet-gem", "effnet-vlad"),
        ("nordland-64x32:600", "effnet-gem", "effnet-vlad"),
    ]
    for c in res["changes"]:
        gap = rows[(c["dataset"], "effnet-vlad")]["R@1"] - rows[(c["dataset"], "effnet-gem")]["R@1"]
        assert c["net"] == round(gap * c["common"]) and c["common"] == rows[(c["dataset"], "effnet-gem")]["queries"]
        assert len(c["fixed"]) + len(c["broken"]) + c["both_right"] + c["both_wrong"] == c["common"]
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("| corridor | effnet-") == 2 + 1 and table.count("| nordland-64x32:600 | effnet-") == 2 + 1
    assert {Path(f).name for f in res["files"]} >= {"comparison.md", "comparison.csv", "comparison.html", "changes.csv"}


def test_cli_lists_after_one_option():
    """`--presets a b --rerank none speed`: the values after the first go to their option, not to datasets."""
    from vprkit.cli.bench import _split_lists

    ds, ps, rs = _split_lists(
        ("corridor", "nordland-64x32:600", "effnet-vlad", "speed"), ("effnet2-vlad-ma4",), ("none",)
    )
    assert ds == ["corridor", "nordland-64x32:600"] and ps == ["effnet2-vlad-ma4", "effnet-vlad"]
    assert rs == ["none", "speed"]
    ds, ps, _ = _split_lists(("corridor", "effnet2-vlad-ma4+speed", "segvlad-slic", "x+speed"), ("effnet-vlad",), ())
    assert ds == ["corridor", "x+speed"] and ps == ["effnet-vlad", "effnet2-vlad-ma4+speed", "segvlad-slic"]


def test_compare_methods_cross_bare_presets_and_keep_named_pairs():
    """``PRESET+RERANK`` is one method; a bare preset is crossed with every ``--rerank`` mode."""
    from vprkit.errors import ConfigError
    from vprkit.pipeline.benchmarking import compare_methods as _compare_methods

    methods = _compare_methods(["a", "a+speed", "seg", "b+none"], [None, "storage"])
    assert methods == [("a", None), ("a", "storage"), ("a", "speed"), ("seg", None), ("seg", "storage"), ("b", None)]
    with pytest.raises(ConfigError, match="PRESET\\+RERANK"):
        _compare_methods(["a+"], [None])
