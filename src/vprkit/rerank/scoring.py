"""Spatial scoring of patch matches: RANSAC homography and rapid spatial scoring, one interface.

Also fast first-pass scorers for the re-ranking cascade: OpenCV's USAC (:func:`usac_score`) and
vectorised minimal-sample fits of a similarity or an affine map (:func:`similarity_scores`,
:func:`affine_scores`, both :func:`motion_scores`) that score all of a query's candidates at one scale
in one call
(:func:`score_candidates`).

Both reference scorers take a query's and a candidate's :class:`PatchSet` at one scale plus their mutual
matches, and return a :class:`SpatialScore` (higher is better; also which matches are inliers, for
drawing). Register new scorers in :data:`SCORERS`.

Both follow the reference implementation (Patch-NetVLAD, ``patchnetvlad/tools/patch_matcher.py``,
``PatchMatcher.compare_two_ransac`` and ``compare_two_spatial``) on identical inputs, and are tested
against it in ``tests/rerank/test_fidelity_*.py``:

- RANSAC fits the homography *candidate → query* (source = candidate patch centres, destination =
  query patch centres) with the matches in *candidate* order, as the reference does (its mutual
  matches come out ordered by database patch index); direction and order change which minimal
  samples OpenCV draws, so inlier counts differ per pair otherwise (see
  ``benchmarks/bench_ransac_direction.py``). Threshold 1.5 × the pixel step between neighbouring
  patches (the reference's ``16 * stride * 1.5``), OpenCV's default 2,000 iterations and 0.995
  confidence; score = inliers / number of query patches.
- Rapid spatial scoring anchors at the largest patch index on each axis of the query's patch grid
  (columns − 1, rows − 1), not at the grid size.

The sign is flipped (the reference returns negative scores so that smaller is better) and a fit
that OpenCV rejects scores 0 instead of raising. Patch centres differ from the reference's VGG16
receptive-field centres by a constant offset applied to both images, which leaves homography
inliers unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from ..registry import Registry
from .matching import Matches

# RANSAC needs at least this many correspondences to fit a homography.
HOMOGRAPHY_MIN_MATCHES = 4
# The original's inlier threshold: 1.5 × the pixel step between neighbouring patches (24 px for
# VGG16's 16-px cells at patch stride 1).
RANSAC_THRESHOLD_STEPS = 1.5
RANSAC_CONFIDENCE = 0.995
RANSAC_MAX_ITERS = 2000

# |h₃₃| below this: the inverse homography maps points to infinity and is left unnormalised.
DEGENERATE_HOMOGRAPHY = 1e-12
# Affine / similarity pre-scoring (:func:`motion_scores`): minimal samples per pair, their seed, the
# largest pairs × hypotheses × matches array scored at once, and the smallest span (pixels; px² for the
# affine's determinant) of a sample's candidate patch centres that fixes the map.
MOTION_HYPOTHESES = 128
MOTION_SEED = 0
MOTION_CHUNK_ELEMENTS = 1 << 21
DEGENERATE_SPAN_PX = 1e-6


@dataclass
class PatchSet:
    """One image's patches at one scale.

    ``centres`` are pixel (x, y) centres in the backbone's input image; ``positions`` are (col, row)
    in patch-grid units; ``grid`` is the patch grid's (rows, cols); ``step_px`` the pixel distance
    between neighbouring patches.
    """

    descriptors: torch.Tensor
    centres: np.ndarray
    positions: np.ndarray
    grid: tuple[int, int]
    step_px: float

    def __len__(self) -> int:
        return int(self.descriptors.shape[0])


@dataclass
class SpatialScore:
    value: float
    inliers: np.ndarray  # bool per match
    # the fitted geometry. RANSAC: 3×3 homography mapping query pixels to candidate pixels — the
    # inverse of the candidate → query homography that is fitted (the reference's direction).
    model: np.ndarray | None = None


def _empty(m: Matches) -> SpatialScore:
    return SpatialScore(0.0, np.zeros(len(m), bool))


def _homography_score(query: PatchSet, candidate: PatchSet, matches: Matches, method: str) -> SpatialScore:
    """Inliers of a robust homography fit (OpenCV ``method``) over the query's patch count; see :func:`ransac_score`."""
    if len(matches) < HOMOGRAPHY_MIN_MATCHES or len(query) == 0:
        return _empty(matches)
    order = np.argsort(np.asarray(matches.candidate), kind="stable")  # the reference's candidate order
    src = candidate.centres[np.asarray(matches.candidate)[order]].astype(np.float32)
    dst = query.centres[np.asarray(matches.query)[order]].astype(np.float32)
    threshold = RANSAC_THRESHOLD_STEPS * query.step_px
    h, mask = cv2.findHomography(
        src, dst, getattr(cv2, method), threshold, maxIters=RANSAC_MAX_ITERS, confidence=RANSAC_CONFIDENCE
    )
    if mask is None or h is None:
        return _empty(matches)
    inliers = np.zeros(len(matches), bool)
    inliers[order] = mask.ravel().astype(bool)
    try:
        model = np.linalg.inv(h)
        model = model / model[2, 2] if abs(model[2, 2]) > DEGENERATE_HOMOGRAPHY else model
    except np.linalg.LinAlgError:
        model = None
    return SpatialScore(float(inliers.sum()) / len(query), inliers, model)


