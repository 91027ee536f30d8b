"""Issue 15, items 1–2: compact maps and large maps on one machine.

    python benchmarks/bench_scale.py [--places 1000000] [--queries 200] [--flat-subset 20000]
                                     [--types pca-opq-ivfpq-rescore ...] [--no-synthetic] [--no-real]

**Synthetic** (``--places`` N, default 1,000,000): N descriptors of the default preset's dimension
(11,520, read from the real Corridor map this benchmark builds, else the preset's backbone dim × K),
generated in seeded chunks so nothing holds more than one chunk: a low-rank "scene" part (places
clustered along routes, as VLAD descriptors of a city are) plus isotropic noise, unit-normalised.
They are written once as a float16 ``descriptors.npy`` (the map's re-scoring copy, 23 GB at 1M) under
``benchmarks/results/cache/`` and memory-mapped. Two query sets, both computed against all N rows
chunk by chunk in one pass: *re-seen* queries (a database row's place seen again with little change)
give the nearest-neighbour view — Recall@1/@10 relative to exact search as ANN benchmarks count it
(top-1 equal; share of the exact top-10 found); *hard* queries (the place's scene changed as much as
a season changes it, calibrated so exact search finds the place first for about two in three, as the
default preset does on seasonal Nordland between 0.41 and Corridor's 0.96) give the place-recognition
view — Recall@1/@10 of the query's own place, for exact search and for each index, and their ratio
(``place_r10_vs_exact``, as the real maps' target is "of uncompressed Recall@1"). PCA is fitted once (randomised SVD
on a seeded sample, as ``map compress`` does) and the N rows projected once; every PCA-based index
shares that pass, whose time is added to each one's build time. Per index type: bytes per place
(RAM of the served index / N, and the codes alone), build time, the served index's RAM, query latency
p50/p99 with 2 threads one query at a time (the PCA projection and any re-scoring included), and
both recall views. ``Flat`` runs
on the first ``--flat-subset`` rows only (at 1M it would need 46 GB).

**Real** (Corridor 111 places, Nordland-600): default-preset maps built from ../shared/datasets
(cached), compressed with each type; Recall@1 against the datasets' ground truth relative to the
uncompressed map's, and bytes per place against float32's (target ≤ 1/50 keeping ≥ 0.97).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import faiss
import numpy as np
from common import DATA, NORDLAND_600, NORDLAND_SIZE, RESULTS, THREADS, report, setup
from tqdm import tqdm

from vprkit import pipeline
from vprkit.datasets import load_dataset
from vprkit.errors import ConfigError, MapError
from vprkit.images import FolderImages
from vprkit.maps.index import TRAIN_SAMPLE_MAX_BYTES, FaissIndex, _top_components
from vprkit.maps.index_options import canonical_options
from vprkit.maps.vectors import DescriptorFile, RowSource, write_descriptors
from vprkit.presets import resolve

CACHE = RESULTS / "cache"
SEED = 0
TOP = 10
FLOAT32_BYTES = 4
# Synthetic structure: places lie along routes in a low-rank scene space; a query is its place seen again.
LATENT_RANK = 128
ROUTE_COUNT = 2000
ROUTE_SPREAD = 0.6  # spread of places around their route centre (latent units)
NOISE_SHARE = 0.35  # norm of the isotropic part relative to the scene part
QUERY_LATENT_NOISE = 0.15  # a query's scene differs a little from its place's ...
QUERY_NOISE_SHARE = 0.35  # ... and its isotropic part is drawn again
# A hard query's scene moved this far (latent units; a route's places spread 0.6): exact search at 1M
# then ranks the place first for ~0.65 of queries and within the top 10 for ~0.9 (measured on 2,000 rows
# of 4 routes, 500 places each as at 1M: 1.5 → 0.91 / 1.00, 2.0 → 0.65 / 0.90, 2.5 → 0.33 / 0.68).
HARD_QUERY_LATENT_NOISE = 2.0
GEN_CHUNK = 8192
GT_CHUNK = 8192
# Index types: name → (factory after the shared PCA, or a full factory for "Flat"; PCA dims; options).
PCA_DIMS = 1024
SYNTHETIC_TYPES: dict[str, tuple[str, int, dict[str, Any]]] = {
    "flat-subset": ("Flat", 0, {}),
    "pca1024-flat": ("Flat", PCA_DIMS, {}),
    "pca1024-sq8": ("SQ8", PCA_DIMS, {}),
    "pca256-hnsw32": ("HNSW32", 256, {"ef_search": 128}),
    "pca1024-ivfpq64": ("IVF1024,PQ64", PCA_DIMS, {"nprobe": 32}),
    "pca1024-ivfpq64-rescore": ("IVF1024,PQ64", PCA_DIMS, {"nprobe": 32, "rescore": 100}),
    "pca1024-opq64-ivfpq64": ("OPQ64,IVF1024,PQ64", PCA_DIMS, {"nprobe": 32}),
    "pca1024-opq64-ivfpq64-rescore": ("OPQ64,IVF1024,PQ64", PCA_DIMS, {"nprobe": 32, "rescore": 100}),
    "pca1024-ivf1024-sq8": ("IVF1024,SQ8", PCA_DIMS, {"nprobe": 32}),
    # Everything in the process's RAM, no re-scoring copy: half-precision codes of a 512-d PCA.
    "pca512-ivf1024-sqfp16": ("IVF1024,SQfp16", 512, {"nprobe": 32}),
    "pca768-ivf1024-sqfp16": ("IVF1024,SQfp16", 768, {"nprobe": 32}),
    "pca768-ivf1024-sqfp16-nprobe16": ("IVF1024,SQfp16", 768, {"nprobe": 16}),
    "pca512-ivf1024-sqfp16-nprobe64": ("IVF1024,SQfp16", 512, {"nprobe": 64}),
    "pca1024-ivf1024-sq8-nprobe64": ("IVF1024,SQ8", PCA_DIMS, {"nprobe": 64}),
    "pca1024-ivf1024-sq8-rescore": ("IVF1024,SQ8", PCA_DIMS, {"nprobe": 32, "rescore": 100}),
    "pca1024-ivfpq64-rescore250": ("IVF1024,PQ64", PCA_DIMS, {"nprobe": 32, "rescore": 250}),
    "pca1024-ivfpq64-rescore400": ("IVF1024,PQ64", PCA_DIMS, {"nprobe": 32, "rescore": 400}),
    "pca1024-ivfpq64-rescore500": ("IVF1024,PQ64", PCA_DIMS, {"nprobe": 32, "rescore": 500}),
}
# Real maps are small (111 and 600 places): flat codes, after a PCA that fits the map or on all dims;
# 4-bit PQ (16 centroids per sub-vector) because 8-bit PQ needs ≥ 256 training rows.
REAL_TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    "flat (float32)": ("Flat", {}),
    "sq4": ("SQ4", {}),
    "pq1440x4": ("PQ1440x4", {}),
    "pca64-sq8": ("PCA64,SQ8", {}),
    "pca64-pq32x4": ("PCA64,PQ32x4", {}),
    "pq180x4-rescore50": ("PQ180x4", {"rescore": 50}),
    "pca64-pq16x4-rescore100": ("PCA64,PQ16x4", {"rescore": 100}),
    # No re-scoring copy at all: a whitened PCA fitted on the map, 4-bit codes (needs ≥ 448 map rows).
    "pcaw448-sq4": ("PCAW448,SQ4", {}),
}
LATENCY_WARMUP = 5
MIB = 2**20


# ---- synthetic descriptors ------------------------------------------------------------------------
def _basis(dim: int) -> np.ndarray:
    rng = np.random.default_rng([SEED, 1])
    return (rng.standard_normal((LATENT_RANK, dim)) / np.sqrt(dim)).astype(np.float32)


def _routes() -> np.ndarray:
    return np.random.default_rng([SEED, 2]).standard_normal((ROUTE_COUNT, LATENT_RANK)).astype(np.float32)


def _place_latents(start: int, stop: int) -> np.ndarray:
    rng = np.random.default_rng([SEED, 3, start])
    routes = _routes()
    which = np.arange(start, stop) % ROUTE_COUNT
    return routes[which] + ROUTE_SPREAD * rng.standard_normal((stop - start, LATENT_RANK)).astype(np.float32)


def _render(latent: np.ndarray, basis: np.ndarray, rng: np.random.Generator, noise_share: float) -> np.ndarray:
    scene = latent @ basis
    noise = rng.standard_normal(scene.shape, dtype=np.float32)
    noise *= noise_share * np.linalg.norm(scene, axis=1, keepdims=True) / np.sqrt(scene.shape[1])
    x = scene + noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_chunks(n: int, dim: int) -> Iterator[np.ndarray]:
    basis = _basis(dim)
    for start in range(0, n, GEN_CHUNK):
        stop = min(n, start + GEN_CHUNK)
        yield _render(_place_latents(start, stop), basis, np.random.default_rng([SEED, 4, start]), NOISE_SHARE)


def synthetic_queries(
    n: int, dim: int, count: int, latent_noise: float = QUERY_LATENT_NOISE, stream: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """(queries, the database row each one shows again): ``latent_noise`` sets how much its scene changed."""
    rng = np.random.default_rng([SEED, stream])
    rows = np.sort(rng.choice(n, size=count, replace=False))
    latents = np.concatenate(
        [
            _place_latents(r // GEN_CHUNK * GEN_CHUNK, min(n, r // GEN_CHUNK * GEN_CHUNK + GEN_CHUNK))[r % GEN_CHUNK][
                None
            ]
            for r in rows
        ]
    )
    latents += latent_noise * rng.standard_normal(latents.shape).astype(np.float32)
    return _render(latents, _basis(dim), rng, QUERY_NOISE_SHARE), rows


def exact_topk(desc, q: np.ndarray, k: int, limit: int | None = None) -> np.ndarray:
    """Exact top-k rows of every query over the first ``limit`` rows, chunk by chunk."""
    n = len(desc) if limit is None else limit
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_r = np.full((len(q), k), -1, np.int64)
    for start in tqdm(range(0, n, GT_CHUNK), desc="exact top-k", leave=False):
        block = np.asarray(desc.array[start : min(n, start + GT_CHUNK)], dtype=np.float32)
        s = q @ block.T
        r = np.broadcast_to(np.arange(start, start + len(block)), s.shape)
        all_s, all_r = np.concatenate([best_s, s], 1), np.concatenate([best_r, r], 1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_r, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_r, order, 1)


# ---- measuring an index ---------------------------------------------------------------------------
def latency_ms(search: Callable[[np.ndarray], Any], q: np.ndarray) -> tuple[float, float]:
    for i in range(min(LATENCY_WARMUP, len(q))):
        search(q[i : i + 1])
    times = []
    for i in range(len(q)):
        t = time.perf_counter()
        search(q[i : i + 1])
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def place_recall(rows: np.ndarray, places: np.ndarray) -> tuple[float, float]:
    """Recall@1/@10 of the query's own place (its source row)."""
    return float(np.mean(rows[:, 0] == places)), float(np.mean((rows[:, :TOP] == places[:, None]).any(1)))


