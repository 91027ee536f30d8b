"""Zoo family: DINOv2 SALAD (Izquierdo & Civera, CVPR 2024) and MegaLoc (Berton & Masone, CVPRW 2025).

Both are a DINOv2 ViT-B/14 (its last block's tokens after the final LayerNorm: patches and CLS) under
SALAD's optimal-transport head (:mod:`vprkit.aggregation.salad`).

**DINOv2 SALAD** (github.com/serizba/salad): ``dino_salad.ckpt`` from the repository's v1.0.0 release (the
README also links a Google Drive copy). Despite its name it is a plain ``state_dict`` of their Lightning
``VPRModel`` saved with ``torch.save`` — their ``hubconf.py`` and ``eval.py`` both pass what ``torch.load``
returns straight to ``load_state_dict`` — so its container is ``torch``. Keys: ``backbone.model.<hub DINOv2
name>`` (the torch.hub ``dinov2_vitb14``, incl. its unused ``mask_token``) and ``aggregator.<SALAD name>``
(64 clusters × 128 + a 256-d token: 8448-d). Input rule (their ``eval.py --image_size 322 322``): every image
resized to 322×322 with torchvision's bilinear ``Resize`` on PIL images, ImageNet normalisation. Licence:
GPL-3.0 (the code; vprkit uses the published weights and implements the head from the paper's equations).

**MegaLoc** (github.com/gmberton/MegaLoc; weights ``model.safetensors`` on Hugging Face ``gberton/MegaLoc``):
its own DINOv2 ViT-B/14 whose parameter names are the hub's (``backbone.*``: no ``mask_token``), and
``aggregator.agg.*`` (SALAD with 64 × 256 + 256 = 16640) then ``aggregator.linear`` (16640 → 8448), then L2.
Input rule (``MegaLoc.forward``): any size; when a side is not a multiple of 14 *both* sides are resized to
``round(side / 14) · 14`` (Python's round: halves to even) with bilinear, antialiased resampling — vprkit's
``ImageSpec(resize="none", to_multiple="resize")`` (PIL's antialiased bilinear on 8-bit pixels, so equal up
to resampling and rounding, not bit for bit). Its position embeddings are interpolated as the hub's since
its commit 4a23a2b ("Fix positional encoding argument order for non-square images", 2026-01-21; before it,
non-square inputs got the transposed grid). Licence: MIT.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from ..config import Config, ImageSpec
from ..errors import WeightsNotFoundError
from .layouts import register_layout, renamed
from .weights import ZooWeights, register_weights

SALAD_SOURCE = "https://github.com/serizba/salad"
MEGALOC_SOURCE = "https://github.com/gmberton/MegaLoc"
SALAD_ENTRY = "dinov2-salad"
MEGALOC_ENTRY = "megaloc"
SALAD_IMAGE_SIZE = (322, 322)  # their eval.py --image_size 322 322
BACKBONE = "dinov2_vitb14"
LAST_BLOCK = 11  # ViT-B/14 has 12 blocks; both heads read the last one's normed tokens
NUM_CLUSTERS = 64
TOKEN_DIM = 256
SALAD_CLUSTER_DIM = 128
MEGALOC_CLUSTER_DIM = 256
MEGALOC_OUT_DIM = 8448

# the official MLPs are nn.Sequential: index of each Linear / 1×1 Conv → vprkit's TwoLayerMLP part
_MLP_PARTS = {
    "token_features": {"0": "hidden", "2": "out"},
    "cluster_features": {"0": "hidden", "3": "out"},
    "score": {"0": "hidden", "3": "out"},
}
_MLP_KEY = re.compile(r"^aggregator\.(token_features|cluster_features|score)\.(\d+)\.(weight|bias)$")
_TRAINING_PREFIXES = ("loss_fn.", "miner.")  # training-wrapper modules; none hold tensors in the release


def _head(state: Mapping[str, Any]) -> dict[str, Any]:
    """Official SALAD head names (after the prefix renaming) → vprkit's; 1×1 conv kernels become matrices."""
    out = {}
    for key, value in state.items():
        match = _MLP_KEY.match(key)
        if match and match.group(2) in _MLP_PARTS[match.group(1)]:
            key = f"aggregator.{match.group(1)}.{_MLP_PARTS[match.group(1)][match.group(2)]}.{match.group(3)}"
            if value.dim() == 4:  # out × in × 1 × 1 → out × in
                value = value.reshape(value.shape[0], value.shape[1])
        elif key == "aggregator.dust_bin":
            key = "aggregator.dustbin"
        out[key] = value
    return out


