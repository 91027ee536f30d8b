"""NetVLAD: soft-assignment VLAD (Arandjelović et al.), initialisable from a k-means vocabulary.

For a local descriptor ``x`` (L2-normalised) the soft assignment to cluster ``k`` is
``a_k(x) = softmax_k(w_k·x + b_k)``; the descriptor is ``V_k = Σ_x a_k(x)·(x − c_k)``,
intra-normalised per cluster, flattened (K·D) and L2-normalised.

Initialisation from a vocabulary follows the released Patch-NetVLAD models: ``w_k = α·c_k/‖c_k‖``,
no bias, with ``α = −log(0.01) / mean(cos₁ − cos₂)`` — the mean gap between each sample
descriptor's best and second-best centre cosine — so that a typical descriptor puts about 99 %
of its weight on its nearest centre. (The paper's other variant, ``w_k = 2α·c_k``,
``b_k = −α‖c_k‖²``, is :meth:`NetVLADLayer.from_centres` with ``variant="v2"``.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbones.base import DenseFeatures
from ..checkpoints import read_netvlad_checkpoint
from ..errors import ConfigError, VocabularyMismatchError
from ..zoo import load_part, zoo_part
from .base import AGGREGATORS, Aggregator, l2n
from .vlad import Vocabulary, fit_vocabulary, vlad_normalise

# α is chosen so that the nearest centre gets this share of the weight against the runner-up.
NEAREST_SHARE = 0.99
ALPHA_VARIANTS = ("released", "v2")
MIN_MARGIN = 1e-6  # floor under the assignment margin, so α stays finite


def alpha_from_margin(margin: float) -> float:
    """``α = −log(1 − share) / margin`` (``−log(0.01)/margin`` for the 99 % share of the original)."""
    return -math.log(1.0 - NEAREST_SHARE) / max(margin, MIN_MARGIN)


class NetVLADLayer(nn.Module):
    """Soft-assignment VLAD over ``B×N×D`` descriptors; also gives per-descriptor assignments.

    ``assign`` is the 1×1 convolution of the original as a linear map (weight ``K×D``, optional
    bias); ``centroids`` are the ``K×D`` centres residuals are taken against.
    """

    def __init__(self, num_clusters: int, dim: int, bias: bool = False, normalize_input: bool = True):
        super().__init__()
        self.num_clusters, self.dim, self.normalize_input = num_clusters, dim, normalize_input
        self.assign = nn.Linear(dim, num_clusters, bias=bias)
        self.centroids = nn.Parameter(torch.zeros(num_clusters, dim))

    @classmethod
    def from_centres(
        cls, centres: np.ndarray | torch.Tensor, alpha: float, variant: str = "released"
    ) -> "NetVLADLayer":
        """The usual α-initialisation from k-means centres (see the module docstring)."""
        if variant not in ALPHA_VARIANTS:
            raise ConfigError(f"unknown NetVLAD initialisation {variant!r}; choose one of {ALPHA_VARIANTS}")
        c = torch.as_tensor(np.asarray(centres, dtype=np.float32))
        layer = cls(c.shape[0], c.shape[1], bias=variant == "v2")
        with torch.no_grad():
            layer.centroids.copy_(c)
            if variant == "released":
                layer.assign.weight.copy_(alpha * l2n(c))
            else:
                layer.assign.weight.copy_(2.0 * alpha * c)
                layer.assign.bias.copy_(-alpha * (c * c).sum(1))
        return layer

    def load_weights(
        self, centroids: torch.Tensor, assign_weight: torch.Tensor, assign_bias: torch.Tensor | None = None
    ) -> None:
        """Load trained parameters (e.g. from :func:`vprkit.checkpoints.read_netvlad_checkpoint`)."""
        w = assign_weight.reshape(assign_weight.shape[0], -1)
        if tuple(centroids.shape) != (self.num_clusters, self.dim) or tuple(w.shape) != (self.num_clusters, self.dim):
            raise VocabularyMismatchError(
                f"NetVLAD weights are {tuple(centroids.shape)} / {tuple(w.shape)}, the layer is {self.num_clusters}×{self.dim}"
            )
        with torch.no_grad():
            self.centroids.copy_(centroids)
            self.assign.weight.copy_(w)
            if assign_bias is not None:
                if self.assign.bias is None:
                    self.assign.bias = nn.Parameter(torch.zeros(self.num_clusters))
                self.assign.bias.copy_(assign_bias)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return l2n(x) if self.normalize_input else x

    def soft_assign(self, x: torch.Tensor) -> torch.Tensor:
        """``…×D`` prepared descriptors → ``…×K`` assignment weights (rows sum to 1)."""
        return torch.softmax(self.assign(x), dim=-1)

    def residual_sums(self, x: torch.Tensor) -> torch.Tensor:
        """``B×N×D`` → un-normalised ``B×K×D``: ``Σ a_k(x)·x − (Σ a_k(x))·c_k``."""
        x = self.prepare(x)
        a = self.soft_assign(x)
        return a.transpose(1, 2) @ x - a.sum(1).unsqueeze(-1) * self.centroids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B×N×D`` → ``B×(K·D)``: intra-normalised, flattened, L2-normalised."""
        return vlad_normalise(self.residual_sums(x))


