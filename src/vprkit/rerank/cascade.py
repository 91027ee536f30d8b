"""Cascade scoring: a cheap pre-score for every matched candidate, RANSAC only for the few it ranks best.

Why: with compact patch descriptors (the ``performance`` preset's 512-d whitened int8) the time of
re-ranking a whole shortlist is not in the matrix products but in the spatial check. OpenCV's
RANSAC stops early only when the inlier ratio is high; a wrong candidate — most of a shortlist —
has few inliers among its mutual matches, so it runs the full 2,000 iterations, at every scale
(profiled on Nordland-600 with one thread: RANSAC 0.59 s of 0.66 s per query for a 100-candidate
shortlist; the rest is 300 one-pair matching calls). Those are exactly the candidates whose RANSAC
score cannot win. The mutual-nearest-neighbour count of a pair is known before any geometry, costs
next to nothing once all candidates are matched in one batched product
(:func:`vprkit.rerank.matching.mutual_nn_stacked`), and ranks the right place high: a true match
shares many mutually-nearest patches (on Nordland-600 the true place is among the 15 best counts
for 84 % of the queries whose shortlist holds it, sampled on 60 queries). So:

1. match every candidate (all of them at once per scale);
2. pre-score each candidate with its mutual-match counts, z-normalised per scale over the
   candidates and summed with the preset's scale weights (:func:`prescore`);
3. verify with the preset's spatial scorer (RANSAC) only the ``verify`` candidates with the best
   pre-scores (:func:`select_for_verification`);
4. give the others, at each scale, the lowest verified score (:func:`fill_unverified`): they were
   judged weaker by the pre-score, so they rank with the weakest verified candidate, and the
   per-scale statistics the fusion z-normalises with still count them.

**A spatial first pass** (``prescorer``): instead of the mutual-match counts, a fast spatial scorer
scores every candidate and the exact scorer re-scores the ``verify`` best by its fused score; the
others keep the fast scorer's score (the same unit, an inlier ratio), not the floor. A first pass
ranks candidates by geometry, which counts do not (a rotated query's true place has few mutual
matches but they agree; a crop keeps few of the query's patches, and counts then favour candidates
with many generic ones — the counts cascade fell from 0.694 to 0.306 on cropped Corridor). It
need not be exact, only rank the right place among the best few: ``performance`` uses
``affine`` (:func:`vprkit.rerank.scoring.affine_scores`: 128 three-match affine hypotheses per pair,
every pair of a scale scored in one vectorised pass). The earlier choice, OpenCV's USAC
(``usac``), also picked well, but one OpenCV call per pair (~130 µs, 300 a query) was most of the
time left. Either finds fewer inliers than RANSAC's 2,000 full passes on a true place with a low
inlier ratio (recorded on rotated and zoomed Nordland: USAC alone 0.200 / 0.290 Recall@1, RANSAC
0.215 / 0.320), which the exact pass over its best few restores.

The fusion (:mod:`vprkit.rerank.fusion`) is unchanged: it receives ``scales × candidates`` scores
as from the full re-ranker.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from ..numerics import zscore
from .fusion import fuse_scales
from .matching import Matches, mutual_nn_stacked
from .scoring import PatchSet, SpatialScore, score_candidates


def prescore(match_counts: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Cheap score per candidate: ``Σ_s w_s · z(mutual matches at scale s)``.

    ``match_counts``: ``scales × candidates`` numbers of mutual nearest neighbours. Z-normalising
    per scale puts scales with many patches (size 2) and few (size 8) on one footing, as the
    fusion does with the spatial scores; a scale where every candidate has the same count adds 0.
    """
    counts = np.asarray(match_counts, np.float64)
    if counts.ndim != 2 or counts.shape[0] != len(weights):
        raise ValueError(f"match counts of shape {counts.shape} for {len(weights)} scale weights")
    return sum(w * zscore(c) for c, w in zip(counts, weights))


def select_for_verification(pre: np.ndarray, verify: int | None) -> np.ndarray:
    """Which candidates the spatial scorer verifies: the ``verify`` best by pre-score.

    ``pre`` is in global order (best global candidate first), so ties in the pre-score go to the
    better global candidate. ``verify=None`` or ``≥ len(pre)`` verifies all.
    """
    pre = np.asarray(pre, np.float64)
    chosen = np.zeros(len(pre), bool)
    if verify is None or verify >= len(pre):
        chosen[:] = True
        return chosen
    if verify < 1:
        raise ValueError(f"verify must be ≥ 1 candidate (or None for all), got {verify}")
    chosen[np.argsort(-pre, kind="stable")[:verify]] = True
    return chosen


