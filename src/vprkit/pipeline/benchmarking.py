"""Evaluating a preset on a labelled dataset (Recall@N), and comparing presets and re-rankings.

:func:`evaluate` builds a map of the dataset's database (:func:`.build.build_map`), localises every
query (global retrieval, re-ranking, or sequence matching), measures Recall@N with the dataset's
ground truth (:mod:`vprkit.evaluation.run`) and writes the run. :func:`compare` runs it for every
preset × re-ranking on every dataset and hands the runs to :mod:`vprkit.evaluation.compare`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import Config, RerankConfig
from ..datasets import Dataset, load_dataset
from ..environment import recorded_environment
from ..errors import ConfigError
from ..evaluation import compare as cmp
from ..evaluation.report import PeakMemory
from ..evaluation.metrics import hit_matrix
from ..evaluation.run import RECALL_NS, Rankings, write_run
from ..images import FolderImages
from ..io import atomic_write_text
from ..presets import resolve
from ..retrieval.sequence import SequenceSettings
from . import sequences
from .build import build_map
from .localization import (
    RERANK_OFF,
    QueryResult,
    RerankChoice,
    get_reranker,
    query_batches,
    rerank_settings,
    search,
)
from .maintain import map_info
from .models import resolve_config
from .open import Map, open_map
from .sequence_frames import offline_results

logger = logging.getLogger(__name__)

ESTIMATES_FILE = "estimates.jsonl"  # sequence mode: each query's estimate, one JSON line each


def evaluate(
    dataset,
    preset: str | Config | None = None,
    out: str | os.PathLike | None = None,
    rerank: RerankChoice = None,
    ns: Sequence[int] = RECALL_NS,
    no_positive: str = "fail",
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    save_predictions: int = 0,
    sequence_length: int | None = None,
    data_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Build a map of ``dataset``'s database, localise every query, and measure Recall@N.

    ``dataset`` is a :class:`vprkit.datasets.Dataset` or a spec for :func:`vprkit.datasets.load_dataset`
    (a name is looked up under ``data_root``, default ``$VPRKIT_DATA``, else ``./datasets``).
    With ``out``, the map lives in ``out/map`` (reused if it exists with the same settings) and the
    per-query CSV, the JSON summary and the resolved config are written there; otherwise a
    temporary map is used. Queries without any positive count as failures (``no_positive="fail"``,
    the VPR-methods-evaluation convention) or are left out (``"skip"``, SegVLAD's).
    ``rerank``: None re-ranks as the preset says (``Config.rerank``), ``"none"`` not at all, or a preset
    name / :class:`RerankConfig` (named or not).
    ``sequence_length`` ≥ 2 scores each query as the middle of a run of that many consecutive queries
    (:mod:`vprkit.retrieval.sequence`, straight lines at 1–3 rows per query) — for sequential datasets
    only, whose queries and database are both traversals in route order, paired frame by frame (any layout
    whose names pair up); re-ranking is then not applied; each query's estimate is summarised (``estimates``).
    """
    ds = load_dataset(dataset, data_root=data_root) if isinstance(dataset, (str, os.PathLike)) else dataset
    if ds.ground_truth is None:
        raise ConfigError(
            f"dataset {ds.name} has no ground truth; use `vprkit map build` and `vprkit localize` instead"
        )
    config = resolve_config(preset)
    settings = rerank_settings(config, rerank)
    seq = sequences.sequence_settings(sequence_length, defaults=sequences.OFFLINE_DEFAULTS)
    if seq is not None:
        sequences.check_sequential_dataset(ds, sorted(ds.database_images))
        if settings is not None:
            raise ConfigError("re-ranking and sequence matching are not combined; choose one (--rerank none)")
    tmp = tempfile.TemporaryDirectory(prefix="vprkit-eval-") if out is None else None
    run_dir = Path(tmp.name) if tmp is not None else Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            build_map(
                FolderImages(ds.database_dir, ds.database_images),
                run_dir / "map",
                config,
                poses=ds.database_poses,
                progress=progress,
                log=log,
            )
            build_s = time.perf_counter() - t0
            m = open_map(run_dir / "map")
            reranker = get_reranker(m, settings if settings is not None else RERANK_OFF, log)
            queries = _QueryRun(m, ds, max(max(ns), 1))
            queries.run(reranker, seq, progress)
        for key, msg in queries.rankings.failed.items():
            log(f"query not evaluated (counts as a failure): {msg}")
        summary = _summary(ds, config, settings, seq, queries, ns, no_positive, build_s, mem.peak_mb)
        _add_estimates(summary, queries, ds, run_dir if out is not None else None)
        if out is not None:
            write_run(
                run_dir,
                summary,
                queries.rankings,
                ds.ground_truth,
                dataset=ds,
                save_predictions=save_predictions,
                log=log,
            )
        if reranker is not None:
            reranker.close()
        return summary
    finally:
        if tmp is not None:
            tmp.cleanup()


