"""Re-ranking's own options (RerankOptions, read off a map's Config once) and the score records benchmarks use."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from vprkit.backbones.extract import ExtractionOptions
from vprkit.config import RerankConfig, VocabularyConfig
from vprkit.presets import get_rerank_config, patch_options, resolve
from vprkit.rerank import RerankOptions, ScoreRecord
from helpers import FixedPatchScores

SHORTLIST = 12


def test_options_hold_what_reranking_reads_of_the_config():
    vgg = resolve(
        "netvlad-vgg16",
        aggregator_options={"checkpoint": "/ck/pitts.pth.tar"},
        vocabulary=VocabularyConfig(k=64, seed=7),
        memory_budget_mb=64,
    )
    opts = RerankOptions.from_config(vgg, "speed")
    assert opts.settings == get_rerank_config("speed")
    assert dict(opts.patches) == patch_options("speed", vgg) and opts.patches["checkpoint"] == "/ck/pitts.pth.tar"
    assert opts.extraction == ExtractionOptions.from_config(vgg) and opts.extraction.image == vgg.image
    assert opts.extraction.decode_buffer_bytes == vgg.memory_plan().decode_buffer_bytes
    assert opts.seed == 7
    custom = RerankConfig("t", scales=((3, 1),), weights=(1.0,))
    assert RerankOptions.from_config(resolve("effnet-vlad"), custom).settings is custom


def _global_scores() -> np.ndarray:
    return np.r_[0.80, 0.79, np.linspace(0.5, 0.4, SHORTLIST - 2)]


def _rerank(rr: FixedPatchScores) -> tuple[np.ndarray, np.ndarray]:
    return rr.rerank(SimpleNamespace(batch=None, features=None), np.arange(SHORTLIST)[None], _global_scores()[None])


def test_each_query_reports_its_score_record_to_the_observer_without_changing_the_ranking():
    settings = RerankConfig("t", scales=((5, 1),), weights=(1.0,), shortlist=SHORTLIST, global_gap=1.0)
    patch = {r: 0.1 for r in range(SHORTLIST)} | {1: 0.9}
    plain_rows, plain_scores = _rerank(FixedPatchScores(settings, patch))
    rr = FixedPatchScores(settings, patch, perfect=2.0)
    records: list[ScoreRecord] = []
    rr.record_scores(records.append)
    rows, scores = _rerank(rr)
    np.testing.assert_array_equal(rows, plain_rows)
    np.testing.assert_allclose(scores, plain_scores)
    (rec,) = records
    np.testing.assert_array_equal(rec.rows, np.arange(SHORTLIST))
    np.testing.assert_allclose(rec.global_scores, _global_scores())
    assert rec.n_matched == len(rr.matched[0]) == int(rec.matched.sum()) < SHORTLIST  # the gap matched a few
    np.testing.assert_allclose(rec.spatial[0], [patch[r] for r in rr.matched[0]])
    assert rec.match_counts is None and rec.perfect.tolist() == [2.0]
    rr.record_scores(None)
    _rerank(rr)
    assert len(records) == 1  # stopped


def test_a_recording_matches_the_whole_shortlist():
    settings = RerankConfig("t", scales=((5, 1),), weights=(1.0,), shortlist=SHORTLIST, global_gap=1.0)
    rr = FixedPatchScores(settings, {r: 0.1 for r in range(SHORTLIST)})
    records: list[ScoreRecord] = []
    rr.record_scores(records.append, whole_shortlist=True)
    _rerank(rr)
    assert rr.settings.global_gap is None and rr.settings.verify == SHORTLIST
    assert records[0].n_matched == SHORTLIST and records[0].matched.all()
