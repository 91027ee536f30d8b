"""A NetVLAD MATLAB model in the struct layout hloc reads, filled with seeded weights.

Relja Arandjelović's NetVLAD models are MatConvNet ``simplenn`` networks; hloc reads the versions
exported by netvlad_tf_open's ``net_class2struct.m`` (every layer a plain struct) with
``scipy.io.loadmat(struct_as_record=False, squeeze_me=True)``:

- ``net.layers{1..29}``: VGG16 up to conv5_3, in torchvision's ``features`` order (conv, relu, pool);
  a conv layer's ``weights`` cell holds ``{S×S×IN×OUT filters, OUT biases}``;
- ``net.layers{30}``: the pre-L2 normalisation, ``{31}``: NetVLAD (``weights = {D×K assignment, −centres D×K}``),
  ``{32}`` intra-normalisation, ``{33}`` the post-L2, ``{34}``: WPCA, a 1×1 conv
  (``weights = {1×1×K·D×OUT, OUT}``), ``{35}`` the final L2 (hloc reads Python indices 30 and 33);
- ``net.meta.normalization.averageImage``: an H×W×3 image whose first pixel is the mean subtracted
  from 0–255 pixels (hloc and netvlad_tf_open read ``averageImage[0, 0]``).

Weights are named as hloc's PyTorch modules hold them (``backbone.N.weight``, ``netvlad.score_proj.weight``,
``netvlad.centers``, ``whiten.weight``, ``whiten.bias``) and converted to MatConvNet's layout here, the
inverse of hloc's conversion. Imported by the record script (``.venv-ref``) and the test (``.venv``): numpy
and SciPy only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import seeded  # noqa: E402

WEIGHT_SEED = 0
# Random VGG16 features are not image-like: these rescale the seeded NetVLAD so that its soft assignment is
# neither uniform nor one-hot and the residuals are not dominated by the centres (as in a trained model).
ASSIGNMENT_SCALE = 30.0
CENTRE_SCALE = 0.1
WHITEN_BIAS_SCALE = 0.01  # the seeded 0.05-scale bias would otherwise outweigh W·v (entries ≈ 1/√(K·D))
# A mean image larger than 1×1 (as hloc's [0, 0] indexing requires), every pixel different: reading another
# pixel than the first would be caught.
AVERAGE_IMAGE_SIDE = 2
AVERAGE_RGB = (123.68, 116.779, 103.939)
AVERAGE_SPREAD = 5.0
# Python indices of the layers after VGG16's conv5_3 (hloc reads 30 and 33).
TAIL = (
    ("preL2", "normalize"),
    ("vlad:core", "custom"),
    ("vlad:intranorm", "normalize"),
    ("postL2", "custom"),
    ("WPCA", "conv"),
    ("finalL2", "custom"),
)


def seeded_netvlad_weights(shapes: Mapping[str, list[int]], seed: int = WEIGHT_SEED) -> dict[str, np.ndarray]:
    """``seeded.seeded_state_dict`` with the NetVLAD assignment and centres rescaled (see the constants)."""
    weights = seeded.seeded_state_dict(shapes, seed)
    weights["netvlad.score_proj.weight"] = weights["netvlad.score_proj.weight"] * np.float32(ASSIGNMENT_SCALE)
    weights["netvlad.centers"] = weights["netvlad.centers"] * np.float32(CENTRE_SCALE)
    weights["whiten.bias"] = weights["whiten.bias"] * np.float32(WHITEN_BIAS_SCALE)
    return weights


def average_image() -> np.ndarray:
    """``AVERAGE_SIDE×AVERAGE_SIDE×3`` float32, first pixel = ``AVERAGE_RGB``, the others shifted."""
    side = AVERAGE_IMAGE_SIDE
    shift = AVERAGE_SPREAD * np.arange(side * side, dtype=np.float32).reshape(side, side, 1)
    return (np.asarray(AVERAGE_RGB, np.float32).reshape(1, 1, 3) + shift).astype(np.float32)


def _cell(*arrays: np.ndarray) -> np.ndarray:
    cell = np.empty((1, len(arrays)), dtype=object)
    for i, a in enumerate(arrays):
        cell[0, i] = np.asarray(a, np.float32)
    return cell


def _backbone_layers(weights: Mapping[str, np.ndarray]) -> list[dict]:
    """torchvision's ``features`` up to conv5_3 as MatConvNet structs (conv: S×S×IN×OUT filters)."""
    convs = sorted({int(k.split(".")[1]) for k in weights if k.startswith("backbone.")})
    layers = []
    for i in range(convs[-1] + 1):
        if i in convs:
            w = np.transpose(weights[f"backbone.{i}.weight"], (2, 3, 1, 0))  # OUT×IN×S×S → S×S×IN×OUT
            b = weights[f"backbone.{i}.bias"].reshape(-1, 1)
            layers.append({"name": f"conv{i}", "type": "conv", "weights": _cell(w, b), "pad": 1.0, "stride": 1.0})
        elif i - 1 in convs:
            layers.append({"name": f"relu{i}", "type": "relu", "leak": 0.0})
        else:
            layers.append({"name": f"pool{i}", "type": "pool", "method": "max", "pool": [2.0, 2.0], "stride": 2.0})
    return layers


def netvlad_struct(weights: Mapping[str, np.ndarray]) -> dict:
    """The ``net`` struct (a dict SciPy writes as a MATLAB struct) holding ``weights`` in MatConvNet's layout."""
    layers = _backbone_layers(weights)
    score = weights["netvlad.score_proj.weight"].reshape(weights["netvlad.score_proj.weight"].shape[0], -1)  # K×D
    centres = weights["netvlad.centers"]  # D×K
    whiten = weights["whiten.weight"]  # OUT×(D·K), hloc's flatten order (D-major)
    tail_weights = {
        "vlad:core": _cell(score.T, -centres),  # the MATLAB layer stores the negated centres
        "WPCA": _cell(whiten.T.reshape(1, 1, *whiten.T.shape), weights["whiten.bias"].reshape(-1, 1)),
    }
    for name, kind in TAIL:
        layer = {"name": name, "type": kind}
        if name in tail_weights:
            layer["weights"] = tail_weights[name]
        if name == "vlad:core":
            layer["K"] = float(centres.shape[1])
        layers.append(layer)
    cell = np.empty((1, len(layers)), dtype=object)
    for i, layer in enumerate(layers):
        cell[0, i] = layer
    return {"layers": cell, "meta": {"normalization": {"averageImage": average_image()}}}


def write_netvlad_mat(path: str | Path, weights: Mapping[str, np.ndarray]) -> Path:
    """Write ``weights`` (hloc's names) as a NetVLAD ``.mat`` in the struct layout hloc reads."""
    from scipy.io import savemat

    savemat(str(path), {"net": netvlad_struct(weights)})
    return Path(path)