def ransac_score(query: PatchSet, candidate: PatchSet, matches: Matches) -> SpatialScore:
    """Inliers of a RANSAC homography between matched patch centres, over the query's patch count.

    As the reference (``PatchMatcher.compare_two_ransac``): ``cv2.findHomography(candidate centres,
    query centres, RANSAC, 1.5 × step)`` with the matches sorted by candidate patch index. Matches may
    come in any order; ``inliers`` is returned in the order of ``matches``.
    """
    return _homography_score(query, candidate, matches, "RANSAC")


def usac_score(query: PatchSet, candidate: PatchSet, matches: Matches) -> SpatialScore:
    """:func:`ransac_score`'s inlier ratio, fitted by OpenCV's USAC (``USAC_DEFAULT``) instead of plain RANSAC.

    Same homography, threshold, confidence and score; what changes is how hypotheses are tested. Plain
    RANSAC scores every hypothesis on every match, and on a wrong candidate (few inliers, so no early
    stop) that is 2,000 full passes per scale — most of a re-ranked shortlist's time. USAC rejects a
    bad hypothesis after a few matches by a sequential probability ratio test (SPRT) and polishes the
    best one by local optimisation, so a wrong candidate costs tens of times less while a right one
    keeps its inliers (``benchmarks/bench_rerank.py`` compares the two on whole shortlists).
    """
    return _homography_score(query, candidate, matches, "USAC_DEFAULT")


def rapid_spatial_score(query: PatchSet, candidate: PatchSet, matches: Matches) -> SpatialScore:
    """Patch-NetVLAD's rapid spatial scoring: how tightly match displacements cluster about their mean.

    ``d = p_db − p_q`` per match (patch-grid units), ``r = |d − mean(d)|`` per axis, score
    ``Σ[(x_max − r_x)² + (y_max − r_y)²] / n_query`` with ``x_max = cols − 1`` and ``y_max = rows − 1``
    of the query's patch grid: the largest patch index on each axis, as the reference
    (``PatchMatcher.compare_two_spatial`` anchors at ``max(indices[0])``, ``max(indices[1])`` of the
    patch index grid, which the reference shares between query and database images).
    Matches within one step of the mean displacement are reported as inliers (for drawing).
    """
    if len(matches) == 0 or len(query) == 0:
        return _empty(matches)
    d = candidate.positions[matches.candidate].astype(np.float64) - query.positions[matches.query].astype(np.float64)
    r = np.abs(d - d.mean(0))
    rows, cols = query.grid
    x_max, y_max = cols - 1, rows - 1
    value = float((((x_max - r[:, 0]) ** 2) + ((y_max - r[:, 1]) ** 2)).sum()) / len(query)
    return SpatialScore(value, (r <= 1.0).all(1))


def _distinct_samples(draws: torch.Tensor, n: torch.Tensor) -> list[torch.Tensor]:
    """Distinct match indices per pair and hypothesis from shared uniform ``draws`` (hypotheses × k):
    the t-th index is uniform over the ``n − t`` matches not drawn yet — drawn among them, then moved
    past each earlier pick in ascending order."""
    picked: list[torch.Tensor] = []
    for t in range(draws.shape[1]):
        k = torch.minimum((draws[None, :, t] * (n[:, None] - t)).long(), n[:, None] - t - 1)
        if picked:
            for earlier in torch.sort(torch.stack(picked), dim=0).values:
                k = k + (k >= earlier).long()
        picked.append(k)
    return picked


