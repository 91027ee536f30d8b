"""The map's index over its global descriptors. Inner product on unit vectors: scores are cosines, higher is better.

FAISS is the default engine (:class:`FaissIndex`); any factory string FAISS knows selects the
structure — ``"Flat"`` (exact), ``"PCA1024,OPQ64,IVF1024,PQ64"`` (compressed), ``"PCA256,HNSW32"`` …
A compressed index is trained once on a bounded, seeded sample of the map and remembers it
(:data:`MANIFEST_FILE`); its shortlist can be re-scored exactly from the full-precision descriptors
kept on disk (:mod:`vprkit.maps.vectors`), so results stay cosines of the original descriptors.

Large maps are split into shards of at most ``shard_rows`` rows (``index-shards/``), searched
together with a merged top-k; adding writes only the last shard, removing rewrites only the shards
that held the rows. Every file is written under a new name and the manifest is swapped atomically,
so a process serving the old index keeps answering while the map grows.
"""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import faiss
import numpy as np

from ..config import Config
from ..errors import ConfigError, MapDamagedError, MapError
from ..io import atomic_path
from ..registry import Registry
from .index_options import QUERY_OPTIONS, faiss_options, faiss_parameters
from .manifest import (
    INDEX_MANIFEST_FILE,
    MAP_FILE,
    VOCAB_FILE,
    DescriptorsRecord,
    FileRecord,
    IndexManifest,
    IndexShard,
    ensure_map_identity,
    map_identity,
    read_index_manifest,
    read_manifest,
    write_index_manifest,
)
from .store import STORE_FILE
from .vectors import (
    DESCRIPTOR_DTYPES,
    DESCRIPTORS_FILE,
    DescriptorFile,
    MemoryDescriptors,
    chunk_rows,
    open_descriptors,
    write_descriptors,
)
from .verify import FileState, check_file, confined

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"  # a one-shard index (every map before sharding, and most maps)
MANIFEST_FILE = INDEX_MANIFEST_FILE  # what the index is and what it was trained on (maps.manifest.IndexManifest)
TRAINED_FILE = "index.trained.faiss"  # the trained, empty index: adding or rebuilding never retrains
SHARD_DIR = "index-shards"
# Enough training vectors per IVF list / PQ centroid that FAISS does not warn or degrade.
TRAIN_VECTORS_PER_CENTROID = 39
# The training sample is bounded in bytes as well as rows: 11,520-d float32 rows are 45 KB each.
TRAIN_SAMPLE_MAX_BYTES = 1 << 30
# Queries re-scored together: bounds the gathered full-precision block (queries × shortlist × dim).
RESCORE_BLOCK_BYTES = 256 * 2**20
# FAISS's "no result" score for inner product (rows are -1 there).
MISSING_SCORE = -np.inf
# A map without shard_rows keeps one index file; live adds go to a small *tail* shard (its own file, listed in
# index.json) so the index file is not rewritten for every place. The tail is folded into the index file once
# it holds more than this share of the rows (and at least TAIL_FOLD_MIN_ROWS): a rewrite per 10 % of growth.
TAIL_FOLD_FRACTION = 0.1
TAIL_FOLD_MIN_ROWS = 1024

# The options of the FAISS backend (``Config.index_options``, index.json) are declared once, in the option table
# (vprkit.options, read by vprkit.maps.index_options); query-time ones may differ between processes.


class Index(Protocol):
    """What retrieval needs of a map's index, whatever engine holds it.

    Rows are the map's rows (the store's order): ``remove`` renumbers the rows after the removed
    ones exactly as deleting them from the key list does, so row ``i`` is always ``keys[i]``.
    """

    factory: str

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def add(
        self,
        vectors: np.ndarray,
        keys: Sequence[str] | None = None,
        runs: np.ndarray | None = None,
        poses: np.ndarray | None = None,
    ) -> None:
        """Append rows; ``keys``, ``runs`` and N×2 ``poses`` are what the store holds for them (a backend
        that keeps them beside the vectors, as Milvus does, stores them; FAISS ignores them)."""

    def set_poses(self, rows: Sequence[int], poses: np.ndarray) -> None:
        """The store changed the poses of ``rows``: a backend that keeps poses updates them (FAISS keeps none)."""

    def remove(self, rows: Sequence[int]) -> None: ...

    def save_to_map(self, map_dir: Path) -> None: ...


# name → a class with ``build_for_map(vectors, config, map_dir)`` and ``load_for_map(map_dir, config)``
INDEX_BACKENDS: Registry[type] = Registry("index backend")


def build_index(vectors: np.ndarray, config: Config, map_dir: Path | None = None) -> Index:
    """The map's index over ``vectors`` (N×dim, the store's rows) as ``config`` asks (backend, factory, options)."""
    return INDEX_BACKENDS.get(config.index_backend).build_for_map(vectors, config, map_dir)


def load_index(map_dir: Path, config: Config) -> Index | None:
    """The map's saved index, or None when it is missing or unreadable (it is derived data: rebuild it)."""
    return INDEX_BACKENDS.get(config.index_backend).load_for_map(Path(map_dir), config)