def recall_vs_exact(rows: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    r1 = float(np.mean(rows[:, 0] == exact[:, 0]))
    r10 = float(np.mean([len(set(a[:TOP]) & set(b[:TOP])) / TOP for a, b in zip(rows, exact)]))
    return r1, r10


def index_bytes(index) -> int:
    return int(len(faiss.serialize_index(index)))


@dataclass
class SyntheticMap:
    """The synthetic map of one run: its float16 descriptors, both query sets with their exact answers, and
    the PCA passes made so far (shared by every index type of that width)."""

    n: int
    dim: int
    train_sample: int
    desc: DescriptorFile
    q: np.ndarray
    hard_q: np.ndarray
    hard_places: np.ndarray
    exact: np.ndarray
    hard_exact: np.ndarray
    pca_cache: dict[int, tuple[Any, np.ndarray, float]] = field(default_factory=dict)


def synthetic_map(args: argparse.Namespace, dim: int) -> SyntheticMap:
    """Generate (or read back from ``CACHE``) the descriptors, queries and exact top-k of ``--places`` rows."""
    n = args.places
    path = CACHE / f"synthetic-{n}x{dim}-seed{SEED}.npy"
    if not path.exists():
        t = time.perf_counter()
        write_descriptors(path, synthetic_chunks(n, dim), dim, "float16")
        print(f"generated {n:,} × {dim} descriptors in {time.perf_counter() - t:.0f} s → {path}")
    desc = DescriptorFile(path)
    q, _ = synthetic_queries(n, dim, args.queries)
    hard_q, hard_places = synthetic_queries(n, dim, args.queries, HARD_QUERY_LATENT_NOISE, stream=7)
    gt_path = CACHE / f"synthetic-{n}x{dim}-seed{SEED}-q{args.queries}-hard{HARD_QUERY_LATENT_NOISE}-gt.npz"
    if gt_path.exists():
        z = np.load(gt_path)
        exact, hard_exact = z["rows"], z["hard_rows"]
    else:  # one pass over the N rows for both query sets
        both = exact_topk(desc, np.concatenate([q, hard_q]), TOP)
        exact, hard_exact = both[: len(q)], both[len(q) :]
        np.savez(gt_path, rows=exact, hard_rows=hard_exact)
    exact_place_r1, exact_place_r10 = place_recall(hard_exact, hard_places)
    print(
        f"exact search over all {n:,} rows, hard queries: place Recall@1 {exact_place_r1:.3f}, "
        f"Recall@10 {exact_place_r10:.3f}"
    )
    return SyntheticMap(n, dim, args.train_sample, desc, q, hard_q, hard_places, exact, hard_exact)


def projected(s: SyntheticMap, dims: int) -> tuple[Any, np.ndarray, float]:
    """(PCA transform, N×dims projected rows as a memmap, seconds to fit and project) — shared by types."""
    n, dim = s.n, s.dim
    if dims in s.pca_cache:
        return s.pca_cache[dims]
    if dims < PCA_DIMS and (CACHE / f"synthetic-{n}-pca{PCA_DIMS}-fit.npz").exists():
        projected(s, PCA_DIMS)  # a cached larger PCA: its leading components are this PCA
    if PCA_DIMS in s.pca_cache and dims < PCA_DIMS:  # leading components of the larger PCA are this PCA
        big, big_rows, big_s = s.pca_cache[PCA_DIMS]
        a = faiss.vector_to_array(big.A).reshape(PCA_DIMS, dim)[:dims]
        b = faiss.vector_to_array(big.b)[:dims]
        pca = _pca_transform(dim, dims, a, b, faiss.vector_to_array(big.mean))
        s.pca_cache[dims] = (pca, big_rows[:, :dims], big_s)
        return s.pca_cache[dims]
    rows_path = CACHE / f"synthetic-{n}-pca{dims}.npy"
    fit_path = CACHE / f"synthetic-{n}-pca{dims}-fit.npz"  # written last: its presence marks a complete pass
    if fit_path.exists() and rows_path.exists():
        z = np.load(fit_path)
        pca = _pca_transform(dim, dims, z["a"], z["b"], z["mean"])
        s.pca_cache[dims] = (pca, np.load(rows_path, mmap_mode="r"), float(z["seconds"]))
        print(f"PCA{dims}: reusing the cached fit and projection ({s.pca_cache[dims][2]:.0f} s when made)")
        return s.pca_cache[dims]
    t = time.perf_counter()
    rng = np.random.default_rng([SEED, 6])
    size = min(n, s.train_sample, TRAIN_SAMPLE_MAX_BYTES // (dim * FLOAT32_BYTES))  # as map compress bounds it
    sample = s.desc.rows(np.sort(rng.choice(n, size=size, replace=False)))
    mean = sample.mean(0)
    comps, _ = _top_components(sample - mean, dims, SEED)
    pca = _pca_transform(dim, dims, comps, -(comps @ mean), mean)
    out = np.lib.format.open_memmap(rows_path, mode="w+", dtype=np.float32, shape=(n, dims))
    for start in tqdm(range(0, n, GT_CHUNK), desc=f"PCA{dims} projection", leave=False):
        out[start : start + GT_CHUNK] = pca.apply(np.asarray(s.desc.array[start : start + GT_CHUNK], np.float32))
    out.flush()
    seconds = time.perf_counter() - t
    np.savez(fit_path, a=comps, b=-(comps @ mean), mean=mean, seconds=seconds)
    s.pca_cache[dims] = (pca, out, seconds)
    print(f"PCA{dims}: fitted and projected {n:,} rows in {seconds:.0f} s")
    return s.pca_cache[dims]


def cached_index(n: int, name: str, build: Callable[[], FaissIndex]) -> tuple[FaissIndex, float]:
    """(built index, build seconds): built once per type and size, then read back (for idle re-timing)."""
    index_path = CACHE / f"synthetic-{n}-{name}.faiss"
    meta_path = index_path.with_suffix(".json")
    if index_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        loaded = FaissIndex(faiss.read_index(str(index_path)), meta["factory"], canonical_options(meta["options"]))
        print(f"{name}: reusing the cached index ({meta['build_s']:.0f} s when built)")
        return loaded, float(meta["build_s"])
    t = time.perf_counter()
    built = build()
    seconds = time.perf_counter() - t
    faiss.write_index(built.index, str(index_path))
    meta_path.write_text(json.dumps({"factory": built.factory, "options": built.options, "build_s": seconds}))
    return built, seconds


@dataclass
class ServedIndex:
    """One index type as served: the index, how many rows it holds, their exact answers, its build time and RAM."""

    index: FaissIndex
    places: int
    exact: np.ndarray
    hard_exact: np.ndarray
    build_s: float
    ram: int


def serve(s: SyntheticMap, name: str, flat_subset: int) -> ServedIndex:
    """Build (or read back) index type ``name`` over the synthetic map."""
    factory, dims, options = SYNTHETIC_TYPES[name]
    t0 = time.perf_counter()
    if dims == 0:  # exact search over a subset: the reference a compressed index is compared with
        limit = min(s.n, flat_subset)
        sub = FaissIndex.build(RowSource(lambda r: s.desc.rows(r), limit, s.dim), factory)
        build_s = time.perf_counter() - t0
        both = exact_topk(s.desc, np.concatenate([s.q, s.hard_q]), TOP, limit)
        return ServedIndex(sub, limit, both[: len(s.q)], both[len(s.q) :], build_s, index_bytes(sub.index))
    pca, reduced, pca_s = projected(s, dims)
    # Built without re-scoring (which would keep its own copy of the reduced rows); the served index
    # re-scores from the full-dimension float16 file, as a compressed map does.
    build_options = {k: v for k, v in options.items() if k != "rescore"}
    sub, sub_build_s = cached_index(
        s.n,
        f"pca{dims}-{factory.replace(',', '-')}",
        lambda: FaissIndex.build(
            reduced, factory, seed=SEED, options={**build_options, "train_sample": s.train_sample}
        ),
    )
    whole = faiss.IndexPreTransform(pca, sub.index)  # the index "PCA{dims},{factory}" would build
    served = FaissIndex(
        whole,
        f"PCA{dims},{factory}",
        {**sub.options, **options},
        descriptors=s.desc if options.get("rescore") else None,
    )
    ram = index_bytes(sub.index) + index_bytes(faiss.IndexPreTransform(pca, faiss.IndexFlatIP(dims)))
    # the shared PCA pass counts for every type
    return ServedIndex(served, s.n, s.exact, s.hard_exact, sub_build_s + pca_s, ram)


def measure(s: SyntheticMap, name: str, served: ServedIndex) -> dict:
    """Bytes, latency and both recall views of one served index type."""
    index, places = served.index, served.places
    empty = faiss.clone_index(index._template())
    codes = (index_bytes(index.index) - index_bytes(empty)) / places
    found, _ = index.search(s.q, TOP)
    r1, r10 = recall_vs_exact(found, served.exact)
    hard_found, _ = index.search(s.hard_q, TOP)
    # Place recall of exact search over the same rows (the subset's own for "Flat" on a subset).
    base_r1, base_r10 = place_recall(served.hard_exact, s.hard_places)
    place_r1, place_r10 = place_recall(hard_found, s.hard_places)
    if places < s.n:  # most hard queries' places lie outside a subset: no place-recall view there
        place_r1 = place_r10 = base_r1 = base_r10 = None
    p50, p99 = latency_ms(lambda x: index.search(x, TOP), s.hard_q)
    return {
        "index": name,
        "factory": index.factory,
        "places": places,
        "pca_dims": SYNTHETIC_TYPES[name][1],
        "bytes_per_place": round(served.ram / places, 1),
        "code_bytes_per_place": round(codes, 1),
        "float32_bytes_per_place": s.dim * FLOAT32_BYTES,
        "build_s": round(served.build_s, 1),
        "ram_mb": round(served.ram / MIB, 1),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "recall@1_vs_exact": round(r1, 3),
        "recall@10_vs_exact": round(r10, 3),
        "place_r1": None if place_r1 is None else round(place_r1, 3),
        "place_r10": None if place_r10 is None else round(place_r10, 3),
        "exact_place_r10": None if base_r10 is None else round(base_r10, 3),
        "place_r10_vs_exact": round(place_r10 / base_r10, 3) if base_r10 else None,
        "place_r1_vs_exact": round(place_r1 / base_r1, 3) if base_r1 else None,
        "rescore": index.options["rescore"],
    }


def run_synthetic(args: argparse.Namespace, dim: int) -> list[dict]:
    faiss.omp_set_num_threads(THREADS)
    CACHE.mkdir(parents=True, exist_ok=True)
    s = synthetic_map(args, dim)
    rows_out: list[dict] = []
    for name in args.types:
        rows_out.append(measure(s, name, serve(s, name, args.flat_subset)))
        print(json.dumps(rows_out[-1]), flush=True)
    return rows_out


def _pca_transform(d_in: int, d_out: int, a: np.ndarray, b: np.ndarray, mean: np.ndarray):
    pca = faiss.PCAMatrix(d_in, d_out)
    faiss.copy_array_to_vector(np.ascontiguousarray(a, np.float32).ravel(), pca.A)
    faiss.copy_array_to_vector(np.ascontiguousarray(b, np.float32), pca.b)
    faiss.copy_array_to_vector(np.ascontiguousarray(mean, np.float32), pca.mean)
    pca.is_trained = True
    return pca


# ---- real maps --------------------------------------------------------------------------------------
def real_map(name: str, dataset: str, image_size) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(map descriptors, query descriptors, positives) of a default-preset map, built once and cached."""
    ds = load_dataset(dataset)
    cached = CACHE / f"{name}-default.npz"
    if not cached.exists():
        map_dir = CACHE / "maps" / name
        if not (map_dir / "map.json").exists():
            pipeline.build_map(
                ds.database_dir, map_dir, resolve(None, image_size=image_size), keys=ds.database_images, progress=True
            )
        m = pipeline.open_map(map_dir, read_only=True)
        by_key = {}
        for qb in pipeline.query_batches(m, FolderImages(ds.queries_dir), ds.query_images, progress=True):
            by_key.update(zip(qb.keys, qb.global_descriptors))
        np.savez(cached, map=m.data.store.read_global(), query=np.stack([by_key[k] for k in ds.query_images]))
    z = np.load(cached)
    return z["map"], z["query"], list(ds.ground_truth.positives)


def run_real(dims_out: list[int]) -> list[dict]:
    rows = []
    for name, dataset, size in (
        ("corridor", str(DATA / "corridor"), None),
        ("nordland600", NORDLAND_600, NORDLAND_SIZE),
    ):
        db, q, positives = real_map(name, dataset, size)
        dims_out.append(db.shape[1])
        base = None
        for label, (factory, options) in REAL_TYPES.items():
            t = time.perf_counter()
            try:
                index = FaissIndex.build(db, factory, seed=SEED, options=options)
            except (ConfigError, MapError) as exc:  # e.g. a PCA wider than the map has rows
                rows.append({"map": name, "places": len(db), "index": label, "error": str(exc)})
                print(json.dumps(rows[-1]), flush=True)
                continue
            build_s = time.perf_counter() - t
            found, _ = index.search(q, 1)
            recall1 = float(np.mean([r in p for r, p in zip(found[:, 0], positives)]))
            base = recall1 if base is None else base
            empty = faiss.clone_index(index._template())
            codes = (index_bytes(index.index) - index_bytes(empty)) / len(db)
            whole = index_bytes(index.index) / len(db)
            float32 = db.shape[1] * FLOAT32_BYTES
            rows.append(
                {
                    "map": name,
                    "places": len(db),
                    "index": label,
                    "code_bytes_per_place": round(codes, 1),
                    "index_bytes_per_place": round(whole, 1),
                    "vs_float32": f"1/{float32 / max(codes, 1e-9):.0f}",
                    "recall@1": round(recall1, 3),
                    "vs_uncompressed": round(recall1 / base, 3) if base else None,
                    "rescore": index.options["rescore"],
                    "build_s": round(build_s, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--places", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--flat-subset", type=int, default=20_000)
    parser.add_argument("--train-sample", type=int, default=65_536)
    parser.add_argument("--types", nargs="+", default=list(SYNTHETIC_TYPES), choices=list(SYNTHETIC_TYPES))
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--no-real", action="store_true")
    parser.add_argument("--name", default="scale")
    args = parser.parse_args()
    setup()
    dims: list[int] = []
    real = [] if args.no_real else run_real(dims)
    if dims:
        dim = dims[0]
    else:
        config = resolve(None)
        dim = pipeline.load_backbone(config).dim * config.vocabulary.k
    synthetic = [] if args.no_synthetic else run_synthetic(args, dim)
    extra = {"places": args.places, "queries": args.queries, "dim": dim, "threads": THREADS, "real": real}
    if real:
        report(
            f"{args.name}-real",
            real,
            [
                "map",
                "places",
                "index",
                "code_bytes_per_place",
                "index_bytes_per_place",
                "vs_float32",
                "recall@1",
                "vs_uncompressed",
                "rescore",
                "build_s",
                "error",
            ],
        )
    if synthetic:
        print()
        report(
            args.name,
            synthetic,
            [
                "index",
                "places",
                "bytes_per_place",
                "code_bytes_per_place",
                "build_s",
                "ram_mb",
                "p50_ms",
                "p99_ms",
                "recall@1_vs_exact",
                "recall@10_vs_exact",
                "place_r1",
                "place_r10",
                "place_r10_vs_exact",
            ],
            extra,
        )


if __name__ == "__main__":
    main()
