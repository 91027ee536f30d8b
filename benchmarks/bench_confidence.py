"""Issue 27 items 2–3: a confidence that the answer is right, and "not in this map", on maps large and small.

    python benchmarks/bench_confidence.py [--maps corridor40 nordland40 toy22 corridor nordland600] [--fit]

Maps (default preset), each with its in-map queries and out-of-map picture sets:

- ``corridor40``: Corridor's first 40 reference frames. In-map: their 40 queries. Out-of-map: Corridor
  queries and references from frame 60 on (the same building, another place), Nordland winter frames,
  the toy street photos.
- ``nordland40``: 40 consecutive Nordland summer frames (1000–1039, 224×112). In-map: their winter
  frames (exact frame). Out-of-map: Corridor queries, the toy photos, winter frames ≥ 100 frames away.
- ``toy22``: the 22 toy street photos. In-map: the photos themselves (a place queried with its own image).
  Out-of-map: Corridor queries, Nordland winter frames.
- ``corridor`` (111) and ``nordland600`` (Nordland-600, 224×112): their queries; out-of-map as above.

Every query goes through ``pipeline.localize`` — the estimate a user gets. The evidence features of
each estimate (``top1_z``, ``margin_z``: z-scores on the map's own impostors) are collected and
the confidence model is refitted **leave-one-dataset-out**: each map's row uses the logistic model
fitted on the *other* maps (each map weighted equally) and the threshold that keeps ≥ 0.90 of the
other maps' correct answers, so no number is reported on the data it was chosen on. ``--fit`` prints the
model fitted on all maps (what ``retrieval.estimate.CONFIDENCE_MODELS["global"]`` ships). Columns:
``AUC r/w``, ROC AUC of the confidence for correct vs wrong top-1 in-map answers; ``accepted``, the share of
correct in-map answers accepted; ``rejected``, per out-of-map set, the share called unknown;
``shipped`` columns repeat the acceptance/rejection as ``localize`` answers them (the shipped model, fitted on
all maps, and its threshold: ``unknown`` as reported).
Writes ``benchmarks/results/confidence.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from common import DATA, NORDLAND_600, NORDLAND_SIZE, RESULTS, report, setup
from vprkit import pipeline
from vprkit.datasets import load_dataset
from vprkit.images import FolderImages, list_images
from vprkit.presets import resolve
from vprkit.retrieval.estimate import CONFIDENCE_MODELS

CACHE = RESULTS / "cache" / "confidence"
FEATURES = ("top1_z", "margin_z")
VERIFIED_FEATURES = (*FEATURES, "inliers_log")
TARGET_ACCEPT = 0.90  # share of correct answers the LODO threshold keeps on the training maps
WINDOW_START, WINDOW = 1000, 40  # the Nordland window map
FAR_FRAMES = 100  # out-of-map Nordland frames lie at least this far from the window
FOREIGN_STEP = 60  # every 60th winter frame as foreign pictures (60 frames over the whole route)
NEAR_STEP = 12  # every 12th winter frame far from the window
L2 = 1e-2  # ridge of the logistic fit: the features are z-scores, this only keeps separable sets finite
NEWTON_STEPS = 50


def _sets() -> dict[str, tuple]:
    """map name → (map source, image size, {label: (source, truth rows per query or None)})."""
    cor = load_dataset(str(DATA / "corridor"))
    nor = load_dataset(NORDLAND_600)
    winter, summer = DATA / "nordland-64x32" / "winter", DATA / "nordland-64x32" / "summer"
    w_all, s_all = list_images(winter), list_images(summer)
    toy = DATA / "toy-unlabelled"
    toy_all = FolderImages(
        toy,
        [f"database/{k}" for k in list_images(toy / "database")]
        + [f"queries/{k}" for k in list_images(toy / "queries")],
    )
    toy_sets = {"toy": (toy_all, None)}
    cq = FolderImages(cor.queries_dir, cor.query_images)
    gt = [sorted(int(r) for r in cor.ground_truth.positives[i]) for i in range(len(cor.query_images))]
    spread = (FolderImages(winter, w_all[::FOREIGN_STEP]), None)
    far = [
        i
        for i in range(0, len(w_all), NEAR_STEP)
        if min(abs(i - WINDOW_START), abs(i - WINDOW_START - WINDOW + 1)) >= FAR_FRAMES
    ]
    return {
        "corridor40": (
            FolderImages(cor.database_dir, cor.database_images[:40]),
            None,
            {
                "in": (
                    FolderImages(cor.queries_dir, cor.query_images[:40]),
                    [[r for r in g if r < 40] for g in gt[:40]],
                ),
                "corridor_q60+": (FolderImages(cor.queries_dir, cor.query_images[60:]), None),
                "corridor_r60+": (FolderImages(cor.database_dir, cor.database_images[60:]), None),
                "nordland": spread,
                **toy_sets,
            },
        ),
        "nordland40": (
            FolderImages(summer, s_all[WINDOW_START : WINDOW_START + WINDOW]),
            NORDLAND_SIZE,
            {
                "in": (FolderImages(winter, w_all[WINDOW_START : WINDOW_START + WINDOW]), [[i] for i in range(WINDOW)]),
                "corridor": (cq, None),
                "nordland_far": (FolderImages(winter, [w_all[i] for i in far]), None),
                **toy_sets,
            },
        ),
        "toy22": (
            toy_all,
            None,
            {"in": (toy_all, [[i] for i in range(len(toy_all.keys))]), "corridor": (cq, None), "nordland": spread},
        ),
        "corridor": (
            FolderImages(cor.database_dir, cor.database_images),
            None,
            {"in": (cq, gt), "nordland": (FolderImages(winter, w_all[::6]), None), **toy_sets},
        ),
        "nordland600": (
            FolderImages(nor.database_dir, nor.database_images),
            NORDLAND_SIZE,
            {
                "in": (
                    FolderImages(nor.queries_dir, nor.query_images),
                    [sorted(map(int, p)) for p in nor.ground_truth.positives],
                ),
                "corridor": (cq, None),
                **toy_sets,
            },
        ),
    }


def measure(name: str, spec: tuple, verify: int = 0) -> dict:
    """Per set: features, confidence, unknown and correctness of every query (cached per calibration)."""
    source, size, sets = spec
    path = CACHE / (f"{name}.json" if not verify else f"{name}-verify{verify}.json")
    features = VERIFIED_FEATURES if verify else FEATURES
    map_dir = CACHE / name / "map"
    pipeline.build_map(source, map_dir, resolve(None, image_size=size) if size else None, progress=False)
    m = pipeline.open_map(map_dir)  # writable: fits and persists calibration.json
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("calibration") == m.calibration.fingerprint and cached.get("model") == _model_stamp():
            return cached["sets"]
    row_of = {k: i for i, k in enumerate(source.keys)}
    out = {}
    for label, (queries, truth) in sets.items():
        t0 = time.perf_counter()
        results = pipeline.localize(m, queries, top_k=5, verify=verify or None)
        items = []
        for i, r in enumerate(results):
            e = r.estimate
            top = row_of.get(r.matches[0].key) if r.matches else None
            items.append(
                {
                    "features": [e.evidence.get("features", {}).get(f) for f in features],
                    "confidence": e.confidence,
                    "unknown": e.unknown,
                    "correct": None if truth is None else top in truth[i],
                }
            )
        out[label] = {
            "foreign": truth is None,
            "queries": items,
            "ms_per_query": 1000 * (time.perf_counter() - t0) / max(1, len(items)),
        }
    path.write_text(json.dumps({"calibration": m.calibration.fingerprint, "model": _model_stamp(), "sets": out}))
    return out


def _model_stamp() -> str:
    models = [CONFIDENCE_MODELS.get(n) for n in ("global", "verified") if n in CONFIDENCE_MODELS]
    return json.dumps([[dict(g.weights), g.bias] for g in models])


def fit_logistic(x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted, lightly ridged logistic regression by Newton's method → (weights, bias)."""
    a = np.c_[x, np.ones(len(x))]
    beta = np.zeros(a.shape[1])
    ridge = L2 * np.eye(a.shape[1])
    ridge[-1, -1] = 0.0
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ beta, -50, 50)))
        grad = a.T @ (weight * (p - y)) + ridge @ beta
        hess = (a * (weight * p * (1 - p))[:, None]).T @ a + ridge
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return beta[:-1], float(beta[-1])


