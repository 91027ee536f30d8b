"""The files of ``eval --out``: summary fields, top-N CSV, Recall@N curve, galleries and the self-contained HTML report.

Everything here runs on synthetic rankings and tiny generated images; no browser, no model.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from vprkit.datasets import GroundTruth
from vprkit.evaluation.gallery import build_galleries, gallery_order
from vprkit.evaluation.html import SECTION_IDS
from vprkit.evaluation.metrics import first_positive_rank, hit_matrix, recall_at_n, recall_curve, top1_precision_recall
from vprkit.evaluation.report import software_versions
from vprkit.evaluation.run import Rankings, write_run


class _Page(HTMLParser):
    """Collects sections, headings, images, tables and anything that would load another resource."""

    def __init__(self):
        super().__init__()
        self.sections: list[str] = []
        self.images: list[dict[str, str]] = []
        self.tables = 0
        self.external: list[str] = []
        self.gallery_rows: list[tuple[str, str]] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id", ""))
        if tag == "img":
            self.images.append(a)
        if tag == "table":
            self.tables += 1
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)
        for attr in ("src", "href"):
            v = a.get(attr)
            if v and not v.startswith("data:") and not v.startswith("#"):
                self.external.append(v)
        if tag == "div" and "gallery-row" in a.get("class", ""):
            self.gallery_rows.append((a["data-kind"], a["data-query"]))


def _decode(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    im.load()
    return im


def _dataset(tmp_path: Path, n_db: int = 8, n_q: int = 6):
    """Tiny image folders: database i is a flat colour, query q looks like database q."""
    db_dir, q_dir = tmp_path / "db", tmp_path / "q"
    db_dir.mkdir()
    q_dir.mkdir()
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, (n_db, 3))
    db_keys = [f"d{i:02d}.png" for i in range(n_db)]
    q_keys = [f"sub/q{i:02d}.png" for i in range(n_q)]
    (q_dir / "sub").mkdir()
    for i, k in enumerate(db_keys):
        Image.new("RGB", (40, 30), tuple(int(c) for c in colours[i])).save(db_dir / k)
    for i, k in enumerate(q_keys):
        Image.new("RGB", (40, 30), tuple(int(c) for c in colours[i])).save(q_dir / k)
    return (
        SimpleNamespace(
            database_dir=db_dir,
            queries_dir=q_dir,
            database_images=db_keys,
            query_images=q_keys,
            ground_truth_rule="query q matches database q ± 1 (synthetic)",
        ),
        db_keys,
        q_keys,
    )


# 6 queries, 8 database images; positives of q are {q, q+1}; query 5 has no positive.
GT = GroundTruth(
    [np.array([0, 1]), np.array([1, 2]), np.array([2, 3]), np.array([3, 4]), np.array([4, 5]), np.array([], int)],
    n_database=8,
    source="frames ±1",
)
RANKED = np.array(
    [
        [0, 7, 6, 5],  # right at 1
        [7, 6, 2, 5],  # first positive at 3
        [7, 6, 5, 0],  # none
        [3, 0, 1, 2],  # right at 1
        [6, 7, 0, 1],  # none
        [0, 1, 2, 3],  # no positive exists
    ]
)
SCORES = np.array(
    [
        [0.9, 0.5, 0.4, 0.3],
        [0.8, 0.7, 0.6, 0.5],
        [0.95, 0.5, 0.4, 0.3],
        [0.7, 0.6, 0.5, 0.4],
        [0.6, 0.5, 0.4, 0.3],
        [0.85, 0.5, 0.4, 0.3],
    ],
    np.float32,
)


def _rankings(q_keys, db_keys):
    r = Rankings(q_keys, db_keys, db_keys, RANKED.shape[1])
    r.add(q_keys, RANKED, SCORES)
    return r


def test_recall_curve_matches_recall_at_n():
    curve = recall_curve(RANKED, GT)
    assert len(curve) == 4
    for n in range(1, 5):
        assert curve[n - 1] == pytest.approx(recall_at_n(RANKED, GT, [n])[f"R@{n}"])
    np.testing.assert_allclose(curve, [2 / 6, 2 / 6, 3 / 6, 3 / 6])
    np.testing.assert_allclose(recall_curve(RANKED, GT, "skip"), [2 / 5, 2 / 5, 3 / 5, 3 / 5])
    assert np.all(np.diff(curve) >= 0)


def test_top1_precision_recall_ends_at_recall_at_1():
    pr = top1_precision_recall(RANKED, SCORES, GT)
    assert pr["recall"][-1] == pytest.approx(recall_at_n(RANKED, GT, [1])["R@1"])
    # strictest threshold first: 0.95 (query 2, wrong) → precision 0
    assert pr["precision"][0] == 0.0 and pr["n_relevant"] == 6
    # unreadable queries (−inf scores, −1 rows) are never accepted but count in the denominator
    scores = SCORES.copy()
    ranked = RANKED.copy()
    scores[0] = -np.inf
    ranked[0] = -1
    pr2 = top1_precision_recall(ranked, scores, GT)
    assert pr2["n_queries"] == 5 and pr2["n_relevant"] == 6 and pr2["recall"][-1] == pytest.approx(1 / 6)
    assert top1_precision_recall(np.full((2, 1), -1), np.full((2, 1), -np.inf), GroundTruth([[0], [0]], 1)) is None


def test_gallery_order_worst_and_best():
    first = first_positive_rank(RANKED, GT)  # [0, 2, -1, 0, -1, -1]
    top1 = SCORES[:, 0]
    worst, best = gallery_order(first, top1, 10, 10)
    # none found first (by score: q2 .95, q5 .85, q4 .6), then q1 (rank 3); best by score: q0 .9, q3 .7
    assert worst == [2, 5, 4, 1]
    assert best == [0, 3]
    worst, best = gallery_order(first, top1, 2, 1, evaluated=GT.n_positives > 0)
    assert worst == [2, 4] and best == [0]
    # non-finite scores sort last among equals; ranks beat scores
    w, _ = gallery_order(np.array([3, -1, 3, 1]), np.array([np.nan, -np.inf, 0.1, 0.9]), 10, 0)
    assert w == [1, 2, 0, 3]


def test_galleries_draw_frames(tmp_path):
    ds, db_keys, q_keys = _dataset(tmp_path)
    entries = build_galleries(
        q_keys,
        db_keys,
        RANKED,
        SCORES,
        first_positive_rank(RANKED, GT),
        hit_matrix(RANKED, GT),
        ds.queries_dir,
        ds.database_dir,
        3,
        n_worst=2,
        n_best=1,
    )
    assert [(e.kind, e.query_index) for e in entries] == [("worst", 2), ("worst", 5), ("best", 0)]
    im = Image.open(io.BytesIO(entries[2].png)).convert("RGB")
    px = np.asarray(im)
    # the best query's first prediction is correct: green frame; query frame is blue
    greens = np.all(px == (26, 152, 80), axis=-1).sum()
    blues = np.all(px == (49, 104, 181), axis=-1).sum()
    reds = np.all(px == (215, 48, 39), axis=-1).sum()
    assert greens > 100 and blues > 100 and reds > 100  # predictions 2 and 3 are wrong
    worst = np.asarray(Image.open(io.BytesIO(entries[0].png)).convert("RGB"))
    assert np.all(worst == (26, 152, 80), axis=-1).sum() == 0  # nothing correct in query 2's list
    assert np.all(worst == (118, 42, 131), axis=-1).sum() == 0  # no true-match tile unless positives are given
    with_truth = build_galleries(
        q_keys,
        db_keys,
        RANKED,
        SCORES,
        first_positive_rank(RANKED, GT),
        hit_matrix(RANKED, GT),
        ds.queries_dir,
        ds.database_dir,
        3,
        n_worst=2,
        n_best=1,
        positives=GT.positives,
    )
    px = [np.asarray(Image.open(io.BytesIO(e.png)).convert("RGB")) for e in with_truth]
    purple = [int(np.all(p == (118, 42, 131), axis=-1).sum()) for p in px]
    # query 2 (no positive retrieved) shows a true match; query 5 has no positive at all; the best row needs none
    assert purple[0] > 100 and purple[1] == 0 and purple[2] == 0
    assert px[0].shape[1] > px[1].shape[1]


def test_write_run_files_summary_and_html(tmp_path):
    ds, db_keys, q_keys = _dataset(tmp_path)
    rankings = _rankings(q_keys, db_keys)
    summary = {
        "dataset": "synthetic",
        "preset": "test",
        "rerank": None,
        "recall": rankings.recall(GT, ns=(1, 2, 4)),
        "timing": {"ms_per_query": 1.5},
        "counts": {"database": 8, "queries": 6, "queries_unreadable": 0},
        "config": {"name": "test", "image": {"size": [30, 40]}},
        "environment": {"VPRKIT_DATA": "/data"},
    }
    out = tmp_path / "run"
    write_run(out, summary, rankings, GT, dataset=ds, save_predictions=3)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {
        "summary.json",
        "per_query.csv",
        "topn.csv",
        "recall_curve.png",
        "pr_curve.png",
        "report.html",
        "predictions/index.csv",
    } <= names
    assert sorted(n for n in names if n.startswith("predictions/") and n.endswith(".png")) == [
        "predictions/best-001_sub_q00.png",
        "predictions/best-002_sub_q03.png",
        "predictions/worst-001_sub_q02.png",
        "predictions/worst-002_sub_q05.png",
        "predictions/worst-003_sub_q04.png",
        "predictions/worst-004_sub_q01.png",
    ]
    index = list(csv.DictReader((out / "predictions" / "index.csv").open()))
    assert [(r["kind"], r["position"], r["query"], r["first_positive_rank"]) for r in index] == [
        ("worst", "1", "sub/q02.png", ""),
        ("worst", "2", "sub/q05.png", ""),
        ("worst", "3", "sub/q04.png", ""),
        ("worst", "4", "sub/q01.png", "3"),
        ("best", "1", "sub/q00.png", "1"),
        ("best", "2", "sub/q03.png", "1"),
    ]
    assert not [n for n in names if n.endswith(".tmp")]

    s = json.loads((out / "summary.json").read_text())
    assert s["ground_truth"]["rule"] == ds.ground_truth_rule and s["ground_truth"]["n_no_positive"] == 1
    assert s["ground_truth"]["rule_text"] == ds.ground_truth_rule
    assert s["recall_curve"] == pytest.approx([2 / 6, 2 / 6, 3 / 6, 3 / 6], abs=1e-6)
    assert set(s["software"]) >= {"python", "torch", "faiss", "numpy", "vprkit"}
    assert s["software"]["numpy"] == np.__version__
    assert s["environment"] == {"VPRKIT_DATA": "/data"} and s["timing"]["ms_per_query"] == 1.5
    assert s["precision_recall"]["n_relevant"] == 6 and 0 <= s["precision_recall"]["average_precision"] <= 1
    assert s["save_predictions"] == 3 and "report.html" in s["files"]
    assert s["config"]["name"] == "test"

    rows = list(csv.DictReader((out / "topn.csv").open()))
    assert len(rows) == 6 * 4 and float(rows[0].pop("score")) == pytest.approx(0.9)
    assert rows[0] == {"query": "sub/q00.png", "rank": "1", "database": "d00.png", "correct": "True"}
    assert [r["correct"] for r in rows if r["query"] == "sub/q01.png"] == ["False", "False", "True", "False"]

    page = _Page()
    text = (out / "report.html").read_text()
    page.feed(text)
    assert set(SECTION_IDS) <= set(page.sections)
    assert page.external == []  # self-contained: no scripts, stylesheets or files
    assert page.tables >= 6
    decoded = [_decode(img["src"]) for img in page.images]
    assert len(decoded) == 2 + 6  # recall curve, PR curve, 4 worst + 2 best rows
    assert all(im.width > 50 and im.height > 50 for im in decoded)
    assert page.gallery_rows == [
        ("worst", "sub/q02.png"),
        ("worst", "sub/q05.png"),
        ("worst", "sub/q04.png"),
        ("worst", "sub/q01.png"),
        ("best", "sub/q00.png"),
        ("best", "sub/q03.png"),
    ]
    assert "query q matches database q ± 1" in text and "VPRKIT_DATA" in text


def test_write_run_without_predictions_and_escaping(tmp_path):
    ds, db_keys, q_keys = _dataset(tmp_path)
    q_keys = [k.replace("q0", "<b>q") for k in q_keys]  # names that would be markup
    rankings = _rankings(q_keys, db_keys)
    summary = {"dataset": "a<script>", "preset": "p", "recall": rankings.recall(GT, ns=(1,)), "config": {}}
    out = tmp_path / "run"
    write_run(out, summary, rankings, GT)
    text = (out / "report.html").read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text and "<b>q" not in text
    page = _Page()
    page.feed(text)
    assert len(page.images) == 2 and page.gallery_rows == [] and not (out / "predictions").exists()
    s = json.loads((out / "summary.json").read_text())
    assert s["ground_truth"]["rule"] == "frames ±1"  # falls back to the ground truth's own description
    assert s["ground_truth"]["rule_text"]


def test_software_versions():
    v = software_versions()
    assert v["python"].count(".") == 2 and v["numpy"] == np.__version__


RENDER_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "check_report_render.py"


def test_the_report_renders_in_headless_chromium_with_its_figures_and_tables(tmp_path):
    """The issue's browser check: a real headless Chromium renders ``report.html``, and the screenshot and
    the page hold the sections, tables and figures (``scripts/check_report_render.py``; ``setup.sh``
    installs Debian's ``chromium`` when run as root)."""
    import shutil
    import subprocess
    import sys

    chromium = next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )
    assert chromium, "this test needs headless Chromium: apt-get install -y chromium (scripts/setup.sh does, as root)"
    ds, db_keys, q_keys = _dataset(tmp_path)
    rankings = _rankings(q_keys, db_keys)
    summary = {
        "dataset": "synthetic",
        "preset": "test",
        "recall": rankings.recall(GT, ns=(1, 2, 4)),
        "timing": {"ms_per_query": 1.5},
        "config": {"name": "test"},
    }
    out = tmp_path / "run"
    write_run(out, summary, rankings, GT, dataset=ds, save_predictions=3)
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [sys.executable, str(RENDER_SCRIPT), str(out / "report.html"), "--out", str(shot), "--height", "3000"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and done.stdout.rstrip().endswith("PASS"), done.stdout + done.stderr
    assert "8 embedded PNGs decode" in done.stdout  # 2 curves + 6 gallery rows, as the HTML test counts
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (3000, 1280)
    # the page is drawn, not blank: the gallery's green and red frames are in the pixels
    flat = image.reshape(-1, 3).astype(int)
    greenish = ((flat[:, 1] > 150) & (flat[:, 0] < 100) & (flat[:, 2] < 100)).sum()
    reddish = ((flat[:, 0] > 180) & (flat[:, 1] < 80) & (flat[:, 2] < 80)).sum()
    assert greenish > 100 and reddish > 100


def test_the_render_check_fails_on_a_report_without_its_figures(tmp_path):
    """The check can fail: a page with the sections but no figures and an external script is refused."""
    import subprocess
    import sys

    page = tmp_path / "report.html"
    page.write_text(
        "<html><body>"
        + "".join(f'<section id="{s}"><table></table></section>' for s in SECTION_IDS)
        + '<script src="http://example.com/x.js"></script></body></html>'
    )
    done = subprocess.run(
        [sys.executable, str(RENDER_SCRIPT), str(page), "--no-browser"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "FAIL  self-contained" in done.stdout and "FAIL  0 embedded PNGs" in done.stdout
