"""Sequences: loop closure over one traversal, and localisation of a stream of frames.

The composer's part only — descriptors come from the map's models (:func:`vprkit.pipeline.query_batches`),
sequence scoring from :mod:`vprkit.retrieval.sequence`, the loop-closure metrics and files from
:mod:`vprkit.evaluation.loops`, video and camera frames from :mod:`vprkit.streams`::

    from vprkit.pipeline import sequences
    summary = sequences.detect_loops("run1/frames", exclude_recent=50, sequence_length=5,
                                     ground_truth="run1/poses.csv", out="loops/")
    for result in sequences.localize_stream("my_map", VideoFrames("drive.mp4"), top_k=5, sequence_length=10):
        print(result.query, result.matches[0].key)
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from ..config import Config
from ..datasets.adapters import MIN_SHARED_NAME_FRACTION, shared_name_fraction
from ..datasets.poses import read_poses
from ..errors import ConfigError, DatasetError
from ..evaluation import loops as loop_eval
from ..images import ImageInput, ImageSource, image_source
from ..io import atomic_write_json
from ..maps import open_map_data
from ..retrieval.sequence import (
    OnlineSequenceMatcher,
    SequenceSettings,
    check_route_order,
    sequence_scores,
    top_k as sequence_top_k,
)
from .build import build_map
from .localization import RERANK_OFF, QueryResult, checked_choice, localize, query_batches
from .open import Map, open_map
from .sequence_frames import push_frame

logger = logging.getLogger(__name__)

LOOPS_CSV = "loops.csv"
LOOPS_JSON = "loops.json"
LOOPS_PLOT = "loops_pr.png"
DEFAULT_EXCLUDE_RECENT = 50
# Frames extracted together in a stream: one keeps the latency of a live camera lowest.
DEFAULT_STREAM_BATCH = 1
# Frames of a file (video, folder) are there already: extracting a few together is faster overall.
FILE_STREAM_BATCH = 8
SINGLE_SCORE_KIND = "cosine"
# Evaluation and loop closure have every frame: score each one in the middle of its window
# (SeqSLAM's original, offline), which pins the place from both sides.
OFFLINE_DEFAULTS = {"anchor": "centre"}


def sequence_settings(
    sequence_length: int | None = None,
    settings: SequenceSettings | Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> SequenceSettings | None:
    """``settings`` (a :class:`SequenceSettings`, or its fields as a mapping over ``defaults``) with
    ``sequence_length`` applied; None when neither asks for sequence matching."""
    if settings is None and sequence_length is None:
        return None
    if isinstance(settings, SequenceSettings):
        fields = {f: getattr(settings, f) for f in settings.__dataclass_fields__}
    else:
        fields = {**dict(defaults or {}), **dict(settings or {})}
    if sequence_length is not None:
        fields["length"] = int(sequence_length)
    try:
        return SequenceSettings(**fields)
    except TypeError as exc:
        raise ConfigError(f"sequence settings: {exc}") from None


# ---- sequential evaluation (used by pipeline.evaluate) ----------------------------------------------
def sequence_rankings(
    map_globals: np.ndarray, query_globals: np.ndarray, settings: SequenceSettings, k: int, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` map rows and sequence scores for time-ordered queries against a route-ordered map."""
    similarity = np.asarray(query_globals, np.float32) @ np.asarray(map_globals, np.float32).T
    return sequence_top_k(sequence_scores(similarity, settings, progress=progress), k)


def check_sequential_dataset(dataset: Any, map_keys: list[str]) -> None:
    """Sequence matching needs queries and database that are both traversals in route order, paired frame by
    frame: a ``sequences`` layout (Nordland), or any layout whose query and database names pair up (a
    ``ref/`` + ``query/`` folder of two synchronised traversals); refuse otherwise, saying which."""
    layout = getattr(dataset, "layout", "") or "unknown"
    if layout != "sequences":
        paired = shared_name_fraction(dataset.query_images, dataset.database_images)
        if paired < MIN_SHARED_NAME_FRACTION:
            raise ConfigError(
                f"--sequence-length needs two synchronised traversals (queries and database both in route "
                f"order, frames named alike, e.g. nordland-64x32, or ref/ + query/ with the same file names); "
                f"{dataset.name} ({layout!r} layout) pairs only {paired:.0%} of its query names with database names"
            )
    check_route_order(dataset.query_images, what=f"{dataset.name} queries")
    check_route_order(map_keys, what=f"{dataset.name} map")


