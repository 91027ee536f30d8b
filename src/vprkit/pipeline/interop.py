"""Interoperability with hloc: a map's descriptors and retrieval pairs as hloc files, and maps from hloc's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import Config
from ..errors import ConfigError, ImageReadError
from ..images import FolderImages
from ..maps import hloc
from .localization import query_batches
from .models import resolve_config
from .open import open_map


def export_hloc(
    map_dir: str | os.PathLike,
    out: str | os.PathLike,
    pairs: str | os.PathLike | None = None,
    queries: str | os.PathLike | None = None,
    top_k: int = 20,
    db_prefix: str = "",
    query_prefix: str = "",
    progress: bool = False,
) -> dict[str, Any]:
    """A map's global descriptors as hloc ``global-feats`` HDF5, plus (with ``pairs`` and ``queries``) retrieval pairs.

    ``queries`` is a folder of query images: their descriptors (the map's own model) are added to the
    same HDF5 file, named ``query_prefix + relative path``, and each query's top ``top_k`` database
    images go to ``pairs`` as hloc's ``pairs_from_retrieval`` writes them. Database images are named
    ``db_prefix + map key``. Names must be unique across both.
    """
    result = hloc.export_map(map_dir, out, prefix=db_prefix)
    if pairs is None and queries is None:
        return result
    if pairs is None or queries is None:
        raise ConfigError("retrieval pairs need both --pairs and --queries")
    m = open_map(map_dir, read_only=True)
    source = FolderImages(Path(queries))
    names, descs = [], []
    for qb in query_batches(m, source, progress=progress):
        names += [query_prefix + k for k in qb.keys]
        descs.append(qb.global_descriptors)
    if not names:
        raise ImageReadError(f"no readable query images in {queries}")
    db_names = [db_prefix + k for k in m.keys]
    clash = set(names) & set(db_names)
    if clash:
        raise ConfigError(
            f"{len(clash)} query names are also database names (e.g. {sorted(clash)[0]!r}); "
            f"give --query-prefix or --db-prefix"
        )
    q = np.concatenate(descs)
    hloc.write_global_features(out, names, q, append=True)
    pair_list = hloc.retrieval_pairs(names, q, db_names, m.store.read_global(), top_k)
    hloc.write_pairs(pairs, pair_list)
    result.update(queries=len(names), pairs=len(pair_list), pairs_path=str(pairs), top_k=top_k)
    return result


def import_hloc(
    features: str | os.PathLike,
    out: str | os.PathLike,
    preset: str | Config | None = None,
    normalize: bool = False,
    prefix: str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """A vprkit map from an hloc global-features HDF5 (keys and descriptors; ``map.json`` records the source).

    Without ``preset`` the map is for retrieval by descriptors given as arrays
    (:func:`vprkit.maps.hloc.retrieve`); with the preset that produced the descriptors it is a normal map.
    """
    config = None if preset is None else resolve_config(preset).to_dict()
    return hloc.import_features(features, out, config=config, prefix=prefix, normalize=normalize)
