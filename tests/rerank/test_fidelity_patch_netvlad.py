"""Fidelity to the Patch-NetVLAD reference (``patchnetvlad/tools/patch_matcher.py``) on identical inputs.

What the reference does (``PatchMatcher.compare_two_ransac`` / ``compare_two_spatial``):

- mutual nearest neighbours from ``dist = sqrt(2 − 2·q·d)`` on L2-normalised descriptors; the
  mutual pairs come out ordered by *candidate* (database) patch index;
- RANSAC: ``cv2.findHomography(candidate centres, query centres, RANSAC, 16·stride·1.5)`` (source =
  candidate, destination = query; 24 px for VGG16's 16-px step at patch stride 1), at least 4
  matches, score = inliers / number of query patches (negated there; positive here);
- rapid spatial scoring: ``d = p_db − p_q`` in patch-grid units, ``r = |d − mean(d)|`` per axis,
  score = Σ[(x_max − r_x)² + (y_max − r_y)²] / number of query patches, with x_max, y_max the
  largest patch index on each axis (columns − 1, rows − 1).

The expected values below are either worked out by hand or computed by an independent call written
here in the reference's argument order.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from vprkit.rerank.matching import Matches, mutual_nn
from vprkit.rerank.scoring import rapid_spatial_score, ransac_score
from helpers import grid_patch_set

STEP = 16.0
THRESHOLD = 16 * 1 * 1.5  # the reference's ransacReprojThreshold at patch stride 1


def grid_set(rows, cols, step=STEP, descriptors=None):
    """Patch-NetVLAD's keypoints: cell centres."""
    return grid_patch_set(rows, cols, step, offset=0.5, descriptors=descriptors)


def idx(col, row, cols):
    return row * cols + col


def matches(pairs):
    q, c = zip(*pairs)
    return Matches(np.array(q), np.array(c), np.ones(len(q)))


# ---- rapid spatial scoring ----------------------------------------------------------------------


def test_rapid_scoring_hand_computed_example():
    # Query and candidate grids of 3 rows × 4 cols: n_q = 12, x_max = cols − 1 = 3, y_max = rows − 1 = 2.
    # Matches as (col, row) → (col, row):
    #   m1: (0,0) → (1,0)   d = ( 1,  0)
    #   m2: (1,1) → (2,1)   d = ( 1,  0)
    #   m3: (3,2) → (3,0)   d = ( 0, −2)
    # mean d = (2/3, −2/3)
    #   r1 = r2 = (|1 − 2/3|, |0 + 2/3|) = (1/3, 2/3);  r3 = (|0 − 2/3|, |−2 + 2/3|) = (2/3, 4/3)
    #   m1, m2: (3 − 1/3)² + (2 − 2/3)² = 64/9 + 16/9 = 80/9
    #   m3:     (3 − 2/3)² + (2 − 4/3)² = 49/9 +  4/9 = 53/9
    # sum = 213/9; score = 213/9 / 12 = 71/36 ≈ 1.9722
    # (anchoring at the grid size, x_max = 4 and y_max = 3, would give
    #  2·[(11/3)² + (7/3)²] + (10/3)² + (5/3)² = 465/9 → 155/36 ≈ 4.3056, more than twice as much.)
    q, c = grid_set(3, 4), grid_set(3, 4)
    m = matches([(idx(0, 0, 4), idx(1, 0, 4)), (idx(1, 1, 4), idx(2, 1, 4)), (idx(3, 2, 4), idx(3, 0, 4))])
    s = rapid_spatial_score(q, c, m)
    assert s.value == pytest.approx(71 / 36, rel=1e-12)
    assert s.value != pytest.approx(155 / 36)
    # the anchor is the query's grid: a larger candidate grid (5 × 6) changes nothing when the
    # matched candidate positions are the same
    c_big = grid_set(5, 6)
    m_big = matches([(idx(0, 0, 4), idx(1, 0, 6)), (idx(1, 1, 4), idx(2, 1, 6)), (idx(3, 2, 4), idx(3, 0, 6))])
    assert rapid_spatial_score(q, c_big, m_big).value == pytest.approx(71 / 36, rel=1e-12)


