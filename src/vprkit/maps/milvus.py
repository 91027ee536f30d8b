"""The Milvus index backend: a map's global descriptors in a Milvus collection, behind :class:`~vprkit.maps.index.Index`.

Why a second backend: a FAISS index lives in one process's RAM. A map larger than one machine's
memory, or one map served by many processes at once, needs the descriptors in a vector database.
Milvus through ``pymilvus`` serves both: Milvus Lite (embedded, a folder ``MAP_DIR/milvus.db``)
for tests and single machines, a Milvus server or cluster (``uri="http://host:19530"``) at scale —
the same code, only the URI differs.

One collection per map, one entity per map row, with fields

- ``id`` — INT64 primary key, stable for the row's lifetime. Ids only ever grow and ``remove``
  deletes, so the map's row order is the ascending order of the ids; ``remove`` renumbers the rows
  after the removed ones exactly as the key list does, and a reopened collection recovers its row
  order from the ids alone;
- ``image`` (the store key), ``run`` (the build run that added it), ``easting`` / ``northing``
  (the pose in metres, NaN when unknown) — so a service or an analyst can filter on them in Milvus;
- ``vector`` — FLOAT_VECTOR of the descriptor's dimension (taken from the data).

Settings come from ``Config.index_options`` (checked by :mod:`vprkit.options`, schema "index"
"milvus"): ``uri`` (default ``MAP_DIR/milvus.db``; a relative file path is taken relative to the map),
``token_env`` (the name of an environment variable holding the server's token: secrets never go
into ``map.json``), ``collection`` (default derived from the map folder), ``index_type`` and
``index_params`` (how Milvus indexes the vectors: ``FLAT`` exact; ``IVF_FLAT`` {nlist}, ``HNSW``
{M, efConstruction} …), ``search_params`` ({nprobe} / {ef} …), ``metric`` (``IP``; ``COSINE`` gives
the same scores on vprkit's unit descriptors) and ``insert_mb`` (bytes per insert request).
Scores are inner products of unit vectors: cosines, higher is better, as with FAISS.

``MAP_DIR/milvus.json`` records which collection holds the map, its dimension, row count, index
settings, a digest of the rows (each key with its image's content hash) and one of the poses;
:meth:`MilvusIndex.load_for_map` reconnects only when all but the poses still match the store
(anything else is stale: the caller rebuilds it from the store), and :meth:`MilvusIndex.update_for_map`
(after a build) inserts only the rows added to a collection that still holds the rest.

The entity fields follow the store through every change: rows added by a build or by the live
service (:class:`~vprkit.pipeline.live.LiveMap` passes each new row's key, run and pose to
:meth:`MilvusIndex.add`) carry them; a pose corrected live (``set_pose``, the service's PATCH) is
rewritten by :meth:`MilvusIndex.set_poses`; removed rows are deleted. Poses changed while the
collection was not open (``vprkit map set-pose``, a build's ``--poses``) differ from the recorded
poses digest, and the next open rewrites the rows whose pose the store changed.

Vectors to index may be a row source larger than RAM (``vprkit.maps.vectors.RowSource``): they
are read and inserted ``insert_mb`` at a time. Limits: Milvus Lite serves one process (share a map
through a server); the store stays the reference for keys and poses (headings and timestamps are
not fields); opening a map ``read_only`` whose collection is stale rebuilds the collection, or
rewrites its changed poses (it is not a file of the map, but it is written).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..config import Config
from ..errors import ConfigError, MapError
from ..io import atomic_write_json
from ..options import MILVUS_LITE_INDEX_TYPES
from .index import INDEX_BACKENDS
from .manifest import read_json
from .store import MapStore

logger = logging.getLogger(__name__)

BACKEND_NAME = "milvus"
LITE_DB = "milvus.db"  # Milvus Lite's data folder inside the map directory (the default URI)
STATE_FILE = "milvus.json"
INSTALL_HINT = "pip install vprkit[scale]"
# Milvus server limits (milvus.yaml defaults): vector dimension, top-k and queries per search request.
MAX_DIM = 32768
MAX_TOPK = 16384
MAX_QUERIES_PER_REQUEST = 16384
MIB = 1 << 20
DEFAULT_INSERT_MB = 16  # well under the server's 64 MB insert-request cap, whatever the dimension
MAX_KEY_CHARS = 4096  # VARCHAR length of an image key (a relative path)
ID_PAGE = 16384  # ids read per query when a collection is reopened (Milvus's query result limit)
LITE_SERVER_LOGGER = "milvus_lite.server_manager"
COLLECTION_PREFIX = "vprkit"
MAX_COLLECTION_NAME = 255
METRICS = ("IP", "COSINE")
LITE_INDEX_TYPES = MILVUS_LITE_INDEX_TYPES
DEFAULTS: dict[str, Any] = {
    "uri": None,
    "token_env": None,
    "collection": None,
    "index_type": "FLAT",
    "index_params": {},
    "search_params": {},
    "metric": "IP",
    "insert_mb": DEFAULT_INSERT_MB,
}

F_ID, F_IMAGE, F_RUN, F_EAST, F_NORTH, F_VECTOR = "id", "image", "run", "easting", "northing", "vector"


def _pymilvus():
    """pymilvus, or the one line that says how to get it (it is an optional dependency)."""
    try:
        import pymilvus
    except ImportError:
        raise ConfigError(f"index backend 'milvus' needs pymilvus and milvus-lite: {INSTALL_HINT}") from None
    return pymilvus


# ---- connections --------------------------------------------------------------------------------
# Milvus Lite runs an in-process server per data folder; it is released when the last index using it
# is closed or collected, so a temporary map (``evaluate`` without ``out``) leaves no server behind.
_lite_users: dict[str, int] = {}
_lite_lock = threading.Lock()


def _is_lite(uri: str) -> bool:
    return "://" not in uri and not uri.startswith("unix:")


def _release(uri: str, client) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - closing a dead connection must not raise from a finaliser
        pass
    if not _is_lite(uri):
        return
    with _lite_lock:
        _lite_users[uri] = _lite_users.get(uri, 1) - 1
        last = _lite_users[uri] <= 0
        if last:
            _lite_users.pop(uri, None)
    if last:
        try:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)
        except Exception:  # noqa: BLE001
            pass


def _connect(uri: str, token_env: str | None):
    """A MilvusClient for ``uri`` (a Milvus Lite folder ``*.db`` or a server URL), with one clear error when it fails."""
    pymilvus = _pymilvus()
    token = ""
    if token_env:
        token = os.environ.get(token_env, "")
        if not token:
            raise ConfigError(f"index option token_env names ${token_env}, which is not set")
    if _is_lite(uri):
        if not uri.endswith(".db"):
            raise ConfigError(
                f"Milvus Lite needs a path ending in .db, got {uri!r} (or give a server uri http://host:19530)"
            )
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        with _lite_lock:
            _lite_users[uri] = _lite_users.get(uri, 0) + 1
    # Milvus Lite logs a traceback of its own when it cannot open the folder; the MapError below says it in one line
    lite_log = logging.getLogger(LITE_SERVER_LOGGER)
    level = lite_log.level
    lite_log.setLevel(logging.CRITICAL)
    try:
        client = pymilvus.MilvusClient(uri=uri, token=token)
    except Exception as exc:  # noqa: BLE001 - pymilvus raises its own exception types for every failure
        if _is_lite(uri):
            with _lite_lock:
                _lite_users[uri] -= 1
        reason = getattr(exc, "message", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = (
            (
                " (is another process holding it? Milvus Lite serves one process; share a map between processes "
                "through a Milvus server: index option uri=http://host:19530)"
            )
            if _is_lite(uri)
            else ""
        )
        raise MapError(f"cannot open Milvus at {uri}: {reason}{hint}") from None
    finally:
        lite_log.setLevel(level)
    return client


# ---- settings -----------------------------------------------------------------------------------
def collection_name(map_dir: Path | None) -> str:
    """A collection name of its own for each map folder (a Milvus server holds many maps).

    Milvus allows letters, digits and underscores; the folder's name keeps it readable, a digest
    of its absolute path keeps two folders of the same name apart.
    """
    if map_dir is None:
        return f"{COLLECTION_PREFIX}_unnamed"
    path = str(Path(map_dir).resolve())
    slug = re.sub(r"[^0-9A-Za-z_]", "_", Path(path).name)[:64]
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:12]
    return f"{COLLECTION_PREFIX}_{slug}_{digest}"[:MAX_COLLECTION_NAME]


def resolve_options(options: Mapping[str, Any], map_dir: Path | None) -> dict[str, Any]:
    """``Config.index_options`` with defaults filled in and the URI made absolute (relative paths: to the map)."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"index 'milvus': unknown option {unknown[0]!r}; allowed: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    uri = opts["uri"]
    if uri is None:
        if map_dir is None:
            raise ConfigError("index 'milvus' without a map folder needs index option uri (a .db path or a server URL)")
        uri = str(Path(map_dir).resolve() / LITE_DB)
    elif _is_lite(str(uri)):
        p = Path(os.path.expanduser(str(uri)))
        uri = str((Path(map_dir) / p).resolve() if map_dir is not None and not p.is_absolute() else p.resolve())
    opts["uri"] = str(uri)
    opts["collection"] = opts["collection"] or collection_name(map_dir)
    if not re.fullmatch(r"[A-Za-z_][0-9A-Za-z_]*", opts["collection"]):
        raise ConfigError(f"index 'milvus': collection {opts['collection']!r} must be letters, digits and underscores")
    if str(opts["metric"]).upper() not in METRICS:
        raise ConfigError(f"index 'milvus': metric {opts['metric']!r} is not one of {', '.join(METRICS)}")
    opts["metric"] = str(opts["metric"]).upper()
    opts["index_type"] = str(opts["index_type"]).upper()
    if _is_lite(opts["uri"]) and opts["index_type"] not in LITE_INDEX_TYPES:
        # Milvus Lite accepts any name at creation, then fails in a background thread and searches exhaustively
        raise ConfigError(
            f"index 'milvus': Milvus Lite indexes with {', '.join(LITE_INDEX_TYPES)}, not "
            f"{opts['index_type']!r}; other index types need a Milvus server (uri=http://host:19530)"
        )
    return opts


