"""Place labels from poses, headings, synchronised frames and ground truth (vprkit.training.labels)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import vprkit.training
from vprkit.datasets import GroundTruth
from vprkit.errors import ConfigError
from vprkit.training import PlaceLabels, cosplace_classes, frame_keys

# Points on a line, in metres: 0–5 positive (5 m), 0–12 soft (12 m), 5–30 soft (25 m, the edge),
# 0–30 negative, 60 far from everything.
LINE = np.array([[0.0, 0.0], [5.0, 0.0], [12.0, 0.0], [30.0, 0.0], [60.0, 0.0]])


def _sets(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(x) for x in torch.nonzero(mask).tolist()}


def test_positive_soft_and_negative_by_distance():
    pl = PlaceLabels.from_poses(LINE)
    pos, neg = pl.masks(torch.arange(5))
    assert _sets(pos) == {(0, 1), (1, 0), (1, 2), (2, 1)}  # 7 m between 5 and 12
    # Soft (10 m < d ≤ 25 m): 0–12, 5–30 (exactly 25 m), 12–30 (18 m) are neither.
    for i, j in [(0, 2), (1, 3), (2, 3)]:
        assert not pos[i, j] and not neg[i, j] and not neg[j, i]
    assert neg[0, 3] and neg[3, 0] and neg[0, 4] and neg[3, 4]
    assert not neg.diagonal().any() and not pos.diagonal().any()
    # Masks are symmetric and disjoint.
    assert torch.equal(pos, pos.T) and torch.equal(neg, neg.T) and not (pos & neg).any()
    assert pl.positives_of(1).tolist() == [0, 2]
    assert pl.soft_positives_of(0).tolist() == [1, 2]


def test_soft_radius_none_makes_everything_beyond_radius_negative():
    pl = PlaceLabels.from_poses(LINE, soft_radius=None)
    _, neg = pl.masks(torch.arange(5))
    assert neg[0, 2] and neg[1, 3]


def test_radius_options_and_errors():
    pl = PlaceLabels.from_poses(LINE, radius=15.0, soft_radius=40.0)
    pos, neg = pl.masks(np.arange(5))
    assert pos[0, 2] and not neg[0, 3] and neg[0, 4]
    with pytest.raises(ConfigError):
        PlaceLabels.from_poses(LINE, radius=10.0, soft_radius=5.0)
    with pytest.raises(ConfigError):
        PlaceLabels.from_poses(LINE, max_heading_diff=20.0)  # no headings


def test_unknown_pose_is_neither_positive_nor_negative():
    xy = np.vstack([LINE, [[np.nan, np.nan]]])
    pos, neg = PlaceLabels.from_poses(xy).masks(np.arange(6))
    assert not pos[5].any() and not neg[5].any() and not pos[:, 5].any() and not neg[:, 5].any()


def test_heading_restricts_positives_but_never_makes_negatives():
    xy = np.array([[0.0, 0.0], [3.0, 0.0], [4.0, 0.0], [40.0, 0.0]])
    headings = np.array([350.0, 5.0, 180.0, 0.0])  # 0–1: 15° apart across north; 0–2: opposite
    pl = PlaceLabels.from_poses(xy, headings, max_heading_diff=20.0)
    pos, neg = pl.masks(np.arange(4))
    assert pos[0, 1] and pos[1, 0]
    assert not pos[0, 2] and not neg[0, 2]  # same spot facing away: soft, not a negative
    assert neg[0, 3] and not pos[0, 3]


def test_query_reference_labels_match_ground_truth_from_radius():
    rng = np.random.default_rng(0)
    q, d = rng.uniform(0, 200, (60, 2)), rng.uniform(0, 200, (150, 2))
    pl = PlaceLabels.from_poses(q, ref_xy=d, radius=10, soft_radius=25)
    gt = GroundTruth.from_radius(q, d, radius=10, soft_radius=25)
    for i in range(len(q)):
        assert pl.positives_of(i).tolist() == gt.positives[i].tolist()
        assert pl.soft_positives_of(i).tolist() == gt.soft_positives[i].tolist()
    pos, neg = pl.masks(np.arange(60), np.arange(150))
    assert torch.equal(pos, torch.from_numpy(gt.to_matrix()))
    dist = np.linalg.norm(q[:, None] - d[None], axis=2)
    assert torch.equal(neg, torch.from_numpy(dist > 25))
    with pytest.raises(ConfigError):
        pl.masks(np.arange(3))  # rectangular labels need ref_ids
    back = pl.to_ground_truth()
    assert [p.tolist() for p in back.positives] == [p.tolist() for p in gt.positives]


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_kdtree_equals_brute_force(chunk):
    rng = np.random.default_rng(chunk)
    xy = rng.uniform(0, 150, (400, 2))
    pl = PlaceLabels.from_poses(xy, chunk_size=chunk)
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    pos, neg = pl.masks(np.arange(400))
    assert torch.equal(pos, torch.from_numpy(dist <= 10))
    off_diag = ~np.eye(400, dtype=bool)
    assert torch.equal(neg, torch.from_numpy((dist > 25) & off_diag))


def test_hundred_thousand_images_stay_sparse():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 5000, (100_000, 2))  # ~8 images within 25 m of each other
    pl = PlaceLabels.from_poses(xy)
    assert pl.soft.nnz < 2_000_000 and pl.positives.nnz < pl.soft.nnz
    ids = rng.choice(100_000, 64, replace=False)
    pos, neg = pl.masks(ids)
    d = np.linalg.norm(xy[ids][:, None] - xy[ids][None], axis=2)
    assert torch.equal(pos, torch.from_numpy((d <= 10) & (d > 0)))
    # Elementwise lookups against the whole set agree with distances.
    j = rng.integers(0, 100_000, 5000)
    i = rng.integers(0, 100_000, 5000)
    dd = np.linalg.norm(xy[i] - xy[j], axis=1)
    assert np.array_equal(pl.is_negative(i, j), (dd > 25) & (i != j))


def test_batch_with_reference_ids_and_tuples():
    pl = PlaceLabels.from_poses(LINE)
    pos, neg = pl.masks([0, 3], [1, 4, 0])
    assert pos.tolist() == [[True, False, False], [False, False, False]]
    assert neg.tolist() == [[False, True, False], [False, True, True]]
    a1, p, a2, n = pl.pairs(torch.arange(5))
    assert {(int(x), int(y)) for x, y in zip(a1, p)} == _sets(pl.masks(torch.arange(5))[0])
    a, p, n = pl.triplets(torch.arange(5))
    P, N = pl.masks(torch.arange(5))
    expected = {(i, j, k) for i in range(5) for j in range(5) for k in range(5) if P[i, j] and N[i, k]}
    assert set(zip(a.tolist(), p.tolist(), n.tolist())) == expected
    assert (0, 1, 3) in expected and not any(t[2] == 2 and t[0] == 0 for t in expected)


def test_classes_give_masks_and_labels():
    pl = PlaceLabels.from_classes([0, 0, 1, 1, -1])
    pos, neg = pl.masks(np.arange(5))
    assert _sets(pos) == {(0, 1), (1, 0), (2, 3), (3, 2)}
    assert neg[0, 2] and not neg[0, 4] and not neg[4, 0]
    assert pl.class_labels([3, 0]).tolist() == [1, 0]
    assert pl.num_classes == 2
    with pytest.raises(ConfigError):
        PlaceLabels.from_poses(LINE).class_labels([0])


# --- CosPlace cells and groups ---------------------------------------------------------------------
def test_cosplace_cells_and_heading_bins():
    xy = np.array([[0.0, 0.0], [9.9, 9.9], [10.0, 0.0], [-0.1, 0.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]])
    headings = np.array([10.0, 20.0, 10.0, 10.0, 29.9, 30.0, 359.0, -10.0])
    cc = cosplace_classes(xy, headings)
    lab = cc.labels
    assert lab[0] == lab[1]  # same 10 m cell, same 0–30° bin
    assert len({lab[0], lab[2], lab[3]}) == 3  # the next cell east, the cell west
    assert lab[4] == lab[0] and lab[5] != lab[4]  # 29.9° vs 30°: bins 0 and 1
    assert lab[6] == lab[7]  # 359° and −10° are both in bin 11
    cell = {tuple(c) for c in cc.cells.tolist()}
    assert (0, 0, 0) in cell and (0, 0, 1) in cell and (0, 0, 11) in cell and (-1, 0, 0) in cell
    assert cc.n_groups == 5 * 5 * 2
    # Group of a class: (east mod 5, north mod 5, heading bin mod 2).
    assert cc.groups[5] == (0 * 5 + 0) * 2 + 1 and cc.groups[3] == (4 * 5 + 0) * 2 + 0


def test_cosplace_groups_keep_classes_apart():
    rng = np.random.default_rng(3)
    xy = rng.uniform(-500, 500, (3000, 2))
    headings = rng.uniform(0, 360, 3000)
    cc = cosplace_classes(xy, headings, cell_m=10, heading_bin_deg=30, n=5, l=2)
    cells, groups = cc.cells, cc.class_groups
    for g in range(cc.n_groups):
        c = cells[groups == g]
        de = np.abs(c[:, None, 0] - c[None, :, 0])
        dn = np.abs(c[:, None, 1] - c[None, :, 1])
        dh = np.abs(c[:, None, 2] - c[None, :, 2])
        dh = np.minimum(dh, 12 - dh)
        same = (de == 0) & (dn == 0) & (dh == 0)
        # Two different classes of one group: ≥ N cells apart (≥ N·M metres between cell origins) or ≥ L bins.
        apart = (de >= 5) | (dn >= 5) | (dh >= 2)
        assert np.all(apart | same)
    images, local = cc.group(0)
    assert np.all(cc.groups[images] == 0) and local.min() == 0 and local.max() == len(np.unique(local)) - 1


def test_cosplace_options():
    xy = np.array([[0.0, 0.0], [15.0, 0.0], [np.nan, 0.0]])
    cc = cosplace_classes(xy, cell_m=20.0)  # no headings: one bin, N·N groups
    assert cc.labels[0] == cc.labels[1] and cc.labels[2] == -1 and cc.n_groups == 25
    assert cosplace_classes(xy, np.zeros(3), heading_bin_deg=45.0, l=2).n_groups == 50
    with pytest.raises(ConfigError):
        cosplace_classes(xy, np.zeros(3), heading_bin_deg=50.0)  # 360/50 is not whole
    with pytest.raises(ConfigError):
        cosplace_classes(xy, np.zeros(3), heading_bin_deg=30.0, l=5)  # 12 bins don't split into L=5
    pl = PlaceLabels.from_poses(xy[:2]).with_classes(cc.labels[:2])
    assert pl.class_labels([0, 1]).tolist() == [0, 0]


# --- frames and list ground truth ------------------------------------------------------------------
@pytest.fixture(scope="module")
def nordland(shared_datasets):
    root = shared_datasets / "nordland-64x32"
    summer = sorted(f"summer/{p.name}" for p in (root / "summer").glob("*.png"))
    winter = sorted(f"winter/{p.name}" for p in (root / "winter").glob("*.png"))
    assert summer and len(summer) == len(winter)
    return summer, winter


def test_nordland_same_frame_across_seasons(nordland):
    summer, winter = nordland
    images = summer + winter  # one training set of both seasons
    n = len(summer)
    pl = PlaceLabels.from_frames(frame_keys(images))
    pos, neg = pl.masks([0, 1, n, n + 1, n + 500])
    # summer/x ↔ winter/x only.
    assert _sets(pos) == {(0, 2), (2, 0), (1, 3), (3, 1)}
    assert neg[0, 1] and neg[0, 3] and neg[0, 4]
    labels = pl.class_labels(np.arange(2 * n))
    assert torch.equal(labels[:n], labels[n:]) and len(torch.unique(labels)) == n
    assert images[n + 17].split("/")[1] == images[17].split("/")[1]


def test_nordland_tolerance_and_soft_frames(nordland):
    summer, winter = nordland
    n = len(summer)
    pl = PlaceLabels.from_frames(frame_keys(summer + winter), tolerance=1, soft_tolerance=3)
    pos, neg = pl.masks([10, n + 9, n + 10, n + 11, n + 12, n + 14])
    assert pos[0].tolist() == [False, True, True, True, False, False]
    assert neg[0].tolist() == [False, False, False, False, False, True]  # ±2, ±3 frames: soft


def test_nordland_queries_against_references_match_ground_truth(nordland):
    summer, winter = nordland
    q, d = frame_keys(winter), frame_keys(summer)
    for tol in (0, 1):
        pl = PlaceLabels.from_frames(q, d, tolerance=tol)
        gt = GroundTruth.from_frames(q, d, tolerance=tol)
        back = pl.to_ground_truth()
        assert all(np.array_equal(a, b) for a, b in zip(back.positives, gt.positives))
    assert torch.equal(pl.class_labels([5]), pl.class_labels([5], ref=True))


def test_integer_frames():
    pl = PlaceLabels.from_frames([0, 10, 20, 0, 10, 21], tolerance=1)
    pos, _ = pl.masks(np.arange(6))
    assert _sets(pos) == {(0, 3), (3, 0), (1, 4), (4, 1), (2, 5), (5, 2)}


def test_from_list_ground_truth_with_soft_positives(tmp_path: Path):
    csv = tmp_path / "gt.csv"
    csv.write_text("query,positives\nq0.jpg,r0.jpg r1.jpg\nq1.jpg,r3.jpg\n")
    gt = GroundTruth.from_list(csv, ["q0.jpg", "q1.jpg"], ["r0.jpg", "r1.jpg", "r2.jpg", "r3.jpg"])
    gt.soft_positives = [np.array([2]), np.array([], dtype=np.int64)]
    pl = PlaceLabels.from_ground_truth(gt)
    pos, neg = pl.masks([0, 1], [0, 1, 2, 3])
    assert pos.tolist() == [[True, True, False, False], [False, False, False, True]]
    assert neg.tolist() == [[False, False, False, True], [True, True, True, False]]


def test_training_never_imports_the_composer_or_faces():
    root = Path(vprkit.training.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")] + [a.name for a in node.names]
            for name in names:
                assert not any(bad in name.split(".") for bad in ("pipeline", "cli", "service")), (path, name)