def test_rapid_scoring_anchor_decides_between_two_candidates():
    # 3 × 4 grids (n_q = 12). Candidate A: 4 matches with displacements (1,1), (−1,−1), (1,−1), (−1,1):
    # mean 0, r = (1, 1) each. Candidate B: 2 matches with the same displacement, r = (0, 0).
    #   reference anchor (3, 2):  A = 4·[(3−1)² + (2−1)²] = 20,  B = 2·(3² + 2²) = 26  → B first
    #   grid-size anchor (4, 3):  A = 4·[(4−1)² + (3−1)²] = 52,  B = 2·(4² + 3²) = 50  → A first
    q, c = grid_set(3, 4), grid_set(3, 4)
    a = matches(
        [
            (idx(0, 0, 4), idx(1, 1, 4)),
            (idx(3, 2, 4), idx(2, 1, 4)),
            (idx(2, 2, 4), idx(3, 1, 4)),
            (idx(1, 0, 4), idx(0, 1, 4)),
        ]
    )
    b = matches([(idx(0, 0, 4), idx(0, 0, 4)), (idx(1, 1, 4), idx(1, 1, 4))])
    sa, sb = rapid_spatial_score(q, c, a), rapid_spatial_score(q, c, b)
    assert sa.value == pytest.approx(20 / 12) and sb.value == pytest.approx(26 / 12)
    assert sb.value > sa.value


def reference_rapid(q_idx, c_idx, indices, n_query):
    """The reference's formula on its (2 × n) patch-index array (row 0 = column, row 1 = row)."""
    d = indices[:, c_idx] - indices[:, q_idx]
    r = np.abs(d - d.mean(axis=1, keepdims=True))
    xmax, ymax = indices[0].max(), indices[1].max()
    return float(((xmax - r[0]) ** 2 + (ymax - r[1]) ** 2).sum() / n_query)


def test_rapid_scoring_equals_the_reference_formula_on_random_matches():
    rng = np.random.default_rng(3)
    q, c = grid_set(26, 36), grid_set(26, 36)  # patch size 5 on a 30 × 40 map
    indices = q.positions.T.astype(int)
    for n in (1, 5, 80, 400):
        qi = rng.choice(len(q), n, replace=False)
        ci = rng.choice(len(c), n, replace=False)
        got = rapid_spatial_score(q, c, Matches(qi, ci, np.ones(n))).value
        assert got == pytest.approx(reference_rapid(qi, ci, indices, len(q)), rel=1e-12)


# ---- RANSAC: direction, order, threshold ---------------------------------------------------------


def apply(h, xy):
    p = np.c_[xy, np.ones(len(xy))] @ h.T
    return p[:, :2] / p[:, 2:]


def test_ransac_reference_direction_counts_the_planted_inliers():
    # Candidate: 10 × 12 grid of patch centres. Planted homography H maps candidate → query pixels.
    # 84 of 120 matches follow H exactly; 36 are outliers whose query end lies > 3 thresholds from
    # where H sends their candidate end. Expected: exactly 84 inliers, score 84 / 120 = 0.7.
    h = np.array([[1.05, 0.03, -9.0], [-0.02, 0.97, 5.0], [2e-4, -1e-4, 1.0]])
    c = grid_set(10, 12)
    q = grid_set(10, 12)
    q.centres = apply(h, c.centres).astype(np.float32)
    rng = np.random.default_rng(7)
    n = len(c)
    ci = np.arange(n)
    qi = np.arange(n)
    out = rng.choice(n, 36, replace=False)
    qi[out] = rng.permutation(qi[out])
    far = np.linalg.norm(q.centres[qi[out]] - apply(h, c.centres[ci[out]]), axis=1) > 3 * THRESHOLD
    qi[out[~far]] = ci[out[~far]]  # the few outliers that landed close become true matches again
    n_true = int((qi == ci).sum())
    order = rng.permutation(n)  # matches in an arbitrary order
    s = ransac_score(q, c, Matches(qi[order], ci[order], np.ones(n)))
    assert int(s.inliers.sum()) == n_true
    assert s.value == pytest.approx(n_true / len(q))
    np.testing.assert_array_equal(s.inliers, (qi == ci)[order])  # reported in the matches' order
    # model: query → candidate, the inverse of the planted candidate → query homography
    np.testing.assert_allclose(apply(s.model, q.centres), c.centres, atol=0.05)


