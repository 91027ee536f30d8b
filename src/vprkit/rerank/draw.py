"""``match-two``: match two images with a re-ranking preset and draw the inlier patch matches.

With ``map_dir`` the map's backbone, image size and fitted patch state (NetVLAD centres, α, PCA)
are used, so the score is the one re-ranking would compute. Without a map, the global preset gives
backbone and image size, and the NetVLAD centres are fitted on the two images themselves (no PCA:
two images are too few to fit one) — good for looking at matches, not for comparing scores with a
map's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..backbones.base import Backbone
from ..backbones.extract import ExtractionOptions, extract
from ..config import RerankConfig
from ..errors import ConfigError, ImageReadError
from ..images import ImageInput, image_source
from ..io import atomic_path
from .extension import PatchesExtension
from .reranker import PairResult, score_pair
from .scoring import SCORERS

# Centres for a map-less match need at least this many cells per cluster to be meaningful.
MIN_CELLS_PER_CLUSTER = 4


@dataclass
class TwoImageMatch:
    image_a: str
    image_b: str
    preset: str
    result: PairResult
    weights: tuple[float, ...]
    pixels: tuple[np.ndarray, np.ndarray]
    figure_path: str | None = None

    @property
    def score(self) -> float:
        """Weighted sum of the per-scale spatial scores (the pair's patch score before z-normalisation)."""
        return float(sum(w * s.value for w, s in zip(self.weights, self.result.scores)))

    def lines(self) -> list[str]:
        out = [f"{self.image_a} ↔ {self.image_b}  preset {self.preset}  score {self.score:.4f}"]
        for q, m, s in zip(self.result.query_sets, self.result.matches, self.result.scores):
            out.append(
                f"  patches on a {q.grid[0]}×{q.grid[1]} grid: {len(q)} query patches, {len(m)} mutual matches, "
                f"{int(s.inliers.sum())} inliers, score {s.value:.4f}"
            )
        return out


def match_pair(
    image_a: ImageInput,
    image_b: ImageInput,
    settings: RerankConfig,
    extraction: ExtractionOptions,
    backbone: Backbone,
    extension: PatchesExtension | None = None,
    out: str | os.PathLike | None = None,
) -> TwoImageMatch:
    """Match ``image_a`` (as query) against ``image_b`` (paths or decoded frames) with re-ranking ``settings``.

    ``extraction``: how the two images are prepared (the map's or the preset's image spec).
    ``extension`` is a fitted patch extension (a map's, so the score is the one re-ranking computes);
    without one, NetVLAD centres are fitted on the two images themselves (no PCA).
    """
    source = image_source({"a": image_a, "b": image_b})
    batches, feats = [], []
    for batch, f in extract(backbone, extraction, source, on_failure=_raise):
        for i in range(len(batch.keys)):  # one image per entry, whatever the batching
            batches.append(type(batch)([batch.keys[i]], batch.pixels[i : i + 1], [batch.geometries[i]]))
            feats.append(f.select(i))
    if extension is None:
        extension = PatchesExtension({**settings.extension_options(), "pca_dim": 0}, backbone, None)
        own = [extension.features(b.pixels, f) for b, f in zip(batches, feats)]
        n_cells = sum(f.patches.shape[1] * f.patches.shape[2] for f in own)
        extension.options["k"] = max(2, min(int(extension.options["k"]), n_cells // MIN_CELLS_PER_CLUSTER))
        extension.fit(zip(batches, feats))
    sets = [extension.describe_batch(b, f)[0] for b, f in zip(batches, feats)]
    result = score_pair(sets[0], sets[1], SCORERS.get(settings.scorer))
    tm = TwoImageMatch(
        _name(image_a, "a"),
        _name(image_b, "b"),
        settings.name,
        result,
        settings.weights,
        (batches[0].pixels[0], batches[1].pixels[0]),
    )
    if out is not None:
        tm.figure_path = str(draw_matches(tm, out))
    return tm


def _raise(key: str, message: str) -> None:
    raise ImageReadError(message)


def _name(image, default: str) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else default


def draw_matches(tm: TwoImageMatch, out: str | os.PathLike, scales: Sequence[int] | None = None) -> Path:
    """Both images side by side; inlier matches as lines coloured by similarity, other mutual matches faint.

    Draws on an Agg canvas of its own (object-oriented matplotlib, no pyplot): the process-wide backend
    and pyplot's figure list are left alone. The file format follows ``out``'s extension (PNG without one).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a, b = (np.transpose(p, (1, 2, 0)) for p in tm.pixels)
    h = max(a.shape[0], b.shape[0])
    canvas = np.ones((h, a.shape[1] + b.shape[1], 3), np.float32)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1] :] = b
    fig = Figure(figsize=(canvas.shape[1] / 50, canvas.shape[0] / 50 + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(np.clip(canvas, 0, 1))
    chosen = range(len(tm.result.scores)) if scales is None else scales
    if not list(chosen):
        raise ConfigError("nothing to draw: no patch scales selected")
    cmap = colormaps["turbo"]
    for s in chosen:
        q, c, m, sc = tm.result.query_sets[s], tm.result.candidate_sets[s], tm.result.matches[s], tm.result.scores[s]
        for i in range(len(m)):
            p0 = q.centres[m.query[i]]
            p1 = c.centres[m.candidate[i]] + np.array([a.shape[1], 0])
            if sc.inliers[i]:
                ax.plot([p0[0], p1[0]], [p0[1], p1[1]], "-", lw=0.9, color=cmap(float(np.clip(m.similarity[i], 0, 1))))
                ax.plot([p0[0], p1[0]], [p0[1], p1[1]], "o", ms=2, color="white")
            else:
                ax.plot([p0[0], p1[0]], [p0[1], p1[1]], "-", lw=0.4, color="grey", alpha=0.25)
    inl = ", ".join(f"{int(s.inliers.sum())}/{len(m)}" for s, m in zip(tm.result.scores, tm.result.matches))
    ax.set_title(
        f"{Path(tm.image_a).name} ↔ {Path(tm.image_b).name}  [{tm.preset}]  score {tm.score:.3f}  "
        f"inliers/matches per scale: {inl}",
        fontsize=8,
    )
    ax.axis("off")
    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format=out.suffix.lstrip(".").lower() or "png", bbox_inches="tight")
    return out
