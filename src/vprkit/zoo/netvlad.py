"""Zoo family: NetVLAD (Arandjelović et al., CVPR 2016) — Relja Arandjelović's MATLAB models, as hloc reads them.

The models are MatConvNet networks (VGG16 conv5_3 → L2 → NetVLAD K=64 → intra-norm → L2 → WPCA to 4096 →
L2) released by the authors; hloc (github.com/cvg/Hierarchical-Localization, ``hloc/extractors/netvlad.py``)
hosts them converted to plain structs by netvlad_tf_open's ``net_class2struct.m`` and reads them with
``scipy.io.loadmat(struct_as_record=False, squeeze_me=True)``. What the ``.mat`` holds and how vprkit maps it
(hloc's reading, checked on seeded weights against hloc's own module: ``tests/zoo/test_netvlad_mat.py``):

- ``net.layers[0..28]``: torchvision's ``vgg16().features`` order; a conv's ``weights`` are MatConvNet's
  ``S×S×IN×OUT`` filters and ``OUT`` biases → ``features.N.weight`` (``OUT×IN×S×S``) and ``.bias``;
- ``net.layers[30]`` (NetVLAD): ``weights[0]`` is the ``D×K`` soft-assignment 1×1 conv (no bias), ``weights[1]``
  the *negated* ``D×K`` centres (MATLAB adds them) → ``layer.assign.weight`` (``K×D``), ``layer.centroids``;
  the descriptors are L2-normalised before it (the pre-L2 layer), each cluster's residual sum after it;
- ``net.layers[33]`` (WPCA): a ``1×1×(D·K)×OUT`` conv and ``OUT`` biases → ``wpca`` (a linear layer with bias),
  its input columns reordered from MATLAB's flatten order (D-major: index ``d·K + k``) to vprkit's (K-major:
  ``k·D + d``), so the whitened descriptor is the same;
- ``net.meta.normalization.averageImage[0, 0]``: the mean colour subtracted from 0–255 pixels (no std): the
  backbone's ``input_norm="matconvnet"``, whose mean is checked against the file's.

Input rule (hloc's ``extract_features`` conf ``netvlad``: ``resize_max`` 1024): the longer side shrunk to 1024 pixels
when longer (``max_side``); smaller images keep their size.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..config import Config, ImageSpec
from ..errors import WeightsNotFoundError
from .layouts import register_layout
from .weights import ZooWeights, register_weights

SOURCE = "https://github.com/cvg/Hierarchical-Localization (hloc/extractors/netvlad.py); models by R. Arandjelović"
LICENCE = "MIT (Relja/netvlad); hloc's struct export: Apache-2.0"
HOST = "https://cvg-data.inf.ethz.ch/hloc/netvlad/"
# Python indices of the NetVLAD and WPCA layers in the exported struct (hloc reads these positions).
VLAD_LAYER = 30
WHITENING_LAYER = 33
CONV_FILTER_DIMS = 4  # S×S×IN×OUT
CONV_WEIGHTS = 2  # filters and biases
# MatConvNet's average colour (0–255 RGB) that vgg16-conv5's input_norm="matconvnet" subtracts (a copy of
# vprkit.backbones.vgg16.MATCONVNET_MEAN: the zoo cannot import the backbones; a test keeps them equal).
MATCONVNET_MEAN = (123.68, 116.779, 103.939)
MEAN_TOLERANCE = 0.01  # the .mat stores single precision
RESIZE_MAX = 1024  # hloc's extract_features conf "netvlad": preprocessing resize_max


def _layer_weights(layer: Any) -> list:
    """A layer's ``weights`` cell as a list of arrays (empty when the layer has none)."""
    import numpy as np  # numpy and torch only when a file is read: resolving a preset imports no library

    w = getattr(layer, "weights", None)
    if w is None:
        return []
    w = np.asarray(w, dtype=object) if isinstance(w, (list, tuple, np.ndarray)) else np.asarray([w], dtype=object)
    return [np.asarray(a, dtype=np.float32) for a in w.reshape(-1)] if w.dtype == object else [w]


def _backbone(layers: list) -> dict[str, Any]:
    """Every conv before the NetVLAD layer → ``backbone.features.N.weight|bias`` (torch layout)."""
    import torch

    out = {}
    for i, layer in enumerate(layers[:VLAD_LAYER]):
        w = _layer_weights(layer)
        if len(w) == CONV_WEIGHTS and w[0].ndim == CONV_FILTER_DIMS:
            out[f"backbone.features.{i}.weight"] = torch.from_numpy(w[0].transpose(3, 2, 0, 1).copy())
            out[f"backbone.features.{i}.bias"] = torch.from_numpy(w[1].reshape(-1).copy())
    return out


