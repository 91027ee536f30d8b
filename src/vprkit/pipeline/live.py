"""A map served live: models loaded once, localisation while places are added, moved and removed.

:class:`LiveMap` is what ``vprkit serve`` (and any long-running process: a robot, a web service) holds
instead of calling :func:`vprkit.pipeline.localize` on a path, which would reload the model for every
query. It composes the stages exactly as a build and a query do — descriptors through
:func:`vprkit.pipeline.query_batches`, rows through :class:`~vprkit.maps.MapStore`, the index through
its ``add``/``remove`` — and adds what sharing needs:

- **Readers–writer lock.** Any number of localisations run together; a write (add, move, remove)
  waits for them and excludes them for its short store-and-index update. The descriptor of an added
  image is computed *before* the write lock is taken, so readers wait only for the disk writes.
- **Durable before the answer.** A write returns after the store (and, for an added place, its image
  under ``MAP_DIR/live-images/``) is on disk: a crash right after loses nothing, and a restart serves
  every acknowledged place. The index is derived data: its file is removed before the store changes
  and saved after, so a crash in between makes the next open rebuild it from the store, never trust
  a stale one.
- **One writer per map.** Writes also take :func:`vprkit.maps.lock.map_write_lock`, so a
  ``vprkit map build`` into the same folder cannot interleave with them (whichever comes second is
  refused with a clear message). Once another process has changed the map (``map.json`` replaced),
  writes are refused (:class:`MapChangedError`): the rows held in memory no longer match the disk.
  Reads keep serving the map as opened (the store keeps its opened files, see ``MapStore.pin``).
- **Recorded.** Each write notes itself in ``map.json`` (counts, index size, ``updated``, ``last_change``).
- **Bounded model concurrency, with batching.** The backbone runs at most ``inference_slots`` passes
  at a time: PyTorch already spreads one pass over the configured threads, and concurrent passes on a
  small CPU only multiply threads and stretch every request's latency. Localisations that arrive while
  the model is busy queue up and the next pass takes them together (up to the preset's batch size), so
  under load the CPU per image drops (batches of 4: about 30 % less) while an idle map answers at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from PIL import Image

from ..images import DecodedImages
from ..io import atomic_path
from ..maps import (
    ENTRY_FIELDS,
    INDEX_FILE,
    MAP_FILE,
    POSE_DIMS,
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
from .batching import DEFAULT_INFERENCE_SLOTS, RequestBatcher
from .localization import QueryResult, RerankChoice, get_reranker, localize, query_batches, rerank_settings
from .open import Map, open_map

logger = logging.getLogger(__name__)

# Where the images of places added live are kept (the map's own copy: re-ranking and explanations read them).
LIVE_IMAGES_DIR = "live-images"
LIVE_RUN_NOTE = "places added through the live map (vprkit serve)"


class LiveMap:
    """One opened map with its models, shared by readers and writers (see the module docstring)."""

    def __init__(
        self,
        map: Map,
        inference_slots: int = DEFAULT_INFERENCE_SLOTS,
        max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS,
    ):
        self.map = map
        self.max_upload_pixels = max_upload_pixels
        self.lock = ReadWriteLock()
        self._batcher = RequestBatcher(inference_slots, map.config.batch_size)
        self._row_of = {k: i for i, k in enumerate(map.data.keys)}
        # Re-rankers by their settings, built once (their patch state, readers and caches) and dropped on a
        # write, which changes the rows they index.
        self._rerankers: dict[str, Any] = {}
        self._rerankers_lock = threading.Lock()
        self._run: int | None = None
        self._seen = self._map_file_state()
        self.opened = time.time()

    @classmethod
    def open(cls, map_dir: str | os.PathLike, device: str | None = None, **options: Any) -> "LiveMap":
        """Open ``map_dir`` for reading and writing and load its models once."""
        return cls(open_map(map_dir, read_only=False, device=device), **options)

    # ---- reading ------------------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return self.map.data.dir

    def __len__(self) -> int:
        return len(self.map.data.keys)

    def size_hint(self) -> tuple[int, int] | None:
        """(height, width) the map's images are resized to, when fixed (lets JPEG uploads decode at reduced scale)."""
        spec = self.map.config.image
        return tuple(spec.size) if spec.resize in ("fixed", "resize_crop") else None  # type: ignore[return-value]

    def decode(self, data: bytes, name: str = "upload") -> Image.Image:
        """Uploaded bytes → an image this map can localise or store (see :func:`decode_image`)."""
        return decode_image(data, name, self.max_upload_pixels, self.size_hint())

    def localize(
        self, frames: Mapping[str, np.ndarray | Image.Image], top_k: int = 10, rerank: RerankChoice = None
    ) -> list[QueryResult]:
        """Top-``top_k`` places of each decoded frame (named by its key), re-ranked as the map was built to
        unless ``rerank`` says otherwise (``"none"``, a preset name).

        Runs beside other localisations (batched with those that wait for the model); waits only for a write
        in progress.
        """
        with self.lock.read():
            return self._batcher.run(
                frames,
                (top_k, rerank if rerank is None or isinstance(rerank, str) else repr(rerank)),
                lambda named, _: localize(
                    self.map, named, top_k=top_k, rerank=self._reranker(rerank), unreadable="report"
                ),
            )

    def place(self, key: str) -> dict[str, Any]:
        """What the map holds for ``key``: its row, position, heading and timestamp."""
        with self.lock.read():
            return self._place(key)

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
        """Add one image as a new place (``key`` or a generated one); durable when this returns.

        ``image`` is a file's bytes (kept as they are under ``live-images/<key>``) or a decoded frame
        (kept as PNG). The descriptor (and the map extensions' payloads) come from the same models as
        the map's. A key already in the map is a :class:`PlaceExistsError`.
        """
        data_bytes, picture, fmt = kept_picture(image, key or "upload", self.decode)
        key = check_key(key) if key is not None else self._new_key(fmt)
        if key in self._row_of:  # early answer; checked again under the write lock
            raise PlaceExistsError(f"place {key!r} is already in the map; delete it or use another id")
        parsed = parse_pose(pose, self.map.data.crs)
        with self._batcher.inference:  # the model's work, before any lock readers would wait for
            (qb,) = list(query_batches(self.map, DecodedImages({key: picture})))
        vector = qb.global_descriptors[:1]
        extras = None
        if self.map.extensions:
            per_image: dict[str, Any] = {}
            for group, ext in self.map.extensions.items():
                per_image[group] = ext.encode(qb.batch, qb.features)[0]
            extras = [per_image]
        with self._writing():
            if key in self._row_of:
                raise PlaceExistsError(f"place {key!r} is already in the map; delete it or use another id")
            run = self._live_run()
            path = self.dir / LIVE_IMAGES_DIR / key
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                Path(tmp).write_bytes(data_bytes)
            entries = {
                "content_sha256": np.array([hashlib.sha256(data_bytes).hexdigest().encode()]),
                "file_size": np.array([len(data_bytes)]),
                "file_mtime": np.array([path.stat().st_mtime]),
                "run": np.array([run]),
            }
            entries = {k: np.asarray(v, ENTRY_FIELDS[k][0]) for k, v in entries.items()}
            xy = np.array([parsed.xy if parsed.xy is not None else (np.nan, np.nan)], np.float64).reshape(1, POSE_DIMS)
            headings = None if parsed.heading is None else np.array([parsed.heading])
            stamps = None if parsed.timestamp is None else np.array([parsed.timestamp])
            try:
                with self._store_change():
                    self.map.store.append([key], vector, xy, headings, stamps, entries, extras)
            except BaseException:
                path.unlink(missing_ok=True)  # the place was not added: its image goes too
                raise
            # the row's key, run and pose too: an index that keeps them beside the vector (Milvus) stores them
            self.map.index.add(vector, [key], entries["run"], xy)
            self._remember(key, xy[0], parsed)
            self._after_write({"added": key})
            return self._place(key)

    def remove_place(self, key: str) -> dict[str, Any]:
        """Remove ``key`` from the map (its live image too); durable when this returns. Returns what it held."""
        with self._writing():
            before = self._place(key)
            with self._store_change():
                rows = np.asarray(self.map.store.remove([key]), np.int64)
            if len(rows):
                self.map.index.remove(rows)
            data = self.map.data
            keep = np.ones(len(data.keys), bool)
            keep[rows] = False
            data.keys = [k for k, kept in zip(data.keys, keep) if kept]
            data.poses = data.poses[keep]
            data.headings, data.timestamps = data.headings[keep], data.timestamps[keep]
            self._row_of = {k: i for i, k in enumerate(data.keys)}
            (self.dir / LIVE_IMAGES_DIR / key).unlink(
                missing_ok=True
            )  # after the store: a crash leaves a stray file, never a lost place
            self._after_write({"removed": key})
            return before

    def update_pose(self, key: str, pose: Mapping[str, Any]) -> dict[str, Any]:
        """Set the position / heading / timestamp of ``key`` (fields not given stay as they are); durable on return."""
        parsed = parse_pose(pose, self.map.data.crs)
        with self._writing():
            self._row(key)
            row = int(
                self.map.store.set_pose(
                    key,
                    None if parsed.xy is None else np.asarray(parsed.xy, np.float64),
                    heading=parsed.heading,
                    timestamp=parsed.timestamp,
                )
            )
            data = self.map.data
            if parsed.xy is not None:
                data.poses[row] = parsed.xy
                # an index that keeps poses beside the vectors (Milvus) follows the store
                self.map.index.set_poses([row], np.asarray(parsed.xy, np.float64).reshape(1, POSE_DIMS))
            if parsed.heading is not None:
                data.headings[row] = parsed.heading
            if parsed.timestamp is not None:
                data.timestamps[row] = parsed.timestamp
            self._record({"pose": key})
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
        heading = self._optional("headings", row)
        stamp = self._optional("timestamps", row)
        return {
            "id": key,
            "row": row,
            "position": None if np.isnan(pos).any() else {"easting": float(pos[0]), "northing": float(pos[1])},
            "heading": heading,
            "timestamp": stamp,
        }

    def _optional(self, name: str, row: int) -> float | None:
        value = float(getattr(self.map.data, name)[row])
        return value if np.isfinite(value) else None

    def _remember(self, key: str, xy: np.ndarray, pose: Pose) -> None:
        """The in-memory view of a row appended at the end (the store appends there too)."""
        data = self.map.data
        data.keys.append(key)
        data.poses = np.vstack([data.poses.reshape(-1, POSE_DIMS), xy.reshape(1, POSE_DIMS)])
        data.headings = np.append(data.headings, np.nan if pose.heading is None else pose.heading)
        data.timestamps = np.append(data.timestamps, np.nan if pose.timestamp is None else pose.timestamp)
        self._row_of[key] = len(data.keys) - 1

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

    def _live_run(self) -> int:
        """The run id recorded for the live images (registered on the first add, reused after a restart)."""
        run = self._live_run_id()
        if run is None:
            run = int(register_run(self.dir, (self.dir / LIVE_IMAGES_DIR).resolve(), LIVE_RUN_NOTE))
            self.map.data.info = read_map_info(self.dir)  # the new run: MapData.images finds live images by it
            self._seen = self._map_file_state()
            self._run = run
        return run

    @contextmanager
    def _store_change(self) -> Iterator[None]:
        """Remove the saved index while the store's rows change, so a crash before :meth:`_after_write` saves
        it again makes the next open rebuild it from the store; if the change fails (nothing changed), put it back."""
        (self.dir / INDEX_FILE).unlink(missing_ok=True)
        try:
            yield
        except BaseException:
            self.map.index.save_to_map(self.dir)
            raise

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """This process's write lock and the map directory's, refusing a map another process changed meanwhile."""
        with self.lock.write(), map_write_lock(self.dir):
            if self._map_file_state() != self._seen:
                raise MapChangedError(
                    f"{self.dir} was changed by another process (a `vprkit map build`, `map remove` …) "
                    f"since this service opened it; restart the service to serve the map as it is now"
                )
            yield

    def _map_file_state(self) -> tuple[int, int, int]:
        """Identity of ``map.json`` as it is now: every writer replaces it by renaming a new file into place."""
        st = (self.dir / MAP_FILE).stat()
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _reranker(self, rerank: RerankChoice):
        """The re-ranker ``rerank`` asks for on this map (None: the map's own), built on first use and kept until
        the next write."""
        settings = rerank_settings(self.map.config, rerank)
        if settings is None:
            return None
        key = repr(settings)
        with self._rerankers_lock:
            if key not in self._rerankers:
                self._rerankers[key] = get_reranker(self.map, settings)
            return self._rerankers[key]

    def _drop_rerankers(self) -> None:
        with self._rerankers_lock:
            rerankers, self._rerankers = self._rerankers, {}
        for reranker in rerankers.values():
            reranker.close()

    def _after_write(self, change: dict[str, str]) -> None:
        """Save the index that matches the store, let extensions refresh what they derive from it, record the change."""
        self._drop_rerankers()
        self.map.index.save_to_map(self.dir)
        for ext in self.map.extensions.values():
            ext.finalize(self.map.store, self.dir)
        self._record(change)

    def _record(self, change: dict[str, str]) -> None:
        """Note a live change in ``map.json`` (counts, index size, time, what changed), as map maintenance does."""
        info = read_map_info(self.dir)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        info.setdefault("counts", {})["images"] = len(self.map.data.keys)
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
