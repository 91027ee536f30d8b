"""SegVLAD (Revisit Anything): segments → SuperSegments → per-SuperSegment VLAD → segment voting.

Importing this package registers the segmenters (``SEGMENTERS``: ``slic``, ``felzenszwalb``,
``features``, ``grid``, ``sam``), the ``segments`` map extension and the ``segvlad`` retriever.
"""

from . import feature_clusters, grid, sam, superpixels  # noqa: F401  (register segmenters)
from .base import SEGMENTERS, Segmenter, build_segmenter, handle_uncovered, masks_to_patches, masks_to_prepared
from .explain import Explanation, explain_pair, segment_sets
from .graph import adjacency, expand, supersegments
from .retriever import SegmentIndex, SegmentSet, SegmentsExtension, SegVLADRetriever
from .supersegments import PCA, select_distinctive, supersegment_sap, supersegment_vlad
from .voting import max_seg, max_sim, vote, weighted

__all__ = [
    "SEGMENTERS",
    "Segmenter",
    "build_segmenter",
    "handle_uncovered",
    "masks_to_patches",
    "masks_to_prepared",
    "Explanation",
    "explain_pair",
    "segment_sets",
    "adjacency",
    "expand",
    "supersegments",
    "SegmentIndex",
    "SegmentSet",
    "SegmentsExtension",
    "SegVLADRetriever",
    "PCA",
    "select_distinctive",
    "supersegment_sap",
    "supersegment_vlad",
    "max_seg",
    "max_sim",
    "vote",
    "weighted",
]