def _design(sets: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    x, y, label = [], [], []
    for name, s in sets.items():
        for q in s["queries"]:
            x.append([np.nan if v is None else v for v in q["features"]])
            y.append(1.0 if q["correct"] else 0.0)
            label.append(name)
    return np.nan_to_num(np.asarray(x, float), nan=0.0), np.asarray(y), label


def probability(x: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x @ w + b, -50, 50)))


def _auc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    if not len(pos) or not len(neg):
        return None
    return float(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))


def fit_on(maps: dict[str, dict]) -> tuple[np.ndarray, float, float]:
    """The model and threshold chosen on ``maps``: each map weighted equally; threshold keeps ≥ 0.90 of each map's correct."""
    xs, ys, ws = [], [], []
    for sets in maps.values():
        x, y, _ = _design(sets)
        xs.append(x), ys.append(y), ws.append(np.full(len(y), 1.0 / len(y)))
    w, b = fit_logistic(np.concatenate(xs), np.concatenate(ys), np.concatenate(ws) * sum(map(len, ys)))
    thr = 1.0
    for sets in maps.values():
        x, y, _ = _design({"in": sets["in"]})
        if y.any():
            thr = min(thr, float(np.quantile(probability(x[y == 1], w, b), 1 - TARGET_ACCEPT)))
    return w, b, thr


