"""Losses (vprkit.training.losses): the quadruplet loss against a loop, the registry, geographic masks.

As pytorch-metric-learning tests its own losses: random embeddings over several seeds compared with
a straightforward loop, gradients flow, and zero loss once every margin holds.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.reducers import MeanReducer

from vprkit.errors import ConfigError
from vprkit.training import (
    LOSSES,
    GeoMaskedLoss,
    PlaceLabels,
    QuadrupletIndices,
    QuadrupletLoss,
    is_classifier_loss,
    make_loss,
)
from vprkit.training.losses import CLASSIFIER_LOSSES

TOL = dict(rtol=1e-6, atol=1e-8)
DISTANCES = {
    "l2": (lambda: LpDistance(), lambda x, y: torch.linalg.norm(x / x.norm() - y / y.norm()), False),
    "l2-squared": (
        lambda: LpDistance(power=2),
        lambda x, y: torch.linalg.norm(x / x.norm() - y / y.norm()) ** 2,
        False,
    ),
    "cosine": (lambda: CosineSimilarity(), lambda x, y: torch.dot(x / x.norm(), y / y.norm()), True),
}


def _batch(seed: int, n_classes: int = 4, per_class: int = 3, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n_classes * per_class, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    return emb, labels


def _reference_quadruplet(emb, labels, m1, m2, dist, inverted, second="all", ref_emb=None, ref_labels=None):
    """The loop the paper describes: Σ [d(a,p) − d(a,n1) + m1]₊ + Σ [d(a,p) − d(n1,n2) + m2]₊, mean of non-zero."""
    ref = emb if ref_emb is None else ref_emb
    rl = labels if ref_labels is None else ref_labels
    same_set = ref_emb is None

    def margin(x, y):  # how much x is "closer" than y
        return (y - x) if inverted else (x - y)

    first, rest = [], []
    for a in range(len(emb)):
        for p in range(len(ref)):
            if rl[p] != labels[a] or (same_set and p == a):
                continue
            dap = dist(emb[a], ref[p])
            for n in range(len(ref)):
                if rl[n] == labels[a]:
                    continue
                first.append(torch.relu(margin(dap, dist(emb[a], ref[n])) + m1))
                cands = [k for k in range(len(ref)) if rl[k] != labels[a] and rl[k] != rl[n]]
                if second == "hardest" and cands:
                    d = [float(dist(ref[n], ref[k]).detach()) for k in cands]
                    cands = [cands[int(np.argmax(d) if inverted else np.argmin(d))]]
                for n2 in cands:
                    rest.append(torch.relu(margin(dap, dist(ref[n], ref[n2])) + m2))
    losses = torch.stack(first + rest)
    nz = losses[losses > 0]
    return nz.mean() if len(nz) else torch.zeros((), dtype=emb.dtype)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("distance", sorted(DISTANCES))
@pytest.mark.parametrize("second", ["all", "hardest"])
def test_quadruplet_matches_loop(seed, distance, second):
    make_distance, dist, inverted = DISTANCES[distance]
    emb, labels = _batch(seed)
    m1, m2 = (0.1, 0.05) if not inverted else (0.3, 0.2)
    loss_fn = QuadrupletLoss(margin=m1, second_margin=m2, second_negatives=second, distance=make_distance())
    got = loss_fn(emb, labels)
    want = _reference_quadruplet(emb, labels, m1, m2, dist, inverted, second)
    torch.testing.assert_close(got, want, **TOL)
    assert got > 0


@pytest.mark.parametrize("seed", [4, 5])
def test_quadruplet_with_reference_set_matches_loop(seed):
    emb, labels = _batch(seed, per_class=2)
    ref, ref_labels = _batch(seed + 100, per_class=2)
    loss_fn = QuadrupletLoss(margin=0.2, second_margin=0.1)
    got = loss_fn(emb, labels, ref_emb=ref, ref_labels=ref_labels)
    want = _reference_quadruplet(emb, labels, 0.2, 0.1, DISTANCES["l2"][1], False, ref_emb=ref, ref_labels=ref_labels)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("seed", [6, 7])
def test_quadruplet_with_explicit_quadruplets_and_triplets(seed):
    emb, labels = _batch(seed)
    dist = DISTANCES["l2"][1]
    g = torch.Generator().manual_seed(seed)
    quads = [
        (a, p, n1, n2)
        for a, p, n1, n2 in itertools.product(range(12), repeat=4)
        if a != p and labels[a] == labels[p] and labels[n1] != labels[a] and labels[n2] not in (labels[a], labels[n1])
    ]
    pick = [quads[i] for i in torch.randperm(len(quads), generator=g)[:40].tolist()]
    idx = QuadrupletIndices(*(torch.tensor(c) for c in zip(*pick)))
    got = QuadrupletLoss(margin=0.2, second_margin=0.1)(emb, indices_tuple=idx)  # no labels needed
    first = {(a, p, n1) for a, p, n1, _ in pick}
    terms = [torch.relu(dist(emb[a], emb[p]) - dist(emb[a], emb[n]) + 0.2) for a, p, n in sorted(first)]
    terms += [torch.relu(dist(emb[a], emb[p]) - dist(emb[n1], emb[n2]) + 0.1) for a, p, n1, n2 in pick]
    t = torch.stack(terms)
    torch.testing.assert_close(got, t[t > 0].mean(), **TOL)
    # A triplet tuple with labels: n2 from the labels, as in the full computation restricted to those triplets.
    trip = tuple(torch.tensor(c) for c in zip(*sorted(first)))
    got3 = QuadrupletLoss(margin=0.2, second_margin=0.1)(emb, labels, indices_tuple=trip)
    terms = [torch.relu(dist(emb[a], emb[p]) - dist(emb[a], emb[n]) + 0.2) for a, p, n in sorted(first)]
    terms += [
        torch.relu(dist(emb[a], emb[p]) - dist(emb[n], emb[k]) + 0.1)
        for a, p, n in sorted(first)
        for k in range(12)
        if labels[k] not in (labels[a], labels[n])
    ]
    t = torch.stack(terms)
    torch.testing.assert_close(got3, t[t > 0].mean(), **TOL)
    with pytest.raises(ValueError):
        QuadrupletLoss()(emb, indices_tuple=trip)  # a triplet without labels cannot pick n2


def test_quadruplet_gradients_flow_and_zero_when_margins_hold():
    emb, labels = _batch(0)
    loss = QuadrupletLoss()(emb, labels)
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    # Each class on its own axis: d(a,p) ≈ 0, d(a,n) = d(n1,n2) ≈ √2 ≫ the margins.
    labels = torch.arange(4).repeat_interleave(3)
    clean = torch.nn.functional.one_hot(labels, 6).double() + 0.001 * torch.randn(12, 6, dtype=torch.float64)
    clean.requires_grad_(True)
    zero = QuadrupletLoss()(clean, labels)
    assert zero.item() == 0.0
    zero.backward()  # still differentiable
    assert QuadrupletLoss()(clean, torch.zeros(12, dtype=torch.long)).item() == 0.0  # no negatives at all


def test_quadruplet_options():
    with pytest.raises(ConfigError):
        QuadrupletLoss(second_negatives="random")


# --- the registry -------------------------------------------------------------------------------------
REQUIRED = {
    "contrastive",
    "triplet",
    "quadruplet",
    "proxy-nca",
    "proxy-anchor",
    "infonce",
    "nt-xent",
    "cosface",
    "arcface",
    "multi-similarity",
}


def test_registry_has_every_loss():
    assert REQUIRED <= set(LOSSES.names())
    with pytest.raises(ConfigError, match="available"):
        LOSSES.get("tripplet")
    with pytest.raises(ConfigError, match="num_classes"):
        make_loss("cosface")


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_loss_has_the_uniform_signature(name):
    emb, labels = _batch(11, dim=8)
    emb = emb.float().detach().requires_grad_(True)
    kwargs = {"num_classes": 4, "embedding_size": 8} if name in CLASSIFIER_LOSSES else {}
    loss_fn = make_loss(name, **kwargs)
    assert is_classifier_loss(loss_fn) == (name in CLASSIFIER_LOSSES)
    value = loss_fn(emb, labels, None, None, None)
    assert value.ndim == 0 and torch.isfinite(value) and value > 0
    value.backward()
    assert emb.grad.abs().sum() > 0
    value2 = loss_fn(embeddings=emb, labels=labels, indices_tuple=None, ref_emb=None, ref_labels=None)
    torch.testing.assert_close(value, value2)


def test_defaults_follow_the_training_conventions():
    assert make_loss("triplet").margin == pytest.approx(0.1)
    ms = make_loss("multi-similarity")
    assert (ms.alpha, ms.beta, ms.base) == (1.0, 50.0, 0.0)
    cf = make_loss("cosface", num_classes=3, embedding_size=4)
    assert (cf.scale, cf.margin) == (30.0, pytest.approx(0.40))
    assert make_loss("infonce").temperature == pytest.approx(0.07)
    q = make_loss("quadruplet")
    assert (q.margin, q.second_margin) == (0.1, 0.05)
    assert make_loss("triplet", margin=0.3).margin == 0.3  # options pass through


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_registry_triplet_matches_loop(seed):
    emb, labels = _batch(seed)
    dist = DISTANCES["l2"][1]
    terms = [
        torch.relu(dist(emb[a], emb[p]) - dist(emb[a], emb[n]) + 0.1)
        for a, p, n in itertools.product(range(12), repeat=3)
        if a != p and labels[a] == labels[p] and labels[n] != labels[a]
    ]
    t = torch.stack(terms)
    torch.testing.assert_close(make_loss("triplet")(emb, labels), t[t > 0].mean(), **TOL)


# --- geographic masks -----------------------------------------------------------------------------
# 0–4 m and 32–36 m are positives; the image at 16 m is a soft positive of every other image.
SOFT_LINE = np.array([[0.0, 0.0], [4.0, 0.0], [16.0, 0.0], [32.0, 0.0], [36.0, 0.0]])


@pytest.mark.parametrize("name", ["triplet", "contrastive", "multi-similarity", "infonce", "quadruplet"])
def test_soft_positives_are_never_negatives(name):
    places = PlaceLabels.from_poses(SOFT_LINE)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 8, generator=g, requires_grad=True)
    loss_fn = make_loss(name, places=places)
    assert isinstance(loss_fn, GeoMaskedLoss)
    value = loss_fn(emb, torch.arange(5))
    value.backward()
    assert value > 0
    assert torch.all(emb.grad[2] == 0)  # the soft image takes no part
    assert emb.grad[[0, 1, 3, 4]].abs().sum() > 0


def test_geo_masked_triplet_equals_explicit_triplets():
    places = PlaceLabels.from_poses(SOFT_LINE)
    emb = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dist = np.linalg.norm(SOFT_LINE[:, None] - SOFT_LINE[None], axis=2)
    trip = [
        (a, p, n)
        for a, p, n in itertools.product(range(5), repeat=3)
        if a != p and dist[a, p] <= 10 and dist[a, n] > 25
    ]
    explicit = LOSSES.get("triplet")()(emb, indices_tuple=tuple(torch.tensor(c) for c in zip(*trip)))
    for tuples in ("pairs", "triplets"):
        geo = GeoMaskedLoss(LOSSES.get("triplet")(), places, tuples=tuples)(emb, torch.arange(5))
        torch.testing.assert_close(geo, explicit)


def test_geo_masked_loss_with_reference_set_and_given_tuple():
    places = PlaceLabels.from_poses(SOFT_LINE[[0, 3]], ref_xy=SOFT_LINE)
    emb = torch.randn(2, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    ref = torch.randn(5, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
    loss = make_loss("triplet", places=places)(emb, torch.arange(2), ref_emb=ref, ref_labels=torch.arange(5))
    loss.backward()
    assert loss > 0 and torch.all(ref.grad[2] == 0)
    given = (torch.tensor([0]), torch.tensor([1]), torch.tensor([3]))
    direct = make_loss("triplet")(emb, indices_tuple=given, ref_emb=ref)
    torch.testing.assert_close(
        make_loss("triplet", places=places)(emb, torch.arange(2), given, ref, torch.arange(5)), direct
    )
    with pytest.raises(ValueError):
        make_loss("triplet", places=places)(emb, torch.arange(2), ref_emb=ref)  # reference ids missing


def test_geo_masked_classifier_loss_uses_place_classes():
    frames = PlaceLabels.from_frames(["a.png", "b.png", "c.png", "a.png", "b.png", "c.png"])
    emb = torch.randn(6, 8, requires_grad=True)
    loss_fn = make_loss("cosface", places=frames, embedding_size=8)
    assert loss_fn.loss.num_classes == 3
    ids = torch.tensor([5, 0, 3])
    value = loss_fn(emb[ids], ids)
    torch.testing.assert_close(value, loss_fn.loss(emb[ids], torch.tensor([2, 0, 0])))
    with pytest.raises(ConfigError):
        make_loss("arcface", places=PlaceLabels.from_poses(SOFT_LINE), num_classes=2, embedding_size=8)


def test_geo_masked_quadruplet_equals_loop_over_masks():
    # Three places (0–4 m, 32–36 m, 70–74 m) and an image at 16 m, soft to the first two places and a
    # negative of the third; the loop says which pairs are negatives, so it checks the masks as well.
    xy = np.array([[0.0, 0.0], [4.0, 0.0], [16.0, 0.0], [32.0, 0.0], [36.0, 0.0], [70.0, 0.0], [74.0, 0.0]])
    places = PlaceLabels.from_poses(xy)
    emb = torch.randn(7, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    d = DISTANCES["l2"][1]
    is_pos = lambda i, j: i != j and dist[i, j] <= 10  # noqa: E731
    is_neg = lambda i, j: dist[i, j] > 25  # noqa: E731
    trip = [(a, p, n) for a, p, n in itertools.product(range(7), repeat=3) if is_pos(a, p) and is_neg(a, n)]
    terms = [torch.relu(d(emb[a], emb[p]) - d(emb[a], emb[n]) + 0.1) for a, p, n in trip]
    terms += [
        torch.relu(d(emb[a], emb[p]) - d(emb[n], emb[k]) + 0.05)
        for a, p, n in trip
        for k in range(7)
        if is_neg(a, k) and is_neg(n, k)
    ]
    t = torch.stack(terms)
    got = make_loss("quadruplet", places=places)(emb, torch.arange(7))
    torch.testing.assert_close(got, t[t > 0].mean(), **TOL)
    # With two places only there is no n2: the first term alone remains.
    lone = QuadrupletIndices(torch.tensor([0]), torch.tensor([1]), torch.tensor([3]), torch.tensor([-1]))
    want = torch.relu(d(emb[0], emb[1]) - d(emb[0], emb[3]) + 0.1)
    torch.testing.assert_close(
        QuadrupletLoss()(emb, indices_tuple=lone), want if want > 0 else torch.zeros((), dtype=torch.float64)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miner_and_masked_loss_train_a_linear_head(seed):
    """The pieces fit: GPS miner → index tuple → masked loss → gradients that lower the loss."""
    from vprkit.training import GeoMiner

    g = torch.Generator().manual_seed(seed)
    places_xy = torch.arange(8, dtype=torch.float64).repeat_interleave(4) * 50.0  # 8 places 50 m apart
    xy = np.stack([places_xy.numpy() + np.tile([0.0, 2.0, 4.0, 6.0], 8), np.zeros(32)], axis=1)
    places = PlaceLabels.from_poses(xy)
    centres = torch.randn(8, 16, generator=g)
    features = centres.repeat_interleave(4, dim=0) + 1.5 * torch.randn(32, 16, generator=g)
    head = torch.nn.Linear(16, 8)
    with torch.no_grad():  # seeded, so the test does not depend on the global RNG
        head.weight.copy_(0.25 * torch.randn(8, 16, generator=g))
        head.bias.zero_()
    loss_fn = make_loss("triplet", places=places)
    # Progress is judged on the mean over *all* triplets (the default reducer averages non-zero ones only).
    full = make_loss("triplet", places=places, reducer=MeanReducer())
    miner = GeoMiner(places, positive="hardest", negative="all", margin=0.1)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    ids = torch.arange(32)
    before = full(head(features), ids).item()
    for _ in range(40):
        emb = head(features)
        loss = loss_fn(emb, ids, miner(emb, ids))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = full(head(features), ids).item()
    assert after < 0.25 * before