def noisy_pair(seed, n_side=(12, 16), n_out=70, noise=9.0):
    """A query and a candidate grid with noisy correspondences and many outliers (RANSAC is then
    sensitive to which samples it draws, so direction and order show)."""
    rng = np.random.default_rng(seed)
    q, c = grid_set(*n_side), grid_set(*n_side)
    n = len(q)
    h = np.array([[0.9, 0.05, 20.0], [0.02, 0.92, 8.0], [3e-4, 1e-4, 1.0]])
    qi = rng.choice(n, 150, replace=False)
    ci = rng.permutation(n)[:150]
    c.centres = c.centres.copy()
    # candidate centres of the true matches follow H from the query, with noise near the threshold
    c.centres[ci] = (apply(h, q.centres[qi]) + rng.normal(0, noise, (150, 2))).astype(np.float32)
    qi_out = qi.copy()
    qi_out[:n_out] = rng.permutation(qi[:n_out])  # outliers: their query ends shuffled
    m = Matches(qi_out, ci, np.ones(150))  # neither query nor candidate order
    return q, c, m


def reference_ransac(q, c, m):
    """The reference's call: candidate → query, matches sorted by candidate patch index."""
    o = np.argsort(m.candidate)
    cv2.setRNGSeed(12345)  # OpenCV's RANSAC seeds its own generator per call; set anyway
    h, mask = cv2.findHomography(
        c.centres[m.candidate[o]].astype(np.float32),
        q.centres[m.query[o]].astype(np.float32),
        cv2.RANSAC,
        ransacReprojThreshold=THRESHOLD,
    )
    inl = np.zeros(len(m), bool)
    inl[o] = mask.ravel() == 1
    return inl, h


def reversed_ransac(q, c, m):
    """vprkit's former call: query → candidate, matches in query order."""
    o = np.argsort(m.query)
    _, mask = cv2.findHomography(
        q.centres[m.query[o]].astype(np.float32),
        c.centres[m.candidate[o]].astype(np.float32),
        cv2.RANSAC,
        ransacReprojThreshold=THRESHOLD,
    )
    return int(mask.sum())


def test_ransac_equals_an_independent_call_in_the_reference_argument_order():
    differs = 0
    for seed in range(6):
        q, c, m = noisy_pair(seed)
        want, h = reference_ransac(q, c, m)
        cv2.setRNGSeed(999)
        s = ransac_score(q, c, m)
        np.testing.assert_array_equal(s.inliers, want)
        assert s.value == pytest.approx(want.sum() / len(q))
        np.testing.assert_allclose(s.model, np.linalg.inv(h) / np.linalg.inv(h)[2, 2], rtol=1e-9, atol=1e-12)
        # the order of the Matches does not matter: the scorer sorts by candidate index itself
        p = np.random.default_rng(seed).permutation(len(m))
        s2 = ransac_score(q, c, Matches(m.query[p], m.candidate[p], m.similarity[p]))
        np.testing.assert_array_equal(s2.inliers, want[p])
        differs += reversed_ransac(q, c, m) != int(want.sum())
    # these inputs do tell the two directions apart, so the equality above is a real check
    assert differs >= 2


def test_ransac_threshold_is_one_and_a_half_patch_steps():
    # 8 × 8 grid matched to itself (identity), except four scattered matches displaced by 23 px
    # (inside the 24-px threshold) and four by 25 px (outside), in different directions.
    c, q = grid_set(8, 8), grid_set(8, 8)
    q.centres = c.centres.copy()
    dirs = np.array([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8], [0.8, -0.6]])
    inside, outside = np.array([9, 22, 43, 54]), np.array([13, 26, 35, 50])
    q.centres[inside] += 23.0 * dirs
    q.centres[outside] += 25.0 * dirs
    pairs = np.arange(64)
    s = ransac_score(q, c, Matches(pairs, pairs, np.ones(64)))
    assert s.inliers[inside].all() and not s.inliers[outside].any()
    assert s.value == pytest.approx(60 / 64)


def test_ransac_needs_four_matches():
    q, c = grid_set(4, 4), grid_set(4, 4)
    corners = np.array([0, 3, 12, 15])
    assert ransac_score(q, c, Matches(corners[:3], corners[:3], np.ones(3))).value == 0.0
    assert ransac_score(q, c, Matches(corners, corners, np.ones(4))).value == pytest.approx(4 / 16)


# ---- mutual nearest neighbours --------------------------------------------------------------------


