"""The estimate: calibration from the map alone, position/heading/spread, "unknown place", persistence,
and the end-to-end behaviour on real data (Nordland frames against a Corridor map are unknown)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from vprkit import pipeline
from vprkit.rerank.base import Reranker
from vprkit.retrieval import estimate as est
from vprkit.retrieval.estimate import (
    CALIBRATION_FILE,
    Calibration,
    circular_mean_deg,
    estimate,
    fit_calibration,
    load_or_fit_calibration,
    sequence_positions,
)

DIM = 64


def _brute_search(matrix: np.ndarray):
    """An exact inner-product index over ``matrix`` (what the map's flat FAISS index answers)."""

    def search(q: np.ndarray, k: int):
        s = q @ matrix.T
        k = min(k, matrix.shape[0])
        rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return rows, np.take_along_axis(s, rows, 1)

    return search


def _equicorrelated(n: int, c: float) -> np.ndarray:
    """n unit vectors whose pairwise cosines are all exactly ``c`` (shared axis + orthogonal private axes)."""
    v = np.zeros((n, DIM))
    v[:, 0] = np.sqrt(c)
    v[np.arange(n), 1 + np.arange(n)] = np.sqrt(1 - c)
    return v.astype(np.float32)


def _reference_impostors(m: np.ndarray, rows: np.ndarray, k: int, window: int) -> np.ndarray:
    """The definition, spelled out: mean of the top-k cosines against rows outside ±window (rows in sequence order)."""
    s = m[rows] @ m.T
    idx = np.arange(len(m))
    s = np.where(np.abs(rows[:, None] - idx[None, :]) <= window, -np.inf, s)
    return np.sort(-np.sort(-s, axis=1)[:, :k].mean(1))


def test_calibration_of_a_constructed_map_gives_the_known_confidence():
    c = 0.4
    m = _equicorrelated(40, c)
    keys = [f"f{i:03d}.png" for i in range(40)]
    cal = fit_calibration(_brute_search(m), lambda r: m[r], keys, k=5, window=3)
    assert np.allclose(cal.impostor, c, atol=1e-6)  # every impostor scores exactly c
    # the impostor distribution is a point mass at c: confidence is ½ there, → 1 above and → 0 below
    assert cal.confidence(c)[0] == pytest.approx(0.5, abs=1e-3)
    assert cal.confidence(c + 0.05)[0] > 0.999 and cal.confidence(c - 0.05)[0] < 0.001


def test_calibration_matches_the_reference_formulation():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(60, DIM))
    m = (base + np.cumsum(rng.normal(size=(60, DIM)) * 0.3, 0)).astype(np.float32)  # a "route": neighbours alike
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    keys = [f"img{i}.jpg" for i in range(60)]  # natural order: img2 before img10 → row order
    cal = fit_calibration(_brute_search(m), lambda r: m[r], keys, k=4, window=2, sample=25, seed=3)
    chosen = np.sort(np.random.default_rng(3).choice(60, 25, replace=False))
    assert np.allclose(cal.impostor, _reference_impostors(m, chosen, 4, 2), atol=1e-5)
    e = np.linspace(cal.impostor.min() - 0.1, cal.impostor.max() + 0.1, 7)
    expected = norm.cdf((e[:, None] - cal.impostor[None, :]) / cal.bandwidth).mean(1)
    assert np.allclose(cal.confidence(e), expected)


def test_sequence_order_is_natural_name_order_not_row_order():
    keys = ["img10.png", "img2.png", "img1.png"]
    assert sequence_positions(keys).tolist() == [2, 1, 0]


def _cal(**kw) -> Calibration:
    values = dict(
        impostor=np.linspace(0.5, 0.7, 21), bandwidth=0.01, k=3, window=2, radius_m=25.0, rows=100, fingerprint="x"
    )
    values.update(kw)
    return Calibration(**values)


def test_position_is_the_weighted_mean_of_agreeing_matches_and_spread_covers_all():
    poses = np.full((50, 2), np.nan)
    poses[[0, 1, 2, 30]] = [[0, 0], [10, 0], [20, 0], [1000, 0]]
    rows, cos = np.array([0, 1, 2, 30]), np.array([0.9, 0.8, 0.7, 0.6])
    e = estimate(rows, cos, poses, None, _cal())
    w = cos[:3]
    assert e.position == pytest.approx(((w * [0, 10, 20]).sum() / w.sum(), 0.0))
    d2 = (poses[rows, 0] - e.position[0]) ** 2
    assert e.spread == pytest.approx(np.sqrt((cos * d2).sum() / cos.sum())) and e.spread_unit == "m"
    assert e.evidence["agreeing"] == 3 and e.evidence["agreement"] == pytest.approx(w.sum() / cos.sum(), abs=1e-4)