def _head(layers: list) -> dict[str, Any]:
    """NetVLAD's assignment and centres (``K×D``) and the WPCA, its columns in vprkit's K-major order."""
    import torch

    vlad, wpca = _layer_weights(layers[VLAD_LAYER]), _layer_weights(layers[WHITENING_LAYER])
    if len(vlad) != CONV_WEIGHTS or vlad[0].ndim != 2 or vlad[0].shape != vlad[1].shape:
        raise WeightsNotFoundError(f"layer {VLAD_LAYER} is not a NetVLAD layer ({{D×K assignment, D×K centres}})")
    if len(wpca) != CONV_WEIGHTS:
        raise WeightsNotFoundError(f"layer {WHITENING_LAYER} is not the WPCA layer ({{filters, biases}})")
    dim, k = vlad[0].shape
    projection = wpca[0].reshape(-1, wpca[1].size).T  # OUT × (D·K), MATLAB's D-major flatten
    if projection.shape[1] != dim * k:
        raise WeightsNotFoundError(f"WPCA takes {projection.shape[1]} inputs, NetVLAD gives {k}×{dim}")
    k_major = projection.reshape(-1, dim, k).transpose(0, 2, 1).reshape(-1, k * dim)
    return {
        "aggregator.layer.assign.weight": torch.from_numpy(vlad[0].T.copy()),
        "aggregator.layer.centroids": torch.from_numpy(-vlad[1].T),
        "aggregator.wpca.weight": torch.from_numpy(k_major.copy()),
        "aggregator.wpca.bias": torch.from_numpy(wpca[1].reshape(-1).copy()),
    }


def _check_mean(net: Any) -> None:
    """The file's mean colour must be the one the backbone subtracts (the backbone holds no per-file mean)."""
    import numpy as np

    try:
        mean = np.asarray(net.meta.normalization.averageImage, dtype=np.float64).reshape(-1, 3)[0]
    except (AttributeError, ValueError):
        raise WeightsNotFoundError("it has no net.meta.normalization.averageImage") from None
    if np.abs(mean - np.asarray(MATCONVNET_MEAN)).max() > MEAN_TOLERANCE:
        raise WeightsNotFoundError(
            f"its mean colour {np.round(mean, 3).tolist()} is not MatConvNet's {list(MATCONVNET_MEAN)}, "
            "which vgg16-conv5's input_norm='matconvnet' subtracts"
        )


@register_layout("netvlad-mat")
def netvlad_mat_layout(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A NetVLAD ``.mat`` (as :func:`vprkit.zoo.formats.read_mat` reads it) → VGG16 + NetVLAD + WPCA tensors."""
    net = raw.get("net")
    layers = getattr(net, "layers", None)
    if layers is None:
        raise WeightsNotFoundError("it holds no net.layers (a NetVLAD struct exported by net_class2struct.m)")
    layers = list(getattr(layers, "ravel", lambda: layers)())
    if len(layers) <= WHITENING_LAYER:
        raise WeightsNotFoundError(f"it has {len(layers)} layers; NetVLAD with WPCA has more than {WHITENING_LAYER}")
    _check_mean(net)
    return {**_backbone(layers), **_head(layers)}


def _entry(name: str, filename: str, trained_on: str) -> ZooWeights:
    return register_weights(
        ZooWeights(
            name=name,
            filename=filename,
            urls=(HOST + filename,),
            format="mat",
            layout="netvlad-mat",
            licence=LICENCE,
            source=SOURCE,
            reported=(
                "none published beside the file: hloc reports localisation, not retrieval recall, and "
                f"Relja/netvlad's README gives no table (its paper plots VGG16 + NetVLAD + whitening, {trained_on})"
            ),
        )
    )


_entry("netvlad-pitts30k", "Pitts30K_struct.mat", "Pitts30k")
_entry("netvlad-tokyotm", "TokyoTM_struct.mat", "Tokyo Time Machine")

OUTPUT_DIM = 4096  # the released WPCA's output (the descriptor's size; the aggregator reads it from the file)


def _preset(name: str, trained_on: str) -> Config:
    return Config(
        name=name,
        description=(
            f"NetVLAD (Relja Arandjelović's MATLAB model trained on {trained_on}, as hloc reads it): VGG16 conv5_3 "
            f"+ NetVLAD K=64 + whitening, {OUTPUT_DIM}-d; pixels·255 minus MatConvNet's mean colour; the longer "
            f"side shrunk to {RESIZE_MAX} when longer (hloc's resize_max; smaller images stay), sides cropped to "
            "multiples of 16"
        ),
        backbone="vgg16-conv5",
        backbone_options={"zoo": name, "input_norm": "matconvnet"},
        image=ImageSpec(size=(RESIZE_MAX, RESIZE_MAX), resize="max_side"),
        aggregator="netvlad",
        aggregator_options={"zoo": name},
    )


PRESETS: list[Config] = [_preset("netvlad-pitts30k", "Pitts30k"), _preset("netvlad-tokyotm", "Tokyo Time Machine")]
