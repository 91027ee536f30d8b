"""What a sequence answer rests on (issue 27 item 4): the trajectory each ranked row won with, the mean raw
cosine along it and the share of frames whose own top-1 lies on it — checked against the scores themselves."""

from __future__ import annotations

import numpy as np
import pytest

from vprkit.errors import ConfigError
from vprkit.retrieval.sequence import (
    OnlineSequenceMatcher,
    SequenceSettings,
    _prepare,
    sequence_evidence,
    sequence_scores,
    top_k,
)

MAP_ROWS = 20
FRAMES = 12


@pytest.fixture
def similarity() -> np.ndarray:
    return np.random.default_rng(2).uniform(-0.2, 0.8, size=(FRAMES, MAP_ROWS)).astype(np.float32)


def _path_score(window: np.ndarray, neutral: np.ndarray, path: np.ndarray) -> float:
    """Mean over the window's slots of the prepared similarity at the path's row (no row: the slot's neutral)."""
    return float(np.mean([window[i, r] if r >= 0 else neutral[i] for i, r in enumerate(path)]))


@pytest.mark.parametrize(
    "settings",
    [SequenceSettings(length=4), SequenceSettings(length=4, trajectory="flexible")],
    ids=["line", "flexible"],
)
def test_each_ranked_row_gets_the_trajectory_that_scored_it(similarity, settings):
    matcher = OnlineSequenceMatcher(settings)
    every_row = np.arange(MAP_ROWS)
    for row in similarity:
        scores = matcher.push(row)
        evidence = matcher.evidence(every_row)
        window, neutral = matcher._window()
        got = [_path_score(window, neutral, p) for p in evidence.paths]
        np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-5)
        assert (evidence.paths[:, -1] == every_row).all()  # each path ends at its row


def test_online_and_offline_evidence_agree_and_centre_paths_score_the_centre(similarity):
    for settings in (SequenceSettings(length=5), SequenceSettings(length=4, trajectory="flexible")):
        matcher = OnlineSequenceMatcher(settings)
        online = []
        for row in similarity:
            rows, _ = top_k(matcher.push(row)[None], 3)
            online.append(matcher.evidence(rows[0]))
        ranked, _ = top_k(sequence_scores(similarity, settings), 3)
        for a, b in zip(online, sequence_evidence(similarity, settings, ranked)):
            np.testing.assert_array_equal(a.paths, b.paths)
            np.testing.assert_allclose(a.mean_cosine, b.mean_cosine, rtol=1e-6)
            np.testing.assert_array_equal(a.support, b.support)
            assert a.frames == b.frames
    settings = SequenceSettings(length=5, anchor="centre")
    scores = sequence_scores(similarity, settings)
    ranked, _ = top_k(scores, 3)
    prepared, neutral = _prepare(similarity, settings)
    for t, evidence in enumerate(sequence_evidence(similarity, settings, ranked)):
        queries = np.arange(t - 2, t + 3)
        for path, row in zip(evidence.paths, ranked[t]):
            total = [
                prepared[q, r] if 0 <= q < FRAMES and r >= 0 else neutral[q if 0 <= q < FRAMES else t]
                for q, r in zip(queries, path)
            ]
            assert np.mean(total) == pytest.approx(scores[t, row], abs=1e-5)
        assert evidence.frames == int(((queries >= 0) & (queries < FRAMES)).sum())


def test_mean_cosine_is_raw_and_support_counts_frames_on_the_trajectory():
    rng = np.random.default_rng(5)
    s = rng.uniform(0.55, 0.65, size=(FRAMES, MAP_ROWS)).astype(np.float32)
    truth = 3 + 1 * np.arange(FRAMES)  # one row per frame
    s[np.arange(FRAMES), truth] = 0.9
    settings = SequenceSettings(length=6)
    matcher = OnlineSequenceMatcher(settings)
    for t, row in enumerate(s):
        rows, _ = top_k(matcher.push(row)[None], 2)
        evidence = matcher.evidence(rows[0])
        assert rows[0, 0] == truth[t]
        # the hub-corrected score is far below a cosine; the reported mean is the raw one along the path
        assert evidence.mean_cosine[0] == pytest.approx(0.9, abs=1e-6)
        assert evidence.support[0] == pytest.approx(min(t + 1, 6) / 6)  # frames not yet seen do not support
    # frames whose own top-1 lies elsewhere do not support the trajectory their sequence wins with
    noisy = s.copy()
    noisy[8:, :] = 0.6
    noisy[np.arange(8, FRAMES), 0] = 0.95  # the last frames' own best row is far from the path
    matcher.reset()
    for row in noisy:
        rows, _ = top_k(matcher.push(row)[None], 1)
    evidence = matcher.evidence(rows[0])
    assert evidence.support[0] <= 2 / 6
    with pytest.raises(ConfigError, match="no frame"):
        OnlineSequenceMatcher(settings).evidence(np.array([0]))