def reference_mutual(qd, cd):
    """The reference's mutual matching: distances sqrt(2 − 2·dot), pairs listed by candidate index."""
    dist = np.sqrt(2 - 2 * (qd @ cd.T) + 1e-9)  # n_q × n_c
    fw = dist.argmin(0)  # nearest query patch of each candidate patch
    bw = dist.argmin(1)  # nearest candidate patch of each query patch
    mut = np.flatnonzero(bw[fw] == np.arange(len(fw)))
    return fw[mut], mut  # query indices, candidate indices (candidate order)


def test_mutual_nn_and_scores_equal_the_reference_pipeline_on_random_descriptors():
    rng = np.random.default_rng(11)
    rows, cols, dim = 9, 12, 32
    n = rows * cols
    qd = rng.normal(size=(n, dim))
    perm = rng.permutation(n)
    cd = qd[perm] + 0.6 * rng.normal(size=(n, dim))  # candidate patch j resembles query patch perm[j]
    qd /= np.linalg.norm(qd, axis=1, keepdims=True)
    cd /= np.linalg.norm(cd, axis=1, keepdims=True)
    q = grid_set(rows, cols, descriptors=torch.from_numpy(qd).float())
    c = grid_set(rows, cols, descriptors=torch.from_numpy(cd).float())
    m = mutual_nn(q.descriptors, c.descriptors)[0]
    rq, rc = reference_mutual(qd.astype(np.float32), cd.astype(np.float32))
    assert sorted(zip(m.query.tolist(), m.candidate.tolist())) == sorted(zip(rq.tolist(), rc.tolist()))
    assert len(m) > 20
    # rapid scoring on the shared index grid
    indices = q.positions.T.astype(int)
    assert rapid_spatial_score(q, c, m).value == pytest.approx(reference_rapid(rq, rc, indices, n), rel=1e-12)
    # RANSAC on the reference's (candidate-ordered) match list
    _, mask = cv2.findHomography(c.centres[rc], q.centres[rq], cv2.RANSAC, ransacReprojThreshold=THRESHOLD)
    assert ransac_score(q, c, m).value == pytest.approx(int(mask.sum()) / n)


# ---- patch centres ------------------------------------------------------------------------------


def reference_vgg_keypoints(rows, cols, p):
    """The reference's RANSAC keypoints for VGG16 conv5_3 (receptive field 196, stride 16, padding 90):
    the centre of the union of the receptive boxes of a patch's corner cells, cast to int."""
    ys, xs = np.meshgrid(np.arange(rows - p + 1), np.arange(cols - p + 1), indexing="ij")
    lo = lambda i: 16 * i - 90.0  # noqa: E731  box start of cell i
    hi = lambda i: 16 * i - 90.0 + 196 - 1  # noqa: E731  box end of cell i
    x = ((lo(xs) + hi(xs + p - 1)) / 2).astype(int)
    y = ((lo(ys) + hi(ys + p - 1)) / 2).astype(int)
    return np.stack([x.ravel(), y.ravel()], 1)


@pytest.mark.parametrize("p", [2, 5, 8])
def test_patch_centres_differ_from_the_reference_by_one_common_shift_that_ransac_ignores(p):
    from vprkit.rerank.patches import PatchScale, patch_centres

    ours = patch_centres(PatchScale(p), (30, 40), 16)
    ref = reference_vgg_keypoints(30, 40, p)
    # (j + P/2)·16 against int(16·j + 8·(P − 1) + 7.5) = 16·j + 8·P − 1: one pixel, the same everywhere
    np.testing.assert_array_equal(ours - ref, np.ones_like(ref))
    # so the homography inliers are the same on either set of centres
    rng = np.random.default_rng(p)
    n = len(ours)
    for _ in range(5):
        qi, ci = rng.choice(n, 200, replace=False), rng.choice(n, 200, replace=False)
        keep = rng.random(200) < 0.5
        ci[keep] = np.clip(qi[keep] + rng.integers(-1, 2, keep.sum()), 0, n - 1)  # half roughly consistent
        _, m_ours = cv2.findHomography(ours[ci].astype(np.float32), ours[qi].astype(np.float32), cv2.RANSAC, THRESHOLD)
        _, m_ref = cv2.findHomography(ref[ci].astype(np.float32), ref[qi].astype(np.float32), cv2.RANSAC, THRESHOLD)
        np.testing.assert_array_equal(m_ours, m_ref)
