"""Training by deep metric learning: labels from geography and time, losses and miners.

``PlaceLabels`` (from poses, synchronised frames, ground truth or classes) is the one label
representation; ``make_loss(name)`` / ``LOSSES`` give pytorch-metric-learning-style losses
(``GeoMaskedLoss`` feeds them geographic masks); ``MINERS``, ``GeoMiner`` and
``OfflineHardNegativeMiner`` choose the tuples. Heads and the trainer come next (issue 12).
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

__all__ = [
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
