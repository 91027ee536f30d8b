"""Training by deep metric learning: labels from geography and time, losses and miners.

``PlaceLabels`` (from poses, synchronised frames, ground truth or classes) is the one label
representation; ``make_loss(name)`` / ``LOSSES`` give pytorch-metric-learning-style losses
(``GeoMaskedLoss`` feeds them geographic masks); ``MINERS``, ``GeoMiner`` and
``OfflineHardNegativeMiner`` choose the tuples.

Training (issue 12, deliverables 4–7): ``CachedFeatures`` (backbone features once, on disk,
memory-mapped beyond the budget), ``SuffixFeatures`` (unfrozen blocks run on a cache of the
frozen prefix's output, ``Backbone.split``) or ``ImageFeatures`` (unfrozen blocks, images re-read);
``build_head`` (GeM, NetVLAD from k-means, MixVPR, + a linear projection — a ``trained``
aggregator); ``Trainer`` (places × images batches, loss + miner, deterministic, resumable,
Recall@N validation every epoch, best kept); ``run_recipe`` (``vprkit train RECIPE.toml``);
``checkpoint_config`` / ``register_checkpoint`` (a checkpoint is a preset); ``add_pca``;
``run_ensemble`` (``[head] members = N``: N heads, seeds apart, concatenated into one ``ensemble`` preset).
"""

from .labels import (
    CellClasses,
    PlaceLabels,
    SparseRelation,
    cosplace_classes,
    frame_keys,
    pairs_from_masks,
    triplets_from_masks,
)
from .losses import (
    LOSSES,
    GeoMaskedLoss,
    QuadrupletIndices,
    QuadrupletLoss,
    is_classifier_loss,
    make_loss,
    quadruplets_from_masks,
)
from .miners import (
    MINERS,
    BatchAllMiner,
    BatchEasyHardMiner,
    BatchHardMiner,
    GeoMiner,
    MinedTuples,
    MultiSimilarityMiner,
    OfflineHardNegativeMiner,
    TripletMiner,
)

from .checkpoint import add_pca, checkpoint_config, is_checkpoint, register_checkpoint
from .curves import plot_curves
from .ensemble import run_ensemble
from .features import CachedFeatures, ImageFeatures, SuffixFeatures
from .heads import build_head
from .recipe import load_recipe, run_recipe
from .trainer import PlaceSampler, Trainer, TrainSettings, Validation, validate

__all__ = [
    "CachedFeatures",
    "ImageFeatures",
    "PlaceSampler",
    "SuffixFeatures",
    "TrainSettings",
    "Trainer",
    "Validation",
    "add_pca",
    "build_head",
    "checkpoint_config",
    "is_checkpoint",
    "load_recipe",
    "plot_curves",
    "register_checkpoint",
    "run_ensemble",
    "run_recipe",
    "validate",
    "LOSSES",
    "MINERS",
    "BatchAllMiner",
    "BatchEasyHardMiner",
    "BatchHardMiner",
    "CellClasses",
    "GeoMaskedLoss",
    "GeoMiner",
    "MinedTuples",
    "MultiSimilarityMiner",
    "OfflineHardNegativeMiner",
    "PlaceLabels",
    "QuadrupletIndices",
    "QuadrupletLoss",
    "SparseRelation",
    "TripletMiner",
    "cosplace_classes",
    "frame_keys",
    "is_classifier_loss",
    "make_loss",
    "pairs_from_masks",
    "quadruplets_from_masks",
    "triplets_from_masks",
]
