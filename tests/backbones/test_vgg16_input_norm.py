"""vgg16-conv5's ``input_norm``: MATLAB NetVLAD's MatConvNet input (0–255 minus the mean colour) vs ImageNet's."""

from __future__ import annotations

import pytest
import torch

from vprkit.backbones import build_backbone
from vprkit.backbones.vgg16 import MATCONVNET_MEAN
from vprkit.errors import ConfigError


def test_matconvnet_input_is_pixels_times_255_minus_the_mean_colour():
    net = build_backbone("vgg16-conv5", pretrained=False, input_norm="matconvnet")
    pixels = torch.rand(2, 3, 32, 48)
    want = pixels * 255 - torch.tensor(MATCONVNET_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(net.normalise(pixels), want, rtol=0, atol=1e-4)
    assert net.identity()["input_norm"] == "matconvnet"


def test_imagenet_default_keeps_the_recorded_identity():
    net = build_backbone("vgg16-conv5", pretrained=False)
    assert "input_norm" not in net.identity()  # maps built before the option keep matching
    torch.manual_seed(0)
    a = build_backbone("vgg16-conv5", pretrained=False, input_norm="matconvnet")
    a.load_state_dict(net.state_dict())
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        assert not torch.allclose(a(x).patches, net(x).patches)
    with pytest.raises(ConfigError, match="input_norm"):
        build_backbone("vgg16-conv5", pretrained=False, input_norm="caffe")
