"""Why did a query match? Its best map image with the strongest matched SuperSegments side by side.

:func:`explain` localises the query with the map's retriever (``segvlad`` or any other), recomputes
the SuperSegments of the query and of the best match (the map image is re-read from the map's
image folder; if it is gone, the stored SuperSegment patch sets are drawn instead), pairs them by
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

from ..errors import MapError

if TYPE_CHECKING:
    from ..pipeline import Map


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
            out.append(f"  #{i + 1}: query SuperSegment {p.query_segment} ↔ map SuperSegment {p.map_segment}  "
                       f"similarity {p.similarity:.3f}")
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
        used_r.add(int(r)); used_c.add(int(c))
        out.append((int(r), int(c), float(sim[r, c])))
        if len(out) >= top:
            break
    return out


def _segment_sets(m: "Map", paths: list[Path]):
    from ..images import iter_batches
    import torch

    ext = m.extensions.get("segments")
    if ext is None:
        raise MapError(f"map {m.dir} has no SuperSegments ('segments' extension); explain needs a segvlad map")
    sets, images = [], []
    for batch in iter_batches("/", [str(p.resolve()) for p in paths], m.config.image, m.backbone.size_multiple, 1, 1):
        for key, msg in batch.failures:
            raise MapError(msg)
        with torch.inference_mode():
            feats = m.backbone(torch.from_numpy(batch.pixels))
        from .retriever import batch_images

        sets.extend(ext.analyse(batch, feats))
        images.extend(batch_images(batch))
    return sets, images


def explain(map: "Map | str | os.PathLike", query: str | os.PathLike, out: str | os.PathLike | None = None,
            top: int = 5, rank: int = 0) -> Explanation:
    """Explain the ``rank``-th match (0 = best) of ``query``; draw it to ``out`` (PNG) if given."""
    from .. import pipeline

    m = map if not isinstance(map, (str, os.PathLike)) else pipeline.open_map(map)
    res = pipeline.localize(m, [query], top_k=rank + 1)[0]
    if len(res.matches) <= rank:
        raise MapError("the map returned no match for this query")
    match = res.matches[rank]
    qset, qimg = _segment_sets(m, [Path(query)])
    qset, qimg = qset[0], qimg[0]
    mpath = m.images_root / match.key
    if mpath.is_file():
        (mset,), (mimg,) = _segment_sets(m, [mpath])
    else:  # image moved: use the stored SuperSegments, drawn on a grey canvas
        from .retriever import SegmentsExtension

        with m.store.open() as reader:
            payload = reader.extras("segments", match.row)
        desc, members = SegmentsExtension.read_payload(payload)
        mset = _stored_set(desc, members, payload, m.backbone.stride)
        mimg = np.full_like(qimg, 128)
    sim = qset.descriptors @ mset.descriptors.T
    pairs = [SegmentPair(r, c, s, tuple(map_centroid(qset, r)), tuple(map_centroid(mset, c)))
             for r, c, s in greedy_pairs(sim, top)]
    exp = Explanation(str(query), match.key, match.row, match.score, pairs)
    if out is not None:
        draw(exp, qimg, qset, mimg, mset, out)
        exp.figure_path = str(out)
    return exp


def _stored_set(desc, members, payload, stride):
    from .retriever import SegmentSet

    grid = tuple(int(v) for v in payload["grid"])
    n = len(desc)
    return SegmentSet(np.zeros((0, grid[0] * stride, grid[1] * stride), bool), members, np.zeros((n, 2)), members,
                      desc, np.arange(n), grid, stride)


def map_centroid(s, i: int) -> np.ndarray:
    """Pixel (x, y) centroid of kept SuperSegment ``i``'s centre segment."""
    seg = int(s.kept[i])
    if seg < len(s.centroids) and np.isfinite(s.centroids[seg]).all() and len(s.masks):
        return s.centroids[seg]
    from .base import patch_centroids

    return patch_centroids(s.members[i : i + 1], s.grid, s.stride)[0]


def draw(exp: Explanation, qimg: np.ndarray, qset, mimg: np.ndarray, mset, out: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import ConnectionPatch
    from skimage.segmentation import find_boundaries

    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    for ax, img, title in ((axes[0], qimg, f"query: {Path(exp.query).name}"),
                           (axes[1], mimg, f"best match: {exp.match}  (score {exp.score:.3f})")):
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
        con = ConnectionPatch(xyA=p.query_centroid, coordsA=axes[0].transData, xyB=p.map_centroid,
                              coordsB=axes[1].transData, color=col, linewidth=1.5)
        fig.add_artist(con)
        axes[0].text(*p.query_centroid, str(k + 1), color="white", fontsize=8, ha="center", va="center",
                     bbox=dict(boxstyle="circle,pad=0.15", fc=col, ec="none"))
        axes[1].text(*p.map_centroid, str(k + 1), color="white", fontsize=8, ha="center", va="center",
                     bbox=dict(boxstyle="circle,pad=0.15", fc=col, ec="none"))
    legend = "   ".join(f"#{k + 1}: {p.similarity:.3f}" for k, p in enumerate(exp.pairs))
    fig.text(0.5, 0.02, f"matched SuperSegments (cosine): {legend}", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _fit(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask, bool)
    outm = np.zeros(size, bool)
    h, w = min(size[0], mask.shape[0]), min(size[1], mask.shape[1])
    outm[:h, :w] = mask[:h, :w]
    return outm
