"""Domain vocabularies (AnyLoc): which datasets look alike, and which vocabulary a new map should use.

AnyLoc builds VLAD vocabularies per *domain* (indoor, urban, aerial …) by pooling the database
descriptors of several datasets, and finds the domains by projecting per-image GeM descriptors
with PCA: datasets of one domain form one cloud. This module computes those descriptors, the PCA
and a suggested grouping, draws the scatter plot, and picks the nearest domain for a new map.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.sparse.csgraph import connected_components

from ..backbones.base import Backbone
from ..backbones.extract import ExtractionOptions, extract, ignore_failures
from ..errors import ConfigError
from ..images import ImageSource, image_source
from ..io import atomic_path, atomic_savez
from ..numerics import PCA
from .base import l2n
from .gem import gem_pool
from .options import VocabularyOptions
from .vlad import IDENTITY_KEYS, Vocabulary
from .vocabulary import build_vocabulary, descriptor_identity, domain_vocabulary_dir

DOMAIN_SAMPLE_IMAGES = 200  # GeM descriptors per dataset: enough for a stable centroid and spread
PCA_COMPONENTS = 2
PCA_FILE = "domains-pca.npz"


def gem_descriptors(
    backbone: Backbone,
    extraction: ExtractionOptions,
    images: ImageSource | str | os.PathLike,
    keys: Sequence[str] | None = None,
    max_images: int = DOMAIN_SAMPLE_IMAGES,
    p: float = 3.0,
    signed: bool = False,
    progress: bool | str = False,
) -> np.ndarray:
    """L2-normalised GeM descriptors of up to ``max_images`` evenly spread images (n×D float32)."""
    source = image_source(images, keys)
    keys = source.keys
    if len(keys) > max_images:
        keys = [keys[i] for i in np.linspace(0, len(keys) - 1, max_images).round().astype(int)]
    out = [
        l2n(gem_pool(f.flat(), p, signed)).float().cpu().numpy()
        for _, f in extract(backbone, extraction, source, keys, progress, on_failure=ignore_failures)
    ]
    if not out:
        raise ConfigError(f"no readable images in {source.describe()}")
    return np.concatenate(out)


@dataclass
class DomainAnalysis:
    names: list[str]
    projected: list[np.ndarray]  # per dataset, n_i × c
    pca: PCA
    groups: list[list[str]] = field(default_factory=list)

    def centroids(self) -> np.ndarray:
        return np.stack([p.mean(0) for p in self.projected])

    def to_dict(self) -> dict[str, Any]:
        return {
            "datasets": self.names,
            "centroids": self.centroids().round(4).tolist(),
            "suggested_domains": self.groups,
        }


def suggest_groups(names: Sequence[str], clouds: Sequence[np.ndarray]) -> list[list[str]]:
    """Group datasets whose clouds overlap: centroid distance below the sum of their spreads.

    Single-linkage on that overlap relation (connected components), so A~B and B~C put A, B, C
    in one domain, as a person reading the scatter plot would.
    """
    cents = np.stack([c.mean(0) for c in clouds])
    spread = np.array([np.sqrt(((c - c.mean(0)) ** 2).sum(1).mean()) for c in clouds])
    dist = np.linalg.norm(cents[:, None] - cents[None], axis=-1)
    adjacent = dist < (spread[:, None] + spread[None])
    n, labels = connected_components(adjacent, directed=False)
    return [[names[i] for i in np.flatnonzero(labels == g)] for g in range(n)]


def analyse_domains(descriptors: dict[str, np.ndarray], n_components: int = PCA_COMPONENTS) -> DomainAnalysis:
    names = list(descriptors)
    if len(names) < 1:
        raise ConfigError("domain analysis needs at least one dataset")
    pca = _fit_pca(np.concatenate([descriptors[n] for n in names]), n_components)
    projected = [pca.transform(descriptors[n]) for n in names]
    return DomainAnalysis(names, projected, pca, suggest_groups(names, projected))


def plot_domains(analysis: DomainAnalysis, out: str | os.PathLike) -> Path:
    """Scatter plot of the first two PCA components, one colour per dataset, centroids labelled."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = colormaps["tab10"]
    for i, (name, pts) in enumerate(zip(analysis.names, analysis.projected)):
        ax.scatter(pts[:, 0], pts[:, 1], s=9, alpha=0.5, color=cmap(i % 10), label=f"{name} ({len(pts)})")
        c = pts.mean(0)
        ax.scatter([c[0]], [c[1]], s=120, marker="X", color=cmap(i % 10), edgecolor="black")
        ax.annotate(name, c, textcoords="offset points", xytext=(6, 6), fontsize=9, weight="bold")
    groups = "; ".join("{" + ", ".join(g) + "}" for g in analysis.groups)
    ax.set_title(f"GeM descriptors, PCA — suggested domains: {groups}", fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png")
    return out


def _fit_pca(x: np.ndarray, n_components: int) -> PCA:
    """Plain principal axes (no whitening, no re-normalisation): positions in the domain plot."""
    pca = PCA.fit(x, n_components, method="exact")
    pca.normalise = False
    return pca


def save_pca(pca: PCA, folder: Path, identity: dict[str, Any]) -> Path:
    path = folder / PCA_FILE
    atomic_savez(
        path, mean=pca.mean, components=pca.components, identity=json.dumps(identity, sort_keys=True, default=str)
    )
    return path


def nearest_domain(
    map_descriptors: np.ndarray, vocab_folder: Path, identity: dict[str, Any]
) -> tuple[str, dict[str, float]]:
    """The domain vocabulary whose datasets lie nearest the new map's images in the domain PCA space.

    Candidates are the vocabularies in ``vocab_folder`` built for the same descriptors
    (``identity``); each stores its datasets' GeM centroids. Distances are measured after projecting
    with the PCA saved by ``vprkit vocab domains`` (or one fitted on the candidates' centroids).
    Returns the domain name and every candidate's distance.
    """
    candidates: dict[str, np.ndarray] = {}
    for path in sorted(Path(vocab_folder).glob("*.npz")):
        if path.name == PCA_FILE:
            continue
        voc = Vocabulary.load(path)
        ident = voc.metadata.get("identity", {})
        if any(ident.get(k) != identity.get(k) for k in IDENTITY_KEYS if k in ident or k in identity):
            continue
        cents = voc.metadata.get("dataset_gem_centroids")
        if cents:
            candidates[path.stem] = np.asarray(list(cents.values()), np.float32)
    if not candidates:
        raise ConfigError(
            f"no domain vocabulary in {vocab_folder} matches these descriptors; build one with `vprkit vocab build --domain NAME …`"
        )
    pca_path = Path(vocab_folder) / PCA_FILE
    pca = None
    if pca_path.exists():
        with np.load(pca_path) as z:
            if json.loads(str(z["identity"])) == json.loads(json.dumps(identity, sort_keys=True, default=str)):
                pca = PCA(z["mean"], z["components"], normalise=False)
    if pca is None:
        allc = np.concatenate(list(candidates.values()))
        pca = _fit_pca(allc, min(PCA_COMPONENTS, max(1, len(allc) - 1)))
    q = pca.transform(map_descriptors.mean(0, keepdims=True))[0]
    dists = {name: float(np.linalg.norm(pca.transform(c) - q, axis=1).min()) for name, c in candidates.items()}
    return min(dists, key=dists.get), dists


# ---- the stage's entry points: domain vocabularies from image sets -----------------------------
def build_domain_vocabulary(
    backbone: Backbone,
    options: VocabularyOptions,
    datasets: dict[str, ImageSource],
    name: str,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Pool sub-sampled descriptors of several image sets (name → database images) into vocabulary ``name``.

    Saved as ``<vocabularies>/<name>.npz`` (or ``out``) with each set's GeM centroid, so
    :func:`nearest_domain` can later choose it for a new map. Memory is bounded by the
    vocabulary pool (``options.pool_bytes``) whatever the datasets' sizes.
    """
    voc = build_vocabulary(backbone, options, list(datasets.values()), name=f"domain:{name}", progress=progress)
    voc.metadata["datasets"] = list(datasets)
    voc.metadata["dataset_gem_centroids"] = {
        label: gem_descriptors(backbone, options.extraction, src).mean(0).round(6).tolist()
        for label, src in datasets.items()
    }
    path = Path(out) if out else domain_vocabulary_dir() / f"{name}.npz"
    return voc.save(path)


def analyse_dataset_domains(
    backbone: Backbone,
    extraction: ExtractionOptions,
    datasets: dict[str, ImageSource],
    plot: str | os.PathLike | None = None,
    progress: bool = True,
) -> DomainAnalysis:
    """GeM descriptors per image set → PCA → suggested domains (+ scatter PNG); saves the PCA for picking."""
    descs = {
        label: gem_descriptors(backbone, extraction, src, progress=progress and label)
        for label, src in datasets.items()
    }
    analysis = analyse_domains(descs)
    save_pca(analysis.pca, domain_vocabulary_dir(), descriptor_identity(extraction, backbone))
    if plot is not None:
        plot_domains(analysis, plot)
    return analysis


def pick_domain(backbone: Backbone, extraction: ExtractionOptions, images: ImageSource) -> tuple[str, dict[str, float]]:
    """The domain vocabulary nearest to ``images`` (see :func:`nearest_domain`)."""
    descs = gem_descriptors(backbone, extraction, images)
    return nearest_domain(descs, domain_vocabulary_dir(), descriptor_identity(extraction, backbone))