@register_layout("salad")
def salad_layout(raw: Mapping[str, Any]) -> dict[str, Any]:
    """serizba/salad's ``VPRModel``: ``backbone.model.*`` (hub DINOv2) and ``aggregator.*`` (SALAD)."""
    kept = {k: v for k, v in raw.items() if not k.startswith(_TRAINING_PREFIXES)}
    return _head(renamed(kept, {"backbone.model.": "backbone.", "aggregator.": "aggregator."}))


@register_layout("megaloc")
def megaloc_layout(raw: Mapping[str, Any]) -> dict[str, Any]:
    """gmberton/MegaLoc's ``MegaLoc``: ``backbone.*`` (hub names), ``aggregator.agg.*`` (SALAD), ``aggregator.linear.*``."""
    if any(k.startswith("backbone.model.") for k in raw):
        raise WeightsNotFoundError("it has backbone.model.* keys (a DINOv2 SALAD checkpoint?)")
    state = renamed(
        raw,
        {
            "backbone.": "backbone.",
            "aggregator.agg.": "aggregator.",
            "aggregator.linear.": "aggregator.projection.",
        },
    )
    return _head(state)


register_weights(
    ZooWeights(
        name=SALAD_ENTRY,
        filename="dino_salad.ckpt",
        urls=(
            f"{SALAD_SOURCE}/releases/download/v1.0.0/dino_salad.ckpt",
            "https://drive.usercontent.google.com/download?id=1u83Dmqmm1-uikOPr58IIhfIzDYwFxCy1&export=download&confirm=t",
        ),
        format="torch",
        layout="salad",
        licence="GPL-3.0 (code; weights published with it)",
        source=SALAD_SOURCE,
        reported="R@1 MSLS-challenge 75.0, MSLS-val 92.2, Nordland 76.0 at 322×322 (SALAD README)",
    )
)
register_weights(
    ZooWeights(
        name=MEGALOC_ENTRY,
        filename="model.safetensors",
        urls=("https://huggingface.co/gberton/MegaLoc/resolve/main/model.safetensors",),
        format="safetensors",
        layout="megaloc",
        licence="MIT",
        source=MEGALOC_SOURCE,
        reported="no recall in the README; see the paper (arXiv:2502.17237)",
    )
)


def _backbone(entry: str) -> dict[str, Any]:
    return {"layer": LAST_BLOCK, "facet": "token", "final_norm": True, "zoo": entry}


PRESETS: list[Config] = [
    Config(
        name="salad",
        description=(
            "DINOv2 SALAD (official checkpoint, ViT-B/14 + optimal transport), 8448-d; images resized to "
            "322×322 (bilinear) as the authors evaluate"
        ),
        backbone=BACKBONE,
        backbone_options=_backbone(SALAD_ENTRY),
        image=ImageSpec(size=SALAD_IMAGE_SIZE, resize="fixed"),
        aggregator="salad",
        aggregator_options={
            "variant": "salad",
            "num_clusters": NUM_CLUSTERS,
            "cluster_dim": SALAD_CLUSTER_DIM,
            "token_dim": TOKEN_DIM,
            "zoo": SALAD_ENTRY,
        },
    ),
    Config(
        name="megaloc",
        description=(
            "MegaLoc (official checkpoint, ViT-B/14 + SALAD + linear), 8448-d; any image size, each side "
            "resized to the nearest multiple of 14 as MegaLoc does"
        ),
        backbone=BACKBONE,
        backbone_options=_backbone(MEGALOC_ENTRY),
        image=ImageSpec(size=None, resize="none", to_multiple="resize"),
        aggregator="salad",
        aggregator_options={
            "variant": "megaloc",
            "num_clusters": NUM_CLUSTERS,
            "cluster_dim": MEGALOC_CLUSTER_DIM,
            "token_dim": TOKEN_DIM,
            "out_dim": MEGALOC_OUT_DIM,
            "zoo": MEGALOC_ENTRY,
        },
    ),
]
