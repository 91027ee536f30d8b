"""Metric-learning losses for VPR behind one call signature, with geographic masks.

Why: VPR papers train with many losses (triplet for NetVLAD, Multi-Similarity for MixVPR, CosFace
for CosPlace, …). pytorch-metric-learning (PML) implements almost all of them with one signature,
``loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``, so the
trainer can swap them by name through :data:`LOSSES`. Two things PML lacks are added here:

- :class:`QuadrupletLoss` (Chen et al. 2017), written as a PML loss (pluggable ``distance``,
  reducer, labels or index tuples);
- geographic masks: PML losses take class labels or index tuples, but GPS supervision gives
  positive / soft-positive / negative masks (:class:`~vprkit.training.labels.PlaceLabels`).
  :class:`GeoMaskedLoss` turns the masks into index tuples, so soft positives are never negatives.

Defaults follow REFERENCE.md's training conventions, which differ from PML's on purpose: triplet
margin 0.1 (NetVLAD-style training, PML: 0.05), Multi-Similarity α 1 β 50 base 0 (MixVPR; PML:
2, 50, 0.5), CosFace scale 30 margin 0.40 (CosPlace; PML: 64, 0.35).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.reducers import AvgNonZeroReducer
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ..errors import ConfigError
from ..registry import Registry
from .labels import PlaceLabels, pairs_from_masks, triplets_from_masks

# --- defaults (REFERENCE.md, "Training conventions") --------------------------------------------
TRIPLET_MARGIN = 0.1
# Quadruplet: the paper asks for a weaker second constraint (α2 < α1); half of the triplet margin.
QUADRUPLET_MARGINS = (0.1, 0.05)
MS_ALPHA, MS_BETA, MS_BASE = 1.0, 50.0, 0.0
COSFACE_SCALE, COSFACE_MARGIN = 30.0, 0.40
ARCFACE_SCALE, ARCFACE_MARGIN_DEG = 64.0, 28.6
NTXENT_TEMPERATURE = 0.07
CONTRASTIVE_POS_MARGIN, CONTRASTIVE_NEG_MARGIN = 0.0, 1.0
PROXY_ANCHOR_MARGIN, PROXY_ANCHOR_ALPHA = 0.1, 32.0


class QuadrupletIndices(NamedTuple):
    """Explicit quadruplets for :class:`QuadrupletLoss`: ``(a, p, n1, n2)``.

    ``a`` indexes ``embeddings``; ``p``, ``n1`` and ``n2`` index ``ref_emb`` (= ``embeddings`` when
    no reference set is given), as PML's tuples do. ``n2 = −1`` marks a triplet without a second
    negative: it contributes its first term only. A *plain* 4-tuple keeps PML's meaning — pairs
    ``(a1, p, a2, n)`` — so a pair miner's output can be passed to any loss; only this named type
    means quadruplets, and only :class:`QuadrupletLoss` understands it.
    """

    anchors: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor
    second_negatives: torch.Tensor


def quadruplets_from_masks(pos: torch.Tensor, neg: torch.Tensor, ref_neg: torch.Tensor) -> QuadrupletIndices:
    """All quadruplets: ``pos[a,p]``, ``neg[a,n1]``, ``neg[a,n2]`` and ``ref_neg[n1,n2]`` (n2 another place than n1).

    Triplets for which no such n2 exists are kept with ``n2 = −1`` (first term only).
    """
    a, p, n1 = triplets_from_masks(pos, neg)
    ok = neg[a] & ref_neg[n1]
    t, n2 = torch.where(ok)
    lone = torch.where(~ok.any(dim=1))[0]
    minus = torch.full_like(lone, -1)
    return QuadrupletIndices(
        torch.cat([a[t], a[lone]]), torch.cat([p[t], p[lone]]), torch.cat([n1[t], n1[lone]]), torch.cat([n2, minus])
    )


class QuadrupletLoss(BaseMetricLossFunction):
    """Quadruplet loss (Chen et al. 2017, "Beyond triplet loss"), PML style.

    ``Σ_(a,p,n1) [d(a,p) − d(a,n1) + m1]₊ + Σ_(a,p,n1,n2) [d(a,p) − d(n1,n2) + m2]₊`` where n2 is
    of another place than both a and n1. ``distance`` is any PML distance (default: L2 on
    normalised embeddings; ``LpDistance(power=2)`` gives the paper's squared distances; with a
    similarity such as ``CosineSimilarity`` the margins apply to similarities, as PML does).

    Tuples, in order of precedence:

    - ``indices_tuple`` a :class:`QuadrupletIndices` — used as given;
    - ``indices_tuple`` a triplet ``(a, p, n)`` or a PML pair tuple ``(a1, p, a2, n)`` (converted to
      triplets with a shared anchor) — n2 is chosen among the references whose label differs from
      both a's and n1's, so ``labels`` are needed;
    - only ``labels`` — every triplet of the batch, then n2 as above.

    ``second_negatives``: ``"all"`` (every valid n2 per triplet) or ``"hardest"`` (the n2 closest to
    n1, one per triplet). The first term is counted once per distinct triplet, the second once
    per quadruplet; the default reducer averages the non-zero terms of both (like PML's triplet loss).
    """

    def __init__(
        self,
        margin: float = QUADRUPLET_MARGINS[0],
        second_margin: float = QUADRUPLET_MARGINS[1],
        second_negatives: str = "all",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if second_negatives not in ("all", "hardest"):
            raise ConfigError(f"second_negatives must be 'all' or 'hardest', got {second_negatives!r}")
        self.margin = margin
        self.second_margin = second_margin
        self.second_negatives = second_negatives
        self.add_to_recordable_attributes(list_of_names=["margin", "second_margin"], is_stat=False)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        ref_mat = mat if ref_emb is embeddings else self.distance(ref_emb, ref_emb)
        if isinstance(indices_tuple, QuadrupletIndices):
            a, p, n1, n2 = (x.to(embeddings.device).long() for x in indices_tuple)
            trip = torch.unique(torch.stack([a, p, n1]), dim=1) if a.numel() else torch.stack([a, p, n1])
            ta, tp, tn = trip[0], trip[1], trip[2]
            has = n2 >= 0
            a, p, n1, n2 = a[has], p[has], n1[has], n2[has]
        else:
            c_f.labels_or_indices_tuple_required(labels, indices_tuple)
            if labels is None:
                raise ValueError("QuadrupletLoss needs labels to choose second negatives, or QuadrupletIndices")
            ta, tp, tn = lmu.convert_to_triplets(indices_tuple, labels, ref_labels, t_per_anchor="all")
            a, p, n1, n2 = self._second_negatives(ta, tp, tn, labels, ref_labels, ref_mat)
        if len(ta) == 0 and len(a) == 0:
            return self.zero_losses()
        first = torch.nn.functional.relu(self.distance.margin(mat[ta, tp], mat[ta, tn]) + self.margin)
        second = torch.nn.functional.relu(self.distance.margin(mat[a, p], ref_mat[n1, n2]) + self.second_margin)
        return {
            "loss": {
                "losses": torch.cat([first, second]),
                "indices": torch.cat([ta, a]),
                "reduction_type": "element",
            }
        }

    def _second_negatives(self, a, p, n1, labels, ref_labels, ref_mat):
        valid = (ref_labels.unsqueeze(0) != labels[a].unsqueeze(1)) & (
            ref_labels.unsqueeze(0) != ref_labels[n1].unsqueeze(1)
        )
        if self.second_negatives == "all":
            t, n2 = torch.where(valid)
            return a[t], p[t], n1[t], n2
        d = ref_mat[n1].detach().clone()
        fill = c_f.neg_inf(d.dtype) if self.distance.is_inverted else c_f.pos_inf(d.dtype)
        d[~valid] = fill
        n2 = d.argmax(dim=1) if self.distance.is_inverted else d.argmin(dim=1)
        keep = valid.any(dim=1)
        return a[keep], p[keep], n1[keep], n2[keep]

    def get_default_reducer(self):
        return AvgNonZeroReducer()


# Losses that learn one weight vector per class: they need class labels and ignore tuples.
_CLASSIFIER_TYPES = (pml_losses.LargeMarginSoftmaxLoss, pml_losses.ProxyAnchorLoss, pml_losses.ProxyNCALoss)


def is_classifier_loss(loss: torch.nn.Module) -> bool:
    """True for proxy / margin-softmax losses (class labels required, index tuples meaningless)."""
    inner = loss.loss if isinstance(loss, GeoMaskedLoss) else loss
    return isinstance(inner, _CLASSIFIER_TYPES)


class GeoMaskedLoss(torch.nn.Module):
    """Any loss of this module, supervised by :class:`PlaceLabels` instead of class labels.

    Same signature as PML's losses, with one convention: **``labels`` / ``ref_labels`` are image
    ids** (indices into the ``PlaceLabels``), not classes. With no ``indices_tuple``, the batch's
    positive / negative masks become an index tuple — pairs ``(a1, p, a2, n)`` for PML's tuple
    losses (``tuples="triplets"`` for triplets), :class:`QuadrupletIndices` for the quadruplet loss —
    so soft positives are never negatives. A given ``indices_tuple`` (e.g. from
    :class:`~vprkit.training.miners.GeoMiner`) is passed through. Classifier losses (CosFace, ArcFace,
    proxies) get the places' class labels instead, and need ``places.has_classes``.
    """

    def __init__(self, loss: torch.nn.Module, places: PlaceLabels, tuples: str = "pairs"):
        super().__init__()
        if tuples not in ("pairs", "triplets"):
            raise ConfigError(f"tuples must be 'pairs' or 'triplets', got {tuples!r}")
        if isinstance(loss, _CLASSIFIER_TYPES) and not places.has_classes:
            raise ConfigError(
                f"{type(loss).__name__} needs class labels; these place labels ({places.source}) have none"
            )
        self.loss = loss
        self.places = places
        self.tuples = tuples

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None):
        if labels is None:
            raise ValueError("GeoMaskedLoss needs the batch's image ids as labels")
        ids = labels
        ref_ids = ref_labels if ref_emb is not None else None
        if ref_emb is not None and ref_ids is None:
            raise ValueError("GeoMaskedLoss with ref_emb needs the references' image ids as ref_labels")
        classes = ref_classes = None
        if self.places.has_classes:
            classes = self.places.class_labels(ids).to(embeddings.device)
            if ref_ids is not None:
                ref_classes = self.places.class_labels(ref_ids, ref=not self.places.square).to(embeddings.device)
        if isinstance(self.loss, _CLASSIFIER_TYPES):
            return self.loss(embeddings, classes, indices_tuple, ref_emb, ref_classes)
        if indices_tuple is None:
            pos, neg = self.places.masks(ids, ref_ids, device=embeddings.device)
            if isinstance(self.loss, QuadrupletLoss):
                r = ids if ref_ids is None else ref_ids
                ref_places = self.places if self.places.square else None
                if ref_places is None:
                    raise ConfigError("the quadruplet loss with query × reference labels needs square (one-set) labels")
                _, ref_neg = ref_places.masks(r, device=embeddings.device)
                indices_tuple = quadruplets_from_masks(pos, neg, ref_neg)
            elif self.tuples == "triplets":
                indices_tuple = triplets_from_masks(pos, neg)
            else:
                indices_tuple = pairs_from_masks(pos, neg)
        # Tuple losses get the tuple only: class labels would let PML re-derive pairs from classes.
        return self.loss(embeddings, None, indices_tuple, ref_emb, None)


# --- the registry ---------------------------------------------------------------------------------
LOSSES: Registry[Callable[..., torch.nn.Module]] = Registry("loss")


@LOSSES.register("contrastive")
def contrastive(pos_margin: float = CONTRASTIVE_POS_MARGIN, neg_margin: float = CONTRASTIVE_NEG_MARGIN, **kwargs):
    return pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin, **kwargs)


@LOSSES.register("triplet")
def triplet(margin: float = TRIPLET_MARGIN, **kwargs):
    return pml_losses.TripletMarginLoss(margin=margin, **kwargs)


@LOSSES.register("quadruplet")
def quadruplet(margin: float = QUADRUPLET_MARGINS[0], second_margin: float = QUADRUPLET_MARGINS[1], **kwargs):
    return QuadrupletLoss(margin=margin, second_margin=second_margin, **kwargs)


@LOSSES.register("proxy-nca")
def proxy_nca(num_classes: int, embedding_size: int, **kwargs):
    return pml_losses.ProxyNCALoss(num_classes=num_classes, embedding_size=embedding_size, **kwargs)


@LOSSES.register("proxy-anchor")
def proxy_anchor(
    num_classes: int,
    embedding_size: int,
    margin: float = PROXY_ANCHOR_MARGIN,
    alpha: float = PROXY_ANCHOR_ALPHA,
    **kwargs,
):
    return pml_losses.ProxyAnchorLoss(
        num_classes=num_classes, embedding_size=embedding_size, margin=margin, alpha=alpha, **kwargs
    )


def _ntxent(temperature: float = NTXENT_TEMPERATURE, **kwargs):
    return pml_losses.NTXentLoss(temperature=temperature, **kwargs)


LOSSES.register("infonce", _ntxent)
LOSSES.register("nt-xent", _ntxent)


@LOSSES.register("cosface")
def cosface(
    num_classes: int, embedding_size: int, scale: float = COSFACE_SCALE, margin: float = COSFACE_MARGIN, **kwargs
):
    return pml_losses.CosFaceLoss(
        num_classes=num_classes, embedding_size=embedding_size, margin=margin, scale=scale, **kwargs
    )


@LOSSES.register("arcface")
def arcface(
    num_classes: int, embedding_size: int, scale: float = ARCFACE_SCALE, margin: float = ARCFACE_MARGIN_DEG, **kwargs
):
    return pml_losses.ArcFaceLoss(
        num_classes=num_classes, embedding_size=embedding_size, margin=margin, scale=scale, **kwargs
    )


@LOSSES.register("multi-similarity")
def multi_similarity(alpha: float = MS_ALPHA, beta: float = MS_BETA, base: float = MS_BASE, **kwargs):
    return pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base, **kwargs)


CLASSIFIER_LOSSES = ("arcface", "cosface", "proxy-anchor", "proxy-nca")


def make_loss(name: str, places: PlaceLabels | None = None, **kwargs) -> torch.nn.Module:
    """The loss registered as ``name`` (options as keyword arguments), wrapped in
    :class:`GeoMaskedLoss` when ``places`` is given. Classifier losses need ``num_classes`` and
    ``embedding_size``; with ``places`` that have classes, ``num_classes`` defaults to theirs."""
    if name in CLASSIFIER_LOSSES and places is not None and places.has_classes:
        kwargs.setdefault("num_classes", places.num_classes)
    if name in CLASSIFIER_LOSSES and ("num_classes" not in kwargs or "embedding_size" not in kwargs):
        raise ConfigError(f"loss {name!r} needs num_classes and embedding_size")
    loss = LOSSES.get(name)(**kwargs)
    return GeoMaskedLoss(loss, places) if places is not None else loss
