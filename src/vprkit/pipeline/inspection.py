"""Looking at one result: why a query matched a map image (SegVLAD explanations), two images' patch matches."""

from __future__ import annotations

import os

import numpy as np

from ..backbones.extract import ExtractionOptions
from ..config import Config
from ..errors import MapError
from ..images import FileImages, ImageInput
from ..presets import get_rerank_config
from ..rerank.draw import match_pair
from ..retrieval.estimate import patch_score_kind
from ..segments.explain import draw, explain_pair, segment_sets, stored_segment_set
from .localization import get_reranker, localize, query_batches, query_source
from .models import load_backbone, resolve_config
from .open import Map, open_map


def explain(
    map: Map | str | os.PathLike, query: ImageInput, out: str | os.PathLike | None = None, top: int = 5, rank: int = 0
):
    """Why ``query`` (a path or a decoded frame) matched its ``rank``-th map image (0 = best): SuperSegment pairs.

    Draws the pairs to ``out`` (PNG) if given. The map must store SuperSegments (a ``segvlad-*`` preset).
    """
    m = map if isinstance(map, Map) else open_map(map, read_only=True)
    ext = m.extensions.get("segments")
    if ext is None:
        raise MapError(f"map {m.dir} has no SuperSegments ('segments' extension); explain needs a segvlad map")
    source = query_source([query])
    res = localize(m, source, top_k=rank + 1)[0]
    if len(res.matches) <= rank:
        raise MapError("the map returned no match for this query")
    match = res.matches[rank]
    extraction = ExtractionOptions.from_config(m.config)
    (qset,), (qimg,) = segment_sets(m.backbone, extraction, ext, source)
    try:
        match_path = m.data.images.path(match.key)
    except (MapError, KeyError):
        match_path = None
    if match_path is not None and match_path.is_file():
        (mset,), (mimg,) = segment_sets(m.backbone, extraction, ext, FileImages([match_path]))
    else:  # image moved (or the map was built from frames): the stored SuperSegments on a grey canvas
        mset, mimg = stored_segment_set(m.store, match.row, m.backbone.stride), np.full_like(qimg, 128)
    exp = explain_pair(res.query, qset, match.key, match.row, match.score, mset, top)
    if out is not None:
        draw(exp, qimg, qset, mimg, mset, out)
        exp.figure_path = str(out)
    return exp


def match_two(
    image_a: ImageInput,
    image_b: ImageInput,
    rerank: str = "performance",
    preset: str | Config | None = None,
    map_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
):
    """Match ``image_a`` (as query) against ``image_b`` with re-ranking preset ``rerank``; draw to ``out``.

    With ``map_dir`` the map's backbone, image size and fitted patch state are used, so the score is
    the one re-ranking computes; otherwise ``preset`` (default: the default preset) gives backbone and
    image size and the patch vocabulary is fitted on the two images.

    The result names its scores: ``score_kind`` (``weighted_inlier_ratio`` for RANSAC presets,
    ``weighted_rapid_spatial_score`` for rapid scoring) for ``score``, ``scale_score_kind`` for each
    scale's; ``patch_state`` says whether the map's fitted state was used (``"map"``) — scores without
    a map are not comparable with a map's. With a map, ``cosine`` is the two images' global cosine
    (the number ``localize`` reports per match); without one it is None (no vocabulary to encode with).
    """
    settings = get_rerank_config(rerank)
    kind = patch_score_kind(settings.scorer)
    if map_dir is not None:
        m = open_map(map_dir, read_only=True)
        reranker = get_reranker(m, rerank, log=lambda _: None)
        tm = match_pair(
            image_a, image_b, settings, ExtractionOptions.from_config(m.config), m.backbone, reranker.extension, out
        )
        g = np.concatenate(
            [
                qb.global_descriptors
                for qb in query_batches(m, query_source({"a": image_a, "b": image_b}, check_files=False))
            ]
        )
        tm.cosine, tm.patch_state = float(g[0] @ g[1]), "map"
    else:
        config = resolve_config(preset)
        tm = match_pair(
            image_a, image_b, settings, ExtractionOptions.from_config(config), load_backbone(config), None, out
        )
        tm.cosine, tm.patch_state = None, "fitted on the two images"
    tm.score_kind, tm.scale_score_kind = f"weighted_{kind}", kind
    return tm