def update_map_index(map_dir: Path, vectors: np.ndarray, config: Config) -> Index:
    """Bring the map's saved index up to ``vectors`` (the store's rows after a build) and save it.

    A map whose index was compressed (``vprkit map compress``) keeps that index: when the saved
    rows are a prefix of ``vectors`` only the new rows are added, otherwise every row is re-added to
    the already trained structure — training happens once. Other maps get the index ``config`` asks for.
    """
    backend = INDEX_BACKENDS.get(config.index_backend)
    updater = getattr(backend, "update_for_map", None)
    if updater is not None:
        index = updater(Path(map_dir), vectors, config)
    else:
        index = backend.build_for_map(vectors, config, Path(map_dir))
    fold = getattr(index, "fold", None)
    if fold is not None:  # a build leaves one index file, as it always has
        fold()
    index.save_to_map(Path(map_dir))
    return index


def config_options(config: Config) -> dict[str, Any]:
    """Every FAISS option ``config`` asks for (its ``index_options`` over the defaults; seed: the vocabulary's)."""
    return faiss_options(config.index_options, seed=config.vocabulary.seed)


def _rows_of(vectors):
    """``vectors`` itself when it is row-indexable with a shape (array, memory map, row source), else an array."""
    return vectors if hasattr(vectors, "shape") and hasattr(vectors, "__getitem__") else np.asarray(vectors)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _is_exact(index) -> bool:
    """Whether ``index`` returns exact inner products (a flat index with no transform)."""
    return isinstance(index, faiss.IndexFlat)


def _clamp_k(k: int, n: int) -> int:
    return max(1, min(int(k), n)) if n else 1


