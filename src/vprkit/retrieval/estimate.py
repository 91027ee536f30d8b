"""An estimate a robot can act on: position, heading, spread, a confidence that the answer is right, and "unknown".

Why a calibration and not a fixed threshold: raw cosines mean different things on different maps (a
corridor's images are all alike — unrelated places score 0.7 — while Nordland's true matches score
0.5), so no single number separates "here" from "somewhere else". What the map itself tells, without a
labelled query, is what a query *whose place is not in the map* scores: for a seeded sample of map
images, leave the image's own place out (its ±``window`` route rows, or ``radius_m`` metres with poses)
and record (1) the best cosine left — the **impostor top-1 cosine** — and (2) how far that best match
stands above the best match at yet another place — the **impostor place margin** (a ratio test over
places, not rows: a query that truly belongs to a place stands out from every *other* place, an
impostor's best match barely does).

A query's evidence is put on those two scales (robust z-scores: distance from the impostors' median in
units of their spread), optionally with the inliers of a geometric verification (:mod:`vprkit.rerank.verification`)
and a sequence's support, and a logistic model turns it into the **confidence**, the probability that
the top-1 answer is the right place. Its weights (:data:`CONFIDENCE_MODELS`) were chosen by
leave-one-dataset-out on labelled maps other than the one a number is reported on
(``benchmarks/bench_confidence.py``); because the features are normalised by each map's own impostors,
the same weights serve every map. ``unknown`` is ``confidence < threshold``; a map too small to have
other places has no calibration: ``confidence`` and ``unknown`` are then None with the reason.

The place scale is the map's own: ``window`` route rows (shrunk on tiny maps so other places remain)
and, with poses, ``radius_m`` = the median distance a route covers over ``window`` rows — never a fixed
25 m, so an office loop of 22 m has places too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.special import ndtr
from tqdm import tqdm

from ..errors import MapError
from ..registry import Registry
from ..io import atomic_write_json
from ..maps.verify import checksum_matches, with_checksum

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
CALIBRATION_VERSION = 2
# Evidence: the top-1 cosine (k = 1). The mean of the top 10 (version 1) smeared the one match that
# matters with nine that do not: on Nordland-600 it told right from wrong at ROC AUC 0.53, the top-1
# cosine at 0.70 (benchmarks/bench_confidence.py).
DEFAULT_TOP_K = 1
# Rows of the sequence (sorted key order) on each side that count as the same place without poses.
DEFAULT_WINDOW = 10
# A tiny map keeps at least this many rows outside every window: window ≤ (n − 1) / WINDOW_FRACTION.
WINDOW_FRACTION = 4
DEFAULT_RADIUS_M = 25.0  # the usual VPR positive radius: only for a map whose poses give no route spacing
# Map images whose impostor evidence is sampled: bounds calibration to sample × one index search.
DEFAULT_SAMPLE = 2000
# Extra neighbours searched when poses decide the place (how many lie within the radius is unknown).
RADIUS_SLACK = 64
# Rows searched per index call while calibrating (bounds the query block's memory).
SEARCH_CHUNK = 256
# Map rows whose descriptors enter the fingerprint (content changes under the same keys).
# A map grown or shrunk live (the service adds places) by less than this share keeps its calibration:
# refitting a large map per added place would cost seconds, and a few rows barely move the sample.
REFIT_FRACTION = 0.1
FINGERPRINT_ROWS = 64
# Below this confidence (a probability of being right) a query is "unknown". Chosen by leave-one-dataset-out
# (benchmarks/bench_confidence.py): on each held-out map, the 10th percentile of the correct answers'
# confidence on the *other* maps was 0.08–0.13; 0.1 keeps ≈ 0.9 of correct answers.
DEFAULT_UNKNOWN_BELOW = 0.1
VERIFIED_UNKNOWN_BELOW = 0.133
# Silverman's rule of thumb for the kernel bandwidth, and a floor so identical samples still smooth.
SILVERMAN = 0.9
IQR_TO_SIGMA = 1.34
MIN_BANDWIDTH = 1e-4
# Floor of a z-score's unit: impostors that all score alike (a map of near-duplicates) must not make
# a thousandth of a cosine more than one standard deviation (GeM maps have impostor spreads of ≈ 0.003).
MIN_SPREAD = 1e-3
MIN_WEIGHT = 1e-6  # cosine weights of agreeing matches are clipped here (negative cosines carry no weight)

STATISTIC = "mean_top_k_cosine"
# A cosine's range, with room for float rounding: evidence values outside it were not computed by vprkit.
COSINE_LIMIT = 1.0 + 1e-3
MAX_BANDWIDTH = 2.0 * COSINE_LIMIT  # wider than the cosines' whole range: no information left


# ---- score kinds -------------------------------------------------------------------------------
# What the ranking score of each mode is; a retriever or re-ranker may declare ``score_kind`` itself.
RETRIEVER_SCORE_KINDS: dict[str, str] = {"global": "cosine", "segvlad": "segvlad_vote"}
RERANKER_SCORE_KIND = "fused_zscore"  # Patch-NetVLAD fuses z-normalised patch (and global) scores


# What one scale's spatial score of two images is, by scorer (``match-two``): RANSAC counts inliers per
# query patch (in [0, 1]); rapid spatial scoring sums squared displacement agreement (grows with the grid).
PATCH_SCORE_KINDS: dict[str, str] = {
    "ransac": "inlier_ratio",
    "usac": "inlier_ratio",
    "similarity": "inlier_ratio",
    "affine": "inlier_ratio",
    "rapid": "rapid_spatial_score",
}


def patch_score_kind(scorer: str) -> str:
    """The name of a spatial scorer's per-scale score (``inlier_ratio`` for RANSAC …)."""
    return PATCH_SCORE_KINDS.get(scorer, f"{scorer}_score")


