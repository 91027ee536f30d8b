"""Miners (vprkit.training.miners): known triplets on hand-made embeddings, GPS masks, offline mining."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import LpDistance

from vprkit.errors import ConfigError
from vprkit.training import (
    MINERS,
    BatchAllMiner,
    BatchEasyHardMiner,
    BatchHardMiner,
    GeoMiner,
    MultiSimilarityMiner,
    OfflineHardNegativeMiner,
    PlaceLabels,
    TripletMiner,
    make_loss,
)

# 1-D embeddings (as 2-D points) with known triplet types for anchor A and positive P (margin 0.1):
# H at 0.2 is closer to A than P is (hard), S at 0.35 is farther but within the margin (semi-hard),
# E at 1.0 is beyond the margin (easy).
A, P, H, S, E = 0, 1, 2, 3, 4
LINE_EMB = torch.tensor([[0.0, 0.0], [0.3, 0.0], [0.2, 0.0], [0.35, 0.0], [1.0, 0.0]])
LINE_LABELS = torch.tensor([0, 0, 1, 1, 1])


def _raw_l2():
    return LpDistance(normalize_embeddings=False)


def _triplets(out) -> set[tuple[int, int, int]]:
    return set(zip(*(t.tolist() for t in out)))


def _reference_triplets(emb, labels, kind, margin):
    d = torch.cdist(emb, emb)
    out = set()
    for a, p, n in itertools.product(range(len(emb)), repeat=3):
        if a == p or labels[a] != labels[p] or labels[n] == labels[a]:
            continue
        m = float(d[a, n] - d[a, p])
        if {"easy": m > margin, "semihard": 0 < m <= margin, "hard": m <= 0, "all": m <= margin}[kind]:
            out.add((a, p, n))
    return out


@pytest.mark.parametrize("kind, expected", [("hard", (A, P, H)), ("semihard", (A, P, S)), ("easy", (A, P, E))])
def test_triplet_miner_finds_the_known_triplet(kind, expected):
    miner = TripletMiner(kind, margin=0.1, distance=_raw_l2())
    got = _triplets(miner(LINE_EMB, LINE_LABELS))
    from_a = {t for t in got if t[:2] == (A, P)}
    assert from_a == {expected}
    assert got == _reference_triplets(LINE_EMB, LINE_LABELS, kind, 0.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["easy", "semihard", "hard", "all"])
def test_triplet_miner_matches_loop_on_random_embeddings(seed, kind):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(16, 3, generator=g)
    labels = torch.randint(0, 4, (16,), generator=g)
    miner = TripletMiner(kind, margin=0.5, distance=_raw_l2())
    got = _triplets(miner(emb, labels))
    assert got == _reference_triplets(emb, labels, kind, 0.5)
    d = torch.cdist(emb, emb)
    margins = [float(d[a, n] - d[a, p]) for a, p, n in got]
    assert miner.last_stats["tuples"] == len(got)
    if got:
        assert miner.last_stats["mean_margin"] == pytest.approx(np.mean(margins), abs=1e-5)


def test_batch_all_returns_every_valid_triplet():
    got = _triplets(BatchAllMiner(distance=_raw_l2())(LINE_EMB, LINE_LABELS))
    assert got == _reference_triplets(LINE_EMB, LINE_LABELS, "all", math.inf)
    assert len(got) == 2 * 3 + 3 * 2 * 2  # label 0: 2 anchors × 1 pos × 3 neg; label 1: 3 × 2 × 2


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_hard_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(12, 4, generator=g)
    labels = torch.arange(4).repeat_interleave(3)
    d = torch.cdist(emb / emb.norm(dim=1, keepdim=True), emb / emb.norm(dim=1, keepdim=True))
    want = set()
    for a in range(12):
        pos = [j for j in range(12) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(12) if labels[j] != labels[a]]
        want.add((a, max(pos, key=lambda j: float(d[a, j])), min(neg, key=lambda j: float(d[a, j]))))
    miner = BatchHardMiner()
    assert _triplets(miner(emb, labels)) == want
    assert miner.last_stats["tuples"] == 12


def test_batch_easy_hard_and_registry_names():
    out = BatchEasyHardMiner(pos_strategy="easy", neg_strategy="hard")(LINE_EMB, LINE_LABELS)
    assert len(out) == 4
    for name in (
        "triplet-easy",
        "triplet-semihard",
        "triplet-hard",
        "triplet-all",
        "batch-all",
        "batch-hard",
        "batch-easy-hard",
        "multi-similarity",
        "gps",
    ):
        assert name in MINERS
    assert MINERS.get("triplet-hard")().type_of_triplets == "hard"
    assert MINERS.get("multi-similarity")().epsilon == pytest.approx(0.1)
    with pytest.raises(ConfigError):
        TripletMiner("medium")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_similarity_miner_matches_its_rule(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(12, 5, generator=g)
    labels = torch.arange(3).repeat_interleave(4)
    miner = MultiSimilarityMiner()
    a1, p, a2, n = miner(emb, labels)
    x = emb / emb.norm(dim=1, keepdim=True)
    s = x @ x.T
    want_pos, want_neg = set(), set()
    for a in range(12):
        pos = [j for j in range(12) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(12) if labels[j] != labels[a]]
        hardest_neg = max(float(s[a, j]) for j in neg)
        hardest_pos = min(float(s[a, j]) for j in pos)
        want_pos |= {(a, j) for j in pos if float(s[a, j]) - 0.1 < hardest_neg}
        want_neg |= {(a, j) for j in neg if float(s[a, j]) + 0.1 > hardest_pos}
    assert set(zip(a1.tolist(), p.tolist())) == want_pos
    assert set(zip(a2.tolist(), n.tolist())) == want_neg
    stats = miner.last_stats
    assert stats["tuples"] == len(want_pos) + len(want_neg)
    mean_pos = np.mean([float(s[i, j]) for i, j in want_pos])
    mean_neg = np.mean([float(s[i, j]) for i, j in want_neg])
    assert stats["mean_margin"] == pytest.approx(mean_pos - mean_neg, abs=1e-5)  # similarity: pos − neg


def test_miners_log_their_counts(caplog):
    with caplog.at_level(logging.DEBUG, logger="vprkit.training.miners"):
        TripletMiner("all", margin=0.1, distance=_raw_l2())(LINE_EMB, LINE_LABELS)
    assert any("mined" in r.getMessage() and "mean margin" in r.getMessage() for r in caplog.records)


# --- the GPS-aware miner --------------------------------------------------------------------------
# Anchor at 0 m; positives at 4 m and 8 m; a soft positive at 16 m; negatives at 40 m and 60 m.
GEO_XY = np.array([[0.0, 0.0], [4.0, 0.0], [8.0, 0.0], [16.0, 0.0], [40.0, 0.0], [60.0, 0.0]])
# In descriptor space the soft image is the anchor's nearest neighbour.
GEO_EMB = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.2, 0.0], [0.05, 0.0], [0.3, 0.0], [0.6, 0.0]])


def _anchor0(out):
    return {t for t in _triplets(out) if t[0] == 0}


def test_geo_miner_hardest_and_easiest():
    places = PlaceLabels.from_poses(GEO_XY)
    ids = torch.arange(6)
    miner = GeoMiner(places, distance=_raw_l2())
    assert _anchor0(miner(GEO_EMB, ids)) == {(0, 2, 4)}  # NetVLAD's best positive, hardest sure negative
    miner = GeoMiner(places, positive="hardest", negatives_per_anchor=2, distance=_raw_l2())
    assert _anchor0(miner(GEO_EMB, ids)) == {(0, 1, 4), (0, 1, 5)}
    miner = GeoMiner(places, negative="semihard", margin=0.15, negatives_per_anchor=3, distance=_raw_l2())
    assert _anchor0(miner(GEO_EMB, ids)) == {(0, 2, 4)}  # 0.2 < 0.3 < 0.35; 0.6 is too far
    miner = GeoMiner(places, negative="all", margin=0.5, distance=_raw_l2())
    assert _anchor0(miner(GEO_EMB, ids)) == {(0, 2, 4), (0, 2, 5)}
    assert miner.last_stats["tuples"] == len(_triplets(miner(GEO_EMB, ids)))
    # The soft positive (image 3) is never a negative of the anchor, nor of the other two positives.
    for neg in ("hardest", "semihard", "all"):
        out = GeoMiner(places, negative=neg, margin=1.0, negatives_per_anchor=6, distance=_raw_l2())(GEO_EMB, ids)
        assert not any(n == 3 and a in (0, 1, 2) for a, _, n in _triplets(out))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("negative", ["hardest", "semihard", "all"])
def test_geo_miner_respects_masks_on_random_sets(seed, negative):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 80, (40, 2))
    places = PlaceLabels.from_poses(xy)
    emb = torch.from_numpy(rng.normal(size=(40, 4))).float()
    ids = torch.from_numpy(rng.permutation(40)[:30])
    miner = GeoMiner(places, negative=negative, margin=0.3, negatives_per_anchor=2)
    out = miner(emb[ids], ids)
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    trip = _triplets(out)
    assert trip
    for a, p, n in trip:
        ga, gp, gn = int(ids[a]), int(ids[p]), int(ids[n])
        assert 0 < dist[ga, gp] <= 10 and dist[ga, gn] > 25
    if negative == "hardest":
        x = emb[ids] / emb[ids].norm(dim=1, keepdim=True)
        d = torch.cdist(x, x)
        pos, neg = places.masks(ids)
        for a in {t[0] for t in trip}:
            order = [j for j in torch.argsort(d[a]).tolist() if neg[a, j]]
            assert {n for aa, _, n in trip if aa == a} == set(order[:2])
    # Explicit masks give the same result.
    pos, neg = places.masks(ids)
    assert _triplets(miner.mine_masks(emb[ids], pos, neg)) == trip


def test_geo_miner_with_reference_set_feeds_a_loss():
    places = PlaceLabels.from_poses(GEO_XY[:1], ref_xy=GEO_XY[1:])  # query 0 against the other five
    miner = GeoMiner(places, distance=_raw_l2())
    ref = GEO_EMB[1:].clone().requires_grad_(True)
    out = miner(GEO_EMB[:1], torch.tensor([0]), ref, torch.arange(5))
    assert _triplets(out) == {(0, 1, 3)}  # reference 1 is the image at 8 m, reference 3 the one at 40 m
    loss = make_loss("triplet", places=places, distance=_raw_l2(), margin=0.2)(
        GEO_EMB[:1], torch.tensor([0]), out, ref, torch.arange(5)
    )
    assert loss.item() == pytest.approx(0.2 - 0.3 + 0.2, abs=1e-6)
    loss.backward()
    assert torch.all(ref.grad[2] == 0) and ref.grad[1].abs().sum() > 0
    with pytest.raises(ConfigError):
        GeoMiner()(GEO_EMB, torch.arange(6))  # no places: use mine_masks


# --- NetVLAD-style offline mining ------------------------------------------------------------------
class Model:
    """A 'model' whose descriptors are rows of a table; counts calls and images described."""

    def __init__(self, n, dim=8, seed=0):
        self.table = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
        self.calls = 0
        self.images = 0

    def __call__(self, ids):
        self.calls += 1
        self.images += len(ids)
        return self.table[ids]


def _line_places(n=120, step=3.0):
    xy = np.stack([np.arange(n) * step, np.zeros(n)], axis=1)
    return PlaceLabels.from_poses(xy), np.linalg.norm(xy[:, None] - xy[None], axis=2)


def test_offline_miner_returns_the_hardest_pool_negatives():
    places, dist = _line_places()
    model = Model(120)
    miner = OfflineHardNegativeMiner(
        places, model, pool_size=10_000, negatives_per_query=10, refresh_every=1000, seed=0
    )
    queries = torch.tensor([0, 17, 60, 119])
    mined = miner.mine(queries)
    x = model.table / model.table.norm(dim=1, keepdim=True)
    d = torch.cdist(x, x)
    for row, q in enumerate(queries.tolist()):
        negs = [j for j in torch.argsort(d[q]).tolist() if dist[q, j] > 25]
        assert mined.negatives[row].tolist() == negs[:10]  # the pool is everything: exact
        poss = [j for j in range(120) if j != q and dist[q, j] <= 10]
        assert mined.positives[row].item() == min(poss, key=lambda j: float(d[q, j]))  # best positive
    assert miner.last_stats["tuples"] == 40
    # Small blocks (one query row, a few cache columns at a time) give the same answer.
    small = OfflineHardNegativeMiner(places, model, pool_size=10_000, negatives_per_query=10, max_block=20, seed=0)
    again = small.mine(queries)
    assert torch.equal(again.negatives, mined.negatives) and torch.equal(again.positives, mined.positives)
    margins = [
        float(d[q, n] - d[q, p])
        for q, p, ns in zip(queries.tolist(), mined.positives.tolist(), mined.negatives.tolist())
        for n in ns
    ]
    assert miner.last_stats["mean_margin"] == pytest.approx(np.mean(margins), abs=1e-5)


def test_offline_miner_never_samples_soft_positives_and_keeps_old_hard_negatives():
    places, dist = _line_places()
    miner = OfflineHardNegativeMiner(places, Model(120), pool_size=1, negatives_per_query=3, seed=1)
    q = torch.arange(0, 120, 7)
    first = miner.mine(q)
    second = miner.mine(q)
    for f, s, qq in zip(first.negatives.tolist(), second.negatives.tolist(), q.tolist()):
        kept = [n for n in f if n >= 0]
        assert len(kept) == 1 and set(kept) <= set(s)  # last call's hard negative stays in the pool
        assert all(dist[qq, n] > 25 for n in s if n >= 0)


def test_offline_miner_refreshes_on_schedule():
    places, _ = _line_places()
    model = Model(120)
    miner = OfflineHardNegativeMiner(places, model, refresh_every=3, chunk_size=50, seed=2)
    q = torch.tensor([5, 50])
    model.calls = model.images = 0
    refreshes = []
    for step in range(7):
        miner.mine(q, query_desc=model.table[q])
        refreshes.append(miner.refreshes)
    assert refreshes == [1, 1, 1, 2, 2, 2, 3]
    assert model.images == 3 * 120 and model.calls == 3 * 3  # chunks of 50: 50 + 50 + 20
    # Between refreshes the cache is stale by design; a refresh picks up the new model.
    model.table[:] = -model.table
    for step in (8, 9):
        miner.mine(q, query_desc=model.table[q])
        assert not torch.equal(miner.cache, model.table)
    miner.mine(q, query_desc=model.table[q])  # call 10 = 3·3 + 1
    assert torch.equal(miner.cache, model.table) and miner.refreshes == 4


def test_offline_miner_memory_bound_and_batch():
    places, dist = _line_places()
    model = Model(120, dim=16)
    # 120 × 16 float32 = 7,680 bytes; 3,000 bytes hold 93 float16 descriptors.
    miner = OfflineHardNegativeMiner(places, model, max_cache_bytes=3000, negatives_per_query=4, seed=3)
    mined = miner.mine(torch.tensor([3, 40, 90]))
    assert miner.cache.dtype == torch.float16 and miner.cache.shape == (93, 16)
    assert set(miner.cache_ids.tolist()) <= set(range(120))
    for q, p, ns in zip(mined.queries.tolist(), mined.positives.tolist(), mined.negatives.tolist()):
        assert p < 0 or dist[q, p] <= 10
        assert all(n in set(miner.cache_ids.tolist()) and dist[q, n] > 25 for n in ns if n >= 0)
    image_ids, (a, p, n) = mined.batch()
    assert torch.equal(image_ids, torch.unique(image_ids))
    got = set(zip(image_ids[a].tolist(), image_ids[p].tolist(), image_ids[n].tolist()))
    want = {
        (q, pp, nn)
        for q, pp, ns in zip(mined.queries.tolist(), mined.positives.tolist(), mined.negatives.tolist())
        for nn in ns
        if pp >= 0 and nn >= 0
    }
    assert got == want
    with pytest.raises(ConfigError):
        OfflineHardNegativeMiner(places, model, max_cache_bytes=10).refresh()
