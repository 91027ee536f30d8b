"""Zoo family: AnyLoc's published domain vocabularies (Keetha et al., RA-L 2023; github.com/AnyLoc/AnyLoc, BSD-3).

AnyLoc-VLAD-DINOv2 encodes DINOv2 ViT-G/14's layer-31 value facet with hard VLAD over K=32 centres
clustered per *domain* (``scripts/dino_v2_global_vocab_vlad.py``: urban, indoor, aerial, structured,
unstructured, and the global vocabulary of all of them). The authors publish the centres in their demo's
``cache.zip`` (``demo/README.md``: "Colab1 > cache.zip" on their public OneDrive; ``demo/utilities.py``
``od_down_links["cache"]``), each as ``cache/vocabulary/dinov2_vitg14/l31_value_c32/<domain>/c_centers.pt``: a
``torch.save``-d K×D float tensor, the raw k-means means of L2-normalised descriptors (``VLAD.fit`` caches
``self.c_centers``). AnyLoc's ``VLAD`` (cosine k-means, ``norm_descs``, ``intra_norm``, hard mode) uses
them as they are: labels by the cosine to the centres, residuals ``x/‖x‖ − c`` against the raw centre,
intra-normalisation, L2 — vprkit's ``vlad`` aggregator with ``centres="raw"`` (tested against that formula).

A vocabulary is not a network part: a preset names it as its vocabulary source ``zoo:anyloc-<domain>``,
resolved by :func:`vocabulary_file` (the file keeps AnyLoc's relative path, so ``Vocabulary.from_anyloc``
recognises backbone, layer, facet and domain from it, and a copy of AnyLoc's ``cache/vocabulary`` folder can
be used as it is). The ViT-G/14 network itself is DINOv2's checkpoint, found as for ``anyloc-vitg14``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ..config import Config, ImageSpec, VocabularyConfig
from ..errors import WeightsNotFoundError
from ..options import DINOV2_ARCHS
from .layouts import register_layout
from .weights import ZOO_WEIGHTS, ZooWeights, cached_path, register_weights, weights_path

SOURCE = "https://github.com/AnyLoc/AnyLoc (demo/README.md: public release, Colab1 > cache.zip)"
LICENCE = "BSD-3-Clause"
# demo/utilities.py od_down_links["cache"]: the demo's cache.zip (OneDrive), which holds every domain's centres
CACHE_ZIP_URL = (
    "https://iiitaphyd-my.sharepoint.com/:u:/g/personal/avneesh_mishra_research_iiit_ac_in/"
    "EW-ZqUeWWexNhbLEQvsCk2wBeucxNlhEpsfeUHHOreyLag"
)
ARCH = "vitg14"
MODEL = f"dinov2_{ARCH}"
FACET = "value"
NUM_CLUSTERS = 32
EMBED_DIM, _DEPTH, LAYER = DINOV2_ARCHS[ARCH]  # 1536-d, layer 31: AnyLoc's choice for ViT-G/14
# The domains of dino_v2_global_vocab_vlad.py. That script calls the global vocabulary (all datasets) "both";
# "global" is vprkit's name for it and the folder looked for (the demo's code shows no folder of its own for it).
DOMAINS = ("urban", "indoor", "aerial", "structured", "unstructured", "global")
# The demo (anyloc_vlad_generate.py / the HF Space) loads these three from cache.zip; the other three are the
# paper's domain vocabularies, looked for at the same path.
DEMO_DOMAINS = ("urban", "indoor", "aerial")
SOURCE_PREFIX = "zoo:"
ANYLOC_IMAGE = ImageSpec((480, 640), "resize_crop")  # AnyLoc's benchmarks: 480×640, centre-crop to /14
BATCH_SIZE = 2


def entry_name(domain: str) -> str:
    return f"anyloc-{domain}"


def relative_path(domain: str) -> str:
    """Where AnyLoc's cache keeps ``domain``'s centres, below ``cache/vocabulary``."""
    return f"{MODEL}/l{LAYER}_{FACET}_c{NUM_CLUSTERS}/{domain}/c_centers.pt"


@register_layout("anyloc-vocabulary")
def anyloc_vocabulary_layout(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Refused: AnyLoc's centres are a vocabulary (``vocabulary source zoo:NAME``), not a model part."""
    raise WeightsNotFoundError("AnyLoc's c_centers.pt is a VLAD vocabulary: use it as vocabulary source zoo:<entry>")


for _domain in DOMAINS:
    register_weights(
        ZooWeights(
            name=entry_name(_domain),
            filename=relative_path(_domain),
            urls=(CACHE_ZIP_URL,),
            format="torch",
            layout="anyloc-vocabulary",
            licence=LICENCE,
            source=SOURCE,
            reported="none in AnyLoc's README (the paper's tables give AnyLoc-VLAD-DINOv2 per dataset)",
            extra={"archive": "cache.zip", "member": f"cache/vocabulary/{relative_path(_domain)}", "domain": _domain},
        )
    )


def vocabulary_file(source: str, explicit: str | os.PathLike | None = None) -> Path:
    """The local ``c_centers.pt`` of vocabulary source ``zoo:anyloc-<domain>``: ``explicit`` (the file, or a
    copy of AnyLoc's ``cache/vocabulary`` folder), else the zoo cache. Never downloaded: AnyLoc publishes a
    zip of every domain behind a OneDrive page, so the error says which member to put where."""
    name = source.removeprefix(SOURCE_PREFIX)
    entry = ZOO_WEIGHTS.get(name)
    try:
        return weights_path(name, explicit, fetch=False)
    except WeightsNotFoundError:
        raise WeightsNotFoundError(
            f"AnyLoc vocabulary {name} not found: download cache.zip from AnyLoc's demo ({entry.urls[0]}), "
            f"and copy its {entry.extra['member']} to {cached_path(entry)} (or pass the file or the unzipped "
            "cache/vocabulary folder)"
        ) from None


def _preset(domain: str) -> Config:
    vlad_dim = NUM_CLUSTERS * EMBED_DIM
    demo = "" if domain in DEMO_DOMAINS else " (not among the demo's three domains: the file may be unpublished)"
    return Config(
        name=entry_name(domain),
        description=(
            f"AnyLoc-VLAD-DINOv2 with AnyLoc's published {domain} vocabulary{demo}: DINOv2 ViT-G/14 layer {LAYER} "
            f"value facet + hard VLAD K={NUM_CLUSTERS} (raw centres), {vlad_dim}-d; 480×640→crop/14. Weights: "
            f"DINOv2 ViT-G/14 as for anyloc-vitg14 (--weights PATH or the caches); the vocabulary from the zoo "
            f"entry {entry_name(domain)} (AnyLoc's cache.zip member, `vprkit weights list`)"
        ),
        backbone=MODEL,
        backbone_options={"layer": LAYER, "facet": FACET},
        image=ANYLOC_IMAGE,
        aggregator="vlad",
        aggregator_options={"centres": "raw"},
        vocabulary=VocabularyConfig(source=SOURCE_PREFIX + entry_name(domain), k=NUM_CLUSTERS, centres="raw"),
        batch_size=BATCH_SIZE,
    )


PRESETS: list[Config] = [_preset(d) for d in DOMAINS]
