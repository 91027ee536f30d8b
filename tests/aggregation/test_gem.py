import pytest
import torch

from vprkit.aggregation.gem import GeM, GlobalToken, Mean, gem_pool
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError


def feats(patches):
    t = torch.tensor(patches, dtype=torch.float32)  # h×w×D
    return DenseFeatures(t.unsqueeze(0), stride=16, image_size=(32, 32))


def test_gem_p1_is_mean_and_p3_hand_computed():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # B=1, N=2, D=2
    assert torch.allclose(gem_pool(x, 1.0), torch.tensor([[2.0, 3.0]]))
    expected = torch.tensor([[14 ** (1 / 3), 36 ** (1 / 3)]])  # ((1+27)/2)^(1/3), ((8+64)/2)^(1/3)
    assert torch.allclose(gem_pool(x, 3.0), expected, atol=1e-5)


def test_classic_gem_clamps_negatives_signed_variant_keeps_sign():
    x = torch.tensor([[[-2.0], [1.0]]])
    # classic: max(x, eps)^3 → (eps^3 + 1)/2 → ≈ 0.5^(1/3)
    assert gem_pool(x, 3.0).item() == pytest.approx(0.5 ** (1 / 3), rel=1e-5)
    # AnyLoc's signed variant: m = (-8 + 1)/2 = -3.5 → -(3.5^(1/3))
    assert gem_pool(x, 3.0, signed=True).item() == pytest.approx(-(3.5 ** (1 / 3)), rel=1e-5)


def test_gem_aggregator_is_l2_normalised():
    f = feats([[[1.0, 2.0], [3.0, 4.0]]])  # 1×2 grid, D=2
    v = GeM(2, p=3.0)(f)
    e = torch.tensor([14 ** (1 / 3), 36 ** (1 / 3)])
    assert torch.allclose(v[0], e / e.norm(), atol=1e-6)
    assert GeM(2).dim == 2


def test_mean_and_global_token():
    f = feats([[[1.0, 0.0], [3.0, 0.0]]])
    assert torch.allclose(Mean(2)(f), torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ConfigError, match="global token"):
        GlobalToken(2)(f)
    f.global_token = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(GlobalToken(2)(f), torch.tensor([[0.6, 0.8]]))


def test_bad_power():
    with pytest.raises(ConfigError):
        GeM(4, p=0)
