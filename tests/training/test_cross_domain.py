"""Cross-domain negatives (vprkit.training.labels.PlaceLabels.with_domains) through masks, miners, losses and the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import synchronised_seasons
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError
from vprkit.training import BatchAllMiner, GeoMiner, PlaceLabels, build_head, make_loss
from vprkit.training.labels import restrict_tuples
from vprkit.training.recipe import prepare
from vprkit.training.trainer import TrainSettings, Trainer

# Three places × two seasons: ids 0–2 summer of places 0–2, ids 3–5 winter of places 0–2.
FRAMES = [0, 1, 2, 0, 1, 2]
SEASONS = [0, 0, 0, 1, 1, 1]
SUMMER, WINTER = (0, 1, 2), (3, 4, 5)


def _sets(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {tuple(x) for x in torch.nonzero(mask).tolist()}


def _cross() -> PlaceLabels:
    return PlaceLabels.from_frames(FRAMES).with_domains(SEASONS)


def test_cross_domain_masks_pin_exactly_the_other_seasons_other_places():
    pos, neg = _cross().masks(np.arange(6))
    assert _sets(pos) == {(0, 3), (3, 0), (1, 4), (4, 1), (2, 5), (5, 2)}  # positives unchanged
    expected = {(s, w) for s in SUMMER for w in WINTER if FRAMES[s] != FRAMES[w]}
    assert _sets(neg) == expected | {(w, s) for s, w in expected}
    assert len(expected) == 6  # summer 0 ↔ winter 1, 2; summer 1 ↔ winter 0, 2; summer 2 ↔ winter 0, 1
    # Without the rule, same-season pairs of other places are negatives too.
    _, neg_any = PlaceLabels.from_frames(FRAMES).masks(np.arange(6))
    assert neg_any[0, 1] and neg_any[3, 4] and not neg[0, 1] and not neg[3, 4]


def test_domains_alone_keep_every_negative_and_unknown_domains_are_never_negatives():
    _, neg_any = PlaceLabels.from_frames(FRAMES).masks(np.arange(6))
    _, neg_rec = PlaceLabels.from_frames(FRAMES).with_domains(SEASONS, negatives="any").masks(np.arange(6))
    assert torch.equal(neg_any, neg_rec)
    _, neg = PlaceLabels.from_frames(FRAMES).with_domains([0, 0, -1, 1, 1, 1]).masks(np.arange(6))
    assert not neg[2].any() and not neg[:, 2].any() and neg[0, 4]


def test_cross_domain_rule_errors_and_survives_with_classes():
    with pytest.raises(ConfigError, match="domain"):
        PlaceLabels(6, classes=np.array(FRAMES), negatives="cross-domain")
    with pytest.raises(ConfigError, match="negatives must be"):
        PlaceLabels.from_frames(FRAMES).with_domains(SEASONS, negatives="other")
    with pytest.raises(ConfigError, match="domains has 5"):
        PlaceLabels.from_frames(FRAMES).with_domains(SEASONS[:5])
    pl = _cross().with_classes(np.array([5, 6, 7, 5, 6, 7]))
    assert pl.negatives == "cross-domain" and not pl.masks(np.arange(6))[1][0, 1]
    assert pl.class_labels([0, 4]).tolist() == [5, 6]


def test_rectangular_labels_take_reference_domains():
    pl = PlaceLabels.from_frames([0, 1], [0, 1, 1], tolerance=0).with_domains([1, 1], ref_domains=[0, 0, 1])
    pos, neg = pl.masks([0, 1], [0, 1, 2])
    assert pos.tolist() == [[True, False, False], [False, True, True]]
    assert neg.tolist() == [[False, True, False], [True, False, False]]  # ref 2 is winter like the queries


def test_restrict_tuples_filters_pairs_and_triplets():
    pos, neg = _cross().masks(np.arange(6))
    t = lambda *xs: tuple(torch.tensor(x) for x in xs)  # noqa: E731
    a1, p, a2, n = restrict_tuples(t([0, 0, 1], [3, 1, 4], [0, 0, 3, 3], [1, 4, 4, 0]), pos, neg)
    assert list(zip(a1.tolist(), p.tolist())) == [(0, 3), (1, 4)]  # (0, 1) is no positive pair
    assert list(zip(a2.tolist(), n.tolist())) == [(0, 4)]  # same season (0,1), (3,4) and a positive (3,0) dropped
    a, p, n = restrict_tuples(t([0, 0, 3], [3, 3, 0], [1, 5, 5]), pos, neg)
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == [(0, 3, 5)]
    with pytest.raises(ConfigError):
        restrict_tuples(t([0], [1]), pos, neg)


def _emb() -> torch.Tensor:
    # Summer images cluster together, winter images cluster together: every same-season
    # pair is closer than any cross-season pair, so an unrestricted miner mines same-season negatives.
    base = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [1.0, 0.0, 0.1], [0.0, 1.0, 0.0], [0.0, 1.0, 0.1], [0.1, 1.0, 0.0]]
    )
    return torch.nn.functional.normalize(base, dim=1)


def test_geo_miner_mines_exactly_the_hardest_cross_season_negative():
    emb = _emb()
    ids = torch.arange(6)
    cross = GeoMiner(_cross(), positive="easiest", negative="hardest")(emb, ids)
    got = set(zip(*(x.tolist() for x in cross)))
    d = torch.cdist(emb, emb)
    expected = set()
    for a in range(6):
        p = (a + 3) % 6
        cands = [n for n in range(6) if SEASONS[n] != SEASONS[a] and FRAMES[n] != FRAMES[a]]
        expected.add((a, p, min(cands, key=lambda n: float(d[a, n]))))
    assert got == expected
    anyneg = set(zip(*(x.tolist() for x in GeoMiner(PlaceLabels.from_frames(FRAMES))(emb, ids))))
    assert all(SEASONS[a] == SEASONS[n] for a, _, n in anyneg)  # without the rule: same-season negatives


def test_masked_infonce_with_cross_domain_negatives_is_the_two_way_season_cross_entropy():
    emb = _emb().requires_grad_(True)
    loss = make_loss("infonce", _cross(), temperature=0.1)(emb, torch.arange(6))
    sim = emb[list(WINTER)] @ emb[list(SUMMER)].T / 0.1
    lab = torch.arange(3)
    ref = (torch.nn.functional.cross_entropy(sim, lab) + torch.nn.functional.cross_entropy(sim.T, lab)) / 2
    assert torch.allclose(loss, ref, atol=1e-5)
    loss.backward()
    assert emb.grad.abs().sum() > 0


class _Feats:
    """Features = fixed rows on a 1×1 grid (the batch-all miner's counts do not depend on them)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, ids):
        return DenseFeatures(self.x[torch.as_tensor(ids)].view(len(ids), 1, 1, -1), 1, (1, 1))


def test_trainer_restricts_class_miner_tuples_to_cross_season_negatives():
    head = build_head("gem", 3, (1, 1))
    tr = Trainer(
        head,
        _Feats(_emb()),
        _cross(),
        TrainSettings(epochs=1, places_per_batch=3, images_per_place=2, loss="multi-similarity", miner="batch-all"),
        progress=False,
    )
    assert isinstance(tr.miner, BatchAllMiner)
    ids = tr.sampler.batch(0, 0)
    emb = head(tr.features.batch(ids))
    raw = tr.miner(emb, tr.places.class_labels(ids))
    kept = restrict_tuples(raw, *tr.places.masks(ids))
    dom = np.asarray(SEASONS)[ids]
    # 6 anchors × 1 positive × 4 other places' images; of those 4, the 2 of the other season stay.
    assert len(raw[0]) == 24 and len(kept[0]) == 12
    assert all(dom[a] != dom[n] for a, n in zip(kept[0].tolist(), kept[2].tolist()))
    assert tr.train_step()["mined"] == 12


def test_recipe_negatives_cross_domain_makes_each_folder_a_domain(tmp_path):
    """``[data] negatives = "cross-domain"``: folders are domains, kept through the cache relabelling."""
    synchronised_seasons(tmp_path / "data", 12)
    recipe = {
        "name": "xd",
        "out": str(tmp_path / "run"),
        "_dir": str(tmp_path),
        "backbone": {
            "preset": "effnet-gem",
            "image_size": [64, 64],
            "memory_budget_mb": 64,
            "cache": str(tmp_path / "cache"),
        },
        "data": {
            "root": "data",
            "labels": "frames",
            "folders": ["summer", "winter"],
            "frames": [0, 12],
            "negatives": "cross-domain",
        },
        "validation": {"queries": "winter", "database": "summer", "holdout": 3, "gap": 1},
        "head": {"name": "gem"},
        "loss": {"name": "infonce"},
        "miner": {"name": ""},
        "sampler": {"places": 4, "images_per_place": 2},
        "train": {"epochs": 1, "seed": 0},
    }
    prep = prepare(recipe, progress=False)
    keys = prep.features.keys
    ids = prep.train_ids
    assert prep.places.negatives == "cross-domain"
    season = np.array([keys[i].split("/")[0] == "winter" for i in ids])
    assert np.array_equal(prep.places.domains[ids], season.astype(np.int64))
    _, neg = prep.places.masks(ids)
    frame = np.array([keys[i].split("/")[1] for i in ids])
    expected = (season[:, None] != season[None, :]) & (frame[:, None] != frame[None, :])
    assert np.array_equal(neg.numpy(), expected)
    outside = np.setdiff1d(np.arange(len(keys)), ids)  # validation images: never cross-domain negatives
    assert len(outside) and (prep.places.domains[outside] == -1).all()
    with pytest.raises(ConfigError, match="negatives must be"):
        prepare({**recipe, "data": {**recipe["data"], "negatives": "sideways"}}, progress=False)
    with pytest.raises(ConfigError, match="needs frame labels"):
        prepare(
            {**recipe, "data": {"root": "data", "labels": "poses", "poses": "p.csv", "negatives": "cross-domain"}},
            progress=False,
        )