@dataclass
class _QueryRun:
    """Every query of a dataset localised on its map: the rankings and the time they took."""

    map: Map
    dataset: Dataset
    k: int
    seconds: float = 0.0
    search_seconds: float = 0.0
    results: list[QueryResult] = field(default_factory=list)  # sequence mode: each query with its estimate

    def __post_init__(self) -> None:
        self.rankings = Rankings(self.dataset.query_images, self.dataset.database_images, self.map.keys, self.k)

    def run(self, reranker, seq: SequenceSettings | None, progress: bool) -> None:
        ds, t0 = self.dataset, time.perf_counter()
        described: dict[str, np.ndarray] = {}
        for qb in query_batches(
            self.map, FolderImages(ds.queries_dir, ds.query_images), progress=progress, on_failure=self.rankings.fail
        ):
            if seq is not None:  # scored as a sequence once every query is described
                described.update(zip(qb.keys, qb.global_descriptors))
                continue
            ts = time.perf_counter()
            rows, scores = search(self.map, qb, self.rankings.k, reranker)
            self.search_seconds += time.perf_counter() - ts
            self.rankings.add(qb.keys, rows, scores)
        if seq is not None and described:
            self._score_sequences(described, seq)
        self.seconds = time.perf_counter() - t0

    def _score_sequences(self, described: dict[str, np.ndarray], seq: SequenceSettings) -> None:
        """Every query scored as the middle of its run; each keeps its estimate (:mod:`.sequence_frames`)."""
        sequences.check_sequential_dataset(self.dataset, list(self.map.keys))
        ts = time.perf_counter()
        in_order = [k for k in self.dataset.query_images if k in described]  # unreadable ones stay failures
        rows, scores, self.results = offline_results(
            self.map, in_order, np.stack([described[k] for k in in_order]), seq, self.rankings.k
        )
        self.search_seconds += time.perf_counter() - ts
        self.rankings.add(in_order, rows, scores)


def estimate_summary(results: Sequence[QueryResult], rankings: Rankings, ground_truth) -> dict[str, Any]:
    """What the estimates of a run say against the ground truth: how many queries have a confidence, the share
    judged unknown, the share of accepted answers (``unknown`` false) whose top-1 is right and of right answers
    accepted. A query whose estimate could not decide (``unknown`` None: nothing calibrated) is neither."""
    correct = hit_matrix(rankings.ranked, ground_truth)[:, 0]
    right = np.array([bool(correct[rankings.query_index[r.query]]) for r in results], bool)
    estimates = [r.estimate for r in results]
    confident = np.array([e is not None and e.confidence is not None for e in estimates], bool)
    unknown = np.array([e is not None and e.unknown is True for e in estimates], bool)
    accepted = np.array([e is not None and e.unknown is False for e in estimates], bool)
    return {
        "frames": len(results),
        "with_confidence": int(confident.sum()),
        "unknown_share": round(float(unknown.mean()), 4) if len(results) else None,
        "undecided": int((~unknown & ~accepted).sum()),
        "accepted": int(accepted.sum()),
        "accepted_correct_share": round(float(right[accepted].mean()), 4) if accepted.any() else None,
        "correct_accepted_share": round(float(accepted[right].mean()), 4) if right.any() else None,
    }


def _add_estimates(summary: dict[str, Any], queries: _QueryRun, ds: Dataset, run_dir: Path | None) -> None:
    """Sequence mode: the estimates' summary in ``summary`` and, with a run folder, each query's in a file."""
    if queries.results:
        summary["estimates"] = estimate_summary(queries.results, queries.rankings, ds.ground_truth)
        if run_dir is not None:
            summary["estimates"]["file"] = str(write_estimates(run_dir / ESTIMATES_FILE, queries.results))


def write_estimates(path: Path, results: Sequence[QueryResult]) -> Path:
    """One JSON line per query: its estimate (confidence, unknown, position or route position, evidence)."""
    lines = [json.dumps({"query": r.query, "estimate": r.to_dict().get("estimate")}, default=str) for r in results]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return path


def _summary(
    ds: Dataset,
    config: Config,
    settings: RerankConfig | None,
    seq: SequenceSettings | None,
    queries: _QueryRun,
    ns: Sequence[int],
    no_positive: str,
    build_s: float,
    peak_mb: float,
) -> dict[str, Any]:
    n_db, n_q = len(queries.map.keys), len(ds.query_images)
    return {
        "dataset": ds.name,
        "preset": config.name,
        "rerank": None if settings is None else settings.name,
        **({"rerank_settings": settings.to_dict()} if settings is not None else {}),
        **(
            {"sequence": {f: getattr(seq, f) for f in seq.__dataclass_fields__}, "score_kind": seq.score_kind}
            if seq is not None
            else {}
        ),
        "recall": queries.rankings.recall(ds.ground_truth, ns, no_positive),
        "timing": {
            "map_build_s": round(build_s, 3),
            "map_images_per_s": round(n_db / build_s, 2) if build_s else None,
            "query_total_s": round(queries.seconds, 3),
            "ms_per_query": round(1000 * queries.seconds / max(1, n_q), 2),
            "search_ms_per_query": round(1000 * queries.search_seconds / max(1, n_q), 2),
        },
        "peak_rss_mb": round(peak_mb, 1),
        "counts": {"database": n_db, "queries": n_q, "queries_unreadable": len(queries.rankings.failed)},
        "config": config.to_dict(),
        "environment": recorded_environment(),
    }