def score_kind(retriever: Any, reranker: Any = None) -> str:
    """The name of the ranking score a retriever (and optional re-ranker) returns (``cosine``, ``fused_zscore`` …)."""
    if reranker is not None:
        return str(getattr(reranker, "score_kind", None) or RERANKER_SCORE_KIND)
    kind = getattr(retriever, "score_kind", None)
    if kind:
        return str(kind)
    name = getattr(retriever, "name", str(retriever))
    return RETRIEVER_SCORE_KINDS.get(name, f"{name}_score")


# ---- the sequence order and "same place" -------------------------------------------------------
_DIGITS = re.compile(r"(\d+)")


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in _DIGITS.split(text)]


def sequence_positions(keys: Sequence[str]) -> np.ndarray:
    """Each row's position in natural name order (``img2`` before ``img10``): the route order of a sequence.

    A map's rows are not necessarily in route order (a build stores cached images first), its names are.
    """
    order = sorted(range(len(keys)), key=lambda i: _natural_key(keys[i]))
    seq = np.empty(len(keys), np.int64)
    seq[np.asarray(order, np.int64)] = np.arange(len(keys))
    return seq


def same_place(
    anchor: int, rows: np.ndarray, sequence: np.ndarray, poses: np.ndarray | None, window: int, radius_m: float
) -> np.ndarray:
    """Which of ``rows`` are the place of ``anchor``: within ``radius_m`` where both poses are known, else within ±``window`` rows."""
    rows = np.asarray(rows, np.int64)
    near = np.abs(sequence[rows] - sequence[anchor]) <= window
    if poses is not None:
        known = np.isfinite(poses[rows]).all(1) & bool(np.isfinite(poses[anchor]).all())
        dist = np.linalg.norm(np.nan_to_num(poses[rows] - poses[anchor]), axis=1)
        near = np.where(known, dist <= radius_m, near)
    return near


