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
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..errors import ConfigError, ImageReadError
from .extension import PatchesExtension
from .presets import get_rerank_settings
from .reranker import PairResult, score_pair
from .scoring import SCORERS

if TYPE_CHECKING:
    from ..images import Batch

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
            out.append(f"  patches on a {q.grid[0]}×{q.grid[1]} grid: {len(q)} query patches, {len(m)} mutual matches, "
                       f"{int(s.inliers.sum())} inliers, score {s.value:.4f}")
        return out


def match_two(image_a: str | os.PathLike, image_b: str | os.PathLike, rerank: str = "performance",
              preset: str = "effnet-vlad", map_dir: str | os.PathLike | None = None,
              out: str | os.PathLike | None = None) -> TwoImageMatch:
    """Match ``image_a`` (as query) against ``image_b`` with re-ranking preset ``rerank``."""
    from .. import pipeline

    settings = get_rerank_settings(rerank)
    if map_dir is not None:
        m = pipeline.open_map(map_dir)
        from .reranker import PatchReranker

        config, backbone = m.config, m.backbone
        ext = PatchReranker(m, settings, log=lambda _: None).extension
    else:
        config = pipeline.resolve_config(preset)
        backbone = pipeline.load_backbone(config)
        ext = None
    batches, feats = [], []
    for path in (image_a, image_b):
        batch = prepared_image(path, config, backbone.size_multiple)
        batches.append(batch)
        with torch.inference_mode():
            feats.append(backbone(torch.from_numpy(batch.pixels)))
    if ext is None:
        ext = PatchesExtension({**settings.extension_options(), "pca_dim": 0}, backbone, None)
        own = [ext.features(b.pixels, f) for b, f in zip(batches, feats)]
        n_cells = sum(f.patches.shape[1] * f.patches.shape[2] for f in own)
        ext.options["k"] = max(2, min(int(ext.options["k"]), n_cells // MIN_CELLS_PER_CLUSTER))
        ext.fit(zip(batches, feats))
    sets = [ext.describe_batch(b, f)[0] for b, f in zip(batches, feats)]
    result = score_pair(sets[0], sets[1], SCORERS.get(settings.scorer))
    tm = TwoImageMatch(str(image_a), str(image_b), settings.name, result, settings.weights,
                       (batches[0].pixels[0], batches[1].pixels[0]))
    if out is not None:
        tm.figure_path = str(draw_matches(tm, out))
    return tm


def prepared_image(path: str | os.PathLike, config, multiple: int) -> "Batch":
    """One image read and prepared exactly as map images are (a batch of one)."""
    from ..images import iter_batches

    path = Path(path)
    batch = next(iter_batches(path.parent, [path.name], config.image, multiple, batch_size=1, workers=1))
    if batch.failures:
        raise ImageReadError(batch.failures[0][1])
    return batch


def draw_matches(tm: TwoImageMatch, out: str | os.PathLike, scales: Sequence[int] | None = None) -> Path:
    """Both images side by side; inlier matches as lines coloured by similarity, other mutual matches faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = (np.transpose(p, (1, 2, 0)) for p in tm.pixels)
    h = max(a.shape[0], b.shape[0])
    canvas = np.ones((h, a.shape[1] + b.shape[1], 3), np.float32)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1]:] = b
    fig, ax = plt.subplots(figsize=(canvas.shape[1] / 50, canvas.shape[0] / 50 + 0.6), dpi=100)
    ax.imshow(np.clip(canvas, 0, 1))
    chosen = range(len(tm.result.scores)) if scales is None else scales
    if not list(chosen):
        raise ConfigError("nothing to draw: no patch scales selected")
    cmap = plt.get_cmap("turbo")
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
    ax.set_title(f"{Path(tm.image_a).name} ↔ {Path(tm.image_b).name}  [{tm.preset}]  score {tm.score:.3f}  "
                 f"inliers/matches per scale: {inl}", fontsize=8)
    ax.axis("off")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
