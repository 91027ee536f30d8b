"""Why did a query match? Its best map image with the strongest matched SuperSegments side by side.

``vprkit.pipeline.explain`` localises the query with the map's retriever (``segvlad`` or any other),
then this module recomputes the SuperSegments of the query and of the best match (:func:`segment_sets`;
the map image is re-read from the map's image folder; if it is gone, the stored SuperSegment patch
sets are drawn instead, :func:`stored_segment_set`), pairs them by
similarity (greedy one-to-one: the most similar pair first, each segment used once) and draws the
top pairs: each pair's *centre segment* is filled in a shared colour, the full SuperSegment is
outlined in that colour, and a line joins the two centroids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from skimage.segmentation import find_boundaries

from ..backbones.base import Backbone
from ..backbones.extract import ExtractionOptions, extract
from ..images import ImageSource
from ..io import atomic_path
from .base import patch_centroids
from .retriever import GROUP, SegmentsExtension, SegmentSet, batch_images

if TYPE_CHECKING:
    from ..maps import MapStore


@dataclass
class SegmentPair:
    query_segment: int
    map_segment: int
    similarity: float
    query_centroid: tuple[float, float]
    map_centroid: tuple[float, float]


@dataclass
class Explanation:
    query: str
    match: str
    match_row: int
    score: float
    pairs: list[SegmentPair] = field(default_factory=list)
    figure_path: str | None = None

    def lines(self) -> list[str]:
        out = [f"query {self.query} → {self.match} (row {self.match_row}, score {self.score:.4f})"]
        for i, p in enumerate(self.pairs):
            out.append(
                f"  #{i + 1}: query SuperSegment {p.query_segment} ↔ map SuperSegment {p.map_segment}  "
                f"similarity {p.similarity:.3f}"
            )
        return out


def greedy_pairs(sim: np.ndarray, top: int) -> list[tuple[int, int, float]]:
    """One-to-one pairs by descending similarity (each row and column used at most once)."""
    sim = np.asarray(sim, np.float64)
    if sim.size == 0:
        return []
    order = np.argsort(-sim, axis=None, kind="stable")
    used_r, used_c, out = set(), set(), []
    for flat in order:
        r, c = np.unravel_index(flat, sim.shape)
        if r in used_r or c in used_c:
            continue
        used_r.add(int(r))
        used_c.add(int(c))
        out.append((int(r), int(c), float(sim[r, c])))
        if len(out) >= top:
            break
    return out


def segment_sets(
    backbone: Backbone, extraction: ExtractionOptions, extension: SegmentsExtension, images: ImageSource
) -> tuple[list[SegmentSet], list[np.ndarray]]:
    """SuperSegments (and prepared pixels) of every image of ``images``, as the map's extension makes them."""
    sets, pictures = [], []
    for batch, feats in extract(backbone, extraction, images):
        sets.extend(extension.analyse(batch, feats))
        pictures.extend(batch_images(batch))
    return sets, pictures


def stored_segment_set(store: "MapStore", row: int, stride: int):
    """A map image's SuperSegments as stored (when its image file is gone), for drawing on a grey canvas."""
    with store.open_extras() as reader:
        payload = reader.extras(GROUP, row)
    desc, members = SegmentsExtension.read_payload(payload)
    return _stored_set(desc, members, payload, stride)


def explain_pair(query: str, qset, match: str, row: int, score: float, mset, top: int = 5) -> Explanation:
    """Pair the query's SuperSegments with the match's (greedy one-to-one by similarity)."""
    sim = qset.descriptors @ mset.descriptors.T
    pairs = [
        SegmentPair(r, c, s, tuple(map_centroid(qset, r)), tuple(map_centroid(mset, c)))
        for r, c, s in greedy_pairs(sim, top)
    ]
    return Explanation(query, match, row, score, pairs)


def _stored_set(desc, members, payload, stride):
    grid = tuple(int(v) for v in payload["grid"])
    n = len(desc)
    return SegmentSet(
        np.zeros((0, grid[0] * stride, grid[1] * stride), bool),
        members,
        np.zeros((n, 2)),
        members,
        desc,
        np.arange(n),
        grid,
        stride,
    )


def map_centroid(s, i: int) -> np.ndarray:
    """Pixel (x, y) centroid of kept SuperSegment ``i``'s centre segment."""
    seg = int(s.kept[i])
    if seg < len(s.centroids) and np.isfinite(s.centroids[seg]).all() and len(s.masks):
        return s.centroids[seg]
    return patch_centroids(s.members[i : i + 1], s.grid, s.stride)[0]


def draw(exp: Explanation, qimg: np.ndarray, qset, mimg: np.ndarray, mset, out: str | os.PathLike) -> Path:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import ConnectionPatch

    colours = colormaps["tab10"]
    fig = Figure(figsize=(10, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, img, title in (
        (axes[0], qimg, f"query: {Path(exp.query).name}"),
        (axes[1], mimg, f"best match: {exp.match}  (score {exp.score:.3f})"),
    ):
        ax.imshow(img)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    for k, p in enumerate(exp.pairs):
        col = np.array(colours(k % 10)[:3])
        for ax, img, s, i in ((axes[0], qimg, qset, p.query_segment), (axes[1], mimg, mset, p.map_segment)):
            h, w = img.shape[:2]
            centre = _fit(s.centre_mask(i), (h, w))
            sup = _fit(s.super_mask(i, (h, w)), (h, w))
            overlay = np.zeros((h, w, 4))
            overlay[centre] = [*col, 0.45]
            edge = find_boundaries(sup, mode="inner")
            overlay[edge] = [*col, 1.0]
            ax.imshow(overlay)
        con = ConnectionPatch(
            xyA=p.query_centroid,
            coordsA=axes[0].transData,
            xyB=p.map_centroid,
            coordsB=axes[1].transData,
            color=col,
            linewidth=1.5,
        )
        fig.add_artist(con)
        axes[0].text(
            *p.query_centroid,
            str(k + 1),
            color="white",
            fontsize=8,
            ha="center",
            va="center",
            bbox=dict(boxstyle="circle,pad=0.15", fc=col, ec="none"),
        )
        axes[1].text(
            *p.map_centroid,
            str(k + 1),
            color="white",
            fontsize=8,
            ha="center",
            va="center",
            bbox=dict(boxstyle="circle,pad=0.15", fc=col, ec="none"),
        )
    legend = "   ".join(f"#{k + 1}: {p.similarity:.3f}" for k, p in enumerate(exp.pairs))
    fig.text(0.5, 0.02, f"matched SuperSegments (cosine): {legend}", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png")
    return out


def _fit(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask, bool)
    outm = np.zeros(size, bool)
    h, w = min(size[0], mask.shape[0]), min(size[1], mask.shape[1])
    outm[:h, :w] = mask[:h, :w]
    return outm