def test_without_poses_the_spread_is_in_sequence_rows():
    e = estimate(np.array([10, 11, 40]), np.array([0.9, 0.9, 0.9]), None, None, _cal(), sequence=np.arange(50))
    assert e.position is None and e.spread_unit == "rows" and e.route_position == pytest.approx(10.5)
    assert e.spread == pytest.approx(np.sqrt(((10 - 10.5) ** 2 + (11 - 10.5) ** 2 + (40 - 10.5) ** 2) / 3))
    assert "spread_rows" in e.to_dict()


def test_heading_is_the_circular_mean():
    h = circular_mean_deg(np.array([359.0, 1.0]))
    assert min(h, 360 - h) == pytest.approx(0.0, abs=1e-9)
    assert circular_mean_deg(np.array([90.0, np.nan, 90.0])) == pytest.approx(90.0)
    assert circular_mean_deg(np.array([np.nan])) is None
    headings = np.full(10, np.nan)
    headings[[0, 1]] = [350.0, 20.0]
    e = estimate(np.array([0, 1]), np.array([0.8, 0.8]), None, headings, _cal(), sequence=np.arange(10))
    assert e.heading == pytest.approx(5.0)


def test_unknown_is_monotone_in_the_score():
    cal = _cal(threshold=0.1)
    evidence = np.linspace(0.3, 0.9, 61)
    conf = cal.confidence(evidence)  # the environment CDF, reported beside the confidence
    assert np.all(np.diff(conf) >= 0) and conf[0] == pytest.approx(0.0, abs=1e-9) and conf[-1] == pytest.approx(1.0)
    results = [estimate(np.array([0]), np.array([v]), None, None, cal, sequence=np.arange(5)) for v in evidence]
    probability = np.array([e.confidence for e in results])
    assert np.all(np.diff(probability) > 0)
    unknown = [e.unknown for e in results]
    first_known = unknown.index(False)
    assert all(unknown[:first_known]) and not any(unknown[first_known:])
    # one match, no rival place seen: only top1_z speaks; the crossing is where the logistic model reaches 0.1
    model = est.CONFIDENCE_MODELS.get("global")
    median, spread = cal.scale("top1")
    crossing = median + spread * (np.log(0.1 / 0.9) - model.bias) / model.weights["top1_z"]
    assert evidence[first_known - 1] < crossing <= evidence[first_known]


def test_place_margin_is_a_ratio_test_over_places_not_rows():
    seq = np.arange(100)
    rows = np.array([50, 51, 49, 80, 10])  # the answer's two route neighbours are its own place
    cos = np.array([0.9, 0.88, 0.87, 0.7, 0.6])
    assert est.place_margin(rows, cos, seq, None, window=2, radius_m=0.0) == pytest.approx(0.2)
    assert est.place_margin(rows[:3], cos[:3], seq, None, window=2, radius_m=0.0) is None  # no other place seen
    poses = np.c_[np.arange(100) * 3.0, np.zeros(100)]  # 3 m apart: with a 5 m radius, row 51 and 49 are the place
    assert est.place_margin(rows, cos, seq, poses, window=0, radius_m=5.0) == pytest.approx(0.2)
    assert est.place_margin(rows, cos, seq, poses, window=0, radius_m=1.0) == pytest.approx(0.02)


def test_the_place_radius_follows_the_route_not_a_fixed_25_m():
    seq = np.arange(40)
    office = np.c_[np.cos(np.arange(40) / 40 * 2 * np.pi), np.sin(np.arange(40) / 40 * 2 * np.pi)] * 3.5  # a 22 m loop
    step = np.linalg.norm(office[5] - office[0])
    assert est.route_radius(office, seq, 5) == pytest.approx(step)
    assert est.route_radius(None, seq, 5) == est.DEFAULT_RADIUS_M


