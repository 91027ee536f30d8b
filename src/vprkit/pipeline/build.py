"""Building a map: extract, aggregate and store the descriptors of a folder of images (or decoded frames).

The steps, each a stage's: settings checked against what the map records (:mod:`vprkit.maps.mapdir`),
what to encode decided from the stored entries (:func:`vprkit.maps.builds.plan_build`), poses read
in the map's frame (:mod:`vprkit.maps.poses`), the vocabulary obtained (:mod:`.vocabularies`), the
backbone run batch by batch (:func:`vprkit.backbones.extract.extract`), descriptors written as
atomic shards (:class:`vprkit.maps.MapStore`), the index updated (:mod:`vprkit.maps.index`) and
``map.json`` written last. The single-process and the Ray build (:mod:`.distributed`) share every
step but the encoding loop.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import __version__
from ..backbones.extract import extract
from ..config import Config
from ..environment import recorded_environment
from ..errors import MapError
from ..images import ImageSource, image_source
from ..io import atomic_write_json
from ..maps import (
    FAILURES_FILE,
    LOCAL_CRS,
    BuildPlan,
    check_build_policies,
    map_write_lock,
    MapStore,
    plan_build,
    pose_rows,
    PoseRows,
    update_map_index,
    write_manifest,
)
from .preparation import BuildModels, BuildRequest, prepare_build, start_build, store_has_poses
from .models import on_cpu, resolve_config

logger = logging.getLogger(__name__)

# Images per shard: big enough that a 100k-image map is a few hundred files, small enough that an
# interrupt loses at most a minute of work.
SHARD_IMAGES = 128


def build_map(
    images: ImageSource | str | os.PathLike,
    out: str | os.PathLike,
    preset: str | Config | None = None,
    poses: str | os.PathLike | np.ndarray | None = None,
    keys: Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    on_change: str = "refuse",
    _after_shard: Callable[[int], None] | None = None,
    on_duplicate: str = "error",
    crs: str | dict | None = None,
) -> dict[str, Any]:
    """Extract, aggregate and store descriptors of every image of ``images`` into ``out``.

    ``images`` is a folder (every image under it, or ``keys`` relative to it) or an image source
    (e.g. :class:`~vprkit.images.DecodedImages` of frames already in memory). ``poses`` is a poses
    CSV or an N×2 array aligned with the keys; given for a map that exists, it updates the poses of
    the images already in it. Returns the map's ``map.json`` content.

    What the map guarantees:

    - **One writer.** The build holds the map's exclusive lock (:mod:`vprkit.maps.lock`); a second build
      into the same folder is refused at once.
    - **One set of settings.** The resolved settings are written (``build.json``) before the first
      shard; a later build or a resumed one with other settings is refused, naming what differs.
    - **Resumable.** Images already in the map (or in shards of an interrupted build) are skipped;
      unreadable images are reported by name and listed in ``failures.json``.
    - **Content-true.** Each entry records its image's SHA-256, file size and time and the build run it
      came from. An image whose content changed since it was added is refused (``on_change="refuse"``,
      the default) or re-encoded in place of its old entry (``"reencode"``) — never kept silently.
    - **Duplicate names.** An image of *another folder* than the run that stored its name, with other
      content, is a duplicate: ``on_duplicate="error"`` (the default) refuses the build naming the first
      ones; ``"new-place"`` stores it as a new place under the key ``run<N>/<name>`` (N: the first run
      from this folder; its file is still ``<folder>/<name>``); ``"replace"`` re-encodes it in place of
      the map's entry, which then points to the new folder. An identical copy is the same picture: it is
      counted (``last_build.copies``), keeps its entry and takes a new pose. Re-running a folder resumes.
    - **Poses keep their frame.** Headings and timestamps are stored per row; the frame is recorded in
      ``map.json`` → ``crs`` (UTM zone for lat/lon, local metres for easting/northing unless ``crs`` states
      one, e.g. ``"utm:33N"``). Lat/lon of a later run are projected into the map's zone (points too far
      from it are refused); lat/lon into a map with local-metre poses is refused.
    """
    started = time.perf_counter()
    check_build_policies(on_change, on_duplicate)
    config = resolve_config(preset)
    source = image_source(images, keys)
    keys = list(source.keys)
    if not keys:
        raise MapError(f"no images found in {source.describe()}")
    out = Path(out)
    request = BuildRequest(config, source, keys, out, poses, crs, on_change, on_duplicate, progress, log)
    with map_write_lock(out):
        info = _build_locked(request, _after_shard)
        info["last_build"]["seconds"] = round(time.perf_counter() - started, 3)  # the whole build, as a user waits
        write_manifest(out, info)
    return info


def _build_locked(req: BuildRequest, after_shard: Callable[[int], None] | None) -> dict[str, Any]:
    previous = start_build(req.out, req.config)
    runs = list(previous.get("runs", []))
    store = MapStore(req.out, req.config.store_dtype)
    rows = pose_rows(req.poses, req.keys, req.crs, previous.get("crs"), store_has_poses(store))
    plan = plan_build(
        req.source,
        req.keys,
        store.entry_table(include_pending=True),
        runs,
        previous.get("images_root"),
        req.on_change,
        req.on_duplicate,
        req.out,
        req.log,
    )
    if plan.copies:
        req.log(
            f"{len(plan.copies)} image(s) are identical copies of map images stored from another folder "
            f"(e.g. {', '.join(plan.copies[:3])}): kept as they are"
            + ("; their poses are updated" if req.poses is not None else "")
        )
    models = prepare_build(req.config, req.source, req.keys, req.out, req.progress, req.log)
    listing = getattr(req.source, "listing", None)
    # skipped entries and unreadable folders of the image folder: recorded, not lost
    failures: dict[str, str] = {p.path: f"{p.kind}: {p.reason}" for p in listing.problems} if listing else {}
    t0 = time.perf_counter()
    _encode(req, plan, models, store, rows, failures, after_shard)
    encode_s = time.perf_counter() - t0
    n = store.consolidate()
    if n == 0:
        raise MapError(
            f"none of the {len(req.keys)} images in {req.source.describe()} could be read; see the messages above"
        )
    updated_poses = _update_known_poses(req, plan, store, rows)
    vectors = store.read_global()
    index = update_map_index(req.out, vectors, req.config)  # keeps a compressed index (trained once), adds new rows
    if failures or (req.out / FAILURES_FILE).exists():
        atomic_write_json(req.out / FAILURES_FILE, failures, default=str)
    skipped = len(listing.problems) if listing is not None else 0
    plan.run["new_images"] = len(plan.todo) - (len(failures) - skipped)
    info = _map_record(req, previous, runs, plan, models, rows, n, failures, index, int(vectors.shape[1]))
    info["last_build"].update(poses_updated=updated_poses, encode_seconds=round(encode_s, 3))
    write_manifest(req.out, info)
    for ext in models.extensions.values():
        ext.finalize(store, req.out)
    return info


class _ShardWriter:
    """Collects encoded batches and writes them as atomic shards of about ``SHARD_IMAGES`` images."""

    def __init__(
        self,
        req: BuildRequest,
        plan: BuildPlan,
        store: MapStore,
        rows: PoseRows,
        has_extras: bool,
        after_shard: Callable[[int], None] | None,
    ) -> None:
        self.req, self.plan, self.store, self.rows = req, plan, store, rows
        self.has_extras, self.after_shard = has_extras, after_shard
        self.row_of = {k: i for i, k in plan.todo}
        self.pending: list[tuple[list[str], np.ndarray, list[dict]]] = []
        self.shards = 0

    def add(self, keys: list[str], vectors: np.ndarray, extras: list[dict]) -> None:
        self.pending.append((keys, vectors, extras))
        if sum(len(p[0]) for p in self.pending) >= SHARD_IMAGES:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        ks = [k for p in self.pending for k in p[0]]
        vec = np.concatenate([p[1] for p in self.pending])
        extras = [e for p in self.pending for e in p[2]]
        prints = [self.req.source.fingerprint(k) for k in ks]
        entries = {
            "content_sha256": np.array([f.sha256.encode() for f in prints]),
            "file_size": np.array([f.size for f in prints]),
            "file_mtime": np.array([f.mtime for f in prints]),
            "run": np.full(len(ks), self.plan.run["run"]),
        }
        at = [self.row_of[k] for k in ks]
        self.store.write_shard(
            [self.plan.target[k] for k in ks],
            vec,
            self.rows.xy[at],
            extras if self.has_extras else None,
            entries,
            headings=self.rows.headings[at],
            timestamps=self.rows.timestamps[at],
        )
        self.pending = []
        self.shards += 1
        if self.after_shard is not None:
            self.after_shard(self.shards)


def _encode(
    req: BuildRequest,
    plan: BuildPlan,
    models: BuildModels,
    store: MapStore,
    rows: PoseRows,
    failures: dict[str, str],
    after_shard: Callable[[int], None] | None,
) -> None:
    """Encode the planned images (features cached by the vocabulary pass first) into shards."""
    writer = _ShardWriter(req, plan, store, rows, bool(models.extensions), after_shard)

    def on_failure(key: str, msg: str) -> None:
        failures[key] = msg
        req.log(f"skipped unreadable image: {msg}")

    todo_keys = plan.todo_keys
    cached = models.cache.keys() & todo_keys
    encoded = itertools.chain(
        models.cache.take(todo_keys),
        extract(
            models.backbone,
            req.config,
            req.source,
            [k for _, k in plan.todo if k not in cached],
            req.progress and "map",
            on_failure,
        ),
    )
    for batch, feats in encoded:
        with torch.inference_mode():
            vec = models.aggregator(feats).float().cpu().numpy()
        per_image: list[dict] = [{} for _ in batch.keys]
        for g, ext in models.extensions.items():
            for d, payload in zip(per_image, ext.encode(batch, on_cpu(feats))):
                d[g] = payload
        writer.add(batch.keys, vec, per_image)
    writer.flush()


def _update_known_poses(req: BuildRequest, plan: BuildPlan, store: MapStore, rows: PoseRows) -> int:
    """Set the poses given for images that were already in the map (images without a pose row keep theirs)."""
    if req.poses is None:
        return 0
    given = np.isfinite(rows.xy).all(axis=1)
    updated = store.update_poses(
        [plan.target[k] for k, g in zip(req.keys, given) if g],
        rows.xy[given],
        skip={plan.target[k] for k in plan.todo_keys},
        headings=rows.headings[given] if rows.has_headings else None,
        timestamps=rows.timestamps[given] if rows.has_timestamps else None,
    )
    if updated:
        req.log(f"updated the poses of {updated} image(s) already in the map")
    return updated


def _map_record(
    req: BuildRequest,
    previous: dict[str, Any],
    runs: list[dict],
    plan: BuildPlan,
    models: BuildModels,
    rows: PoseRows,
    n: int,
    failures: dict[str, str],
    index,
    dim: int,
) -> dict[str, Any]:
    """The ``map.json`` content after a build."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    listing = getattr(req.source, "listing", None)
    vocabulary = models.vocabulary
    return {
        "vprkit_version": __version__,
        "config": req.config.to_dict(),
        "images_root": plan.run["images_root"] if plan.run["images_root"] else previous.get("images_root"),
        "runs": runs + [plan.run],
        "crs": rows.frame or previous.get("crs") or dict(LOCAL_CRS),
        "backbone": models.backbone.identity(),
        "aggregator": models.aggregator.identity(),
        "descriptor_dim": dim,
        "vocabulary": None
        if vocabulary is None
        else {"checksum": vocabulary.checksum, "source": req.config.vocabulary.source, "k": vocabulary.k},
        "counts": {
            "images": n,
            "failed": len(failures),
            **({"ignored_files_by_extension": listing.ignored} if listing is not None and listing.ignored else {}),
        },
        "index": {"factory": index.factory, "ntotal": index.ntotal},
        "extensions": sorted(models.extensions),
        "environment": recorded_environment(),
        "created": previous.get("created") or now,
        "updated": now,
        "last_build": {
            "new_images": plan.run["new_images"],
            "reencoded": len(plan.reencoded),
            "copies": len(plan.copies),
            "new_places": len(plan.new_places),
            **({"poses": rows.report} if rows.report is not None else {}),
        },
    }