# ---- comparing methods ---------------------------------------------------------------------------
def _run_folder_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)


def compare(
    datasets: Sequence,
    presets: Sequence[str | Config],
    reranks: Sequence[str | None] = (None,),
    out: str | os.PathLike | None = None,
    baseline: str | None = None,
    n: int = 1,
    ns: Sequence[int] = RECALL_NS,
    no_positive: str = "fail",
    resolve_options: Mapping[str, Any] | None = None,
    save_predictions: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
    data_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate every preset × re-ranking mode on every dataset; one table and per-query fixes/breaks.

    ``reranks``: re-ranking presets, ``None`` (or ``"none"``) for global retrieval only. Each run is
    :func:`evaluate` into ``out/<dataset>/<preset>[+<rerank>]`` (so a rerun reuses the maps), then
    :mod:`vprkit.evaluation.compare` writes ``comparison.{md,csv,html,json}`` and ``changes.csv`` to
    ``out``: Recall@N, bytes per place, time per query, and which queries each method fixes or breaks
    within the top ``n`` against ``baseline`` (a method label, default the first). ``resolve_options``
    go to :func:`vprkit.presets.resolve` for every preset (``image_size``, ``float16``, …). Dataset names are
    looked up under ``data_root`` (default ``$VPRKIT_DATA``, else ``./datasets``).
    Returns ``{"rows", "changes", "runs" (folders), "files"}``.
    """
    if not datasets or not presets:
        raise ConfigError("compare needs at least one dataset and one preset")
    modes = [None if r in (None, "", RERANK_OFF) else r for r in (reranks or (None,))]
    methods = compare_methods(presets, modes)
    tmp = tempfile.TemporaryDirectory(prefix="vprkit-compare-") if out is None else None
    root = Path(tmp.name) if tmp is not None else Path(out)
    try:
        records = []
        for spec in datasets:
            ds = load_dataset(spec, data_root=data_root) if isinstance(spec, (str, os.PathLike)) else spec
            for preset, mode in methods:
                config = resolve(preset, rerank=mode, **dict(resolve_options or {}))
                label = config.name + (f"+{mode}" if mode else "")
                run_dir = root / _run_folder_name(ds.name) / _run_folder_name(label)
                log(f"compare: {ds.name} · {config.name}" + (f" + {mode}" if mode else "") + f" → {run_dir}")
                evaluate(
                    ds,
                    config,
                    out=run_dir,
                    rerank=mode,
                    ns=ns,
                    no_positive=no_positive,
                    progress=progress,
                    log=log,
                    save_predictions=save_predictions,
                )
                records.append(cmp.load_run(run_dir, map_info(run_dir / "map")["bytes_per_image"]))
        changes = cmp.pairwise_changes(records, baseline, n)
        files = [] if tmp is not None else [str(p) for p in cmp.write_comparison(root, records, changes, ns)]
        return {
            "rows": cmp.comparison_rows(records, ns),
            "changes": changes,
            "runs": [r.folder for r in records] if tmp is None else [],
            "files": files,
            "markdown": cmp.render_markdown(records, changes, ns, list_queries=False),
        }
    finally:
        if tmp is not None:
            tmp.cleanup()


def compare_methods(presets: Sequence[str | Config], modes: Sequence[str | None]) -> list[tuple[Any, str | None]]:
    """(preset, re-ranking mode) pairs: ``"NAME+MODE"`` names one pair; a bare preset is crossed with ``modes``.

    The ``+`` form lets one table hold methods that cannot all be crossed (a SegVLAD preset has no patch
    re-ranking), e.g. ``effnet2-vlad-ma4 effnet2-vlad-ma4+speed segvlad-slic``.
    """
    out: list[tuple[Any, str | None]] = []
    for preset in presets:
        if isinstance(preset, str) and "+" in preset:
            name, mode = preset.split("+", 1)
            if not name or not mode:
                raise ConfigError(f"method {preset!r}: write PRESET+RERANK, e.g. effnet2-vlad-ma4+speed")
            out.append((name, None if mode == RERANK_OFF else mode))
        else:
            out.extend((preset, mode) for mode in modes)
    return out
