"""The spatial-layout head, and the validation protocol: checkpoints are picked on frames held out of
training, never on the evaluated set (which may only be monitored).

Fast: random features on tiny grids, and 64×64 images through EfficientNet-Lite0 for the recipe run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import synchronised_seasons
from vprkit.aggregation import AGGREGATORS
from vprkit.aggregation.layout import SpatialLayout
from vprkit.aggregation.projection import TrainedHead
from vprkit.backbones.base import DenseFeatures
from vprkit.datasets import GroundTruth
from vprkit.errors import ConfigError
from vprkit.options import SCHEMAS
from vprkit.training import PlaceLabels
from vprkit.training.heads import build_head
from vprkit.training.recipe import prepare, run_recipe, split_holdout
from vprkit.training.trainer import MONITOR_PREFIX, Trainer, TrainSettings, Validation

H, W, D = 4, 3, 6


def _feats(b: int = 3, h: int = H, w: int = W, seed: int = 0, grad: bool = False, dtype=torch.float32) -> DenseFeatures:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, h, w, D, generator=g, dtype=dtype).requires_grad_(grad)
    return DenseFeatures(x, 16, (h * 16, w * 16))


def _reference_layout(head: SpatialLayout, x: torch.Tensor) -> torch.Tensor:
    """The layout head written as explicit sums over each cell's k×k neighbourhood (zero outside the map)."""
    b, h, w, c = x.shape
    k, r = head.kernel, head.kernel // 2
    wt, bias = head.conv.weight.detach().double(), head.conv.bias.detach().double()
    pad = torch.zeros(b, h + 2 * r, w + 2 * r, c, dtype=torch.float64)
    pad[:, r : r + h, r : r + w] = x.double()
    out = torch.zeros(b, head.out_channels, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            acc = bias.clone().expand(b, -1).clone()
            for di in range(k):
                for dj in range(k):
                    acc = acc + pad[:, i + di, j + dj] @ wt[:, :, di, dj].T
            out[:, :, i, j] = acc * torch.exp(head.log_weight.detach().double()[i, j])
    y = out.reshape(b, -1)
    return y / y.norm(dim=1, keepdim=True)


# ---- the layout head ---------------------------------------------------------------------------------


def test_layout_head_starts_as_the_flattened_map():
    f = _feats()
    head = SpatialLayout(D, H, W)
    assert head.dim == H * W * D
    expected = F.normalize(f.patches.permute(0, 3, 1, 2).flatten(1), dim=1)  # channel-major flattening
    assert torch.allclose(head(f), expected, atol=1e-6)
    # Fewer channels: the truncated identity keeps the first ones.
    small = SpatialLayout(D, H, W, out_channels=2)
    assert small.dim == H * W * 2
    assert torch.allclose(small(f), F.normalize(f.patches[..., :2].permute(0, 3, 1, 2).flatten(1), dim=1), atol=1e-6)


def test_layout_head_matches_the_neighbourhood_sum_formulation():
    torch.manual_seed(0)
    head = SpatialLayout(D, H, W, out_channels=4, kernel=3)
    with torch.no_grad():
        head.conv.weight.normal_()
        head.conv.bias.normal_()
        head.log_weight.normal_()
    f = _feats(b=2, seed=1)
    assert torch.allclose(head(f).double(), _reference_layout(head, f.patches), atol=1e-5)


def test_layout_head_gradients_are_exact():
    torch.manual_seed(0)
    head = SpatialLayout(D, 3, 2, out_channels=2, kernel=3, trainable=True).double()
    assert all(p.requires_grad for p in head.parameters())
    f = _feats(b=1, h=3, w=2, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda x: head(DenseFeatures(x, 16, f.image_size)), (f.patches,))
    w = head.log_weight.detach().clone().requires_grad_(True)

    def of_weights(lw):
        x = head.conv(f.patches.detach().permute(0, 3, 1, 2)) * torch.exp(lw)[None, None]
        return F.normalize(x.flatten(1), dim=1)

    assert torch.autograd.gradcheck(of_weights, (w,))
    assert not any(p.requires_grad for p in SpatialLayout(D, H, W).parameters())  # frozen unless trainable


def test_layout_head_grid_is_checked_or_adapted():
    head = SpatialLayout(D, H, W)
    other = _feats(h=2 * H, w=2 * W)
    with pytest.raises(ConfigError, match="trained at"):
        head(other)
    adapt = SpatialLayout(D, H, W, adapt_grid=True)
    pooled = F.adaptive_avg_pool2d(other.patches.permute(0, 3, 1, 2), (H, W))
    assert torch.allclose(adapt(other), F.normalize(pooled.flatten(1), dim=1), atol=1e-6)
    with pytest.raises(ConfigError, match="odd"):
        SpatialLayout(D, H, W, kernel=2)
    with pytest.raises(ConfigError, match="grid"):
        SpatialLayout(D)


def test_layout_head_is_registered_and_round_trips_as_a_trained_head(tmp_path):
    assert AGGREGATORS.get("layout") is SpatialLayout and ("aggregator", "layout") in SCHEMAS
    torch.manual_seed(0)
    head = build_head("layout", D, (H, W), {"out_channels": 5})
    assert head.head.height == H and head.head.width == W and head.dim == H * W * 5
    with torch.no_grad():
        head.head.conv.weight.add_(0.1)
        head.head.log_weight.add_(0.3)
    torch.save(head.state_dict(), tmp_path / "h.pt")
    back = TrainedHead(
        D, head="layout", head_options={"height": H, "width": W, "out_channels": 5}, state=tmp_path / "h.pt"
    )
    f = _feats()
    assert torch.allclose(back(f), head(f))
    with pytest.raises(ConfigError, match="grid"):
        build_head("layout", D, (H, W), {"height": H + 1})


# ---- the validation protocol ------------------------------------------------------------------------


def _sequences(root: Path, n: int = 24) -> None:
    synchronised_seasons(root, n)


@pytest.fixture
def holdout_recipe(recipe_factory, tmp_path):
    """The tiny recipe (conftest) in ``tmp_path``; ``**validation`` adds to ``[validation]`` (queries winter, database
    summer)."""

    def make(**validation) -> dict:
        return recipe_factory(tmp_path, name="holdout-run", validation=validation)

    return make


def test_validation_overlapping_training_is_refused(tmp_path, holdout_recipe):
    _sequences(tmp_path / "data")
    with pytest.raises(ConfigError, match="also training frames"):
        prepare(holdout_recipe(frames=[12, 20]), progress=False)


def test_the_monitor_is_recorded_but_never_picks_the_checkpoint():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(20, H, W, D, generator=g)
    x = torch.cat(
        [base + 0.3 * torch.rand(20, H, W, D, generator=g), base + 0.3 * torch.rand(20, H, W, D, generator=g)]
    )

    class Feats:
        grid = (H, W)

        def __len__(self):
            return len(x)

        def batch(self, ids):
            return DenseFeatures(x[torch.as_tensor(np.asarray(ids))], 16, (H * 16, W * 16))

    feats = Feats()
    labels = PlaceLabels.from_classes(np.r_[np.arange(20), np.arange(20)])
    gt = GroundTruth.from_frames(np.arange(10), np.arange(10), 0)
    val = Validation(feats, np.arange(20, 30), np.arange(10), gt)
    # A monitor whose ground truth is shuffled: its recall moves unlike the validation's.
    mon = Validation(
        feats,
        np.arange(30, 40),
        np.arange(10, 20),
        GroundTruth.from_frames(np.arange(10), np.random.default_rng(1).permutation(10), 0),
    )
    torch.manual_seed(0)
    head = build_head("layout", D, (H, W), {"out_channels": 3})
    tr = Trainer(
        head,
        feats,
        labels,
        TrainSettings(epochs=3, places_per_batch=5, lr=5e-2, loss="infonce", miner=None),
        val,
        train_ids=np.r_[np.arange(20, 30), np.arange(10)],
        progress=False,
        monitor=mon,
    )
    hist = tr.fit()
    assert all(f"{MONITOR_PREFIX}R@1" in h and "R@1" in h for h in hist)
    assert tr.best["R@1"] == max(h["R@1"] for h in hist)
    assert tr.best["epoch"] == 1 + int(np.argmax([h["R@1"] for h in hist]))


def test_holdout_run_splits_trains_monitors_and_picks_on_the_holdout(tmp_path, holdout_recipe):
    """One recipe run: the split (training / held-out validation / monitored evaluation never meet), the run, the cache."""
    _sequences(tmp_path / "data")
    r = holdout_recipe(holdout=4, gap=2)
    data, val = split_holdout(r, r["data"], r["validation"])
    assert data["frames"] == [0, 10] and val["frames"] == [12, 16] and "holdout" not in val
    with pytest.raises(ConfigError, match="no training frame"):
        split_holdout(r, r["data"], {"holdout": 15, "gap": 1})
    with pytest.raises(ConfigError, match="replaces"):
        split_holdout(r, r["data"], {"holdout": 3, "frames": [0, 4]})
    s = run_recipe(r, progress=False)
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(hist) == 2 and all({"R@1", f"{MONITOR_PREFIX}R@1"} <= set(h) for h in hist)
    assert s["best"]["R@1"] == max(h["R@1"] for h in hist)
    assert "monitor" not in (tmp_path / "run" / "best.ckpt").read_text()  # it records its own validation only
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    # The ids the run used: training, validation and monitored frames are disjoint, and the
    # cache (written by the run) is reused by a recipe over a sub-range of its frames.
    mtime = (tmp_path / "cache" / "features.npy").stat().st_mtime_ns
    prep = prepare(r, progress=False)
    keys = prep.features.keys
    frame = lambda i: int(Path(keys[i]).stem.split("-")[1])  # noqa: E731
    train = {frame(i) for i in prep.train_ids}
    valid = {frame(i) for i in np.r_[prep.validation.query_ids, prep.validation.database_ids]}
    monitored = {frame(i) for i in np.r_[prep.monitor.query_ids, prep.monitor.database_ids]}
    assert train == set(range(10)) and valid == set(range(12, 16)) and monitored == set(range(16, 24))
    sub = holdout_recipe(holdout=2)
    sub["data"]["frames"] = [0, 10]
    sub_prep = prepare(sub, progress=False)
    assert (tmp_path / "cache" / "features.npy").stat().st_mtime_ns == mtime
    assert {frame(i) for i in sub_prep.train_ids} == set(range(8))