def _fit_similarity(src: list[torch.Tensor], dst: list[torch.Tensor]):
    """z ↦ a·z + b through two matches (complex centres): a = (d₂ − d₁)/(s₂ − s₁), b = d₁ − a·s₁."""
    span, lift = src[1] - src[0], dst[1] - dst[0]
    span_sq = (span**2).sum(-1)
    ok = span_sq > DEGENERATE_SPAN_PX**2
    safe = torch.where(ok, span_sq, torch.ones_like(span_sq))
    a_re = (lift[..., 0] * span[..., 0] + lift[..., 1] * span[..., 1]) / safe
    a_im = (lift[..., 1] * span[..., 0] - lift[..., 0] * span[..., 1]) / safe
    linear = torch.stack([torch.stack([a_re, -a_im], -1), torch.stack([a_im, a_re], -1)], -2)
    shift = dst[0] - (linear @ src[0][..., None])[..., 0]
    return linear, shift, ok


def _fit_affine(src: list[torch.Tensor], dst: list[torch.Tensor]):
    """x ↦ A·x + t through three matches: A = [d₂−d₁, d₃−d₁]·[s₂−s₁, s₃−s₁]⁻¹, t = d₁ − A·s₁."""
    p = torch.stack([src[1] - src[0], src[2] - src[0]], -1)  # columns
    q = torch.stack([dst[1] - dst[0], dst[2] - dst[0]], -1)
    det = p[..., 0, 0] * p[..., 1, 1] - p[..., 0, 1] * p[..., 1, 0]
    ok = det.abs() > DEGENERATE_SPAN_PX**2
    safe = torch.where(ok, det, torch.ones_like(det))
    inv = torch.stack(
        [torch.stack([p[..., 1, 1], -p[..., 0, 1]], -1), torch.stack([-p[..., 1, 0], p[..., 0, 0]], -1)], -2
    )
    linear = q @ (inv / safe[..., None, None])
    shift = dst[0] - (linear @ src[0][..., None])[..., 0]
    return linear, shift, ok


MOTION_FITS = {"similarity": _fit_similarity, "affine": _fit_affine}
MOTION_SAMPLE_SIZE = {"similarity": 2, "affine": 3}