def poses_digest(poses: np.ndarray) -> str:
    """A digest of the rows' poses in order (every unknown value counted as the same NaN)."""
    xy = np.asarray(poses, np.float64).reshape(-1, 2)
    return hashlib.sha256(np.ascontiguousarray(np.where(np.isfinite(xy), xy, np.nan)).tobytes()).hexdigest()


def rows_digest(keys: Sequence[str], shas: Sequence[bytes | str]) -> str:
    """A digest of the map's rows in order — each key with its image's content hash.

    A collection is current only for these very rows: a re-encoded picture (same key, new content)
    changes it as surely as an added or removed one.
    """
    h = hashlib.sha256()
    for key, sha in zip(keys, shas):
        h.update(key.encode("utf-8"))
        h.update(b"\0")
        h.update(sha if isinstance(sha, bytes) else str(sha).encode("ascii"))
        h.update(b"\0")
    return h.hexdigest()


class _MapRows:
    """What the map's store says of each row: key, content hash, run and pose (empty when there is no store)."""

    def __init__(self, map_dir: Path | None):
        self.keys: list[str] = []
        self.shas: np.ndarray = np.zeros(0, "S1")
        self.runs = np.zeros(0, np.int64)
        self.poses = np.zeros((0, 2))
        if map_dir is None:
            return
        store = MapStore(map_dir)
        try:
            keys = store.keys()
            if not keys:
                return
            entries = store.read_entries()
            poses = np.asarray(store.read_poses(), np.float64)
        except MapError:  # no store yet (an index built before its map): rows carry no metadata
            return
        self.keys, self.shas = keys, np.asarray(entries["content_sha256"])
        self.runs, self.poses = np.asarray(entries["run"], np.int64), poses

    def digest(self, n: int | None = None) -> str:
        n = len(self.keys) if n is None else n
        return rows_digest(self.keys[:n], self.shas[:n])

    def poses_digest(self, n: int | None = None) -> str:
        return poses_digest(self.poses[: len(self.keys) if n is None else n])

    def slice(self, start: int, stop: int) -> tuple[list[str], np.ndarray, np.ndarray] | tuple[None, None, None]:
        """Keys, runs and poses of rows ``start:stop`` — or nothing when the store does not hold those rows."""
        if stop > len(self.keys):
            return None, None, None
        return self.keys[start:stop], self.runs[start:stop], self.poses[start:stop]


