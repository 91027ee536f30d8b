"""The ``sequence`` confidence model: fitted leave-one-dataset-out on what bench_sequence_unknown.py recorded.

    .venv/bin/python benchmarks/bench_sequence_unknown.py        # records the three sets below
    .venv/bin/python benchmarks/fit_sequence_confidence.py       # fits, prints the LODO table

Sets: Corridor and Nordland-600 evaluated with ``--sequence-length 10`` (right and wrong answers) and a
Nordland winter stream against the Corridor map (every answer wrong: not in the map). Features: the
global model's ``top1_z`` and ``margin_z`` of the frame's own cosine with the sequence's answer, and the
``sequence_support``. Each set's row uses the model and threshold (≥ 0.90 of the other sets' right
answers accepted) fitted on the other sets; ``fitted on all`` is what ``CONFIDENCE_MODELS["sequence"]`` ships.
Writes ``benchmarks/results/sequence_confidence.json``.
"""

from __future__ import annotations

import csv
import json

import numpy as np

from bench_confidence import TARGET_ACCEPT, _auc, fit_logistic, probability
from common import RESULTS, report

CACHE = RESULTS / "cache" / "sequence_unknown"
FEATURES = ("top1_z", "margin_z", "sequence_support")


def _load(folder: str) -> tuple[np.ndarray, np.ndarray]:
    right = {}
    with open(CACHE / folder / "per_query.csv", newline="") as f:
        for row in csv.DictReader(f):
            right[row["query"]] = row["correct"] == "True"
    x, y = [], []
    for line in (CACHE / folder / "estimates.jsonl").read_text().splitlines():
        rec = json.loads(line)
        feats = rec["estimate"]["evidence"].get("features", {})
        x.append([feats.get(f, 0.0) for f in FEATURES])
        y.append(float(right[rec["query"]]))
    return np.asarray(x, float), np.asarray(y)


def _foreign() -> tuple[np.ndarray, np.ndarray]:
    x = []
    for line in (CACHE / "foreign_stream_L10.jsonl").read_text().splitlines():
        feats = json.loads(line)["estimate"]["evidence"].get("features", {})
        x.append([feats.get(f, 0.0) for f in FEATURES])
    return np.asarray(x, float), np.zeros(len(x))


def fit(sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, float, float]:
    xs = [x for x, _ in sets.values()]
    ys = [y for _, y in sets.values()]
    ws = [np.full(len(y), 1.0 / len(y)) for y in ys]
    w, b = fit_logistic(np.concatenate(xs), np.concatenate(ys), np.concatenate(ws) * sum(map(len, ys)))
    thr = min(
        (float(np.quantile(probability(x[y == 1], w, b), 1 - TARGET_ACCEPT)) for x, y in sets.values() if y.any()),
        default=0.5,
    )
    return w, b, thr


def main() -> None:
    sets = {
        "corridor L10": _load("corridor-eval"),
        "nordland600 L10": _load("nordland600"),
        "foreign stream L10": _foreign(),
    }
    rows = []
    for name, (x, y) in sets.items():
        w, b, thr = fit({k: v for k, v in sets.items() if k != name})
        p = probability(x, w, b)
        accepted = p >= thr
        rows.append(
            {
                "held out": name,
                "weights": "/".join(f"{v:.2f}" for v in w) + f" b={b:.2f}",
                "thr": round(thr, 3),
                "R@1": round(float(y.mean()), 3),
                "AUC r/w": None if _auc(p[y == 1], p[y == 0]) is None else round(_auc(p[y == 1], p[y == 0]), 3),
                "right accepted": round(float(accepted[y == 1].mean()), 3) if y.any() else None,
                "accepted right": round(float(y[accepted].mean()), 3) if accepted.any() else None,
                "unknown": round(float((~accepted).mean()), 3),
            }
        )
    w, b, thr = fit(sets)
    fitted = {"weights": dict(zip(FEATURES, w.round(3).tolist())), "bias": round(b, 3), "threshold": round(thr, 3)}
    print(f"fitted on all: {fitted}")
    report("sequence_confidence", rows, list(rows[0]), {"fitted_on_all": fitted, "features": FEATURES})


if __name__ == "__main__":
    main()