def row_for(name: str, sets: dict, w: np.ndarray, b: float, thr: float) -> dict:
    x, y, _ = _design({"in": sets["in"]})
    p = probability(x, w, b)
    shipped = np.array([q["confidence"] if q["confidence"] is not None else np.nan for q in sets["in"]["queries"]])
    row = {
        "map": name,
        "R@1": round(float(y.mean()), 3),
        "weights": "/".join(f"{v:.2f}" for v in w) + f" b={b:.2f}",
        "thr": round(thr, 3),
        "AUC r/w": _r(_auc(p[y == 1], p[y == 0])),
        "accepted": round(float((p[y == 1] >= thr).mean()), 3) if y.any() else None,
        "shipped AUC r/w": _r(_auc(shipped[y == 1], shipped[y == 0])),
        "shipped accepted": round(
            float(np.mean([q["unknown"] is False for q, ok in zip(sets["in"]["queries"], y) if ok])), 3
        )
        if y.any()
        else None,
    }
    rejected, shipped_rej = [], []
    for label, s in sets.items():
        if not s["foreign"]:
            continue
        fx, _, _ = _design({label: s})
        rejected.append(f"{label} {float((probability(fx, w, b) < thr).mean()):.2f}")
        shipped_rej.append(f"{label} {float(np.mean([bool(q['unknown']) for q in s['queries']])):.2f}")
    row["rejected"] = ", ".join(rejected)
    row["shipped rejected"] = ", ".join(shipped_rej)
    return row


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--maps", nargs="+", default=list(_sets()))
    ap.add_argument("--fit", action="store_true", help="also fit on every map (the shipped model's weights)")
    ap.add_argument("--verify", type=int, default=0, help="verify the top N answers (the 'verified' model); 0: none")
    args = ap.parse_args()
    setup()
    CACHE.mkdir(parents=True, exist_ok=True)
    specs = _sets()
    measured = {name: measure(name, specs[name], args.verify) for name in args.maps}
    names = VERIFIED_FEATURES if args.verify else FEATURES
    rows = []
    for name, sets in measured.items():
        w, b, thr = fit_on({k: v for k, v in measured.items() if k != name})
        rows.append(row_for(name, sets, w, b, thr))
    extra = {"features": names, "verify": args.verify, "target_accept": TARGET_ACCEPT}
    if args.fit:
        w, b, thr = fit_on(measured)
        extra["fitted_on_all"] = {
            "weights": dict(zip(names, w.round(3).tolist())),
            "bias": round(b, 3),
            "threshold": round(thr, 3),
        }
        print(f"fitted on all maps: {extra['fitted_on_all']}")
    report("confidence" if not args.verify else f"confidence-verify{args.verify}", rows, list(rows[0]), extra)


if __name__ == "__main__":
    main()