# ---- loop closure ---------------------------------------------------------------------------------
def _truth(ground_truth, keys: list[str], radius: float, exclude_recent: int) -> np.ndarray:
    """The loop truth from a poses CSV, a matrix file (.npy / numeric .csv) or an array."""
    n = len(keys)
    if isinstance(ground_truth, np.ndarray):
        if ground_truth.shape == (n, 2):
            return loop_eval.truth_from_positions(ground_truth, radius, exclude_recent)
        if ground_truth.shape == (n, n):
            b = ground_truth != 0
            return (b | b.T) & loop_eval.earlier_mask(n, exclude_recent)
        raise DatasetError(f"loop ground truth must be {n}×2 positions or a {n}×{n} matrix, got {ground_truth.shape}")
    path = Path(ground_truth)
    if path.suffix.lower() == ".csv" and path.is_file() and _numeric_first_line(path):
        return loop_eval.read_truth_matrix(path, n, exclude_recent)
    if path.suffix.lower() == ".npy":
        return loop_eval.read_truth_matrix(path, n, exclude_recent)
    positions = read_poses(path).lookup(keys)
    missing = ~np.isfinite(positions).all(axis=1)
    if missing.any():
        first = [keys[i] for i in np.flatnonzero(missing)[:3]]
        raise DatasetError(f"{path}: {int(missing.sum())} frame(s) have no pose (e.g. {', '.join(first)})")
    return loop_eval.truth_from_positions(positions, radius, exclude_recent)