class NetVLAD(Aggregator):
    """NetVLAD as a global aggregator for any backbone's dense map (``dim = K × D``): a Module around :class:`NetVLADLayer`.

    Built from the map's vocabulary (α from ``alpha`` or the vocabulary's recorded
    ``assignment_margin``), or from a trained checkpoint with ``checkpoint=PATH`` (a NetVLAD /
    Patch-NetVLAD VGG16 checkpoint; its own centres replace the vocabulary's, and its WPCA layer,
    if it has one, projects the descriptor as in Patch-NetVLAD's global retrieval unless
    ``wpca=False``), or from a zoo checkpoint with ``zoo=NAME`` (Relja Arandjelović's MATLAB models: NetVLAD
    and whitening, sized from the file; ``weights`` names the file), or unfitted with ``k=K`` and then
    :meth:`fit` on a descriptor sample (k-means centres and α) or ``load_state_dict``. Parameters are frozen
    unless ``trainable=True``.
    """

    name = "netvlad"
    needs_vocabulary = True
    learns_from_sample = True

    def __init__(
        self,
        backbone_dim: int,
        vocabulary: Vocabulary | None = None,
        alpha: float | None = None,
        variant: str = "released",
        checkpoint: str | None = None,
        wpca: bool = True,
        chunk: int = 16,
        k: int | None = None,
        trainable: bool = False,
        zoo: str | None = None,
        weights: str | None = None,
    ):
        super().__init__(backbone_dim)
        self.chunk = chunk
        self.checkpoint = checkpoint
        self.zoo = zoo
        self.variant = variant
        self.trainable = bool(trainable)
        self.wpca: nn.Linear | None = None
        self.vocabulary: Vocabulary | None = None
        self.alpha: float | None = None if alpha is None else float(alpha)
        self._fitted = True
        if zoo:
            self._init_from_zoo(zoo, weights)
        elif checkpoint is not None:
            ck = read_netvlad_checkpoint(checkpoint)
            if ck.dim != backbone_dim:
                raise VocabularyMismatchError(
                    f"{checkpoint}: NetVLAD is {ck.dim}-d, the backbone gives {backbone_dim}-d"
                )
            self.layer = NetVLADLayer(ck.num_clusters, ck.dim, bias=ck.assign_bias is not None)
            self.layer.load_weights(ck.centroids, ck.assign_weight, ck.assign_bias)
            if wpca and ck.wpca_weight is not None:
                self.wpca = nn.Linear(ck.wpca_weight.shape[1], ck.wpca_weight.shape[0], bias=ck.wpca_bias is not None)
                with torch.no_grad():
                    self.wpca.weight.copy_(ck.wpca_weight)
                    if ck.wpca_bias is not None:
                        self.wpca.bias.copy_(ck.wpca_bias)
        elif vocabulary is not None:
            self._init_from_vocabulary(vocabulary, self.alpha)
        elif k is not None:
            if variant not in ALPHA_VARIANTS:
                raise ConfigError(f"unknown NetVLAD initialisation {variant!r}; choose one of {ALPHA_VARIANTS}")
            self.layer = NetVLADLayer(int(k), backbone_dim, bias=variant == "v2")
            self._fitted = False
        else:
            raise ConfigError(
                "the netvlad aggregator needs a vocabulary (or checkpoint=PATH of a trained NetVLAD, "
                "or k=K to fit one with .fit(descriptors))"
            )
        self.requires_grad_(self.trainable)

    def _init_from_zoo(self, zoo: str, weights: str | None) -> None:
        """Layer and whitening sized from the zoo checkpoint's tensors, then filled by the zoo loader."""
        state = zoo_part(zoo, weights, "aggregator")
        centroids, projection = state.get("layer.centroids"), state.get("wpca.weight")
        if centroids is None:
            raise VocabularyMismatchError(f"zoo checkpoint {zoo} holds no NetVLAD layer for the netvlad aggregator")
        num_clusters, dim = (int(n) for n in centroids.shape)
        if dim != self.backbone_dim:
            raise VocabularyMismatchError(f"zoo {zoo}: NetVLAD is {dim}-d, the backbone gives {self.backbone_dim}-d")
        self.layer = NetVLADLayer(num_clusters, dim, bias="layer.assign.bias" in state)
        if projection is not None:
            self.wpca = nn.Linear(int(projection.shape[1]), int(projection.shape[0]), bias="wpca.bias" in state)
        load_part(self, zoo, weights, "aggregator")

    def _init_from_vocabulary(self, vocabulary: Vocabulary, alpha: float | None) -> None:
        if vocabulary.dim != self.backbone_dim:
            raise VocabularyMismatchError(
                f"vocabulary has {vocabulary.dim}-d centres but the backbone gives {self.backbone_dim}-d"
            )
        if alpha is None:
            margin = vocabulary.metadata.get("assignment_margin")
            if margin is None:
                raise ConfigError(
                    f"vocabulary {vocabulary.metadata.get('name', vocabulary.checksum)} records no assignment margin; "
                    "rebuild it with this vprkit version or pass alpha=… to the netvlad aggregator"
                )
            alpha = alpha_from_margin(float(margin))
        self.alpha = float(alpha)
        self.vocabulary = vocabulary
        self.layer = NetVLADLayer.from_centres(vocabulary.centres, self.alpha, self.variant).eval()
        self._fitted = True

    def fit(
        self, descriptors: np.ndarray | torch.Tensor, seed: int = 0, metadata: dict[str, Any] | None = None, **_: Any
    ) -> None:
        """k-means centres (K = the layer's clusters) and α from the sample's assignment margin (unless ``alpha`` was given)."""
        if self.checkpoint is not None or self.zoo:
            raise ConfigError("this netvlad aggregator was loaded from a trained checkpoint; fitting would discard it")
        device = self.layer.centroids.device
        voc = fit_vocabulary(descriptors, self.layer.num_clusters, metadata, seed=seed)
        self._init_from_vocabulary(voc, self.alpha)
        self.layer.to(device)
        self.requires_grad_(self.trainable)

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def get_extra_state(self) -> str:
        return json.dumps({"alpha": self.alpha, "fitted": self._fitted}, sort_keys=True)

    def set_extra_state(self, state: str) -> None:
        d = json.loads(state)
        self.alpha = d.get("alpha")
        self._fitted = bool(d.get("fitted", True))

    @classmethod
    def wants_vocabulary(cls, options: dict[str, Any]) -> bool:
        return not options.get("checkpoint") and not options.get("zoo") and options.get("k") is None

    @property
    def dim(self) -> int:
        return self.wpca.out_features if self.wpca is not None else self.layer.num_clusters * self.layer.dim

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        if not self._fitted:
            raise ConfigError("this netvlad aggregator is not fitted: call .fit(descriptors) or load_state_dict(...)")
        flat = features.flat().float()
        out = torch.cat([self.layer(flat[i : i + self.chunk]) for i in range(0, len(flat), self.chunk)])
        return out if self.wpca is None else l2n(self.wpca(out))

    def identity(self) -> dict[str, Any]:
        source = (
            self.zoo
            if self.zoo
            else Path(self.checkpoint).name
            if self.checkpoint
            else (self.vocabulary.checksum if self.vocabulary is not None else None)
        )
        return {**super().identity(), "k": self.layer.num_clusters, "netvlad": source, "wpca": self.wpca is not None}


AGGREGATORS.register("netvlad", NetVLAD)
