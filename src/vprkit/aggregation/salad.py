"""SALAD (Izquierdo & Civera, CVPR 2024) and MegaLoc's variant of it (Berton & Masone, 2025), from the equations.

SALAD reads a ViT's patch tokens ``t_i`` (``n`` of them, ``C``-d) and its CLS token ``t_{n+1}``:

- *cluster features* ``f_i = W₂ ReLU(W₁ t_i)`` (``C → 512 → l``; during training dropout 0.3 after ``W₁``);
- *scores* ``s_ij = V₂ ReLU(V₁ t_i)`` (``C → 512 → m``, the same dropout) for the ``m`` clusters, plus one
  *dustbin* row holding a single learned score ``z`` for every token;
- an entropic optimal transport of the ``(m+1)×n`` score matrix in the log domain (Sinkhorn, 3 iterations,
  regularisation 1): every token carries mass ``1/(n+m)``, every cluster ``1/(n+m)`` and the dustbin the
  remaining ``(n−m)/(n+m)``; the transport plan is rescaled by ``n+m`` (``P = exp(log P + log(n+m))``) and the
  dustbin row dropped, so token ``i`` sends weight ``P_ji`` to cluster ``j``;
- per-cluster aggregation ``V_j = Σ_i P_ji f_i`` (an ``l×m`` matrix), each cluster's ``l``-vector
  L2-normalised, flattened ``l``-major (entry ``c·m + j``);
- a *global token* ``g = U₂ ReLU(U₁ t_{n+1})`` (``C → 512 → token_dim``), L2-normalised;
- ``[g, vec(V)]`` L2-normalised: ``dim = m·l + token_dim`` (8448 for SALAD's 64 × 128 + 256).

MegaLoc (``variant="megaloc"``) is that head with ``l = 256`` (``64 × 256 + 256 = 16640``) followed by a linear
projection ``16640 → out_dim`` (8448, with bias) and a final L2 normalisation.

Both official codes (serizba/salad ``models/aggregators/salad.py``, gmberton/MegaLoc ``megaloc_model.py``) feed
the *last* DINOv2 block's tokens after the final LayerNorm: in vprkit ``layer = depth − 1, facet = "token",
final_norm = True`` — :attr:`DenseFeatures.patches` and :attr:`DenseFeatures.global_token`. Their 1×1
convolutions are linear maps over channels: here they are ``nn.Linear`` layers over the ``B×n×C`` tokens (the
zoo layouts reshape the official ``out×in×1×1`` kernels). Official checkpoints load with ``zoo=NAME``
(:mod:`vprkit.zoo.salad`). The transport needs more tokens than clusters (``n > m``: the dustbin's mass
``n − m`` must be positive): at least 65 patches (e.g. 126×126 px) for 64 clusters.

A property of this transport (the official code's too): a constant added to a whole row of the scores is
absorbed by that row's potential in the first row scaling, so the dustbin score ``z`` and the bias of the
score MLP's last layer do not change the descriptor (their gradients are rounding noise). They are kept as
parameters because the checkpoints hold them.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import DenseFeatures
from ..errors import ConfigError
from ..zoo import load_part
from .base import AGGREGATORS, Aggregator, l2n

VARIANTS = ("salad", "megaloc")
MLP_HIDDEN = 512  # the hidden width of all three MLPs in both official codes (MegaLoc's mlp_dim)
TRAIN_DROPOUT = 0.3  # dropout after the first layer of the cluster and score MLPs (training only)
MEGALOC_OUT_DIM = 8448  # MegaLoc's published descriptor size (its feat_dim)
SINKHORN_ITERATIONS = 3


def log_optimal_transport(scores: torch.Tensor, dustbin: torch.Tensor, iterations: int) -> torch.Tensor:
    """``B×m×n`` cluster scores + one dustbin score → ``B×(m+1)×n`` log transport plan, rescaled by ``n+m``.

    Marginals: each of the ``n`` tokens and each of the ``m`` clusters ``1/(n+m)``, the dustbin ``(n−m)/(n+m)``;
    ``iterations`` alternating log-domain row / column scalings starting from zero potentials (rows first).
    """
    b, m, n = scores.shape
    if n <= m:
        raise ConfigError(
            f"SALAD's optimal transport needs more patch tokens than clusters: {n} tokens for {m} clusters "
            f"(use a larger image)"
        )
    augmented = torch.cat([scores, dustbin.to(scores.dtype).expand(b, 1, n)], dim=1)
    log_mass = -torch.tensor(math.log(n + m), dtype=scores.dtype, device=scores.device)
    log_rows = log_mass.expand(m + 1).clone()
    log_rows[-1] = log_rows[-1] + math.log(n - m)
    log_cols = log_mass.expand(n)
    u = torch.zeros(b, m + 1, dtype=scores.dtype, device=scores.device)
    v = torch.zeros(b, n, dtype=scores.dtype, device=scores.device)
    for _ in range(iterations):
        u = log_rows - torch.logsumexp(augmented + v.unsqueeze(1), dim=2)
        v = log_cols - torch.logsumexp(augmented + u.unsqueeze(2), dim=1)
    return augmented + u.unsqueeze(2) + v.unsqueeze(1) - log_mass


class TwoLayerMLP(nn.Module):
    """``Linear → (dropout in training) → ReLU → Linear`` over the last axis."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.hidden = nn.Linear(in_dim, MLP_HIDDEN)
        self.out = nn.Linear(MLP_HIDDEN, out_dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(F.dropout(self.hidden(x), self.dropout, self.training)))