@INDEX_BACKENDS.register("faiss")
class FaissIndex:
    """A FAISS index built from a factory string (``"Flat"``, ``"PCA256,Flat"``, ``"IVF1024,PQ64"`` …).

    ``index`` is the first (usually only) shard; ``shards`` all of them, in row order.
    ``descriptors``: full-precision rows for exact re-scoring (a memory-mapped file or an array).
    """

    def __init__(
        self,
        index,
        factory: str = "Flat",
        options: Mapping[str, Any] | None = None,
        *,
        shards: Sequence[Any] | None = None,
        descriptors: DescriptorFile | MemoryDescriptors | None = None,
        trained: Any = None,
        trained_on: Mapping[str, Any] | None = None,
    ):
        self.shards = list(shards) if shards is not None else [index]
        self.factory = factory
        self.options = faiss_options(options)
        self.descriptors = descriptors
        self.trained = trained  # the trained empty index (None: not yet known; Flat needs none)
        self.trained_on = dict(trained_on or {})
        self._files: list[str | None] = [None] * len(self.shards)  # saved file of each shard (None: changed)
        self._states: list[FileState | None] = [None] * len(self.shards)  # what each saved file is (index.json)
        self._descriptors_state: FileState | None = None  # what the saved descriptors copy is (None: changed)
        self._trained_state: FileState | None = None
        self._generation = 0
        self._trained_dirty = False  # the trained structure differs from the map's TRAINED_FILE
        self._apply_query_options()

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls, vectors: np.ndarray, factory: str = "Flat", seed: int = 0, options: Mapping[str, Any] | None = None
    ) -> "FaissIndex":
        """Train ``factory`` on a seeded sample of ``vectors`` (when it needs training) and add every row.

        ``vectors`` is an array or any row source with ``shape`` and row indexing (a memory map,
        :class:`~vprkit.maps.vectors.RowSource`): only the sample and one chunk are in RAM at a time.
        """
        x = _rows_of(vectors)
        if len(x.shape) != 2:
            raise MapError(f"index vectors must be 2-D, got {x.shape}")
        opts = faiss_options(options)
        if opts["seed"] is None:
            opts["seed"] = int(seed)
        trained, trained_on = train_index(x, factory, opts)
        out = cls(None, factory, opts, shards=[], trained=trained, trained_on=trained_on)
        out._trained_dirty = True
        out._start_descriptors(x.shape[1])
        out.add(x)
        return out

    def _start_descriptors(self, dim: int) -> None:
        """Keep a full-precision copy for re-scoring when the index is approximate and asked to re-score."""
        if self.options["rescore"] and not _is_exact(self._template()):
            self.descriptors = MemoryDescriptors(
                np.empty((0, dim), DESCRIPTOR_DTYPES[self.options["descriptors_dtype"]])
            )

    @classmethod
    def build_for_map(cls, vectors: np.ndarray, config: Config, map_dir: Path | None = None) -> "FaissIndex":
        """A new index over ``vectors``: the map's recorded trained structure when it has one, else ``config``'s."""
        recorded = cls._recorded(map_dir, config) if map_dir is not None else None
        if recorded is not None:
            factory, options, trained, trained_on = recorded
            out = cls(None, factory, options, shards=[], trained=trained, trained_on=trained_on)
            out._start_descriptors(_rows_of(vectors).shape[1])
            out.add(vectors)
            return out
        return cls.build(vectors, config.index, seed=config.vocabulary.seed, options=config_options(config))

    @classmethod
    def update_for_map(cls, map_dir: Path, vectors: np.ndarray, config: Config) -> "FaissIndex":
        """The saved index plus the rows of ``vectors`` it lacks, or a rebuild (see :func:`update_map_index`)."""
        current = cls.load_for_map(map_dir, config)
        x = _rows_of(vectors)
        if current is not None and current.trained is not None and not _is_exact(current.trained):
            n = current.ntotal
            if n <= len(x) and current._holds_prefix(x):
                current.add(x[n:])
                return current
        return cls.build_for_map(x, config, map_dir)

    def _holds_prefix(self, x: np.ndarray) -> bool:
        """Whether this index's rows are ``x[:ntotal]`` (checked on the full-precision copy when there is one)."""
        if self.descriptors is None or len(self.descriptors) != self.ntotal:
            return False
        step = chunk_rows(x.shape[1])
        for start in range(0, self.ntotal, step):
            stop = min(start + step, self.ntotal)
            stored = self.descriptors.array[start:stop]
            if not np.array_equal(stored, np.asarray(x[start:stop]).astype(stored.dtype)):
                return False
        return True

    @staticmethod
    def _recorded(map_dir: Path | None, config: Config):
        """(factory, options, trained index, trained_on) recorded in ``map_dir``, or None."""
        if map_dir is None:
            return None
        manifest = _read_manifest(Path(map_dir))
        if manifest is None or not (Path(map_dir) / TRAINED_FILE).exists():
            return None
        try:
            if manifest.trained is not None:
                check_file(Path(map_dir) / TRAINED_FILE, manifest.trained.size, manifest.trained.fingerprint, "trained")
        except MapDamagedError as exc:
            logger.warning("%s; the index is trained again", exc)
            return None
        try:
            trained = faiss.read_index(str(Path(map_dir) / TRAINED_FILE))
        except (RuntimeError, MemoryError):
            logger.warning("%s is unreadable; the index is trained again", Path(map_dir) / TRAINED_FILE)
            return None
        options = _serving_options(manifest.options, config)
        return manifest.factory or config.index, options, trained, manifest.trained_on

    # ---- reading and writing a map's index ------------------------------------------------------
    @classmethod
    def load_for_map(cls, map_dir: Path, config: Config) -> "FaissIndex | None":
        map_dir = Path(map_dir)
        manifest = _read_manifest(map_dir)
        if manifest is None:  # a map from before manifests: one index.faiss of config.index
            path = map_dir / INDEX_FILE
            if not path.exists():
                return None
            try:
                confined(map_dir, INDEX_FILE)
                return cls.load(path, config.index)
            except MapError as exc:
                logger.warning("%s; rebuilding it from the store", exc)
                return None
        listed = [e.file for e in manifest.shards]
        listed += [r.file for r in (manifest.descriptors, manifest.trained) if r is not None]
        try:
            for name in listed:  # a link leading out of the map: never read, the index is rebuilt
                confined(map_dir, name)
        except MapDamagedError as exc:
            logger.warning("%s; rebuilding the index from the store", exc)
            return None
        missing = [e.file for e in manifest.shards if not (map_dir / e.file).exists()]
        if missing:  # removed on purpose (a live update in progress, a user): derived data, rebuilt quietly
            logger.info("index file %s is missing; rebuilding the index from the store", missing[0])
            return None
        try:
            loaded = cls._load_manifest(map_dir, manifest, config)  # an unreadable file says so first
            _check_belongs(map_dir, manifest)
            return loaded
        except MapError as exc:
            logger.warning("%s; rebuilding the index from the store", exc)
            return None

    @classmethod
    def _load_manifest(cls, map_dir: Path, manifest: IndexManifest, config: Config) -> "FaissIndex":
        shards, files = [], []
        for entry in manifest.shards:
            path = map_dir / entry.file
            shards.append(cls.load(path, manifest.factory or "?").index)
            if shards[-1].ntotal != entry.rows:
                raise MapError(f"{path} holds {shards[-1].ntotal} rows, the manifest says {entry.rows}")
            files.append(entry.file)
        if not shards:
            raise MapError(f"{map_dir / MANIFEST_FILE} lists no index shards")
        if len({int(s.d) for s in shards}) > 1 or (manifest.dim is not None and shards[0].d != manifest.dim):
            raise MapError(f"{map_dir / MANIFEST_FILE}: its shards are not all {manifest.dim}-d")
        trained = _read_trained(map_dir)
        options = _serving_options(manifest.options, config)
        descriptors = open_descriptors(map_dir) if manifest.descriptors is not None else None
        total = sum(s.ntotal for s in shards)
        if descriptors is not None and (len(descriptors) != total or descriptors.dim != shards[0].d):
            raise MapError(
                f"{descriptors.path} holds {len(descriptors)}×{descriptors.dim} descriptors, the index "
                f"{total}×{shards[0].d}: it does not belong to this index"
            )
        if manifest.descriptors is not None and descriptors is None:
            raise MapError(f"{map_dir / DESCRIPTORS_FILE} is missing or unreadable")
        out = cls(
            None,
            manifest.factory or "?",
            options,
            shards=shards,
            descriptors=descriptors,
            trained=trained,
            trained_on=manifest.trained_on,
        )
        out._files = files
        out._states = [_state_of(e) for e in manifest.shards]
        out._descriptors_state = None if descriptors is None else _state_of(manifest.descriptors)
        out._trained_state = None if manifest.trained is None else _state_of(manifest.trained)
        out._generation = manifest.generation
        out._trained_dirty = trained is None
        return out

    def save_to_map(self, map_dir: Path) -> None:
        """Write changed shards under new names, the descriptors and the trained index, then swap the manifest.

        ``index.json`` records each file's size, fingerprint and checksum and the map's identity
        (:mod:`vprkit.maps.verify`): an opened map checks them and rebuilds what does not belong.
        """
        map_dir = Path(map_dir)
        generation = self._generation + 1
        self.fold(force=False)
        sharded = len(self.shards) > 1 or self.options["shard_rows"] > 0
        for i, shard in enumerate(self.shards):
            if (
                self._files[i] is not None
                and (map_dir / self._files[i]).exists()
                and (sharded or self._files[i] == INDEX_FILE)
            ):
                continue
            name = f"{SHARD_DIR}/shard-{i:04d}.g{generation}.faiss" if sharded else INDEX_FILE
            with atomic_path(map_dir / name) as tmp:
                faiss.write_index(shard, str(tmp))
            self._files[i], self._states[i] = name, FileState.of(map_dir / name)
        keeps_training = self.trained is not None and bool(self.trained_on.get("sample"))
        if keeps_training and (self._trained_dirty or not (map_dir / TRAINED_FILE).exists()):
            with atomic_path(map_dir / TRAINED_FILE) as tmp:
                faiss.write_index(self.trained, str(tmp))
            self._trained_dirty, self._trained_state = False, FileState.of(map_dir / TRAINED_FILE)
        self._save_descriptors(map_dir)
        write_index_manifest(map_dir, self._manifest(map_dir, generation, keeps_training))
        self._generation = generation
        _remove_unlisted(
            map_dir,
            set(self._files),
            keep_single=not sharded,
            keep_descriptors=self.descriptors is not None,
            keep_trained=keeps_training,
        )

    def _save_descriptors(self, map_dir: Path) -> None:
        """Write the descriptors copy when it is not the map's file yet; record what the file now is."""
        if self.descriptors is None:
            return
        target = map_dir / DESCRIPTORS_FILE
        if not isinstance(self.descriptors, DescriptorFile) or self.descriptors.path != target:
            self.descriptors = write_descriptors(
                target, self.descriptors.iter_chunks(), self.descriptors.dim, self.options["descriptors_dtype"]
            )
            self._descriptors_state = FileState.of(target)
        elif self._descriptors_state is None:  # appended in place: a large file records its fingerprint only
            self._descriptors_state = FileState.of(target, full=False)

    def _manifest(self, map_dir: Path, generation: int, keeps_training: bool) -> IndexManifest:
        """``index.json`` of the files just saved."""
        if keeps_training and self._trained_state is None:
            self._trained_state = FileState.of(map_dir / TRAINED_FILE)
        trained = self._trained_state if keeps_training else None
        desc = self._descriptors_state
        return IndexManifest(
            map_id=ensure_map_identity(map_dir),
            dim=self.d,
            factory=self.factory,
            options=dict(self.options),
            ntotal=self.ntotal,
            trained_on=dict(self.trained_on),
            generation=generation,
            saved=_now(),
            shards=[
                IndexShard(file=f, rows=int(sh.ntotal), **(st.to_dict() if st else {}))
                for f, sh, st in zip(self._files, self.shards, self._states)
            ],
            descriptors=None
            if self.descriptors is None
            else DescriptorsRecord(
                file=DESCRIPTORS_FILE,
                dtype=str(self.descriptors.dtype),
                rows=len(self.descriptors),
                **(desc.to_dict() if desc else {}),
            ),
            trained=None if trained is None else FileRecord(file=TRAINED_FILE, **trained.to_dict()),
        )

    # ---- the Index protocol ---------------------------------------------------------------------
    @property
    def index(self):
        """The first shard (the whole index unless the map is sharded)."""
        return self.shards[0]

    @property
    def ntotal(self) -> int:
        return int(sum(s.ntotal for s in self.shards))

    @property
    def d(self) -> int:
        """The descriptors' dimension (read from a shard: making the empty template would copy a whole flat index)."""
        return int(self.shards[0].d if self.shards else self._template().d)

    def _template(self):
        """The trained, empty structure new shards start from (an emptied copy of a shard if none was kept)."""
        if self.trained is None:
            if not self.shards:
                raise MapError(f"index {self.factory!r} has no trained structure to add to; rebuild it")
            self.trained = faiss.clone_index(self.shards[0])
            self.trained.reset()
        return self.trained

    def _new_shard(self):
        shard = faiss.clone_index(self._template())
        self._set_query_options(shard)
        return shard

    def add(
        self,
        vectors: np.ndarray,
        keys: Sequence[str] | None = None,
        runs: np.ndarray | None = None,
        poses: np.ndarray | None = None,
    ) -> None:
        """Append rows ``ntotal …``: to the last shard, opening new ones every ``shard_rows`` rows.

        Rows are read and encoded chunk by chunk (``vectors`` may be a memory map or a row source).
        ``keys``, ``runs`` and ``poses`` are accepted for the protocol and not kept: FAISS holds vectors
        only, the store the rest.
        """
        x = _rows_of(vectors)
        if len(x.shape) != 2 or x.shape[1] != self.d:
            raise MapError(f"cannot add vectors of shape {tuple(x.shape)} to a {self.d}-d index")
        cap = self.options["shard_rows"] or None
        if not self.shards:
            self._open_shard()
        elif cap is None and len(self.shards) == 1 and self._files[0] is not None and _mergeable(self.shards[0]):
            self._open_shard()  # the saved index file stays as it is: new rows go to a tail shard (folded later)
        step = chunk_rows(x.shape[1])
        start = 0
        while start < len(x):
            last = self.shards[-1]
            room = len(x) - start if cap is None else cap - last.ntotal
            if room <= 0:
                self._open_shard()
                continue
            stop = min(len(x), start + room, start + step)
            block = np.ascontiguousarray(x[start:stop], dtype=np.float32)
            if self.descriptors is not None:
                self.descriptors.append(block)
                self._descriptors_state = None
            last.add(block)
            self._files[-1], self._states[-1] = None, None
            start = stop

    def fold(self, force: bool = True) -> bool:
        """Merge the tail shards of a map without ``shard_rows`` into its one index (``force=False``: only once
        the tail outgrew :data:`TAIL_FOLD_FRACTION` of the rows). Returns whether it folded; results are unchanged."""
        if self.options["shard_rows"] or len(self.shards) < 2 or not _mergeable(self.shards[0]):
            return False
        tail = sum(s.ntotal for s in self.shards[1:])
        if not force and tail <= max(TAIL_FOLD_MIN_ROWS, TAIL_FOLD_FRACTION * self.shards[0].ntotal):
            return False
        base = self.shards[0]
        if self._files[0] is not None:  # the loaded index may be shared with readers: merge into a copy
            base = faiss.clone_index(base)
        for shard in self.shards[1:]:
            _merge_into(base, shard)
        self.shards, self._files, self._states = [base], [None], [None]
        return True

    def _open_shard(self) -> None:
        self.shards.append(self._new_shard())
        self._files.append(None)
        self._states.append(None)

    def set_poses(self, rows: Sequence[int], poses: np.ndarray) -> None:
        """Nothing to do: FAISS keeps no poses (the store is where they change)."""

    def remove(self, rows: Sequence[int]) -> None:
        """Delete ``rows``; later rows move down as in the key list. Only the shards holding them change.

        Flat and flat-code indexes (PQ, SQ, with or without PCA/OPQ) compact in place (FAISS shifts the
        ids); IVF indexes remove the entries and renumber the ids in their lists; others (HNSW) re-add
        the kept rows of the shard from the full-precision copy, or from their own reconstruction.
        """
        drop = np.unique(np.asarray(list(rows), dtype=np.int64))
        if len(drop) == 0:
            return
        if drop[0] < 0 or drop[-1] >= self.ntotal:
            raise MapError(f"cannot remove rows {drop.tolist()[:5]}: the index holds {self.ntotal}")
        starts = np.cumsum([0] + [s.ntotal for s in self.shards])
        for i in reversed(range(len(self.shards))):
            local = drop[(drop >= starts[i]) & (drop < starts[i + 1])] - starts[i]
            if len(local):
                self._remove_from_shard(i, local, int(starts[i]))
                self._files[i], self._states[i] = None, None
        if self.descriptors is not None:
            self.descriptors.remove(drop)
            self._descriptors_state = None
        keep = [i for i, s in enumerate(self.shards) if s.ntotal > 0] or [0]
        self.shards = [self.shards[i] for i in keep]
        self._files = [self._files[i] for i in keep]
        self._states = [self._states[i] for i in keep]

    def _remove_from_shard(self, i: int, local: np.ndarray, offset: int) -> None:
        shard = self.shards[i]
        inner = faiss.downcast_index(shard.index) if isinstance(shard, faiss.IndexPreTransform) else shard
        if isinstance(inner, faiss.IndexFlatCodes):
            shard.remove_ids(faiss.IDSelectorBatch(local))
            return
        try:
            ivf = faiss.extract_index_ivf(shard)
        except RuntimeError:
            ivf = None
        if ivf is not None:
            lists = faiss.downcast_InvertedLists(ivf.invlists)
            if isinstance(lists, faiss.ArrayInvertedLists):
                shard.remove_ids(faiss.IDSelectorBatch(local))
                for list_no in range(ivf.nlist):
                    size = lists.list_size(list_no)
                    if size:
                        ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size)
                        ids -= np.searchsorted(local, ids).astype(ids.dtype)  # ids after a removed one move down
                return
        kept = np.setdiff1d(np.arange(shard.ntotal, dtype=np.int64), local)
        if self.descriptors is not None and len(self.descriptors) == self.ntotal:
            vectors = self.descriptors.rows(kept + offset)
        else:
            try:
                vectors = shard.reconstruct_batch(kept) if len(kept) else np.zeros((0, shard.d), np.float32)
            except RuntimeError as exc:
                raise MapError(
                    f"index {self.factory!r} cannot remove rows in place ({exc}); rebuild it from the store"
                ) from None
        fresh = self._new_shard()
        if len(vectors):
            fresh.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.shards[i] = fresh

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows and scores (higher is better); rows are -1 where fewer than k were found.

        With ``rescore`` > 0 and full-precision descriptors, the top ``max(k, rescore)`` of the
        compressed index are re-scored exactly: the scores are then the descriptors' cosines.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.d:
            raise MapDamagedError(
                f"queries are {q.shape[-1] if q.ndim else 0}-d but the map's index holds {self.d}-d descriptors: "
                f"the map's files come from another preset (rebuild the map, or restore its own files)"
            )
        n = self.ntotal
        k = _clamp_k(k, n)
        rescore = self.descriptors is not None and self.options["rescore"] > 0
        wide = _clamp_k(max(k, self.options["rescore"]), n) if rescore else k
        scores, rows = self._search_shards(q, wide)
        if rescore:
            scores, rows = self._rescore(q, rows, k)
        return rows[:, :k].astype(np.int64), scores[:, :k].astype(np.float32)

    def _search_shards(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.shards) == 1:
            return self.shards[0].search(q, k)
        all_scores, all_rows, offset = [np.full((len(q), 1), MISSING_SCORE, np.float32)], [np.full((len(q), 1), -1)], 0
        for shard in self.shards:
            if shard.ntotal:
                s, r = shard.search(q, min(k, shard.ntotal))
                all_scores.append(s)
                all_rows.append(np.where(r >= 0, r + offset, -1))
            offset += shard.ntotal
        scores, rows = np.concatenate(all_scores, axis=1), np.concatenate(all_rows, axis=1)
        scores = np.where(rows >= 0, scores, MISSING_SCORE)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, 1), np.take_along_axis(rows, top, 1)

    def _rescore(self, q: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosines of the shortlist ``rows`` from the full-precision copy, best ``k`` first."""
        nq, wide = rows.shape
        block = max(1, RESCORE_BLOCK_BYTES // max(1, wide * q.shape[1] * 4))
        out_scores = np.full((nq, wide), MISSING_SCORE, np.float32)
        for start in range(0, nq, block):
            r = rows[start : start + block]
            valid = r >= 0
            vecs = self.descriptors.rows(np.where(valid, r, 0))
            exact = np.einsum("qkd,qd->qk", vecs, q[start : start + block])
            out_scores[start : start + block] = np.where(valid, exact, MISSING_SCORE)
        order = np.argsort(-out_scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(out_scores, order, 1), np.take_along_axis(rows, order, 1)

    # ---- query-time settings --------------------------------------------------------------------
    def _set_query_options(self, shard) -> None:
        space = faiss.ParameterSpace()
        for name, value in faiss_parameters(self.options).items():  # FAISS's names only here (efSearch)
            try:
                space.set_index_parameter(shard, name, value)
            except RuntimeError:
                pass  # the index has no such parameter (a flat index has no lists to probe)

    def _apply_query_options(self) -> None:
        for shard in self.shards:
            self._set_query_options(shard)

    def set_options(self, **options: Any) -> None:
        """Change query-time options (``nprobe``, ``ef_search``, ``rescore``) of this loaded index."""
        bad = set(options) - set(QUERY_OPTIONS)
        if bad:
            raise ConfigError(f"{sorted(bad)} cannot change after training; query-time options are {QUERY_OPTIONS}")
        self.options = faiss_options({**self.options, **options})
        self._apply_query_options()

    # ---- single files (hloc exports, tests) -----------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the first shard to ``path`` (a one-file index; sharded maps use :meth:`save_to_map`)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, factory: str = "?") -> "FaissIndex":
        """Read an index file; a truncated or foreign file is a :class:`MapError` (the index can be rebuilt)."""
        try:
            return cls(faiss.read_index(str(path)), factory)
        except (RuntimeError, MemoryError) as exc:  # MemoryError: a damaged header asked for an absurd allocation
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise MapError(f"{path} is not a readable FAISS index ({reason})") from None


def train_index(vectors: np.ndarray, factory: str, options: Mapping[str, Any]):
    """An empty ``factory`` index trained on a bounded seeded sample of ``vectors``, and what it was trained on.

    The sample is ``train_sample`` rows (fewer when the rows would exceed :data:`TRAIN_SAMPLE_MAX_BYTES`),
    drawn uniformly without replacement with ``seed``; its SHA-256 is recorded so a retraining can be
    checked to be the same one.
    """
    x = _rows_of(vectors)
    try:
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(f"FAISS cannot build index {factory!r} for {x.shape[1]}-d vectors: {exc}") from None
    if index.is_trained:
        return index, {"factory": factory, "sample": 0, "rows": int(len(x)), "date": _now()}
    if len(x) == 0:
        raise MapError(f"index {factory!r} needs training vectors, and the map is empty")
    cap = max(1, min(int(options["train_sample"]) or len(x), TRAIN_SAMPLE_MAX_BYTES // (x.shape[1] * 4)))
    seed = int(options["seed"] or 0)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), size=min(cap, len(x)), replace=False))
    sample = np.ascontiguousarray(x[pick], dtype=np.float32)
    _seed_training(index, seed)
    try:
        _fit_pca(index, sample, seed)
        index.train(sample)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise ConfigError(
            f"cannot train index {factory!r} on {len(sample)} vectors of {x.shape[1]} dims: {reason} "
            f"(fewer lists, centroids or PCA dims, or a larger map/sample)"
        ) from None
    return index, {
        "factory": factory,
        "sample": int(len(sample)),
        "seed": seed,
        "rows": int(len(x)),
        "sample_sha256": hashlib.sha256(sample.tobytes()).hexdigest(),
        "date": _now(),
    }


def _fit_pca(index, sample: np.ndarray, seed: int) -> None:
    """Fit the PCA steps of ``index`` with a randomised SVD, keeping only what applying them needs.

    FAISS's own PCA training eigen-decomposes a d×d (or n×n) matrix and serialises the full
    eigenvector matrix with the index: for 11,520-d descriptors that is minutes of training and
    hundreds of MB per index file, for a projection of a few MB. Here the top components come from a
    randomised SVD of the centred sample (Halko et al. 2011, with power iterations), and only the
    projection (A, b) and its eigenvalues are kept. Whitening (``PCAW``, eigen_power) is applied as
    FAISS does; random rotations or balanced bins are left to FAISS.
    """
    if not isinstance(index, faiss.IndexPreTransform):
        return
    x = np.asarray(sample, dtype=np.float32)
    for i in range(index.chain.size()):
        vt = faiss.downcast_VectorTransform(index.chain.at(i))
        if vt.is_trained:
            x = vt.apply(x)
            continue
        if not isinstance(vt, faiss.PCAMatrix) or vt.random_rotation or vt.balanced_bins:
            return  # FAISS trains this one and what follows
        d_out, n = vt.d_out, len(x)
        if d_out > min(n, vt.d_in):
            raise ConfigError(
                f"PCA to {d_out} dims needs at least {d_out} training rows of ≥ {d_out} dims "
                f"(has {n} rows of {vt.d_in}); lower the PCA dimension or train on more rows"
            )
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        centred = x - mean
        components, singular = _top_components(centred, d_out, seed)
        eig = (singular.astype(np.float64) ** 2 / n).astype(np.float32)
        a = components
        if vt.eigen_power != 0:
            a = a * ((eig + vt.epsilon) ** vt.eigen_power)[:, None]
        faiss.copy_array_to_vector(mean, vt.mean)
        faiss.copy_array_to_vector(eig, vt.eigenvalues)
        faiss.copy_array_to_vector(np.ascontiguousarray(a, np.float32).ravel(), vt.A)
        faiss.copy_array_to_vector(np.ascontiguousarray(-(a @ mean), np.float32), vt.b)
        vt.is_trained = True
        x = vt.apply(x)


# Randomised SVD: extra directions beyond the rank asked for, and subspace iterations (accuracy of
# the trailing components; 4 is the usual choice for slowly decaying spectra).
SVD_OVERSAMPLE = 16
SVD_POWER_ITERATIONS = 4


def _top_components(x: np.ndarray, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``rank`` leading right singular vectors (rank×d, orthonormal rows) and singular values of ``x``."""
    n, d = x.shape
    width = min(rank + SVD_OVERSAMPLE, n, d)
    if width >= min(n, d) // 2:  # asking for most of the spectrum: an exact SVD is as cheap
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        return vt[:rank].astype(np.float32), s[:rank]
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(x @ rng.standard_normal((d, width)).astype(np.float32))
    for _ in range(SVD_POWER_ITERATIONS):
        q, _ = np.linalg.qr(x.T @ q)
        q, _ = np.linalg.qr(x @ q)
    _, s, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    return vt[:rank].astype(np.float32), s[:rank]


def _serving_options(recorded: Mapping[str, Any], config: Config) -> dict[str, Any]:
    """The options a map was compressed with; the config may change the query-time ones."""
    overrides = {k: v for k, v in dict(config.index_options).items() if k in QUERY_OPTIONS}
    return faiss_options({**recorded, **overrides}, seed=config.vocabulary.seed)


def _read_manifest(map_dir: Path) -> IndexManifest | None:
    """The map's checked index manifest, or None when it has none or it is damaged (the index is derived data).

    A manifest naming a file outside the map folder is damaged too: that file is never read."""
    try:
        return read_index_manifest(map_dir)
    except MapError as exc:
        logger.warning("%s; the index is rebuilt from the store", exc)
        return None


def _ivf_of(index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None


def _mergeable(index) -> bool:
    """Whether shards of ``index``'s kind merge exactly (flat codes: Flat, PQ, SQ; IVF), with or without transforms.
    Graph indexes (HNSW) do not: their live adds rewrite the one index file."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    return isinstance(inner, faiss.IndexFlatCodes) or _ivf_of(index) is not None


def _merge_into(base, tail) -> None:
    """Append ``tail``'s rows to ``base`` (same trained structure): IVF lists renumber the tail's ids after ``base``'s."""
    if _ivf_of(base) is not None:
        faiss.extract_index_ivf(base).merge_from(faiss.extract_index_ivf(tail), int(base.ntotal))
        if isinstance(base, faiss.IndexPreTransform):
            base.ntotal = faiss.extract_index_ivf(base).ntotal
    else:
        base.merge_from(tail)


def _state_of(record) -> FileState | None:
    """The recorded state of a listed file (None for a manifest from before files were recorded)."""
    if record is None or record.size is None or record.fingerprint is None:
        return None
    return FileState(record.size, record.fingerprint, record.sha256)


def _check_belongs(map_dir: Path, manifest: IndexManifest) -> None:
    """A :class:`MapDamagedError` when the index was built for another map or one of its files changed since
    it was saved (sizes and fingerprints only: a few reads per file, whatever its size)."""
    own = map_identity(map_dir)
    if manifest.map_id is not None and own is not None and manifest.map_id != own:
        raise MapDamagedError(f"{map_dir / MANIFEST_FILE} was written for another map (map id {manifest.map_id})")
    records = [(e, "index shard") for e in manifest.shards]
    records += [(manifest.descriptors, "descriptors copy"), (manifest.trained, "trained index")]
    for record, what in records:
        if record is not None and (map_dir / record.file).exists():
            check_file(map_dir / record.file, record.size, record.fingerprint, what)


def _read_trained(map_dir: Path):
    """The trained empty index (None when there is none or it cannot be read: it is then kept from a shard)."""
    path = map_dir / TRAINED_FILE
    if not path.exists():
        return None
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError):
        return None


def _remove_unlisted(
    map_dir: Path, listed: set[str | None], keep_single: bool, keep_descriptors: bool, keep_trained: bool
) -> None:
    """Delete index files the new manifest no longer lists (a reader that opened them keeps its copy)."""
    shard_dir = map_dir / SHARD_DIR
    if shard_dir.is_dir():
        for p in shard_dir.glob("shard-*.faiss"):
            if f"{SHARD_DIR}/{p.name}" not in listed:
                p.unlink(missing_ok=True)
    if not keep_single and INDEX_FILE not in listed:
        (map_dir / INDEX_FILE).unlink(missing_ok=True)
    if not keep_descriptors:
        (map_dir / DESCRIPTORS_FILE).unlink(missing_ok=True)
    if not keep_trained:
        (map_dir / TRAINED_FILE).unlink(missing_ok=True)


def serving_footprint(map_dir: str | os.PathLike) -> dict[str, Any]:
    """What a map costs: bytes per place on disk (store, index, descriptors) and the RAM to serve it.

    RAM = the index files (FAISS holds them in memory) + the keys and poses + the vocabulary and,
    when the map records it, the model's weights. The full-precision descriptors kept for re-scoring
    are memory-mapped: counted on disk, not in RAM (the page cache holds what queries touch).
    """
    d = Path(map_dir)
    manifest = _read_manifest(d)
    if manifest is not None:
        index_files = [d / s.file for s in manifest.shards]
        n = manifest.ntotal
    else:
        index_files = [d / INDEX_FILE] if (d / INDEX_FILE).exists() else []
        n = _rows_in(index_files[0]) if index_files else 0
    index_bytes = sum(_size(p) for p in index_files)
    trained_bytes = _size(d / TRAINED_FILE)
    store_bytes, desc_bytes, vocab_bytes = _size(d / STORE_FILE), _size(d / DESCRIPTORS_FILE), _size(d / VOCAB_FILE)
    per = (lambda b: round(b / n, 1)) if n else (lambda b: None)
    code_bytes = max(0, index_bytes - trained_bytes * len(index_files))
    model_bytes = _model_bytes(d)
    ram = index_bytes + vocab_bytes + (model_bytes or 0)
    return {
        "places": n,
        "factory": None if manifest is None else manifest.factory,
        "shards": len(index_files),
        "disk_bytes": {"store": store_bytes, "index": index_bytes + trained_bytes, "descriptors": desc_bytes},
        "disk_bytes_per_place": {
            "store": per(store_bytes),
            "index": per(index_bytes),
            "index_codes": per(code_bytes),
            "descriptors": per(desc_bytes),
        },
        "ram_bytes": {"index": index_bytes, "vocabulary": vocab_bytes, "model": model_bytes, "total": ram},
    }


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _rows_in(path: Path) -> int:
    """Rows of a FAISS index file, read memory-mapped (0 when it is unreadable)."""
    try:
        return int(faiss.read_index(str(path), faiss.IO_FLAG_MMAP).ntotal)
    except RuntimeError:
        return 0


def _model_bytes(map_dir: Path) -> int | None:
    """The model's weights in bytes, when ``map.json`` records them (None when it does not or cannot be read)."""
    if not (map_dir / MAP_FILE).exists():
        return None
    try:
        backbone = read_manifest(map_dir).backbone
    except MapError:
        return None
    return (backbone or {}).get("weights_bytes")


def _seed_training(index, seed: int) -> None:
    """Seed the k-means FAISS runs while training ``index`` (IVF coarse quantiser, product quantisers).

    FAISS's clustering otherwise uses a fixed seed of its own; taking the map's seed makes an index
    trained on a sample reproducible from the map's settings and lets benchmarks vary it.
    """
    parts = []
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index (flat, HNSW, PQ …)
        ivf = None
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        parts += [ivf, getattr(ivf, "pq", None)]
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    parts += [inner, getattr(inner, "pq", None)]
    for part in parts:
        params = getattr(part, "cp", None)
        if params is not None and hasattr(params, "seed"):
            params.seed = int(seed)
        if hasattr(part, "do_polysemous_training"):
            # Polysemous codes only serve Hamming-filtered search, which vprkit does not enable; training
            # them takes most of a PQ index's training time (tens of seconds even for small maps).
            part.do_polysemous_training = False
