"""A map served live: models loaded once, localisation while places are added, moved and removed.

:class:`LiveMap` is what ``vprkit serve`` (and any long-running process: a robot, a web service) holds
instead of calling :func:`vprkit.pipeline.localize` on a path, which would reload the model for every
query. It composes the stages exactly as a build and a query do — descriptors through
:func:`vprkit.pipeline.query_batches`, rows through :class:`~vprkit.maps.MapStore`, the index through
its ``add``/``remove`` — and adds what sharing needs:

- **Readers–writer lock, fair both ways.** Any number of localisations run together; a write (add,
  move, remove) waits for them and excludes them for its short store-and-index update. A waiting
  writer holds back new readers, and the readers waiting when a write ends go before the next one
  (:class:`~vprkit.maps.lock.ReadWriteLock`). A localisation holds the read lock only while its batch
  runs, not while it queues for the model; the descriptor (and payloads) of an added image are
  computed *before* the write lock is taken, so readers wait only for the disk writes.
- **All or nothing, durable before the answer.** A write returns once the store (and an added place's image
  under ``MAP_DIR/live-images/``) is on disk; one that fails leaves nothing (:mod:`vprkit.pipeline.live_writes`):
  a full disk is a :class:`StorageFullError`, a read-only folder a :class:`ReadOnlyMapError`.
- **Read-only when it must.** A read-only folder or full disk serves localisation (one warning); writes are
  refused with the reason. Each write is recorded in ``map.json`` (counts follow the store).
- **No request builds expensive state.** Re-ranking reads stored patches or a state saved by ``vprkit rerank
  prepare`` or at start-up (``prepare_rerank``); else :class:`StateNotPreparedError`. Kept re-rankers follow writes.
- **One writer per map.** Writes also take :func:`vprkit.maps.lock.map_write_lock`, so a ``vprkit map build``
  into the same folder cannot interleave with them (whichever comes second is refused). Once another process
  has changed the map (``map.json`` replaced: :attr:`LiveMap.changed_on_disk`), writes are refused
  (:class:`MapChangedError`); reads keep serving the map as opened (see ``MapStore.pin``).
- **Bounded model concurrency, with batching.** At most ``inference_slots`` backbone passes at a time; queries
  arriving meanwhile share the next pass (batches of 4: about 30 % less CPU per image).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image

from ..errors import MapError, ReadOnlyMapError, StateNotPreparedError, StorageFullError
from ..images import DecodedImages
from ..maps import (
    LIVE_DIR,
    MAP_FILE,
    check_key,
    map_write_lock,
    MapChangedError,
    parse_pose,
    PlaceExistsError,
    Pose,
    read_map_info,
    ReadWriteLock,
    register_run,
    UnknownPlaceError,
    write_manifest,
)
from ..uploads import DEFAULT_MAX_UPLOAD_PIXELS, FORMAT_EXTENSIONS, decode_image, kept_picture
from . import live_writes
from .batching import DEFAULT_INFERENCE_SLOTS, RequestBatcher
from .live_writes import LIVE_IMAGES_DIR, PreparedPlace, Undo, storage_errors
from .localization import QueryResult, RerankChoice, get_reranker, localize, query_batches, rerank_settings
from .open import Map, open_map

logger = logging.getLogger(__name__)

LIVE_RUN_NOTE = "places added through the live map (vprkit serve)"


class LiveMap:
    """One opened map with its models, shared by readers and writers (see the module docstring).

    ``refuse_writes``: why writes are refused (a map served read-only), or None.
    """

    def __init__(
        self,
        map: Map,
        inference_slots: int = DEFAULT_INFERENCE_SLOTS,
        max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
        prepare_rerank: Iterable[str] = (),
        refuse_writes: MapError | None = None,
    ):
        self.map = map
        self.max_upload_pixels = max_upload_pixels
        self.lock = ReadWriteLock()
        self._batcher = RequestBatcher(inference_slots, map.config.batch_size)
        self._row_of = {k: i for i, k in enumerate(map.data.keys)}
        # Re-rankers by their settings, built once from stored or prepared state and kept across writes.
        self._rerankers: dict[str, Any] = {}
        self._rerankers_lock = threading.Lock()
        self._run: int | None = None
        self.refuse_writes = refuse_writes or (
            ReadOnlyMapError(f"{map.dir} is opened read-only") if map.data.read_only else None
        )
        self._seen = self._map_file_state()
        self.opened = time.time()
        # the map's own re-ranking (stored with it, or prepared at start-up if it was built without storing it)
        for choice in ([None] if map.config.rerank is not None else []) + list(prepare_rerank):
            self._prepare_rerank(choice)
        if self.refuse_writes is None:
            self._tidy()

    @classmethod
    def open(cls, map_dir: str | os.PathLike, device: str | None = None, **options: Any) -> "LiveMap":
        """Open ``map_dir`` for reading and writing and load its models once.

        On a read-only folder or a full disk the map is opened read-only with one warning: localisation works,
        writes raise :class:`ReadOnlyMapError` / :class:`StorageFullError`."""
        d = Path(map_dir)
        refused = live_writes.probe_writable([d, d / LIVE_IMAGES_DIR, d / LIVE_DIR])
        if refused is None:
            try:
                with storage_errors(f"opening {d.name} for writing"):
                    return cls(open_map(d, read_only=False, device=device), **options)
            except (StorageFullError, ReadOnlyMapError) as exc:
                refused = exc
        logger.warning("serving %s read-only: %s; places cannot be added, moved or removed", d, refused)
        return cls(open_map(d, read_only=True, device=device), refuse_writes=refused, **options)

    # ---- reading ------------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return self.map.data.dir

    def __len__(self) -> int:
        return len(self.map.data.keys)

    @property
    def changed_on_disk(self) -> bool:
        """Whether another process replaced ``map.json`` since this map was opened (or last wrote it)."""
        return self._map_file_state() != self._seen

    def size_hint(self) -> tuple[int, int] | None:
        """(height, width) an upload may be reduced to before the map resizes it (JPEG draft, whole-factor reduce):
        the fixed size, or for ``keep_aspect`` / ``max_side`` a square of the longer side (both sides stay at least that long, so
        the map's own resize still scales down); None when images are used at their size."""
        spec = self.map.config.image
        if spec.size is None or spec.resize == "none":
            return None
        if spec.resize in ("keep_aspect", "max_side"):
            return (max(spec.size), max(spec.size))
        return tuple(spec.size)  # type: ignore[return-value]

    def decode(self, data: bytes, name: str = "upload") -> Image.Image:
        """Uploaded bytes → an image this map can localise or store (see :func:`decode_image`)."""
        return decode_image(data, name, self.max_upload_pixels, self.size_hint())

    def localize(
        self, frames: Mapping[str, np.ndarray | Image.Image], top_k: int = 10, rerank: RerankChoice = None, verify=None
    ) -> list[QueryResult]:
        """Top-``top_k`` places of each decoded frame (named by its key), re-ranked as the map was built to unless
        ``rerank`` says otherwise (``"none"``, a preset whose state is stored or prepared); ``verify``: VerifySettings.

        Runs beside other localisations (batched with those that wait for the model); holds the read lock
        only while its batch runs, so a write waits for the batches running, not for the queue.
        """

        def run_batch(named: dict[str, Any], _: Any) -> list[QueryResult]:
            with self.lock.read():
                reranker = self._reranker(rerank)
                return localize(self.map, named, top_k=top_k, rerank=reranker, unreadable="report", verify=verify)

        settings = (top_k, rerank if rerank is None or isinstance(rerank, str) else repr(rerank), verify)
        return self._batcher.run(frames, settings, run_batch)

    def place(self, key: str) -> dict[str, Any]:
        """What the map holds for ``key``: its row, position, heading and timestamp."""
        with self.lock.read():
            return self._place(key)

    def places(self, offset: int = 0, limit: int = 100) -> tuple[int, list[dict[str, Any]]]:
        """(places in the map, the places of rows ``offset`` … ``offset + limit - 1``), as :meth:`place` gives them."""
        with self.lock.read():
            return len(self.map.data.keys), [self._place(k) for k in self.map.data.keys[offset : offset + limit]]

    def info(self) -> dict[str, Any]:
        """A summary of the served map: settings, counts, index, frame (``map.json`` with live counts)."""
        with self.lock.read():
            data = self.map.data
            info = data.info
            poses = data.poses
            return {
                "map_dir": str(data.dir),
                "preset": data.config.name,
                "descriptor_dim": info.get("descriptor_dim"),
                "places": len(data.keys),
                "places_with_position": int((~np.isnan(poses).any(axis=1)).sum()) if len(poses) else 0,
                "index": {"factory": getattr(data.index, "factory", None), "ntotal": int(data.index.ntotal)},
                "crs": data.crs,
                "extensions": sorted(self.map.extensions),
                "created": info.get("created"),
                "updated": info.get("updated"),
                "runs": len(info.get("runs", [])),
                "vprkit_version": info.get("vprkit_version"),
            }

    # ---- writing ------------------------------------------------------------------------------
    def add_place(
        self, image: bytes | np.ndarray | Image.Image, key: str | None = None, pose: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Add one image as a new place (``key`` or a generated one); durable when this returns, nothing kept if
        it raises.

        ``image`` is a file's bytes (kept as they are under ``live-images/<key>``) or a decoded frame
        (kept as PNG). The descriptor (and the map extensions' and kept re-rankers' payloads) come from the
        same models as the map's. A key already in the map, or clashing with a file there, is a
        :class:`PlaceExistsError`.
        """
        self._check_writable()
        data_bytes, picture, fmt = kept_picture(image, key or "upload", self.decode)
        key = check_key(key) if key is not None else self._new_key(fmt)
        if key in self._row_of:  # early answer; checked again under the write lock
            raise PlaceExistsError(f"place {key!r} is already in the map; delete it or use another id")
        parsed = parse_pose(pose, self.map.data.crs)
        with self._batcher.inference:  # the model's work, before any lock readers would wait for
            (qb,) = list(query_batches(self.map, DecodedImages({key: picture})))
            place = PreparedPlace(key, data_bytes, qb.global_descriptors[:1], parsed, qb)
            if self.map.extensions:
                place.extras = [{g: ext.encode(qb.batch, qb.features)[0] for g, ext in self.map.extensions.items()}]
            for reranker in self._kept_rerankers():
                if not getattr(reranker.candidates, "stored", True):
                    place.rerank_payloads[id(reranker)] = reranker.candidates.encode_place(qb.batch, qb.features)
        with self._writing():
            live_writes.commit_add(self, place)
            return self._place(key)

    def remove_place(self, key: str) -> dict[str, Any]:
        """Remove ``key`` from the map (its live image too); durable when this returns. Returns what it held."""
        self._check_writable()
        with self._writing():
            before = self._place(key)
            live_writes.commit_remove(self, key)
            return before

    def update_pose(self, key: str, pose: Mapping[str, Any]) -> dict[str, Any]:
        """Set the position / heading / timestamp of ``key`` (fields not given stay as they are); durable on return."""
        self._check_writable()
        parsed = parse_pose(pose, self.map.data.crs)
        with self._writing():
            live_writes.commit_pose(self, key, self._row(key), parsed)
            return self._place(key)

    # ---- helpers (callers hold the lock) ------------------------------------------------------
    def _row(self, key: str) -> int:
        row = self._row_of.get(key)
        if row is None:
            raise UnknownPlaceError(f"no place {key!r} in the map")
        return row

    def _place(self, key: str) -> dict[str, Any]:
        row = self._row(key)
        data = self.map.data
        pos = data.poses[row]
        return {
            "id": key,
            "row": row,
            "position": None if np.isnan(pos).any() else {"easting": float(pos[0]), "northing": float(pos[1])},
            "heading": self._optional("headings", row),
            "timestamp": self._optional("timestamps", row),
        }

    def _optional(self, name: str, row: int) -> float | None:
        value = float(getattr(self.map.data, name)[row])
        return value if np.isfinite(value) else None

    def _new_key(self, fmt: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return f"live-{stamp}-{os.urandom(4).hex()}{FORMAT_EXTENSIONS.get(fmt, '.img')}"

    def _live_run_id(self) -> int | None:
        """The build run of the live images folder, if one is recorded in ``map.json``."""
        if self._run is not None:
            return self._run
        root = str((self.dir / LIVE_IMAGES_DIR).resolve())
        for run in self.map.data.info.get("runs", []):
            if run.get("images_root") == root:
                self._run = int(run["run"])
        return self._run

    def _live_run(self, undo: Undo) -> int:
        """The run id recorded for the live images (registered on the first add, reused after a restart)."""
        run = self._live_run_id()
        if run is None:
            run = int(register_run(self.dir, (self.dir / LIVE_IMAGES_DIR).resolve(), LIVE_RUN_NOTE))
            undo.push("the live images' run", lambda: self._forget_run(run))
            self.map.data.info = read_map_info(self.dir)  # the new run: MapData.images finds live images by it
            self._seen = self._map_file_state()
            self._run = run
        return run

    def _forget_run(self, run: int) -> None:
        live_writes.unregister_run(self.dir, run)
        self.map.data.info = read_map_info(self.dir)
        self._seen = self._map_file_state()
        self._run = None

    def _check_writable(self) -> None:
        if self.refuse_writes is not None:
            raise type(self.refuse_writes)(f"{self.refuse_writes}; the map is served read-only")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """This process's write lock and the map directory's, refusing a map another process changed meanwhile."""
        with self.lock.write(), map_write_lock(self.dir, reentrant=True):
            if self._map_file_state() != self._seen:
                raise MapChangedError(
                    f"{self.dir} was changed by another process (a `vprkit map build`, `map remove` …) "
                    f"since this service opened it; restart the service to serve the map as it is now"
                )
            yield

    def _map_file_state(self) -> tuple[int, int, int] | None:
        """Identity of ``map.json`` now (None: gone): every writer replaces it by renaming a new file into place."""
        try:
            st = (self.dir / MAP_FILE).stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _reranker(self, rerank: RerankChoice):
        """The re-ranker ``rerank`` asks for on this map (None: the map's own), built on first use from the map's
        stored or prepared state (never computed here: a missing state is a StateNotPreparedError) and kept."""
        settings = rerank_settings(self.map.config, rerank)
        if settings is None:
            return None
        key = repr(settings)
        with self._rerankers_lock:
            if key not in self._rerankers:
                save = self.refuse_writes is None
                self._rerankers[key] = get_reranker(self.map, settings, save=save, compute=False)
            return self._rerankers[key]

    def _prepare_rerank(self, choice: RerankChoice) -> None:
        """Load the re-ranking state ``choice`` asks for at start-up, computing and saving what is missing first (a
        start-up, not a request, may take minutes; on a map served read-only it is kept in memory)."""
        try:
            self._reranker(choice)
            return
        except StateNotPreparedError:
            pass
        settings = rerank_settings(self.map.config, choice)
        logger.warning("re-ranking '%s' is not prepared in %s: preparing it before serving", settings.name, self.dir)
        reranker = get_reranker(self.map, settings, save=self.refuse_writes is None)
        reranker.prepare(progress=False)
        if reranker.candidates.saved is not None and reranker.candidates.saved.saves:
            reranker.close()
            self._reranker(choice)  # read back as a request would
            return
        reranker.candidates.compute_missing = False  # kept in memory; requests still never compute
        with self._rerankers_lock:
            self._rerankers[repr(settings)] = reranker

    def _kept_rerankers(self) -> list[Any]:
        with self._rerankers_lock:
            return list(self._rerankers.values())

    def _tidy(self) -> None:
        """At start-up: remove temporary files interrupted writes left in ``live-images/``, and make ``map.json``'s
        counts the store's (a write killed before recording itself). Skipped while another process writes."""
        try:
            with map_write_lock(self.dir), storage_errors("tidying the map at start-up"):
                live_writes.clean_live_images(self.dir / LIVE_IMAGES_DIR)
                counts = self.map.data.info.get("counts", {})
                index = self.map.data.info.get("index", {})
                n = len(self.map.data.keys)
                if counts.get("images") != n or index.get("ntotal") != int(self.map.index.ntotal):
                    self._record({"recounted": str(n)}, n)
        except MapError as exc:
            logger.warning("%s: not tidied at start-up (%s)", self.dir, exc)

    def _record(self, change: dict[str, str], count: int) -> None:
        """Note a live change in ``map.json`` (``count`` places, index size, time, what changed), as map maintenance
        does."""
        info = read_map_info(self.dir)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        info.setdefault("counts", {})["images"] = count
        info.setdefault("index", {})["ntotal"] = int(self.map.index.ntotal)
        info["updated"] = now
        info["last_change"] = {"at": now, "live": change}
        write_manifest(self.dir, info)
        self.map.data.info = info
        self._seen = self._map_file_state()


__all__ = [
    "LIVE_IMAGES_DIR",
    "LiveMap",
    "MapChangedError",
    "PlaceExistsError",
    "Pose",
    "ReadWriteLock",
    "UnknownPlaceError",
    "check_key",
    "decode_image",
    "parse_pose",
]