class SALAD(Aggregator):
    """SALAD's optimal-transport head on DINOv2 tokens (``variant="megaloc"``: plus MegaLoc's projection).

    ``dim = num_clusters · cluster_dim + token_dim``, or ``out_dim`` when a projection is set (MegaLoc).
    Frozen unless ``trainable=True``; ``zoo=NAME`` loads the aggregator part of that official checkpoint.
    """

    name = "salad"

    def __init__(
        self,
        backbone_dim: int,
        variant: str = "salad",
        num_clusters: int = 64,
        cluster_dim: int = 128,
        token_dim: int = 256,
        out_dim: int | None = None,
        sinkhorn_iterations: int = SINKHORN_ITERATIONS,
        zoo: str | None = None,
        weights: str | os.PathLike | None = None,
        trainable: bool = False,
    ):
        super().__init__(backbone_dim)
        if variant not in VARIANTS:
            raise ConfigError(f"salad: variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "megaloc" and out_dim is None:
            out_dim = MEGALOC_OUT_DIM
        if variant == "salad" and out_dim is not None:
            raise ConfigError("salad: out_dim (a final projection) belongs to variant 'megaloc'")
        if min(num_clusters, cluster_dim, token_dim, sinkhorn_iterations) < 1 or (out_dim is not None and out_dim < 1):
            raise ConfigError(
                "salad: num_clusters, cluster_dim, token_dim, sinkhorn_iterations and out_dim must be ≥ 1"
            )
        self.variant = variant
        self.num_clusters, self.cluster_dim, self.token_dim = int(num_clusters), int(cluster_dim), int(token_dim)
        self.out_dim = None if out_dim is None else int(out_dim)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.cluster_features = TwoLayerMLP(self.backbone_dim, self.cluster_dim, TRAIN_DROPOUT)
        self.score = TwoLayerMLP(self.backbone_dim, self.num_clusters, TRAIN_DROPOUT)
        self.token_features = TwoLayerMLP(self.backbone_dim, self.token_dim)
        self.dustbin = nn.Parameter(torch.tensor(1.0))
        self.projection = None if self.out_dim is None else nn.Linear(self.salad_dim, self.out_dim)
        self.zoo = zoo
        if zoo:
            load_part(self, zoo, weights, "aggregator")
        self.requires_grad_(bool(trainable))
        self.eval()  # inference never turns dropout off itself; the trainer calls train() for its steps

    @property
    def salad_dim(self) -> int:
        """SALAD's own descriptor size, before any projection."""
        return self.num_clusters * self.cluster_dim + self.token_dim

    @property
    def dim(self) -> int:
        return self.salad_dim if self.out_dim is None else self.out_dim

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        if features.global_token is None:
            raise ConfigError("the salad aggregator needs the backbone's CLS token (a DINOv2 backbone, facet 'token')")
        patches, dtype = features.patches, self.dustbin.dtype  # the head's precision (float32 unless converted)
        tokens = patches.reshape(len(patches), -1, patches.shape[-1]).to(dtype)  # B × n × C
        local = self.cluster_features(tokens)  # B × n × l
        scores = self.score(tokens).transpose(1, 2)  # B × m × n
        plan = log_optimal_transport(scores, self.dustbin, self.sinkhorn_iterations)[:, :-1].exp()  # B × m × n
        clusters = torch.bmm(local.transpose(1, 2), plan.transpose(1, 2))  # B × l × m
        scene = self.token_features(features.global_token.to(dtype))
        descriptor = l2n(torch.cat([l2n(scene), l2n(clusters, dim=1).flatten(1)], dim=-1))
        if self.projection is not None:
            descriptor = l2n(self.projection(descriptor))
        return descriptor

    def identity(self) -> dict[str, Any]:
        ident = {
            **super().identity(),
            "variant": self.variant,
            "num_clusters": self.num_clusters,
            "cluster_dim": self.cluster_dim,
            "token_dim": self.token_dim,
            "sinkhorn_iterations": self.sinkhorn_iterations,
        }
        if self.out_dim is not None:
            ident["out_dim"] = self.out_dim
        if self.zoo:
            ident["zoo"] = self.zoo
        return ident


AGGREGATORS.register("salad", SALAD)