def test_a_map_too_small_to_calibrate_says_unknown_null_with_the_reason():
    m = _equicorrelated(3, 0.4)
    cal = fit_calibration(_brute_search(m), lambda r: m[r], ["a", "b", "c"], window=3)
    assert not cal.usable
    e = estimate(np.array([0]), np.array([0.9]), None, None, cal, sequence=np.arange(3))
    assert e.confidence is None and e.unknown is None and "too small" in e.evidence["unknown_reason"]
    assert e.to_dict()["unknown"] is None


def test_a_small_office_loop_with_poses_has_a_confidence():
    """The issue's case: poses spanning 22 m had no place but the whole map; the radius now follows the route."""
    rng = np.random.default_rng(0)
    m = (rng.normal(size=(40, DIM)) + np.cumsum(rng.normal(size=(40, DIM)) * 0.3, 0)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    angle = np.arange(40) / 40 * 2 * np.pi
    poses = np.c_[np.cos(angle), np.sin(angle)] * 3.5
    keys = [f"f{i:02d}" for i in range(40)]
    cal = fit_calibration(_brute_search(m), lambda r: m[r], keys, poses)
    assert cal.usable and cal.radius_m < 5 and cal.impostor_margin.size > 0
    rows, cos = _brute_search(m)(m[[7]], cal.search_depth())
    e = estimate(rows[0], cos[0], poses, None, cal, sequence=np.arange(40), evidence=cos[0], evidence_rows=rows[0])
    assert e.confidence is not None and e.confidence > 0.9 and e.unknown is False  # a map image queried with itself


def test_persisted_calibration_is_reused_and_refitted_when_stale(tmp_path, monkeypatch):
    m = _equicorrelated(30, 0.3)
    keys = [f"f{i:02d}" for i in range(30)]
    fits = []
    real_fit = est.fit_calibration
    monkeypatch.setattr(est, "fit_calibration", lambda *a, **kw: fits.append(1) or real_fit(*a, **kw))
    args = (_brute_search(m), lambda r: m[r])
    load_or_fit_calibration(tmp_path, *args, keys, None, write=True)
    saved = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert saved["rows"] == 30 and len(fits) == 1
    again = load_or_fit_calibration(tmp_path, *args, keys, None, write=True)
    assert len(fits) == 1 and again.rows == 30  # read back, not refitted
    m2 = _equicorrelated(31, 0.3)
    grown = load_or_fit_calibration(tmp_path, _brute_search(m2), lambda r: m2[r], keys + ["f30"], None, write=True)
    assert len(fits) == 2 and grown.rows == 31 and json.loads((tmp_path / CALIBRATION_FILE).read_text())["rows"] == 31
    m3 = m2.copy()
    m3[:, 0] *= 0.5  # same keys, other content
    m3 /= np.linalg.norm(m3, axis=1, keepdims=True)
    load_or_fit_calibration(tmp_path, _brute_search(m3), lambda r: m3[r], keys + ["f30"], None, write=True)
    assert len(fits) == 3
    (tmp_path / CALIBRATION_FILE).write_text("{damaged")
    assert load_or_fit_calibration(tmp_path, _brute_search(m3), lambda r: m3[r], keys + ["f30"], None).rows == 31
    assert load_or_fit_calibration(tmp_path, *args, keys, None, fit=False) is None  # stale, and told not to fit


# ---- end to end on real data ---------------------------------------------------------------------
REFS = 30
CORRIDOR_QUERIES = range(3, 27, 4)
NORDLAND_FRAMES = 6


@pytest.fixture(scope="module")
def estimate_map(corridor_map, tmp_path_factory) -> Path:
    """The session's map of the first REFS Corridor references (default preset), copied: a writable open below
    saves a calibration into it."""
    return Path(shutil.copytree(corridor_map(count=REFS), tmp_path_factory.mktemp("estimate") / "map"))


def test_real_nordland_frames_are_unknown_in_a_corridor_map(estimate_map, shared_datasets):
    m = pipeline.open_map(estimate_map, read_only=True)
    assert not (estimate_map / CALIBRATION_FILE).exists()  # a reader writes nothing
    q = shared_datasets / "corridor" / "query"
    corridor = [q / f"{i:07d}.jpg" for i in CORRIDOR_QUERIES]
    winter = sorted((shared_datasets / "nordland-64x32" / "winter").iterdir())[::400][:NORDLAND_FRAMES]
    results = pipeline.localize(m, corridor + winter, top_k=5)
    assert not (estimate_map / CALIBRATION_FILE).exists()
    inside, outside = results[: len(corridor)], results[len(corridor) :]
    assert all(r.estimate.unknown for r in outside), [r.estimate.confidence for r in outside]
    assert np.mean([not r.estimate.unknown for r in inside]) >= 0.75, [r.estimate.confidence for r in inside]
    assert max(r.estimate.confidence for r in outside) < min(r.estimate.confidence for r in inside)
    d = inside[0].to_dict()
    assert d["matches"][0]["score_kind"] == "cosine" and d["matches"][0]["cosine"] == pytest.approx(
        d["matches"][0]["score"]
    )
    assert set(d["estimate"]) >= {"position", "heading_deg", "spread_rows", "confidence", "unknown", "evidence"}
    json.dumps(d)  # JSON-ready
    writable = pipeline.open_map(estimate_map)  # the first writable open persists the calibration
    assert (estimate_map / CALIBRATION_FILE).exists() and writable.calibration.rows == REFS


class _ReversingReranker(Reranker):
    """A stand-in re-ranker (the real ones are tested in tests/rerank): reverses the shortlist, z-scored scores."""

    shortlist = 8

    def rerank(self, query, rows, scores):
        rows = rows[:, : self.shortlist][:, ::-1].copy()
        return rows, np.tile(np.linspace(1.5, -1.5, rows.shape[1]), (len(rows), 1))


def test_confidence_judges_the_final_answer_in_every_mode_and_scores_say_what_they_are(
    estimate_map, shared_datasets, monkeypatch
):
    m = pipeline.open_map(estimate_map, read_only=True)
    queries = [shared_datasets / "corridor" / "query" / f"{i:07d}.jpg" for i in (5, 15)]
    plain = pipeline.localize(m, queries, top_k=5)
    monkeypatch.setattr(pipeline.localization, "get_reranker", lambda *a, **kw: _ReversingReranker())
    reranked = pipeline.localize(m, queries, top_k=5, rerank="speed")  # any real name: get_reranker is the stand-in
    assert [x.row for x in reranked[0].matches] != [x.row for x in plain[0].matches]
    for a, b in zip(plain, reranked):
        assert b.matches[0].score_kind == "fused_zscore" and a.matches[0].score_kind == "cosine"
        # the confidence is about the answer given: the re-ranked top-1 (the global 5th) is judged on its own cosine
        assert b.estimate.evidence["top1_cosine"] == pytest.approx(b.matches[0].cosine, abs=1e-5)
        assert b.estimate.evidence["place_margin"] < a.estimate.evidence["place_margin"]
        assert b.estimate.confidence < a.estimate.confidence
        global_cos = {x.row: x.score for x in a.matches}  # global mode: the score is the cosine
        shared = [x for x in b.matches if x.row in global_cos]
        assert shared and all(x.cosine == pytest.approx(global_cos[x.row], abs=1e-4) for x in shared)


def test_match_two_names_its_scores(shared_datasets):
    ref = shared_datasets / "corridor" / "ref"
    tm = pipeline.match_two(ref / "0000003.jpg", ref / "0000004.jpg", rerank="speed")
    assert tm.score_kind == "weighted_rapid_spatial_score" and tm.scale_score_kind == "rapid_spatial_score"
    assert tm.cosine is None and tm.patch_state.startswith("fitted")


def test_a_few_live_additions_keep_the_calibration_and_many_refit():
    cal = _cal(rows=100)
    assert cal.covers(100) and cal.covers(105) and cal.covers(95)
    assert not cal.covers(111) and not cal.covers(89)
    assert _cal(rows=3).covers(3) and not _cal(rows=3).covers(4)


def test_a_calibration_from_an_earlier_vprkit_is_refitted_quietly(tmp_path, caplog):
    m = _equicorrelated(30, 0.3)
    keys = [f"f{i:02d}" for i in range(30)]
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"version": 1, "statistic": "mean_top_k_cosine", "k": 10}))
    with caplog.at_level("INFO", logger="vprkit.retrieval.estimate"):
        cal = load_or_fit_calibration(tmp_path, _brute_search(m), lambda r: m[r], keys, None, write=True)
    assert cal.usable and cal.impostor_margin.size > 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "earlier vprkit" in caplog.text
    assert json.loads((tmp_path / CALIBRATION_FILE).read_text())["version"] == est.CALIBRATION_VERSION
