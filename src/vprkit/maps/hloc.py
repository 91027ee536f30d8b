"""Interoperability with hloc (Hierarchical-Localization): global-feature HDF5 files and retrieval pairs.

hloc's formats, as its code writes and reads them:

- **global features** (``extract_features.main`` with a global model such as ``netvlad``): one HDF5
  group per image *name* — the image path relative to hloc's image folder, so ``db/0001.jpg``
  becomes the nested groups ``/db/0001.jpg`` — holding a dataset ``global_descriptor`` (1-D; hloc
  stores float16 with ``as_half``, we write float32) and ``image_size`` (width, height).
  ``utils.io.list_h5_names`` reads the names back as the parent-group paths of every dataset.
- **retrieval pairs** (``pairs_from_retrieval``): a text file, one ``query_name db_name`` per line,
  the top K database images of each query by inner product of global descriptors;
  ``utils.parsers.parse_retrieval`` reads it.

This stage exports a map's descriptors and keys to the first, writes the second from query
descriptors, and imports an hloc file as a vprkit map (store + FAISS index + ``map.json``). An imported
map holds descriptors of a model vprkit may not have: it is for retrieval with descriptors given
as arrays (:func:`retrieve`), unless a vprkit preset is named that produced them — then it is a
normal map and ``vprkit localize`` works on images.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np
from PIL import Image

from .. import __version__
from ..errors import ConfigError, MapError
from ..io import atomic_path, atomic_write_text
from ..numerics import NORM_FLOOR
from .index import INDEX_FILE, FaissIndex
from .manifest import MAP_FILE, Counts, IndexSection, MapManifest, read_map_info, write_manifest
from .store import MapStore

DESCRIPTOR = "global_descriptor"
IMAGE_SIZE = "image_size"
IMPORT_SHARD_ROWS = 4096
IMPORTED_BACKBONE = "hloc-import"


def _check_name(name: str) -> str:
    n = str(name).replace(os.sep, "/")
    parts = n.split("/")
    if not n or n.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise MapError(f"{name!r} cannot be an hloc image name (an HDF5 path relative to the image folder)")
    return n


def write_global_features(
    path: str | os.PathLike,
    names: Sequence[str],
    descriptors: np.ndarray,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
    append: bool = False,
    as_half: bool = False,
) -> Path:
    """Write hloc global features: ``/<name>/global_descriptor`` (float32, or float16 with ``as_half``).

    ``image_sizes``: optional ``name → (width, height)`` written as ``/<name>/image_size`` as hloc does.
    ``append=True`` adds to an existing file (names already there are replaced, as hloc does);
    otherwise the file is written whole to a temporary name and renamed into place.
    """
    names = [_check_name(n) for n in names]
    desc = np.asarray(descriptors)
    if desc.ndim != 2 or len(desc) != len(names):
        raise MapError(f"{len(names)} names but descriptors of shape {desc.shape}")
    if len(set(names)) != len(names):
        raise MapError("image names must be unique")
    dtype = np.float16 if as_half else np.float32
    path = Path(path)

    def fill(f: h5py.File) -> None:
        for name, vec in zip(names, desc):
            if name in f:
                del f[name]
            g = f.create_group(name)
            g.create_dataset(DESCRIPTOR, data=vec.astype(dtype))
            if image_sizes and name in image_sizes:
                g.create_dataset(IMAGE_SIZE, data=np.asarray(image_sizes[name], dtype=np.int64))

    if append and path.exists():
        with h5py.File(path, "a", libver="latest") as f:
            fill(f)
        return path
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver="latest") as f:
            fill(f)
    return path


def list_global_names(path: str | os.PathLike) -> list[str]:
    """Names of the images with a ``global_descriptor`` in an hloc features file, sorted."""
    names: list[str] = []
    with h5py.File(Path(path), "r") as f:

        def visit(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[-1] == DESCRIPTOR:
                names.append(obj.parent.name.strip("/"))

        f.visititems(visit)
    return sorted(names)


def read_global_features(path: str | os.PathLike, names: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """``(names, N×D float32)`` of an hloc global-features file (all images, or ``names`` in that order)."""
    path = Path(path)
    if not path.is_file():
        raise MapError(f"{path}: no such hloc features file")
    names = list_global_names(path) if names is None else [_check_name(n) for n in names]
    if not names:
        raise MapError(
            f"{path} holds no '{DESCRIPTOR}' datasets: not an hloc global-features file "
            f"(local features hold keypoints/descriptors instead)"
        )
    rows = []
    with h5py.File(path, "r") as f:
        for n in names:
            try:
                rows.append(np.asarray(f[n][DESCRIPTOR][()], dtype=np.float32).ravel())
            except KeyError:
                raise MapError(f"{path} has no {DESCRIPTOR} for image {n!r}") from None
    dims = {r.size for r in rows}
    if len(dims) != 1:
        raise MapError(f"{path}: global descriptors of different lengths {sorted(dims)}")
    return names, np.stack(rows)


def _image_sizes(root: Path | None, keys: Sequence[str]) -> dict[str, tuple[int, int]]:
    if root is None:
        return {}
    sizes = {}
    for k in keys:
        try:
            with Image.open(root / k) as im:
                sizes[k] = (int(im.width), int(im.height))
        except (OSError, ValueError):
            continue
    return sizes


def export_map(
    map_dir: str | os.PathLike, out: str | os.PathLike, prefix: str = "", image_size: bool = True, as_half: bool = False
) -> dict[str, Any]:
    """A map's global descriptors as hloc global features, named ``prefix + key``.

    Keys are the map's image paths relative to its image folder, which is what hloc names images by
    when that folder is hloc's ``image_dir`` (give ``prefix`` when hloc's folder is a parent, e.g.
    ``"db/"``). ``image_size`` adds each image's (width, height) when the images are on disk.
    Returns ``{"path", "images", "dim"}``.
    """
    d = Path(map_dir)
    info = read_map_info(d)
    store = MapStore(d, info.get("config", {}).get("store_dtype", "float32"))
    keys = store.keys()
    if not keys:
        raise MapError(f"{d} holds no images")
    vectors = store.read_global()
    root = info.get("images_root")
    sizes = _image_sizes(Path(root), keys) if image_size and root else {}
    names = [prefix + k for k in keys]
    path = write_global_features(out, names, vectors, {prefix + k: v for k, v in sizes.items()}, as_half=as_half)
    return {"path": str(path), "images": len(keys), "dim": int(vectors.shape[1])}


def retrieval_pairs(
    query_names: Sequence[str],
    query_descriptors: np.ndarray,
    db_names: Sequence[str],
    db_descriptors: np.ndarray,
    top_k: int,
    min_score: float | None = None,
    exclude_self: bool = True,
) -> list[tuple[str, str, float]]:
    """``(query, db, score)`` for each query's top ``top_k`` database images by inner product.

    hloc's ``pairs_from_retrieval`` does the same: inner products, a query never paired with an image
    of the same name, and (it passes ``min_score=0``) pairs below ``min_score`` dropped.
    """
    q = np.ascontiguousarray(query_descriptors, dtype=np.float32)
    db = np.ascontiguousarray(db_descriptors, dtype=np.float32)
    if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
        raise ConfigError(f"query descriptors {q.shape} and database descriptors {db.shape} do not match")
    if top_k < 1:
        raise ConfigError("top_k must be ≥ 1")
    k = min(int(top_k), len(db_names))
    db_index = {n: i for i, n in enumerate(db_names)}
    pairs: list[tuple[str, str, float]] = []
    for start in range(0, len(q), 1024):
        sim = q[start : start + 1024] @ db.T
        for i, row in enumerate(sim, start):
            if exclude_self and query_names[i] in db_index:
                row[db_index[query_names[i]]] = -np.inf
            if min_score is not None:
                row[row < min_score] = -np.inf
            top = np.argpartition(-row, k - 1)[:k] if k < len(row) else np.arange(len(row))
            top = top[np.argsort(-row[top], kind="stable")]
            pairs += [(query_names[i], db_names[j], float(row[j])) for j in top if np.isfinite(row[j])]
    return pairs


def write_pairs(path: str | os.PathLike, pairs: Sequence[tuple[str, str] | tuple[str, str, float]]) -> Path:
    """hloc's pairs file: ``query db`` per line (names must not contain whitespace)."""
    lines = []
    for p in pairs:
        a, b = p[0], p[1]
        if any(c.isspace() for c in a + b):
            raise MapError(f"hloc pair names cannot contain whitespace: {a!r} {b!r}")
        lines.append(f"{a} {b}")
    return atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def read_pairs(path: str | os.PathLike) -> dict[str, list[str]]:
    """hloc's ``parse_retrieval``: query → database names in file order."""
    out: dict[str, list[str]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            q, r = line.split()
            out.setdefault(q, []).append(r)
    return out


def import_features(
    features: str | os.PathLike,
    out: str | os.PathLike,
    config: Mapping[str, Any] | None = None,
    names: Sequence[str] | None = None,
    prefix: str | Sequence[str] | None = None,
    normalize: bool = False,
    index_factory: str = "Flat",
    store_dtype: str = "float32",
) -> dict[str, Any]:
    """Make a vprkit map from an hloc global-features file: store (keys + descriptors), index, ``map.json``.

    ``config``: the resolved settings of the vprkit preset that produced the descriptors, if one did
    (then the map works with ``vprkit localize``); otherwise a placeholder whose backbone is
    ``hloc-import``, and the map is for :func:`retrieve` with query descriptors of the same model.
    ``normalize`` L2-normalises the descriptors (vprkit's scores are cosines; hloc ranks by raw inner
    product, which is the same for NetVLAD's unit vectors). ``map.json`` records the source file.
    ``names`` or ``prefix`` (one or several, as hloc's ``db_prefix``) choose the images; default all.
    Refuses to write into a folder that already holds a map.
    """
    src = Path(features)
    out = Path(out)
    if (out / MAP_FILE).exists():
        raise MapError(f"{out} already holds a map; import into a new folder")
    if prefix and names is None:
        prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
        names = [n for n in list_global_names(src) if n.startswith(prefixes)]
        if not names:
            raise MapError(f"{src} has no image whose name starts with {' or '.join(map(repr, prefixes))}")
    names, vectors = read_global_features(src, names)
    norms = np.linalg.norm(vectors, axis=1)
    if normalize:
        vectors = vectors / np.maximum(norms, NORM_FLOOR)[:, None]
    if config is not None and config.get("store_dtype"):
        store_dtype = config["store_dtype"]
    store = MapStore(out, store_dtype)
    if store.keys(include_pending=True):
        raise MapError(f"{out} already holds a descriptor store; import into a new folder")
    for start in range(0, len(names), IMPORT_SHARD_ROWS):
        store.write_shard(names[start : start + IMPORT_SHARD_ROWS], vectors[start : start + IMPORT_SHARD_ROWS])
    n = store.consolidate()
    index = FaissIndex.build(store.read_global(), index_factory)
    index.save(out / INDEX_FILE)
    manifest = _imported_manifest(
        src, config, index_factory, store_dtype, index.ntotal, n, vectors.shape[1], prefix, normalize, norms
    )
    write_manifest(out, manifest)
    return manifest.to_dict()


def _imported_manifest(
    src: Path,
    config: Mapping[str, Any] | None,
    index_factory: str,
    store_dtype: str,
    ntotal: int,
    n: int,
    dim: int,
    prefix: str | Sequence[str] | None,
    normalize: bool,
    norms: np.ndarray,
) -> MapManifest:
    """``map.json`` of a map imported from hloc: the settings (a preset's, or a placeholder) and where it came from."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if config is None:
        config = {
            "name": "hloc-import",
            "backbone": IMPORTED_BACKBONE,
            "aggregator": "none",
            "description": "descriptors imported from hloc; no vprkit model computes queries for this map",
            "index": index_factory,
            "store_dtype": store_dtype,
        }
        queries = (
            "by descriptor only: vprkit.maps.hloc.retrieve(map, query_descriptors) with the same model's descriptors"
        )
    else:
        queries = f"images through preset {config.get('name')!r} (vprkit localize), or descriptors via retrieve()"
    imported = {
        "format": "hloc global features (HDF5: /<image name>/global_descriptor)",
        "from": str(src.resolve()),
        "prefix": prefix if prefix else None,
        "images": n,
        "normalized": bool(normalize),
        "norms": {"min": float(norms.min()), "max": float(norms.max())},
        "queries": queries,
        "imported_at": now,
    }
    return MapManifest(
        vprkit_version=__version__,
        config=dict(config),
        images_root=None,
        descriptor_dim=int(dim),
        vocabulary=None,
        counts=Counts(images=n, failed=0),
        index=IndexSection(factory=index_factory, ntotal=ntotal),
        extensions=[],
        imported=imported,
        created=now,
        updated=now,
    )


def retrieve(
    map_dir: str | os.PathLike, query_descriptors: np.ndarray, top_k: int = 10
) -> list[list[tuple[str, float]]]:
    """Top ``top_k`` (key, score) per query descriptor, from any map (imported or built) — no model loaded.

    Scores are inner products (cosines for unit vectors), higher is better.
    """
    d = Path(map_dir)
    info = read_map_info(d)
    store = MapStore(d, info.get("config", {}).get("store_dtype", "float32"))
    keys = store.keys()
    path = d / INDEX_FILE
    index = FaissIndex.load(path) if path.exists() else None
    if index is None or index.ntotal != len(keys):
        index = FaissIndex.build(store.read_global(), info.get("index", {}).get("factory", "Flat"))
    q = np.atleast_2d(np.asarray(query_descriptors, dtype=np.float32))
    dim = info.get("descriptor_dim")
    if dim is not None and q.shape[1] != dim:
        raise ConfigError(f"query descriptors are {q.shape[1]}-d, the map's {dim}-d")
    rows, scores = index.search(q, top_k)
    return [[(keys[r], float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]