def _numeric_first_line(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip().split(",")
    try:
        [float(x) for x in first]
    except ValueError:
        return False
    return bool(first)


def _frame_descriptors(
    frames, preset: str | Config | None, work: Path, progress: bool, log: Callable[[str], None]
) -> tuple[list[str], np.ndarray]:
    """Keys in time order and their global descriptors, through a map built of the frames themselves
    (its vocabulary comes from them too); the map in ``work`` is reused on a rerun."""
    source = image_source(frames)
    keys = list(source.keys)
    if len(keys) < 2:
        raise DatasetError(f"loop closure needs at least two frames; {source.describe()} has {len(keys)}")
    check_route_order(keys, what="sequence frames")  # before any work
    build_map(source, work, preset, progress=progress, log=log)
    data = open_map_data(work, read_only=True)  # the descriptors only: no model is loaded
    row = {k: i for i, k in enumerate(data.keys)}
    kept = [k for k in keys if k in row]  # unreadable frames were logged and listed by the build
    g = data.store.read_global().astype(np.float32)
    return kept, g[[row[k] for k in kept]]


def detect_loops(
    frames: str | os.PathLike | ImageSource | Mapping[str, ImageInput],
    preset: str | Config | None = None,
    exclude_recent: int = DEFAULT_EXCLUDE_RECENT,
    sequence_length: int | None = None,
    sequence: SequenceSettings | Mapping[str, Any] | None = None,
    ground_truth: str | os.PathLike | np.ndarray | None = None,
    radius: float = loop_eval.DEFAULT_LOOP_RADIUS_M,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Match each frame of one traversal against all *earlier* frames outside ``exclude_recent``.

    ``frames``: a folder (frames in sorted name order = time order) or an image source. Descriptors
    are computed once (a map of the frames, kept in ``out/map``); similarities of every frame to
    every earlier one, optionally scored as sequences (``sequence_length`` ≥ 2). With
    ``ground_truth`` (poses CSV → positions within ``radius`` metres, ``.npy``/numeric ``.csv``
    binary matrix, or an array) the precision–recall curve, its area and recall at 100 % precision
    are computed. With ``out``: ``loops.csv`` (candidates, best first), ``loops.json`` and
    ``loops_pr.png``. Returns the summary (and ``candidates``, a :class:`LoopCandidates`).
    """
    # Hub correction centres each map row on the queries' mean; here the "map" is the frames' own past,
    # whose masked pairs (recent frames) would enter that mean: off unless asked for.
    settings = sequence_settings(sequence_length, sequence, {**OFFLINE_DEFAULTS, "hub_correction": False})
    if settings is not None and settings.length == 1:
        settings = None
    tmp = tempfile.TemporaryDirectory(prefix="vprkit-loops-") if out is None else None
    root = Path(tmp.name) if tmp is not None else Path(out)
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        keys, g = _frame_descriptors(frames, preset, root / "map", progress, log)
        describe_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        similarity = loop_eval.without_recent(g @ g.T, exclude_recent)
        if settings is not None:
            scores, kind = sequence_scores(similarity, settings, progress=progress), settings.score_kind
        else:
            scores, kind = similarity, SINGLE_SCORE_KIND
        candidates = loop_eval.best_earlier_matches(scores, exclude_recent, kind)
        match_s = time.perf_counter() - t1
        summary: dict[str, Any] = {
            "frames": len(keys),
            "exclude_recent": int(exclude_recent),
            "score_kind": kind,
            "sequence": None if settings is None else {f: getattr(settings, f) for f in settings.__dataclass_fields__},
            "n_candidates": int(candidates.has_match.sum()),
            "timing": {"descriptors_s": round(describe_s, 3), "matching_s": round(match_s, 3)},
        }
        correct = None
        if ground_truth is not None:
            truth = _truth(ground_truth, keys, radius, exclude_recent)
            pr = loop_eval.loop_precision_recall(candidates, truth)
            correct = pr["correct"]
            summary["ground_truth"] = str(ground_truth) if not isinstance(ground_truth, np.ndarray) else "array"
            summary["radius_m"] = radius
            summary.update(loop_eval.summary_dict(pr))
            if out is not None:
                summary["plot"] = str(loop_eval.write_pr_plot(root / LOOPS_PLOT, pr))
        if out is not None:
            summary["csv"] = str(loop_eval.write_candidates_csv(root / LOOPS_CSV, keys, candidates, correct))
            atomic_write_json(root / LOOPS_JSON, summary, default=str)
        summary["candidates"] = candidates
        summary["keys"] = keys
        return summary
    finally:
        if tmp is not None:
            tmp.cleanup()


# ---- streams -------------------------------------------------------------------------------------
def _as_named(frames: Iterable) -> Iterator[tuple[str, ImageInput]]:
    for i, item in enumerate(frames):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            yield item
        else:
            yield (str(item) if isinstance(item, (str, os.PathLike)) else f"frame-{i:06d}"), item


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def localize_stream(
    map,
    frames: Iterable,
    top_k: int = 10,
    sequence_length: int | None = None,
    sequence: SequenceSettings | Mapping[str, Any] | None = None,
    rerank: str | None = None,
    batch_frames: int = DEFAULT_STREAM_BATCH,
    device: str | None = None,
) -> Iterator:
    """Localise frames as they come; yields one :class:`~vprkit.pipeline.QueryResult` per frame, in order.

    ``frames``: ``(name, frame)`` pairs (see :mod:`vprkit.streams`) or bare frames / paths. Without a
    sequence length each frame is localised on its own (as :func:`vprkit.pipeline.localize`); with
    one, each frame's scores are the best trajectory over the last ``sequence_length`` frames
    (:class:`~vprkit.retrieval.sequence.OnlineSequenceMatcher`); the map's rows must be in route
    order. Results before ``sequence_length`` frames have been seen carry fewer frames' evidence.
    Sequence results carry an estimate like single images (confidence, unknown, position or route position;
    :mod:`vprkit.pipeline.sequence_frames`); each match's ``score`` is the mean cosine along its trajectory
    (``score_kind`` ``sequence_mean_cosine``) and its ``cosine`` the frame's own.
    An unreadable frame gets a result with its ``error`` and leaves the sequence as it was.
    """
    settings = sequence_settings(sequence_length, sequence)
    if settings is not None and settings.length == 1:
        settings = None
    rerank = checked_choice(rerank)
    if settings is not None and rerank not in (None, RERANK_OFF):
        raise ConfigError("re-ranking and sequence matching are not combined; choose one")
    if batch_frames < 1:
        raise ConfigError(f"batch_frames must be ≥ 1, got {batch_frames}")
    m = map if isinstance(map, Map) else open_map(map, read_only=True, device=device)
    matcher = map_globals = None
    if settings is not None:
        check_route_order(m.keys, m.poses, what=f"map {m.dir}")
        matcher = OnlineSequenceMatcher(settings)
        map_globals = m.store.read_global().astype(np.float32)
    headings = getattr(m.data, "headings", None)
    for chunk in _chunks(_as_named(frames), batch_frames):
        names = [n for n, _ in chunk]
        if len(set(names)) != len(names):
            raise ConfigError(f"two frames of one batch share the name {names[0]!r}")
        if matcher is None:  # frame by frame: exactly what localize answers for them
            yield from localize(m, dict(chunk), top_k=top_k, rerank=rerank, unreadable="report")
            continue
        failed: dict[str, str] = {}
        done: dict[str, QueryResult] = {}
        t0 = time.perf_counter()
        for qb in query_batches(m, image_source(dict(chunk)), on_failure=failed.__setitem__):
            for key, g in zip(qb.keys, qb.global_descriptors):
                done[key] = push_frame(m, matcher, key, g, map_globals, top_k, headings)
                done[key].seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
        for name in names:
            yield done.get(name) or QueryResult(name, [], 0.0, failed.get(name, "not localised"))