def effective_window(n: int, window: int = DEFAULT_WINDOW) -> int:
    """The window, shrunk for tiny maps so rows outside it remain."""
    return max(1, min(window, (n - 1) // WINDOW_FRACTION))


def map_fingerprint(
    keys: Sequence[str], read_rows: Callable[[np.ndarray], np.ndarray], token: str = "", poses: np.ndarray | None = None
) -> str:
    """SHA-256 of the row count, the keys, the poses, a probe of rows' descriptors and ``token``.

    What changes the calibration: rows added or removed, poses set (they decide "same place"), and
    descriptors re-encoded (seen through ``FINGERPRINT_ROWS`` probed rows). A rebuild that adds
    nothing leaves it unchanged, so the calibration is not refitted for nothing.
    """
    h = hashlib.sha256(f"{len(keys)}\n{token}\n".encode())
    h.update("\n".join(keys).encode())
    if poses is not None:
        h.update(np.ascontiguousarray(np.asarray(poses, np.float64)).tobytes())
    if len(keys):
        probe = np.unique(np.linspace(0, len(keys) - 1, min(FINGERPRINT_ROWS, len(keys))).astype(np.int64))
        h.update(np.round(np.asarray(read_rows(probe), np.float32), 4).tobytes())
    return h.hexdigest()


# ---- the calibration ---------------------------------------------------------------------------
@dataclass
class Calibration:
    """The map's impostor evidence distribution (fitted from the map alone) and the unknown threshold."""

    impostor: np.ndarray  # sorted evidence values of sampled map images against other places
    bandwidth: float
    k: int
    window: int
    radius_m: float
    rows: int
    fingerprint: str
    threshold: float | None = None  # None: each confidence model's own (ConfidenceModel.threshold)
    seed: int = 0
    statistic: str = STATISTIC
    extra: dict[str, Any] = field(default_factory=dict)
    sequence: np.ndarray | None = field(default=None, repr=False, compare=False)  # route positions (not persisted)
    # sorted place margins of the sampled impostors: their best cosine minus the best at yet another place
    impostor_margin: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def search_depth(self) -> int:
        """Neighbours of a query to search for its evidence: past the answer's own place to the best of another."""
        slack = RADIUS_SLACK if self.extra.get("has_poses") else 0
        return max(1, min(self.rows, self.k + 2 * (2 * self.window + 1) + slack))

    def scale(self, which: str) -> tuple[float, float]:
        """(median, robust spread) of the impostor ``"top1"`` cosines or ``"margin"``s: the unit of a z-score."""
        x = self.impostor if which == "top1" else self.impostor_margin
        if x.size == 0:
            return float("nan"), float("nan")
        q25, q50, q75 = np.percentile(x, [25, 50, 75])
        return float(q50), max(float(q75 - q25) / IQR_TO_SIGMA, MIN_SPREAD)

    def features(self, top1: float, margin: float | None) -> dict[str, float]:
        """The query's evidence on this map's impostor scales (robust z-scores; NaN where not computable)."""
        m1, s1 = self.scale("top1")
        mm, sm = self.scale("margin")
        z_margin = (margin - mm) / sm if margin is not None and self.impostor_margin.size else float("nan")
        return {"top1_z": (top1 - m1) / s1, "margin_z": z_margin}

    @property
    def usable(self) -> bool:
        """False for a map too small to have other places (then confidence is not defined)."""
        return self.impostor.size > 0

    def evidence(self, cosines: np.ndarray) -> np.ndarray:
        """The statistic of each row of Q×K global cosines (best first, -inf/NaN padded): mean of the top ``k`` finite."""
        c = np.atleast_2d(np.asarray(cosines, np.float64))
        c = -np.sort(-np.where(np.isfinite(c), c, -np.inf), axis=1)[:, : self.k]
        ok = np.isfinite(c)
        n = ok.sum(1)
        return np.where(n > 0, np.where(ok, c, 0.0).sum(1) / np.maximum(n, 1), np.nan)

    def confidence(self, evidence: np.ndarray | float) -> np.ndarray:
        """Kernel-smoothed impostor CDF at ``evidence`` — in [0, 1], monotone increasing; NaN when not usable."""
        e = np.atleast_1d(np.asarray(evidence, np.float64))
        if not self.usable:
            return np.full(e.shape, np.nan)
        out = np.empty(e.shape)
        for lo in range(0, e.size, SEARCH_CHUNK):  # Q × sample at a time, bounded
            block = e[lo : lo + SEARCH_CHUNK]
            out[lo : lo + SEARCH_CHUNK] = ndtr((block[:, None] - self.impostor[None, :]) / self.bandwidth).mean(1)
        return np.where(np.isfinite(e), out, 0.0)

    def is_stale(self, rows: int, fingerprint: str) -> bool:
        return self.rows != rows or self.fingerprint != fingerprint

    def covers(self, rows: int) -> bool:
        """Whether a map now holding ``rows`` rows may keep this calibration (changed by < ``REFIT_FRACTION``)."""
        return abs(rows - self.rows) < max(1.0, REFIT_FRACTION * self.rows)

    def to_dict(self) -> dict[str, Any]:
        """The calibration file's content, with its own checksum (an edit by hand is refitted, not believed)."""
        return with_checksum(self._fields())

    def _fields(self) -> dict[str, Any]:
        return {
            "version": CALIBRATION_VERSION,
            "statistic": self.statistic,
            "k": self.k,
            "window": self.window,
            "radius_m": self.radius_m,
            "rows": self.rows,
            "fingerprint": self.fingerprint,
            "threshold": self.threshold,
            "seed": self.seed,
            "bandwidth": self.bandwidth,
            "impostor": [round(float(v), 7) for v in self.impostor],
            "impostor_margin": [round(float(v), 7) for v in self.impostor_margin],
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
        if d.get("version") != CALIBRATION_VERSION or d.get("statistic") != STATISTIC:
            raise MapError(
                f"calibration version {d.get('version')} / statistic {d.get('statistic')!r} is not this vprkit's"
            )
        if not checksum_matches(d):
            raise MapError("calibration was changed after vprkit wrote it (its checksum does not match)")
        try:
            cal = cls(
                np.sort(np.asarray(d["impostor"], np.float64).reshape(-1)),
                float(d["bandwidth"]),
                int(d["k"]),
                int(d["window"]),
                float(d["radius_m"]),
                int(d["rows"]),
                str(d["fingerprint"]),
                None if d.get("threshold") is None else float(d["threshold"]),
                int(d.get("seed", 0)),
                STATISTIC,
                dict(d.get("extra", {})),
                impostor_margin=np.sort(np.asarray(d["impostor_margin"], np.float64).reshape(-1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MapError(f"calibration is damaged ({exc!r})") from None
        problem = cal._implausible()
        if problem:
            raise MapError(f"calibration is damaged ({problem})")
        return cal

    def _implausible(self) -> str | None:
        """What no fitted calibration holds (NaN, cosines beyond ±1, a sample larger than the map …), or None."""
        checks = {
            "impostor evidence must be finite cosines": bool(np.all(np.abs(self.impostor) <= COSINE_LIMIT)),
            "impostor margins must be finite differences of cosines": bool(
                np.all((self.impostor_margin >= 0) & (self.impostor_margin <= 2 * COSINE_LIMIT))
            ),
            "the bandwidth must be a positive number": bool(MIN_BANDWIDTH <= self.bandwidth <= MAX_BANDWIDTH),
            "k and the window must be ≥ 1": self.k >= 1 and self.window >= 1,
            "the radius must be a finite distance ≥ 0": bool(np.isfinite(self.radius_m) and self.radius_m >= 0),
            "the threshold must be in [0, 1]": self.threshold is None or bool(0.0 <= self.threshold <= 1.0),
            "the sample cannot exceed the map's rows": 0 <= self.impostor.size <= max(self.rows, 0),
        }
        failed = [what for what, ok in checks.items() if not ok]
        return "; ".join(failed) or None

    def summary(self) -> dict[str, Any]:
        """A few numbers for the estimate's evidence (the full sample stays in the map's calibration file)."""
        q = np.percentile(self.impostor, [5, 50, 95]) if self.usable else [np.nan] * 3
        qm = np.percentile(self.impostor_margin, [50, 95]) if self.impostor_margin.size else [np.nan] * 2
        return {
            "k": self.k,
            "window_rows": self.window,
            "radius_m": self.radius_m,
            "sample": int(self.impostor.size),
            "impostor_p05": _r(q[0]),
            "impostor_median": _r(q[1]),
            "impostor_p95": _r(q[2]),
            "impostor_margin_median": _r(qm[0]),
            "impostor_margin_p95": _r(qm[1]),
        }


def _r(v: float) -> float | None:
    return None if not np.isfinite(v) else round(float(v), 6)


def _bandwidth(x: np.ndarray) -> float:
    """Silverman's rule of thumb: 0.9 · min(σ, IQR/1.34) · m^(−1/5)."""
    if x.size < 2:
        return MIN_BANDWIDTH
    iqr = float(np.subtract(*np.percentile(x, [75, 25])))
    sigma = min(float(x.std()), iqr / IQR_TO_SIGMA) or float(x.std())
    return max(MIN_BANDWIDTH, SILVERMAN * sigma * x.size**-0.2)


def fit_calibration(
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    read_rows: Callable[[np.ndarray], np.ndarray],
    keys: Sequence[str],
    poses: np.ndarray | None = None,
    *,
    k: int = DEFAULT_TOP_K,
    window: int = DEFAULT_WINDOW,
    radius_m: float | None = None,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    threshold: float | None = None,
    fingerprint: str = "",
    progress: bool = False,
) -> Calibration:
    """Fit the impostor distribution of a map from the map alone.

    ``search(vectors, k) -> (rows, cosines)`` is the map's index (the one queries use, so an
    approximate index is calibrated as it answers); ``read_rows(rows)`` returns stored descriptors.
    Cost: ``min(sample, n)`` index searches of ``k + 2·window + 1`` neighbours, in chunks — bounded
    for any map size.
    """
    n = len(keys)
    w = effective_window(n, window)
    k_eff = max(1, min(k, n - (2 * w + 1)))
    has_poses = poses is not None and bool(np.isfinite(poses).all(1).any())
    pose_arr = np.asarray(poses, np.float64) if has_poses else None
    seq = sequence_positions(keys)
    if radius_m is None:
        radius_m = route_radius(pose_arr, seq, w)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, min(sample, n), replace=False)) if n else np.zeros(0, np.int64)
    # deep enough to pass the anchor's own place and its best impostor's place (2 places of ≤ 2w + 1 rows)
    want = min(n, k_eff + 2 * (2 * w + 1) + (RADIUS_SLACK if has_poses else 0))
    values: list[float] = []
    margins: list[float] = []
    chunks = range(0, len(chosen), SEARCH_CHUNK)
    if progress:
        chunks = tqdm(chunks, desc="calibrate", unit="chunk")
    for lo in chunks:
        rows = chosen[lo : lo + SEARCH_CHUNK]
        if n <= 2 * w + 1:
            break
        found, cos = search(np.ascontiguousarray(read_rows(rows), np.float32), want)
        for anchor, fr, fc in zip(rows, found, cos):
            ok = fr >= 0
            fr, fc = fr[ok], fc[ok]
            other = ~same_place(int(anchor), fr, seq, pose_arr, w, radius_m)
            top = fc[other][:k_eff]
            if top.size:
                values.append(float(np.mean(top)))
                margin = place_margin(fr[other], fc[other], seq, pose_arr, w, radius_m)
                if margin is not None:
                    margins.append(margin)
    imp = np.sort(np.asarray(values, np.float64))
    if imp.size == 0:
        logger.info("map of %d image(s) is too small to calibrate a confidence (no other places)", n)
    return Calibration(
        imp,
        _bandwidth(imp),
        k_eff,
        w,
        radius_m,
        n,
        fingerprint,
        threshold,
        seed,
        extra={"has_poses": has_poses},
        impostor_margin=np.sort(np.asarray(margins, np.float64)),
    )


def route_radius(poses: np.ndarray | None, sequence: np.ndarray, window: int) -> float:
    """The map's own place radius: the median distance its route covers over ``window`` rows.

    A place is ±``window`` route rows without poses; with poses the same place should be the same
    distance whatever the map's extent (a 22 m office loop and a 100 km railway alike), so the radius
    follows the route's spacing instead of a fixed 25 m. :data:`DEFAULT_RADIUS_M` only where the poses
    give no spacing (fewer than two consecutive known poses).
    """
    if poses is None or len(sequence) <= window:
        return DEFAULT_RADIUS_M
    by_route = np.asarray(poses, np.float64)[np.argsort(sequence)]
    step = np.linalg.norm(by_route[window:] - by_route[:-window], axis=1)
    step = step[np.isfinite(step)]
    return float(np.median(step)) if step.size else DEFAULT_RADIUS_M


def place_margin(
    rows: np.ndarray, cosines: np.ndarray, sequence: np.ndarray, poses: np.ndarray | None, window: int, radius_m: float
) -> float | None:
    """How far the best match (``rows[0]``, ranked best first) stands above the best match at *another* place.

    The ratio test over places, not rows: the top match's route neighbours (or the matches within the
    radius) are its own place and never its rival. None when every ranked row is that place (the
    search was not deep enough to see another; a caller then searches deeper or does without).
    """
    rows = np.asarray(rows, np.int64)
    cosines = np.asarray(cosines, np.float64)
    ok = rows >= 0
    rows, cosines = rows[ok], cosines[ok]
    if rows.size < 2:
        return None
    elsewhere = ~same_place(int(rows[0]), rows, sequence, poses, window, radius_m)
    if not elsewhere.any():
        return None
    return float(max(0.0, cosines[0] - cosines[elsewhere].max()))


def load_or_fit_calibration(
    map_dir: Path | None,
    search,
    read_rows,
    keys: Sequence[str],
    poses: np.ndarray | None,
    token: str = "",
    write: bool = False,
    fit: bool = True,
    progress: bool = False,
    **options,
) -> Calibration | None:
    """The map's calibration: ``map_dir/calibration.json`` when it is fresh, else fitted (and written atomically when ``write``).

    Stale means the row count or the fingerprint (keys, a probe of descriptors, ``token``) changed.
    A damaged file is refitted with a warning rather than failing the map. ``fit=False`` returns
    None instead of fitting (a reader that may never need it).
    """
    fp = map_fingerprint(keys, read_rows, token, poses)
    path = None if map_dir is None else Path(map_dir) / CALIBRATION_FILE
    cal = None
    if path is not None and path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(doc, dict) and isinstance(doc.get("version"), int) and doc["version"] < CALIBRATION_VERSION:
                logger.info("%s was fitted by an earlier vprkit (version %d); recalibrating", path, doc["version"])
            else:
                cal = Calibration.from_dict(doc)
            if cal is not None and cal.is_stale(len(keys), fp):
                logger.info("%s is stale (the map changed); recalibrating", path)
                cal = None
        except (OSError, ValueError, MapError) as exc:
            logger.warning("%s is unreadable (%s); recalibrating", path, exc)
            cal = None
    if cal is None:
        if not fit:
            return None
        cal = fit_calibration(search, read_rows, keys, poses, fingerprint=fp, progress=progress, **options)
        if write and path is not None:
            try:
                atomic_write_json(path, cal.to_dict())
            except OSError as exc:  # a map we may read but not write: keep the calibration in memory
                logger.warning("could not write %s (%s); the calibration is kept in memory", path, exc)
    cal.sequence = sequence_positions(keys)
    return cal


# ---- the confidence model ----------------------------------------------------------------------
@dataclass(frozen=True)
class ConfidenceModel:
    """A logistic model of "the top-1 answer is the right place" over map-normalised evidence.

    ``weights`` name the features (:meth:`Calibration.features`: ``top1_z``, ``margin_z``; and, where the
    evidence exists, ``inliers_log`` = log(1 + verified inliers) and ``sequence_support`` in [0, 1]).
    A feature that cannot be computed for a query (NaN) contributes nothing — the model then leans on the others.
    """

    name: str
    weights: Mapping[str, float]
    bias: float
    threshold: float = DEFAULT_UNKNOWN_BELOW  # below it the answer is "unknown"
    source: str = ""

    def probability(self, features: Mapping[str, float]) -> float:
        logit = self.bias + sum(
            w * float(features[f]) for f, w in self.weights.items() if np.isfinite(features.get(f, np.nan))
        )
        return float(1.0 / (1.0 + np.exp(-np.clip(logit, -LOGIT_LIMIT, LOGIT_LIMIT))))


LOGIT_LIMIT = 50.0  # beyond this exp() overflows; the probability is 0 or 1 to double precision anyway
CONFIDENCE_MODELS: Registry[ConfidenceModel] = Registry("confidence model")
# Weights fitted by benchmarks/bench_confidence.py (logistic regression, each labelled map weighted
# equally) on every map it measures; its leave-one-dataset-out table reports each map with the weights
# fitted on the others, which is the honest accuracy. Features are z-scores on each map's impostors,
# so the same weights serve every map.
CONFIDENCE_MODELS.register(
    "global",
    ConfidenceModel(
        "global", {"top1_z": 0.289, "margin_z": 0.866}, -1.522, DEFAULT_UNKNOWN_BELOW, "benchmarks/bench_confidence.py"
    ),
)
# With the answer's verified inliers (bench_confidence.py --verify 1: XFeat, the answer checked). The
# threshold keeps ≥ 0.90 of each map's right answers (0.127–0.169 chosen per held-out map; 0.133 on all).
CONFIDENCE_MODELS.register(
    "verified",
    ConfidenceModel(
        "verified",
        {"top1_z": 0.055, "margin_z": 0.707, "inliers_log": 0.966},
        -4.715,
        VERIFIED_UNKNOWN_BELOW,
        "benchmarks/bench_confidence.py --verify 1",
    ),
)
# No ``sequence`` model: fitted leave-one-dataset-out on Corridor and Nordland-600 with sequences of 10 and a
# foreign stream (benchmarks/fit_sequence_confidence.py), it accepted fewer right Nordland answers (0.35) than
# the global model does on the same frames (0.44, 0.996 of accepted answers right): 14 wrong answers in all
# are too few to fit it. Sequence frames use the global model on the frame's own cosine with the sequence's answer.


def confidence_model(features: Mapping[str, float]) -> ConfidenceModel:
    """The model for the evidence at hand: ``verified`` when inliers were counted, ``sequence`` for a
    sequence's frame, else ``global`` (each falls back to ``global`` if it is not registered)."""
    for name, feature in (("verified", "inliers_log"), ("sequence", "sequence_support")):
        if np.isfinite(features.get(feature, np.nan)) and name in CONFIDENCE_MODELS:
            return CONFIDENCE_MODELS.get(name)
    return CONFIDENCE_MODELS.get("global")


# ---- the estimate ------------------------------------------------------------------------------
def row_cosines(read_rows: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Q×K global cosines of each query with its ranked ``rows`` (−1 → NaN), one store read per batch."""
    rows = np.asarray(rows, np.int64)
    out = np.full(rows.shape, np.nan)
    valid = rows >= 0
    if valid.any():
        vec = read_rows(rows[valid])
        qi = np.nonzero(valid)[0]
        out[valid] = np.einsum("nd,nd->n", np.asarray(queries, np.float32)[qi], np.asarray(vec, np.float32))
    return out


@dataclass
class Estimate:
    """Where the query is, how sure, and from what evidence.

    ``position`` (easting, northing) and ``heading`` (degrees) come from the top matches that agree
    with the best one (same place); ``spread`` is the cosine-weighted RMS distance of all top
    matches from that position — metres with poses, sequence rows without (``spread_unit``).
    """

    position: tuple[float, float] | None
    heading: float | None
    spread: float | None
    spread_unit: str
    confidence: float | None
    unknown: bool | None  # None: no calibration could say (evidence["unknown_reason"] says why)
    evidence: dict[str, Any] = field(default_factory=dict)
    route_position: float | None = None  # weighted mean route index (natural name order) of the agreeing matches
    # the answer's geometric verification (inliers, two-view model, relative rotation), when one ran
    verification: dict[str, Any] | None = None
    latlon: tuple[float, float] | None = None  # WGS84 degrees of ``position`` (a map whose poses are UTM)
    crs: str | None = None  # the frame of ``position`` (e.g. "EPSG:32633"), named with ``latlon``

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": None if self.position is None else [round(v, 3) for v in self.position],
            **({} if self.latlon is None else {"latlon": [round(v, 8) for v in self.latlon], "crs": self.crs}),
            "route_position": None if self.route_position is None else round(self.route_position, 2),
            "heading_deg": None if self.heading is None else round(self.heading, 2),
            f"spread_{self.spread_unit}": None if self.spread is None else round(self.spread, 3),
            "confidence": None if self.confidence is None else round(self.confidence, 4),
            "unknown": self.unknown,
            "evidence": self.evidence,
            **({} if self.verification is None else {"verification": self.verification}),
        }

    def line(self) -> str:
        """One human-readable line."""
        if self.position is not None:
            where = f"at ({self.position[0]:.1f}, {self.position[1]:.1f})"
        else:
            where = "no pose" + ("" if self.route_position is None else f", route position {self.route_position:.1f}")
        head = "" if self.heading is None else f", heading {self.heading:.0f}°"
        spread = "" if self.spread is None else f", spread {self.spread:.1f} {self.spread_unit}"
        if self.latlon is not None:
            where += f" = {self.latlon[0]:.6f}, {self.latlon[1]:.6f}"
        conf = "n/a" if self.confidence is None else f"{self.confidence:.3f}"
        verdict = {True: "UNKNOWN PLACE", False: "in map", None: "cannot tell"}[self.unknown]
        return f"{verdict}: confidence {conf} {where}{head}{spread}{self._verified()}"

    def _verified(self) -> str:
        """``; verified: 84 inliers (fundamental), rotated 12.3° (uncalibrated)`` — or nothing."""
        answer = (self.verification or {}).get("answer")
        if not answer:
            return "" if self.verification is None else "; answer not verified (time budget)"
        text = f"; verified: {answer['inliers']} inliers ({answer['model']})"
        if answer.get("rotation_deg") is not None:
            text += f", rotated {answer['rotation_deg']:.1f}°" + ("" if answer["calibrated"] else " (uncalibrated)")
        return text


def circular_mean_deg(angles: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    """Weighted circular mean in [0, 360) of angles in degrees (NaNs ignored); None when none is known."""
    a = np.asarray(angles, np.float64)
    w = np.ones_like(a) if weights is None else np.asarray(weights, np.float64)
    ok = np.isfinite(a) & (w > 0)
    if not ok.any():
        return None
    r = np.deg2rad(a[ok])
    s, c = float((w[ok] * np.sin(r)).sum()), float((w[ok] * np.cos(r)).sum())
    if np.hypot(s, c) < MIN_WEIGHT:  # opposite headings cancel: no mean direction
        return None
    return float(np.rad2deg(np.arctan2(s, c)) % 360.0)


def estimate(
    rows: np.ndarray,
    cosines: np.ndarray,
    poses: np.ndarray | None,
    headings: np.ndarray | None,
    calibration: Calibration,
    evidence: np.ndarray | None = None,
    sequence: np.ndarray | None = None,
    threshold: float | None = None,
    evidence_rows: np.ndarray | None = None,
    inliers: float | None = None,
    sequence_support: float | None = None,
) -> Estimate:
    """The estimate of one query from its ranked matches.

    ``rows``/``cosines``: the final ranking (best first, any mode) and each row's *global cosine*
    with the query; ``evidence``/``evidence_rows``: the query's top global cosines over the whole map
    and their rows, best first (default: ``cosines``/``rows``) — deep enough to reach another place
    than the answer's, for the place margin. ``inliers``: the verified inliers of the answer (geometric
    verification), ``sequence_support``: a sequence's agreement with the answer in [0, 1].
    ``sequence``: each map row's route position (:func:`sequence_positions`; default: row order).
    """
    rows = np.asarray(rows, np.int64).reshape(-1)
    cos = np.asarray(cosines, np.float64).reshape(-1)
    keep = rows >= 0
    rows, cos = rows[keep], cos[keep]
    thr = calibration.threshold if threshold is None else float(threshold)  # None: the confidence model's
    n_map = int(max(rows.max() + 1 if rows.size else 0, 0 if sequence is None else len(sequence)))
    seq = np.arange(n_map) if sequence is None else np.asarray(sequence)
    pose_arr = None if poses is None else np.asarray(poses, np.float64)
    conf, info, model = _confidence(
        rows, cos, seq, pose_arr, calibration, evidence, evidence_rows, inliers, sequence_support
    )
    if thr is None:
        thr = model.threshold
    info["threshold"] = thr
    if rows.size == 0:
        return Estimate(None, None, None, "rows", 0.0 if conf is None else conf, True, {**info, "matches": 0})
    agree = same_place(int(rows[0]), rows, seq, pose_arr, calibration.window, calibration.radius_m)
    w = np.clip(np.nan_to_num(cos, nan=0.0), MIN_WEIGHT, None)
    position, spread, unit = None, None, "rows"
    if pose_arr is not None:
        p = pose_arr[rows]
        known = np.isfinite(p).all(1)
        if (known & agree).any():
            sel = known & agree
            position_arr = (w[sel, None] * p[sel]).sum(0) / w[sel].sum()
            position = (float(position_arr[0]), float(position_arr[1]))
            d2 = ((p[known] - position_arr) ** 2).sum(1)
            spread, unit = float(np.sqrt((w[known] * d2).sum() / w[known].sum())), "m"
    s = seq[rows].astype(np.float64)
    centre = float((w[agree] * s[agree]).sum() / w[agree].sum())
    if position is None:
        spread = float(np.sqrt((w * (s - centre) ** 2).sum() / w.sum()))
    heading = None
    if headings is not None:
        heading = circular_mean_deg(np.asarray(headings, np.float64)[rows[agree]], w[agree])
    info.update(
        agreement=round(float(w[agree].sum() / w.sum()), 4),
        agreeing=int(agree.sum()),
        matches=int(rows.size),
    )
    unknown = None if conf is None else bool(conf < thr)  # uncalibrated: neither claim can be made
    return Estimate(position, heading, spread, unit, conf, unknown, info, centre)


def _confidence(
    rows: np.ndarray,
    cos: np.ndarray,
    seq: np.ndarray,
    poses: np.ndarray | None,
    calibration: Calibration,
    evidence: np.ndarray | None,
    evidence_rows: np.ndarray | None,
    inliers: float | None,
    sequence_support: float | None,
) -> tuple[float | None, dict[str, Any], ConfidenceModel]:
    """The probability that the answer ``rows[0]`` is right, the evidence it came from, and the model used."""
    if evidence_rows is None or evidence is None:  # the ranking is all the evidence there is
        ev_rows, ev_cos = rows[:0], cos[:0]
    else:
        ev_rows = np.asarray(evidence_rows, np.int64).reshape(-1)
        ev_cos = np.asarray(evidence, np.float64).reshape(-1)
        if ev_rows.shape != ev_cos.shape:
            raise ValueError(f"evidence rows {ev_rows.shape} and cosines {ev_cos.shape} differ in shape")
        ev_rows, ev_cos = ev_rows[ev_rows >= 0], ev_cos[ev_rows >= 0]
    info: dict[str, Any] = {"calibration": calibration.summary()}
    if rows.size == 0 or not calibration.usable:
        info["unknown_reason"] = (
            "no match to judge" if rows.size == 0 else "map too small to calibrate a confidence (no other places)"
        )
        return (0.0 if rows.size == 0 and calibration.usable else None), info, CONFIDENCE_MODELS.get("global")
    # the answer's rivals: every ranked row and every row of the evidence outside the answer's place. Unlike
    # place_margin (the calibration's, clipped at 0) a rival place scoring higher is negative evidence here.
    pool_rows = np.concatenate([rows, ev_rows])
    pool_cos = np.concatenate([cos, ev_cos])
    rivals = ~same_place(int(rows[0]), pool_rows, seq, poses, calibration.window, calibration.radius_m)
    margin = None
    if rivals.any():
        margin = float(cos[0] - np.nanmax(pool_cos[rivals]))
    elif pool_rows.size > 1:  # no other place seen: its best is below the weakest row seen
        margin = float(cos[0] - np.nanmin(pool_cos))
    features = calibration.features(float(cos[0]), margin)
    features["inliers_log"] = float(np.log1p(inliers)) if inliers is not None else float("nan")
    features["sequence_support"] = float(sequence_support) if sequence_support is not None else float("nan")
    model = confidence_model(features)
    conf = model.probability(features)
    env = calibration.confidence(float(cos[0]))[0]
    info.update(
        model=model.name,
        top1_cosine=_r(float(cos[0])),
        place_margin=None if margin is None else _r(margin),
        features={k: _r(v) for k, v in features.items() if np.isfinite(v)},
        environment=_r(float(env)),  # share of the map's impostors whose top-1 cosine is below the answer's
    )
    return conf, info, model