def fill_unverified(verified_scores: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """``scales × candidates`` scores with each unverified candidate at its scale's lowest verified score.

    ``verified_scores``: ``scales × candidates`` (entries of unverified candidates are ignored).
    """
    scores = np.asarray(verified_scores, np.float64)
    chosen = np.asarray(chosen, bool)
    if not chosen.any():
        raise ValueError("at least one candidate must be verified")
    floor = scores[:, chosen].min(axis=1, keepdims=True)
    return np.where(chosen[None, :], scores, floor)


class CascadeScores(NamedTuple):
    """What the cascade found for one query: ``scales × candidates`` scores (unverified ones filled),
    which candidates were verified, and the ``scales × candidates`` mutual-match counts it chose them by
    (benchmarks record them to replay other ``verify`` settings without matching again)."""

    scores: np.ndarray
    chosen: np.ndarray
    match_counts: np.ndarray


def finest_scale(query_sets: Sequence[PatchSet]) -> int:
    """The scale with the most query patches: the most expensive to match (ties: the first)."""
    return int(np.argmax([len(q.descriptors) for q in query_sets]))


def fine_candidates(query: PatchSet, candidates: Sequence[PatchSet], budget: int, verify: int | None = None) -> int:
    """How many candidates the finest scale matches within ``budget`` patch similarities: as many as fit
    (the candidates' mean patch count times the query's per candidate), at least ``verify`` and 1."""
    if not candidates:
        return 0
    per_candidate = max(1, len(query.descriptors)) * max(1.0, float(np.mean([len(c.descriptors) for c in candidates])))
    return int(min(len(candidates), max(verify or 1, int(budget // per_candidate))))


def cascade_scores(
    query_sets: list[PatchSet],
    candidates: list[list[PatchSet]],
    scorer: Callable[[PatchSet, PatchSet, Matches], SpatialScore],
    weights: Sequence[float],
    verify: int | None,
    device=None,
    prescorer: Callable[[PatchSet, PatchSet, Matches], SpatialScore] | None = None,
    fine_budget: int | None = None,
) -> CascadeScores:
    """``scales × candidates`` spatial scores of one query against its candidates (in global order),
    with ``scorer`` run only on the candidates :func:`select_for_verification` picks; that mask; the counts.

    ``prescorer``: pick them by its fused scores instead of the mutual-match counts; the unpicked keep
    its scores (see the module docs). A prescorer with a batched form scores each scale's candidates in
    one call (:func:`vprkit.rerank.scoring.score_candidates`).

    ``fine_budget`` (with a prescorer): the finest scale (:func:`finest_scale`) computes at most that
    many patch similarities (query patches × candidate patches, summed over candidates): it matches
    :func:`fine_candidates` of them, the best by the coarser scales' fused first-pass scores; the others
    get the finest scale's lowest first-pass score among them (as :func:`fill_unverified` does for the
    exact pass) and a mutual-match count of 0, and only candidates matched at every scale are verified.
    Why: matching cost grows with the product of the two sides' patch counts, so the finest scale
    dominates it, and far more at high resolution (Corridor's 320×240: 266 size-2 patches a side, 70,756
    similarities per candidate; Nordland's 224×112: 78, 6,084). A budget bounds the cost per query
    whatever the resolution: where the whole shortlist fits it nothing changes.
    """
    n_scales, n_cand = len(query_sets), len(candidates)
    if fine_budget is not None and prescorer is None:
        raise ValueError("fine_budget picks by the coarser scales' first pass: pass a prescorer")
    fine = finest_scale(query_sets) if fine_budget is not None and n_scales > 1 else None
    n_fine = (
        n_cand
        if fine is None
        else fine_candidates(query_sets[fine], [c[fine] for c in candidates], fine_budget, verify)
    )
    order = [s for s in range(n_scales) if s != fine] + ([fine] if fine is not None else [])
    matches: list[list[Matches]] = [[] for _ in range(n_scales)]
    counts = np.zeros((n_scales, n_cand))
    scores = np.zeros((n_scales, n_cand))
    fine_mask = np.ones(n_cand, bool)
    for s in order:
        q = query_sets[s]
        if s == fine and n_fine < n_cand:
            coarse = [c for c in range(n_scales) if c != fine]
            fine_mask = select_for_verification(
                fuse_scales([scores[c] for c in coarse], [weights[c] for c in coarse]), n_fine
            )
        picked = np.flatnonzero(fine_mask) if s == fine else np.arange(n_cand)
        found = mutual_nn_stacked(q.descriptors, [candidates[c][s].descriptors for c in picked], device)
        per_scale = [Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))] * n_cand
        for c, m in zip(picked, found):
            per_scale[c] = m
        matches[s] = per_scale
        counts[s, picked] = [len(m) for m in found]
        if prescorer is not None:
            scores[s, picked] = score_candidates(prescorer, q, [candidates[c][s] for c in picked], found)
            if len(picked) < n_cand:
                scores[s, ~fine_mask] = scores[s, picked].min()
    if prescorer is None:
        chosen = select_for_verification(prescore(counts, weights), verify)
    else:
        fused = np.where(fine_mask, fuse_scales(list(scores), weights), -np.inf)
        chosen = select_for_verification(fused, verify) & fine_mask
    for c in np.flatnonzero(chosen):
        for s, q in enumerate(query_sets):
            scores[s, c] = scorer(q, candidates[c][s], matches[s][c]).value
    return CascadeScores(scores if prescorer is not None else fill_unverified(scores, chosen), chosen, counts)
