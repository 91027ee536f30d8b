"""Re-ranking: Patch-NetVLAD-style multi-scale patch matching over a global shortlist.

``patches`` (integral NetVLAD patch descriptors) → ``matching`` (mutual nearest neighbours) →
``scoring`` (RANSAC homography, rapid spatial scoring) → ``fusion`` (per-scale z-norm, weighted
sums, global fusion, and the global gap deciding which candidates are re-ranked at all), packaged
as the :class:`PatchReranker` and named presets (``performance``, ``performance-reference``,
``speed``, ``storage`` …, plain data in :data:`vprkit.presets.RERANK_PRESETS`; a preset on one map is a
:class:`RerankOptions`). The ``patches`` map extension
stores candidates' patch descriptors at build time; for a map built without them, ``saved``
keeps the state fitted on first use (and the patches computed since) in the map.
"""

from .base import Reranker
from .extension import PatchesExtension
from .fusion import fuse_scales, fuse_with_global, rank_shortlist, within_global_gap
from .local_features import LOCAL_FEATURES, LocalFeaturePipeline, LocalFeatures, make_local_features
from .matching import Matches, mutual_nn, mutual_nn_grouped
from .options import RerankOptions
from .patches import PatchProjection, PatchScale, direct_patch_vlad, integral_patch_vlad
from .reranker import PairResult, PatchReranker, ScoreRecord, make_reranker, score_pair
from .saved import SavedState
from .scoring import SCORERS, PatchSet, SpatialScore, rapid_spatial_score, ransac_score
from .two_view import Intrinsics, TwoViewOptions, TwoViewResult, two_view
from .verification import CandidateCheck, LocalFeatureReranker, Verification, Verifier

__all__ = [
    "Reranker",
    "RerankOptions",
    "make_reranker",
    "PatchesExtension",
    "fuse_scales",
    "fuse_with_global",
    "rank_shortlist",
    "within_global_gap",
    "Matches",
    "mutual_nn",
    "mutual_nn_grouped",
    "PatchProjection",
    "PatchScale",
    "direct_patch_vlad",
    "integral_patch_vlad",
    "PairResult",
    "PatchReranker",
    "ScoreRecord",
    "score_pair",
    "SCORERS",
    "PatchSet",
    "SpatialScore",
    "rapid_spatial_score",
    "ransac_score",
    "SavedState",
    "LOCAL_FEATURES",
    "LocalFeaturePipeline",
    "LocalFeatures",
    "make_local_features",
    "Intrinsics",
    "TwoViewOptions",
    "TwoViewResult",
    "two_view",
    "CandidateCheck",
    "LocalFeatureReranker",
    "Verification",
    "Verifier",
]
