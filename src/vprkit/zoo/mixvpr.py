"""Zoo family: MixVPR (Ali-bey, Chaib-draa & Giguère, WACV 2023) — the three published ResNet-50 models.

The authors (github.com/amaralibey/MixVPR, README "Weights") publish three checkpoints on Google Drive,
all ResNet-50 cut after ``layer3`` (1024 channels, stride 16: a 20×20 grid at their 320×320 input) with
4 feature mixers of ratio 1, differing in the projections: 4096-d (1024 channels × 4 rows), 512-d
(256 × 2) and 128-d (64 × 2). Each file is a plain ``state_dict`` of their Lightning ``VPRModel``
saved with ``torch.save`` (their README loads it with ``torch.load`` + ``load_state_dict``), despite
its ``.ckpt`` name: keys ``backbone.model.<torchvision name>`` and ``aggregator.<MixVPR name>``.

Input rule: the authors evaluate at 320×320 (their Pittsburgh and validation transforms: ``T.Resize`` with
its default bilinear filter, ImageNet normalisation; only their later ``demo.py`` resizes bicubic). The presets keep that size and set ``adapt_grid``, so that another ``--image-size``
still runs (the 20×20 grid is average-pooled from the larger or smaller one) — which is not the
published protocol, and not what the reported recalls measure.

No licence: the repository publishes none, so the weights carry no stated terms; vprkit holds no copy of
its code (the head is written from the paper).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from ..config import Config, ImageSpec
from .layouts import register_layout, renamed
from .weights import ZooWeights, register_weights

SOURCE = "https://github.com/amaralibey/MixVPR"
LICENCE = "none stated (the repository has no licence)"
LAYOUT = "mixvpr-resnet"
IMAGE_SIZE = (320, 320)
GRID = (20, 20)  # ResNet-50 to layer3 (stride 16) at 320×320
MIX_DEPTH = 4
MLP_RATIO = 1.0

# official sub-module index in FeatureMixerLayer.mix (LayerNorm, Linear, ReLU, Linear) → vprkit's name
_MIXER_PARTS = {"0": "norm", "1": "fc1", "3": "fc2"}
_MIXER_KEY = re.compile(r"^aggregator\.mix\.(\d+)\.mix\.(\d+)\.")
# modules of the training wrapper that hold no tensors in the published files; dropped should one appear
_TRAINING_PREFIXES = ("loss_fn.", "miner.")


def _drive(file_id: str) -> tuple[str, ...]:
    """Google Drive's direct downloads of a shared file (the README links its viewer page)."""
    return (
        f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t",
        f"https://drive.google.com/uc?export=download&id={file_id}",
    )


# dim: (out_channels, out_rows, Drive file id, README's R@1 on Pitts250k-test, Pitts30k-test, MSLS-val)
VARIANTS: dict[int, tuple[int, int, str, tuple[float, float, float]]] = {
    4096: (1024, 4, "1vuz3PvnR7vxnDDLQrdHJaOA04SQrtk5L", (94.3, 91.6, 88.2)),
    512: (256, 2, "1khiTUNzZhfV2UUupZoIsPIbsMRBYVDqj", (93.2, 90.7, 84.1)),
    128: (64, 2, "1DQnefjk1hVICOEYPwE4-CZAZOvi1NSJz", (88.7, 87.8, 78.5)),
}


def entry_name(dim: int) -> str:
    return f"mixvpr-r50-{dim}"


@register_layout(LAYOUT)
def mixvpr_layout(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The authors' ``VPRModel`` keys → vprkit's: ``backbone.model.*`` → the ResNet's torchvision names,
    ``aggregator.mix.<i>.mix.<0|1|3>.*`` → ``aggregator.mixers.<i>.<norm|fc1|fc2>.*``."""
    kept = {k: v for k, v in raw.items() if not k.startswith(_TRAINING_PREFIXES)}
    state = renamed(kept, {"backbone.model.": "backbone.", "aggregator.": "aggregator."})
    out = {}
    for key, value in state.items():
        match = _MIXER_KEY.match(key)
        if match and match.group(2) in _MIXER_PARTS:
            key = f"aggregator.mixers.{match.group(1)}.{_MIXER_PARTS[match.group(2)]}." + key[match.end() :]
        out[key] = value
    return out


def _register(dim: int) -> Config:
    channels, rows, file_id, (pitts250k, pitts30k, msls) = VARIANTS[dim]
    name = entry_name(dim)
    register_weights(
        ZooWeights(
            name=name,
            filename=f"resnet50_MixVPR_{dim}_channels({channels})_rows({rows}).ckpt",
            urls=_drive(file_id),
            format="torch",
            layout=LAYOUT,
            licence=LICENCE,
            source=SOURCE,
            reported=f"R@1 Pitts250k-test {pitts250k}, Pitts30k-test {pitts30k}, MSLS-val {msls} (MixVPR README)",
        )
    )
    return Config(
        name=name,
        description=(
            f"MixVPR (official ResNet-50 checkpoint), {dim}-d; images resized to 320×320 as the authors evaluate "
            f"(another --image-size runs by pooling the feature grid to 20×20: not the published protocol)"
        ),
        backbone="resnet50",
        backbone_options={"cut": "layer3", "zoo": name},
        image=ImageSpec(size=IMAGE_SIZE, resize="fixed"),
        aggregator="mixvpr",
        aggregator_options={
            "height": GRID[0],
            "width": GRID[1],
            "depth": MIX_DEPTH,
            "mlp_ratio": MLP_RATIO,
            "out_channels": channels,
            "out_rows": rows,
            "adapt_grid": True,
            "zoo": name,
        },
    )


PRESETS: list[Config] = [_register(dim) for dim in VARIANTS]
