"""A trained head centred on its training mean (``TrainedHead.fit_centre`` / ``add_centre``), alone and fused with VLAD.

Why centring: every image of one domain shares a large common component in a layout head's output,
which raises every head cosine alike; subtracting the training mean leaves what differs between places.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vprkit.aggregation import fit_vocabulary
from vprkit.aggregation.projection import CENTRE_KEY, Projection, TrainedHead, add_centre, read_state
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError

H, W, D = 3, 4, 6
OUT = 5  # layout channels per cell
STRIDE = 16
VLAD_K = 3
WEIGHT = 0.8  # the VLAD part's share of the fused cosine
SHARED = 5.0  # the size of the component every image shares, against unit place-specific parts
PLACES = 12
TOL = 1e-5


def _features(n: int, seed: int, shared: float = SHARED) -> DenseFeatures:
    """``n`` feature maps that all share one large random map plus a small map of their own."""
    g = torch.Generator().manual_seed(seed)
    common = torch.rand(1, H, W, D, generator=torch.Generator().manual_seed(1234))
    x = shared * common + torch.rand(n, H, W, D, generator=g)
    return DenseFeatures(x, STRIDE, (H * STRIDE, W * STRIDE))


def _layout() -> TrainedHead:
    return TrainedHead(D, head="layout", head_options={"height": H, "width": W, "out_channels": OUT}).eval()


def _batches(feats: DenseFeatures, size: int):
    for i in range(0, len(feats.patches), size):
        yield DenseFeatures(feats.patches[i : i + size], STRIDE, feats.image_size)


def test_the_centre_is_the_mean_uncentred_output_and_outputs_stay_unit_norm():
    head, feats = _layout(), _features(PLACES, seed=0)
    with torch.no_grad():
        raw = head(feats)
    centre = head.fit_centre(_batches(feats, size=5))  # batches: the mean over all of them, not the last
    assert torch.allclose(centre, raw.mean(0), atol=TOL)
    with torch.no_grad():
        y = head(feats)
    assert torch.allclose(y, torch.nn.functional.normalize(raw - centre, dim=1), atol=TOL)
    assert torch.allclose(y.norm(dim=1), torch.ones(len(y)), atol=TOL)


def test_centring_removes_the_shared_component_so_other_places_stop_looking_alike():
    head, feats = _layout(), _features(PLACES, seed=0)
    with torch.no_grad():
        before = head(feats)
        head.fit_centre([feats])
        after = head(feats)
    off = ~torch.eye(PLACES, dtype=torch.bool)
    # Uncentred, the shared component makes every pair of places nearly identical; centred, they are not.
    assert (before @ before.T)[off].mean() > 0.9
    assert (after @ after.T)[off].mean() < 0.1


def test_a_centred_state_round_trips_and_marks_its_identity(tmp_path):
    head, feats = _layout(), _features(PLACES, seed=0)
    plain = head.state_dict()
    assert CENTRE_KEY not in plain and "centred" not in head.identity()  # uncentred heads are unchanged
    path = add_centre(head, [feats], tmp_path / "centred.head.pt")
    assert CENTRE_KEY in read_state(path)
    again = TrainedHead(
        D, head="layout", head_options={"height": H, "width": W, "out_channels": OUT}, state=str(path)
    ).eval()
    other = _features(4, seed=1)
    with torch.no_grad():
        assert torch.allclose(again(other), head(other), atol=TOL)
    assert again.identity()["centred"] is True


def test_the_fused_cosine_mixes_vlad_with_the_centred_head_by_the_weight():
    feats = _features(PLACES, seed=0)
    vocabulary = fit_vocabulary(feats.patches.reshape(-1, D).numpy(), VLAD_K, seed=0)
    fused = TrainedHead(
        D,
        head="layout",
        head_options={"height": H, "width": W, "out_channels": OUT},
        vlad={"k": VLAD_K, "assignments": 1, "weight": WEIGHT},
        vocabulary=vocabulary,
    ).eval()
    fused.fit_centre([feats])
    with torch.no_grad():
        x = fused(feats)
        v, h = fused.vlad(feats), fused.head_forward(feats)
    assert x.shape[1] == fused.dim == fused.vlad.dim + H * W * OUT
    assert torch.allclose(x @ x.T, WEIGHT * v @ v.T + (1 - WEIGHT) * h @ h.T, atol=TOL)
    assert torch.allclose(x[:, : fused.vlad.dim], math.sqrt(WEIGHT) * v, atol=TOL)


def test_projections_after_a_centre_and_wrong_centres_are_refused():
    head = _layout()
    with pytest.raises(ConfigError, match="dims"):
        head.set_centre(np.zeros(head.head_dim + 1, np.float32))
    with pytest.raises(ConfigError, match="finite"):
        head.set_centre(np.full(head.head_dim, np.nan, np.float32))
    with pytest.raises(ConfigError, match="at least one image"):
        head.fit_centre([])
    head.fit_centre([_features(PLACES, seed=0)])
    with pytest.raises(ConfigError, match="centred"):
        head.add_projection(Projection(head.head_dim, 4))