def _padded_centres(
    query: PatchSet, candidates: Sequence[PatchSet], matches: Sequence[Matches], rows: np.ndarray, n_np: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matched patch centres of the pairs ``rows``, padded to the widest pair: candidate (x, y) and query (x, y)."""
    width = int(n_np.max())
    row_of = np.repeat(np.arange(len(rows)), n_np)
    slot = np.arange(len(row_of)) - np.repeat(np.cumsum(n_np) - n_np, n_np)
    src = np.zeros((len(rows), width, 2))
    dst = np.zeros((len(rows), width, 2))
    src[row_of, slot] = np.concatenate([candidates[c].centres[np.asarray(matches[c].candidate)] for c in rows])
    dst[row_of, slot] = query.centres[np.concatenate([np.asarray(matches[c].query) for c in rows])]
    return torch.from_numpy(src), torch.from_numpy(dst)


def motion_scores(
    query: PatchSet,
    candidates: Sequence[PatchSet],
    matches: Sequence[Matches],
    motion: str = "affine",
    hypotheses: int = MOTION_HYPOTHESES,
    seed: int = MOTION_SEED,
    return_best: bool = False,
):
    """:func:`ransac_score`'s inlier ratio for an affine map or a similarity instead of a homography,
    for all of one query's candidates at one scale at once, with no OpenCV call.

    Why: as the first pass of a cascade (``prescorer``) it has to score every shortlist candidate at
    every scale — 300 pairs a query for ``performance`` — and one OpenCV call per pair cost more than
    the geometry itself (USAC: ~130 µs a call for ~15 matches). Both maps have small minimal samples
    with closed-form fits (:data:`MOTION_FITS`: 2 matches fix a similarity ``z ↦ a·z + b`` on complex
    centres, 3 an affine map), so every hypothesis of every candidate is tested in one vectorised
    pass, and a match is an inlier when the map puts its candidate patch centre within the RANSAC
    threshold (1.5 patch steps, query pixels) of its query patch centre. Both follow what a rotated,
    zoomed or cropped view of the same place does to patch centres; the affine map also follows the
    shear that perspective gives a receding surface (a similarity picked worse on Nordland's track:
    README, "Re-ranking you can afford").

    Hypotheses: ``hypotheses`` random minimal samples per pair, drawn from one seeded stream *shared*
    by all pairs (each pair scales the same uniform draws to its own match count), so a candidate's
    score depends only on its own matches — not on the rest of its shortlist or the block it is in.
    With inlier ratio *w* a 3-match sample is all-inlier with probability ≈ *w*³, so 128 samples miss
    every good one with probability 0.973¹²⁸ ≈ 3 % at *w* = 0.3. Returns the best inlier count over the
    query's patch count per candidate (0 below a minimal sample); with ``return_best``, also each
    candidate's best map (3×3, candidate → query pixels; ``None`` if none was defined) and inlier mask.
    """
    n_cand = len(candidates)
    values = np.zeros(n_cand)
    best_models: list[np.ndarray | None] = [None] * n_cand
    best_masks = [np.zeros(len(m), bool) for m in matches] if return_best else []
    lengths = np.array([len(m) for m in matches])
    usable = np.flatnonzero(lengths >= MOTION_SAMPLE_SIZE[motion])
    if len(query) == 0 or len(usable) == 0:
        return (values, best_models, best_masks) if return_best else values
    threshold_sq = (RANSAC_THRESHOLD_STEPS * query.step_px) ** 2
    draws = torch.from_numpy(np.random.default_rng(seed).random((hypotheses, MOTION_SAMPLE_SIZE[motion])))
    # pairs in blocks of at most MOTION_CHUNK_ELEMENTS hypothesis × match tests, sorted by match count so
    # that a block's padding (to its widest pair) stays small
    usable = usable[np.argsort(lengths[usable], kind="stable")]
    start = 0
    while start < len(usable):
        fits = np.flatnonzero(
            np.arange(1, len(usable) - start + 1) * hypotheses * lengths[usable[start:]] <= MOTION_CHUNK_ELEMENTS
        )
        rows = usable[start : start + (int(fits[-1]) + 1 if len(fits) else 1)]
        start += len(rows)
        n_np = lengths[rows]
        width = int(n_np.max())
        n = torch.from_numpy(n_np)
        src_t, dst_t = _padded_centres(query, candidates, matches, rows, n_np)
        valid = torch.arange(width)[None, :] < n[:, None]  # rows × width
        picks = _distinct_samples(draws, n)  # one rows × hypotheses index tensor per sample point
        gather = lambda t, k: torch.gather(t, 1, k[:, :, None].expand(-1, -1, 2))  # noqa: E731
        src_pts = [gather(src_t, k) for k in picks]
        dst_pts = [gather(dst_t, k) for k in picks]
        linear, shift, ok = MOTION_FITS[motion](src_pts, dst_pts)  # rows × hyp × 2 × 2, rows × hyp × 2, rows × hyp
        # every hypothesis applied to every match of its pair in one batched product: rows × (hyp·2) × width
        models = torch.cat([linear, shift[..., None]], -1).float().reshape(len(rows), -1, 3)
        points = torch.cat([src_t.float(), torch.ones(len(rows), width, 1)], 2).transpose(1, 2)
        landed = torch.bmm(models, points).reshape(len(rows), hypotheses, 2, width)
        error_sq = (landed - dst_t.float().transpose(1, 2)[:, None]).square_().sum(2)  # rows × hyp × width
        inliers = (error_sq <= threshold_sq) & valid[:, None, :] & ok[:, :, None]
        counts = inliers.sum(2)  # rows × hypotheses
        best = counts.argmax(1)  # ties → the first best hypothesis (deterministic)
        values[rows] = (counts.gather(1, best[:, None])[:, 0].double() / len(query)).numpy()
        if return_best:
            for r, c in enumerate(rows):
                h = int(best[r])
                if bool(ok[r, h]):
                    model = np.eye(3)
                    model[:2, :2], model[:2, 2] = linear[r, h].numpy(), shift[r, h].numpy()
                    best_models[c] = model
                    best_masks[c] = inliers[r, h, : n_np[r]].numpy().copy()
    return (values, best_models, best_masks) if return_best else values


def _one_pair(motion: str, query: PatchSet, candidate: PatchSet, matches: Matches) -> SpatialScore:
    """One pair's :func:`motion_scores`, with its inliers and the fitted map as a 3×3 matrix
    (query pixels → candidate pixels, as the RANSAC scorer reports it)."""
    values, models, masks = motion_scores(query, [candidate], [matches], motion, return_best=True)
    if models[0] is None:
        return SpatialScore(float(values[0]), masks[0] if masks else np.zeros(len(matches), bool))
    try:
        return SpatialScore(float(values[0]), masks[0], np.linalg.inv(models[0]))
    except np.linalg.LinAlgError:
        return SpatialScore(float(values[0]), masks[0])


def similarity_scores(
    query: PatchSet, candidates: Sequence[PatchSet], matches: Sequence[Matches], **options
) -> np.ndarray:
    """:func:`motion_scores` for a similarity (2-match samples): rotation, one scale, translation."""
    return motion_scores(query, candidates, matches, "similarity", **options)


def affine_scores(query: PatchSet, candidates: Sequence[PatchSet], matches: Sequence[Matches], **options) -> np.ndarray:
    """:func:`motion_scores` for an affine map (3-match samples): shear and unequal scales too."""
    return motion_scores(query, candidates, matches, "affine", **options)


def similarity_score(query: PatchSet, candidate: PatchSet, matches: Matches) -> SpatialScore:
    """One pair's :func:`similarity_scores`, with its inliers and fitted map."""
    return _one_pair("similarity", query, candidate, matches)


def affine_score(query: PatchSet, candidate: PatchSet, matches: Matches) -> SpatialScore:
    """One pair's :func:`affine_scores`, with its inliers and fitted map."""
    return _one_pair("affine", query, candidate, matches)


SCORERS: Registry[Callable[[PatchSet, PatchSet, Matches], SpatialScore]] = Registry("spatial scorer")
SCORERS.register("ransac", ransac_score)
SCORERS.register("usac", usac_score)
SCORERS.register("rapid", rapid_spatial_score)
SCORERS.register("similarity", similarity_score)
SCORERS.register("affine", affine_score)


def _inlier_ratio_perfect(query: PatchSet) -> float:
    return 1.0


def _rapid_perfect(query: PatchSet) -> float:
    rows, cols = query.grid
    return float((cols - 1) ** 2 + (rows - 1) ** 2)


# What each scorer gives a perfect alignment — every query patch matched, all in agreement: an
# inlier ratio of 1 for the fitted models; for rapid scoring, every match at the mean displacement,
# x_max² + y_max². A score over it is the *agreement*, in [0, 1] whatever the scorer and image size
# (:func:`vprkit.rerank.fusion.best_agreement`); keyed like :data:`SCORERS` (a scorer registered without one cannot be gated
# by ``min_agreement``).
PERFECT_SCORES: Registry[Callable[[PatchSet], float]] = Registry("perfect spatial score")
for _name in ("ransac", "usac", "similarity", "affine"):
    PERFECT_SCORES.register(_name, _inlier_ratio_perfect)
PERFECT_SCORES.register("rapid", _rapid_perfect)


def perfect_score(scorer: str, query: PatchSet) -> float:
    """The value ``scorer`` (a :data:`SCORERS` name) gives ``query`` against a perfectly aligned copy of itself."""
    return float(PERFECT_SCORES.get(scorer)(query))


# Scorers with a form that scores all of a query's candidates at one scale in one call.
BATCHED_SCORERS: dict[Callable, Callable[[PatchSet, Sequence[PatchSet], Sequence[Matches]], np.ndarray]] = {
    similarity_score: similarity_scores,
    affine_score: affine_scores,
}


def score_candidates(
    scorer: Callable[[PatchSet, PatchSet, Matches], SpatialScore],
    query: PatchSet,
    candidates: Sequence[PatchSet],
    matches: Sequence[Matches],
) -> np.ndarray:
    """``scorer``'s value for each candidate of one query at one scale: in one call where the scorer
    has a batched form (:data:`BATCHED_SCORERS`), else pair by pair."""
    batched = BATCHED_SCORERS.get(scorer)
    if batched is not None:
        return np.asarray(batched(query, candidates, matches), np.float64)
    return np.array([scorer(query, c, m).value for c, m in zip(candidates, matches)], np.float64)