def _rows(vectors) -> Any:
    """``vectors`` as rows to slice: an array, a memory map or a row source (a map larger than RAM) as it is."""
    rows = vectors if hasattr(vectors, "shape") and hasattr(vectors, "__getitem__") else np.asarray(vectors)
    if len(rows.shape) != 2:
        raise MapError(f"index vectors must be 2-D, got {tuple(rows.shape)}")
    return rows


# ---- the index ----------------------------------------------------------------------------------
@INDEX_BACKENDS.register(BACKEND_NAME)
class MilvusIndex:
    """A map's global descriptors in one Milvus collection; rows are the store's rows (see the module docstring)."""

    def __init__(self, client, options: Mapping[str, Any], dim: int, ids: np.ndarray, next_id: int = 0):
        self.client = client
        self.options = dict(options)
        self.collection = self.options["collection"]
        self.dim = int(dim)
        self.ids = np.asarray(ids, np.int64)  # ids[row]: ascending, so the row of an id is a binary search
        # never reused, even after the last rows are removed: a deleted id may linger in Milvus until compaction
        self.next_id = max(int(next_id), int(self.ids[-1]) + 1 if len(self.ids) else 0)
        self.factory = f"milvus:{self.options['index_type']}"
        self._finalizer = weakref.finalize(self, _release, self.options["uri"], client)

    # -- building and reopening --
    @classmethod
    def build(
        cls,
        vectors,
        options: Mapping[str, Any],
        keys: Sequence[str] | None = None,
        runs: np.ndarray | None = None,
        poses: np.ndarray | None = None,
    ) -> "MilvusIndex":
        """A fresh collection (any old one of the same name is dropped) holding ``vectors`` as rows 0…N-1.

        ``vectors`` may be a row source larger than RAM: it is read and inserted chunk by chunk.
        """
        rows = _rows(vectors)
        dim = int(rows.shape[1])
        if not 0 < dim <= MAX_DIM:
            raise ConfigError(
                f"Milvus holds vectors of 1..{MAX_DIM} dimensions; the map's descriptors have {dim} "
                f"(use a preset with PCA, or the faiss backend)"
            )
        client = _connect(options["uri"], options.get("token_env"))
        try:
            name = options["collection"]
            if client.has_collection(name):
                client.drop_collection(name)
            client.create_collection(name, schema=_schema(dim), consistency_level="Strong")
            # sync=False: pymilvus's wait for the index asks for a timestamp Milvus Lite does not serve (it
            # logs a traceback and sleeps); the server indexes in the background, a search never waits for it
            client.create_index(name, _index_params(client, options), sync=False)
            client.load_collection(name)
        except Exception as exc:  # noqa: BLE001
            _release(options["uri"], client)
            raise _milvus_error(f"cannot create collection {options['collection']!r}", exc) from None
        index = cls(client, options, dim, np.zeros(0, np.int64))
        index._insert(rows, keys, runs, poses)
        client.flush(name)  # sealed segments: searching unflushed rows is several times slower (Milvus Lite: ×6)
        return index

    @classmethod
    def build_for_map(cls, vectors, config: Config, map_dir: Path | None = None) -> "MilvusIndex":
        opts = resolve_options(config.index_options, map_dir)
        keys, runs, poses = _MapRows(map_dir).slice(0, len(_rows(vectors)))
        return cls.build(vectors, opts, keys, runs, poses)

    @classmethod
    def load_for_map(cls, map_dir: Path, config: Config) -> "MilvusIndex | None":
        """The map's collection when ``milvus.json`` says it holds exactly the store's rows, else None (rebuild it)."""
        rows = _MapRows(map_dir)
        return cls._reopen(Path(map_dir), config, rows, len(rows.keys))

    @classmethod
    def update_for_map(cls, map_dir: Path, vectors, config: Config) -> "MilvusIndex":
        """After a build: the saved collection plus the new rows when it holds a prefix of the store, else a new one.

        Adding to a map of millions of rows then inserts only what the build added.
        """
        map_dir = Path(map_dir)
        rows = _MapRows(map_dir)
        state = _read_state(map_dir)
        saved = int(state.get("ntotal", -1)) if state else -1
        n = len(_rows(vectors))
        index = cls._reopen(map_dir, config, rows, saved) if 0 <= saved <= min(n, len(rows.keys)) else None
        if index is None:
            return cls.build_for_map(vectors, config, map_dir)
        if saved < n:
            keys, runs, poses = rows.slice(saved, n)
            index.add(_rows(vectors)[saved:n], keys, runs, poses)
        return index

    @classmethod
    def _reopen(cls, map_dir: Path, config: Config, rows: _MapRows, n: int) -> "MilvusIndex | None":
        """The saved collection if it holds the store's first ``n`` rows with these settings, else None."""
        opts = resolve_options(config.index_options, map_dir)
        state = _read_state(map_dir)
        if state is None:
            return None
        expected = {
            "uri": opts["uri"],
            "collection": opts["collection"],
            "index_type": opts["index_type"],
            "index_params": opts["index_params"],
            "metric": opts["metric"],
            "ntotal": n,
            "rows_sha256": rows.digest(n),
        }
        changed = [k for k, v in expected.items() if state.get(k) != v]
        if changed:
            logger.info(
                "the Milvus collection of %s is stale (%s differ); rebuilding it from the store",
                map_dir,
                ", ".join(changed),
            )
            return None
        client = _connect(opts["uri"], opts.get("token_env"))
        try:
            if not client.has_collection(opts["collection"]):
                _release(opts["uri"], client)
                logger.warning("Milvus collection %s is missing; rebuilding it from the store", opts["collection"])
                return None
            client.load_collection(opts["collection"])
            ids = _read_ids(client, opts["collection"], int(state.get("next_id", 0)))
        except Exception as exc:  # noqa: BLE001
            _release(opts["uri"], client)
            logger.warning(
                "Milvus collection %s is unreadable (%s); rebuilding it from the store",
                opts["collection"],
                getattr(exc, "message", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0],
            )
            return None
        if len(ids) != n:
            _release(opts["uri"], client)
            logger.warning(
                "Milvus collection %s holds %d rows, the store %d; rebuilding it", opts["collection"], len(ids), n
            )
            return None
        index = cls(client, opts, int(state.get("dim", 0)), ids, int(state.get("next_id", 0)))
        if n and state.get("poses_sha256") != rows.poses_digest(n):  # poses set while the collection was closed
            try:
                index._sync_poses(rows.poses[:n])
            except (MapError, ConfigError) as exc:
                index.close()
                logger.warning("%s; rebuilding the Milvus collection from the store", exc)
                return None
        return index

    def save_to_map(self, map_dir: Path) -> None:
        """Flush the collection and record in ``milvus.json`` what it holds (so a reopen can tell it is current)."""
        self.client.flush(self.collection)
        rows = _MapRows(map_dir)
        atomic_write_json(
            Path(map_dir) / STATE_FILE,
            {
                "uri": self.options["uri"],
                "collection": self.collection,
                "index_type": self.options["index_type"],
                "index_params": self.options["index_params"],
                "metric": self.options["metric"],
                "dim": self.dim,
                "ntotal": self.ntotal,
                "next_id": self.next_id,
                "rows_sha256": rows.digest() if len(rows.keys) == self.ntotal else None,
                "poses_sha256": rows.poses_digest() if len(rows.keys) == self.ntotal else None,
            },
        )

    def close(self) -> None:
        """Close the connection (and stop Milvus Lite's server when no other index uses it)."""
        self._finalizer()

    # -- the Index protocol --
    @property
    def ntotal(self) -> int:
        return int(len(self.ids))

    def add(
        self,
        vectors: np.ndarray,
        keys: Sequence[str] | None = None,
        runs: np.ndarray | None = None,
        poses: np.ndarray | None = None,
    ) -> None:
        """Append rows ``ntotal …`` (with their keys, runs and poses when given)."""
        rows = _rows(vectors)
        if rows.shape[1] != self.dim:
            raise MapError(f"cannot add vectors of shape {tuple(rows.shape)} to a {self.dim}-d index")
        self._insert(rows, keys, runs, poses)

    def set_poses(self, rows: Sequence[int], poses: np.ndarray) -> None:
        """Rewrite the ``easting`` / ``northing`` fields of ``rows`` (N×2 metres, NaN unknown) as the store now has them.

        Each entity is read whole and upserted with its new pose (same id, key, run and vector): a
        full-entity upsert, since Milvus servers before 2.6 have no partial one.
        """
        at = np.asarray(list(rows), dtype=np.int64).reshape(-1)
        xy = np.asarray(poses, np.float64).reshape(-1, 2)
        if len(at) != len(xy):
            raise MapError(f"{len(at)} rows need {len(at)} poses, got {len(xy)}")
        if len(at) == 0:
            return
        if at.min() < 0 or at.max() >= self.ntotal:
            raise MapError(f"cannot set the poses of rows {at.tolist()[:5]}: the index holds {self.ntotal}")
        ids = self.ids[at]
        fields = [F_ID, F_IMAGE, F_RUN, F_EAST, F_NORTH, F_VECTOR]
        for start, stop in _chunks(len(ids), self._rows_per_request()):
            wanted = ids[start:stop]
            try:
                found = self.client.query(
                    self.collection, filter=f"{F_ID} in {wanted.tolist()}", output_fields=fields, limit=len(wanted)
                )
                by_id = {int(r[F_ID]): r for r in found}
                missing = [int(i) for i in wanted if int(i) not in by_id]
                if missing:
                    raise MapError(
                        f"Milvus collection {self.collection!r} lacks the entities {missing[:5]} of the map's rows"
                    )
                entities = [
                    {**{f: by_id[int(i)][f] for f in fields}, F_EAST: float(p[0]), F_NORTH: float(p[1])}
                    for i, p in zip(wanted, xy[start:stop])
                ]
                self.client.upsert(self.collection, entities)
            except MapError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _milvus_error(f"cannot update poses in collection {self.collection!r}", exc) from None

    def _sync_poses(self, poses: np.ndarray) -> None:
        """Rewrite the pose fields of the rows whose pose in the store (``poses``, N×2) differs from the collection's."""
        held = _read_poses(self.client, self.collection, self.next_id, self.ids)
        want = np.asarray(poses, np.float64).reshape(-1, 2)
        same = (held == want) | (np.isnan(held) & np.isnan(want))
        changed = np.flatnonzero(~same.all(axis=1))
        if len(changed):
            logger.info(
                "rewriting the pose fields of %d row(s) of Milvus collection %s (set while it was closed)",
                len(changed),
                self.collection,
            )
            self.set_poses(changed, want[changed])

    def remove(self, rows: Sequence[int]) -> None:
        """Delete ``rows``; later rows move down as in the key list (their ids stay, their row numbers shift)."""
        drop = np.unique(np.asarray(list(rows), dtype=np.int64))
        if len(drop) == 0:
            return
        if drop[0] < 0 or drop[-1] >= self.ntotal:
            raise MapError(f"cannot remove rows {drop.tolist()[:5]}: the index holds {self.ntotal}")
        gone = self.ids[drop]
        step = MAX_QUERIES_PER_REQUEST
        for start in range(0, len(gone), step):
            self.client.delete(self.collection, ids=gone[start : start + step].tolist())
        self.ids = np.delete(self.ids, drop)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows and cosines, best first, Q×min(k, ntotal); rows -1 where Milvus found fewer."""
        q = _as_matrix(queries)
        if self.ntotal == 0 or len(q) == 0:
            width = 1 if self.ntotal == 0 else max(1, min(k, self.ntotal))
            return np.full((len(q), width), -1, np.int64), np.full((len(q), width), -np.inf, np.float32)
        k = max(1, min(k, self.ntotal, MAX_TOPK))
        rows = np.full((len(q), k), -1, np.int64)
        scores = np.full((len(q), k), -np.inf, np.float32)
        params = {"metric_type": self.options["metric"], "params": dict(self.options["search_params"])}
        for start, stop in _chunks(len(q), self._rows_per_request()):
            hits = self.client.search(
                self.collection,
                data=q[start:stop].tolist(),
                limit=k,
                anns_field=F_VECTOR,
                search_params=params,
                output_fields=[],
            )
            for i, found in enumerate(hits):
                if not found:
                    continue
                ids = np.fromiter((h["id"] for h in found), np.int64, len(found))
                sims = np.fromiter((h["distance"] for h in found), np.float32, len(found))
                pos = np.searchsorted(self.ids, ids)
                ok = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == ids)
                pos, sims = pos[ok], sims[ok]
                rows[start + i, : len(pos)] = pos
                scores[start + i, : len(pos)] = sims
        return rows, scores

    # -- helpers --
    def _rows_per_request(self) -> int:
        """Vectors per insert or search request: ``insert_mb`` worth of float32 (at least one)."""
        per = int(self.options.get("insert_mb", DEFAULT_INSERT_MB) * MIB) // (self.dim * np.dtype(np.float32).itemsize)
        return max(1, min(per, MAX_QUERIES_PER_REQUEST))

    def _insert(self, x, keys: Sequence[str] | None, runs: np.ndarray | None, poses: np.ndarray | None) -> None:
        """Insert rows of ``x`` (an array or a row source) in requests of ``insert_mb``, with fresh ids."""
        n = len(x)
        if n == 0:
            return
        keys = list(keys) if keys is not None else [""] * n
        runs = np.asarray(runs, np.int64) if runs is not None else np.full(n, -1, np.int64)
        poses = np.asarray(poses, np.float64) if poses is not None else np.full((n, 2), np.nan)
        if len(keys) != n or len(runs) != n or poses.shape != (n, 2):
            raise MapError(f"{n} vectors need {n} keys, runs and N×2 poses")
        new_ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        for start, stop in _chunks(n, self._rows_per_request()):
            chunk = np.asarray(x[start:stop], dtype=np.float32)
            rows = [
                {
                    F_ID: int(new_ids[i]),
                    F_IMAGE: keys[i][:MAX_KEY_CHARS],
                    F_RUN: int(runs[i]),
                    F_EAST: float(poses[i, 0]),
                    F_NORTH: float(poses[i, 1]),
                    F_VECTOR: v.tolist(),
                }
                for i, v in zip(range(start, stop), chunk)
            ]
            try:
                self.client.insert(self.collection, rows)
            except Exception as exc:  # noqa: BLE001
                raise _milvus_error(f"cannot insert into collection {self.collection!r}", exc) from None
            self.ids = np.concatenate([self.ids, new_ids[start:stop]])
            self.next_id = int(new_ids[stop - 1]) + 1


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise MapError(f"index vectors must be 2-D, got {x.shape}")
    return x


def _read_state(map_dir: Path) -> dict[str, Any] | None:
    """``milvus.json``, or None when it is missing or unreadable (the collection is then rebuilt)."""
    path = Path(map_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        return read_json(path)
    except MapError as exc:
        logger.warning("%s; rebuilding the Milvus collection from the store", exc)
        return None


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _schema(dim: int):
    pymilvus = _pymilvus()
    schema = pymilvus.MilvusClient.create_schema(
        auto_id=False, enable_dynamic_field=False, description="vprkit map: one entity per map row"
    )
    schema.add_field(F_ID, pymilvus.DataType.INT64, is_primary=True)
    schema.add_field(F_IMAGE, pymilvus.DataType.VARCHAR, max_length=MAX_KEY_CHARS)
    schema.add_field(F_RUN, pymilvus.DataType.INT64)
    schema.add_field(F_EAST, pymilvus.DataType.DOUBLE)
    schema.add_field(F_NORTH, pymilvus.DataType.DOUBLE)
    schema.add_field(F_VECTOR, pymilvus.DataType.FLOAT_VECTOR, dim=dim)
    return schema


def _index_params(client, options: Mapping[str, Any]):
    params = client.prepare_index_params()
    params.add_index(
        field_name=F_VECTOR,
        index_type=options["index_type"],
        metric_type=options["metric"],
        params=dict(options["index_params"]),
    )
    return params


def _read_ids(client, collection: str, next_id: int) -> np.ndarray:
    """Every primary id of ``collection`` below ``next_id``, ascending (= the map's row order).

    Read in windows of id values, each holding at most ``ID_PAGE`` ids (they are unique), so no
    query hits Milvus's result limit (a query iterator would, on Milvus Lite, make the server log a
    traceback for a timestamp call it does not implement).
    """
    ids: list[np.ndarray] = []
    for lo in range(0, max(0, int(next_id)), ID_PAGE):
        page = client.query(
            collection, filter=f"{F_ID} >= {lo} and {F_ID} < {lo + ID_PAGE}", output_fields=[F_ID], limit=ID_PAGE
        )
        ids.append(np.fromiter((int(r[F_ID]) for r in page), np.int64, len(page)))
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def _read_poses(client, collection: str, next_id: int, ids: np.ndarray) -> np.ndarray:
    """The ``easting`` / ``northing`` fields of the entities ``ids`` (ascending), N×2 in the same order.

    Read in the same windows of id values as :func:`_read_ids`.
    """
    out = np.full((len(ids), 2), np.nan)
    for lo in range(0, max(0, int(next_id)), ID_PAGE):
        page = client.query(
            collection,
            filter=f"{F_ID} >= {lo} and {F_ID} < {lo + ID_PAGE}",
            output_fields=[F_ID, F_EAST, F_NORTH],
            limit=ID_PAGE,
        )
        if not page:
            continue
        got = np.fromiter((int(r[F_ID]) for r in page), np.int64, len(page))
        xy = np.array([(float(r[F_EAST]), float(r[F_NORTH])) for r in page], np.float64).reshape(-1, 2)
        pos = np.searchsorted(ids, got)
        ok = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == got)
        out[pos[ok]] = xy[ok]
    return out


def _milvus_error(what: str, exc: Exception) -> MapError | ConfigError:
    """One line from a pymilvus exception; a refused index type or parameter is a settings error."""
    reason = getattr(exc, "message", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if re.search(r"index|param|metric|not support", reason, re.IGNORECASE):
        return ConfigError(f"{what}: {reason} (check index_options index_type / index_params / metric)")
    return MapError(f"{what}: {reason}")


__all__ = [
    "MilvusIndex",
    "BACKEND_NAME",
    "LITE_DB",
    "STATE_FILE",
    "collection_name",
    "poses_digest",
    "resolve_options",
    "rows_digest",
]
