"""Building VLAD vocabularies from images, and making the aggregator a configuration asks for.

A vocabulary is clustered from a bounded sample of local descriptors (AnyLoc's sampling rule for
large maps, then a reservoir capped by the memory plan), from one image set (a map's own
vocabulary) or several (a domain vocabulary). Where vocabularies are kept on disk — a map's
``vocabulary.npz``, the shared domain folder — is decided here too, so every caller finds them
the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..backbones.base import Backbone
from ..backbones.extract import ExtractionOptions, FeatureCache, extract, ignore_failures
from ..backbones.weights import vprkit_cache_dir
from ..errors import ConfigError
from ..images import ImageSource, image_source
from ..zoo import anyloc
from .base import AGGREGATORS, Aggregator
from .options import AggregationOptions, VocabularyOptions
from .vlad import DescriptorSampler, Vocabulary, fit_vocabulary

VOCABULARIES_ENV = "VPRKIT_VOCABULARIES"


def descriptor_identity(
    options: AggregationOptions | VocabularyOptions | ExtractionOptions,
    backbone: Backbone,
) -> dict[str, Any]:
    """What a descriptor depends on (backbone, layer/facet, dim, stride, image spec): vocabularies record it.

    ``options`` supplies the image spec (any of the stage's option records holds it).
    """
    return {**backbone.identity(), "image": options.image.to_dict()}


def vocabulary_sample(keys: Sequence[str], options: VocabularyOptions) -> tuple[list[str], int]:
    """Which images (and patch step) feed the vocabulary: AnyLoc's rule for maps above 2,000 images."""
    vc = options.vocabulary
    if len(keys) <= vc.large_map_images:
        return list(keys), 1
    rng = np.random.default_rng(vc.seed)
    n = max(vc.k, int(round(len(keys) * vc.large_map_fraction)))
    picked = sorted(rng.choice(len(keys), size=min(n, len(keys)), replace=False))
    return [keys[i] for i in picked], vc.large_map_patch_step


def build_vocabulary(
    backbone: Backbone,
    options: VocabularyOptions,
    sources: Iterable[ImageSource | tuple[str | os.PathLike, Sequence[str]]],
    name: str = "map",
    progress: bool = False,
    cache: FeatureCache | None = None,
) -> Vocabulary:
    """Spherical k-means over a bounded sample of local descriptors from one or more image sets.

    ``sources`` are image sources (or (folder, keys) pairs); several pool datasets into one domain
    vocabulary. RAM for the pool is capped by ``options.pool_bytes`` (reservoir sampling; the memory
    plan's ``vocabulary_pool_bytes``: ``vocabulary.max_bytes`` or a share of ``memory_budget_mb``). With
    ``cache``, the extracted features are also kept (within its budget) for the caller's next pass.
    """
    vc = options.vocabulary
    sampler = DescriptorSampler(backbone.dim, options.pool_bytes, seed=vc.seed)
    n_images = 0
    for src in sources:
        src = image_source(*src) if isinstance(src, tuple) else src
        sample, step = vocabulary_sample(src.keys, options)
        sampler.patch_step = step
        label = progress and f"vocabulary {Path(src.describe()).name}"
        for batch, feats in extract(backbone, options.extraction, src, sample, label, on_failure=ignore_failures):
            sampler.add(feats)
            n_images += len(batch.keys)
            if cache is not None:
                cache.add(batch, feats)
    if len(sampler.pool) < vc.k:
        raise ConfigError(f"only {len(sampler.pool)} descriptors from {n_images} images: too few for K={vc.k}")
    meta = {
        "name": name,
        "identity": descriptor_identity(options, backbone),
        "n_images": n_images,
        "sample_bytes": sampler.nbytes,
        "descriptors_seen": sampler.seen,
        "pooled_descriptors": int(len(sampler.pool)),
        "pool_max_bytes": options.pool_bytes,
    }
    return fit_vocabulary(sampler.pool, vc.k, meta, seed=vc.seed, sets=options.sets, centres=options.centres)


def domain_vocabulary_dir() -> Path:
    """Where shared domain vocabularies live: ``$VPRKIT_VOCABULARIES`` or ``<cache>/vocabularies``."""
    return Path(os.environ.get(VOCABULARIES_ENV, vprkit_cache_dir() / "vocabularies"))


def resolve_vocabulary_source(source: str) -> Path | None:
    """``map`` → None; ``domain:NAME`` → the shared domain vocabulary file; ``zoo:ENTRY`` → a published one
    (``vprkit weights list``); otherwise a path.

    (``auto`` is resolved by the map build, which has the images to compare with the domains.)
    """
    if source == "map":
        return None
    if source.startswith("domain:"):
        path = domain_vocabulary_dir() / f"{source.split(':', 1)[1]}.npz"
        if not path.exists():
            raise ConfigError(
                f"domain vocabulary {source!r} not found at {path}; build it with `vprkit vocab build --domain NAME DATASET…`"
            )
        return path
    if source.startswith("zoo:"):  # a published vocabulary (AnyLoc's c_centers.pt per domain)
        return anyloc.vocabulary_file(source)
    return Path(source)


def wants_vocabulary(options: AggregationOptions) -> bool:
    """Whether the aggregator needs a vocabulary (a trained checkpoint may replace it)."""
    factory = AGGREGATORS.get(options.aggregator)
    wants = getattr(factory, "wants_vocabulary", None)
    if wants is not None:
        return bool(wants(dict(options.aggregator_options)))
    return bool(getattr(factory, "needs_vocabulary", False))


def make_aggregator(options: AggregationOptions, backbone: Backbone, vocabulary: Vocabulary | None) -> Aggregator:
    """The aggregator on ``backbone``'s features (given the vocabulary when it needs one)."""
    factory = AGGREGATORS.get(options.aggregator)
    kwargs = dict(options.aggregator_options)
    if wants_vocabulary(options):
        if vocabulary is None:
            raise ConfigError(f"aggregator {options.aggregator!r} needs a vocabulary")
        vocabulary.check_compatible(descriptor_identity(options, backbone))
        kwargs["vocabulary"] = vocabulary
    return factory(backbone.dim, **kwargs)
