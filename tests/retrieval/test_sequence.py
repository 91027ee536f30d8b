"""Sequence matching (SeqSLAM-style) against straightforward loop implementations of its definition."""

from __future__ import annotations

import numpy as np
import pytest

from vprkit.errors import ConfigError
from vprkit.retrieval.sequence import (
    CONTRAST_SCORE_KIND,
    SCORE_KIND,
    OnlineSequenceMatcher,
    SequenceSettings,
    check_route_order,
    contrast_normalise,
    sequence_scores,
    top_k,
)


# ---- reference formulations: plain loops over queries, rows, velocities and steps ----------------------
def reference_contrast(s: np.ndarray, window: int) -> np.ndarray:
    """OpenSeqSLAM's doContrastEnhancement, per element, on similarities."""
    out = np.empty_like(s, dtype=np.float64)
    q, n = s.shape
    for t in range(q):
        for j in range(n):
            v = s[t, max(0, j - window // 2) : min(n, j + window // 2 + 1)].astype(np.float64)
            out[t, j] = (s[t, j] - v.mean()) / max(v.std(ddof=1), 1e-6)
    return out


def reference_line(s: np.ndarray, settings: SequenceSettings) -> np.ndarray:
    """Best straight line ending at (t, j): mean over L steps of s[t-k, j-round(v k)], off-map steps = row mean."""
    s = s.astype(np.float64)
    if settings.contrast_window:
        s = reference_contrast(s, settings.contrast_window)
    q, n = s.shape
    length = settings.length
    out = np.full((q, n), -np.inf)
    for t in range(q):
        for j in range(n):
            for v in settings.velocities:
                total = 0.0
                for k in range(length):
                    tk, jk = t - k, j - int(np.round(v * k))
                    if tk < 0:
                        total += s[t].mean()
                    elif 0 <= jk < n:
                        total += s[tk, jk]
                    else:
                        total += s[tk].mean()
                out[t, j] = max(out[t, j], total / length)
    return out


def reference_flexible(s: np.ndarray, settings: SequenceSettings) -> np.ndarray:
    """Exhaustive search over every path of whole-row steps in the range, with the turn penalty."""
    import itertools

    q, n = s.shape
    length = settings.length
    steps = list(range(int(np.floor(settings.min_velocity)), int(np.ceil(settings.max_velocity)) + 1))
    out = np.full((q, n), -np.inf)
    for t in range(q):
        rows = [s[t - k] if t - k >= 0 else np.full(n, s[t].mean()) for k in range(length)][::-1]  # oldest first
        for j in range(n):
            for path in itertools.product(steps, repeat=length - 1):
                pos, total, pen = j, rows[-1][j], 0.0
                for i, d in enumerate(reversed(path)):  # walk back from the newest row
                    pos -= d
                    total += rows[length - 2 - i][pos] if 0 <= pos < n else np.nan
                for a, b in zip(path[:-1], path[1:]):
                    pen += settings.turn_penalty * abs(a - b)
                if np.isnan(total):
                    continue  # paths leaving the map: the vectorised version fills them, compare on-map paths only
                out[t, j] = max(out[t, j], (total - pen) / length)
    return out


@pytest.fixture
def small_matrix() -> np.ndarray:
    return np.random.default_rng(0).uniform(-0.2, 0.8, size=(9, 14)).astype(np.float32)


def test_line_scores_match_the_reference_loops(small_matrix):
    # The references are SeqSLAM's formulation on raw similarities: the hub correction is off here
    # (it is a preprocessing of the matrix, pinned by its own test below).
    for settings in (
        SequenceSettings(length=4, min_velocity=0.5, max_velocity=2.5, velocity_step=0.5, hub_correction=False),
        SequenceSettings(length=3, both_directions=True, hub_correction=False),
        SequenceSettings(length=5, contrast_window=4, hub_correction=False),
    ):
        got = sequence_scores(small_matrix, settings)
        np.testing.assert_allclose(got, reference_line(small_matrix, settings), rtol=1e-4, atol=1e-4)


def test_flexible_scores_match_exhaustive_search_on_the_map_interior(small_matrix):
    settings = SequenceSettings(
        length=3, trajectory="flexible", min_velocity=1, max_velocity=2, turn_penalty=0.05, hub_correction=False
    )
    got = sequence_scores(small_matrix, settings)
    ref = reference_flexible(small_matrix, settings)
    inner = np.isfinite(ref)  # every path to these cells stays on the map and after the first query
    inner[: settings.length - 1] = False
    inner[:, : 2 * (settings.length - 1)] = False
    assert inner.sum() > 20
    np.testing.assert_allclose(got[inner], ref[inner], rtol=1e-5, atol=1e-5)


def test_contrast_normalisation_is_seqslams(small_matrix):
    np.testing.assert_allclose(
        contrast_normalise(small_matrix, 6), reference_contrast(small_matrix, 6), rtol=1e-4, atol=1e-4
    )
    assert SequenceSettings(contrast_window=10).score_kind == CONTRAST_SCORE_KIND
    assert SequenceSettings().score_kind == SCORE_KIND


def _diagonal(
    queries: int, rows: int, velocity: int, start: int, noise: float, seed: int = 0, boost: float = 1.5
) -> np.ndarray:
    """Noise plus a weak true trajectory (velocity rows per query) that a single frame cannot pick out."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0.3, noise, size=(queries, rows)).astype(np.float32)
    t = np.arange(queries)
    s[t, start + velocity * t] += boost * noise
    return s


def test_a_velocity_two_diagonal_is_found_where_single_frames_fail():
    s = _diagonal(queries=30, rows=200, velocity=2, start=40, noise=0.1)
    truth = 40 + 2 * np.arange(30)
    single = (s.argmax(1) == truth)[9:].mean()
    seq = sequence_scores(s, SequenceSettings(length=10))
    hit = (seq.argmax(1) == truth)[9:].mean()
    assert single < 0.6 and hit >= 0.95
    only_one = sequence_scores(s, SequenceSettings(length=10, min_velocity=1, max_velocity=1))
    assert (only_one.argmax(1) == truth)[9:].mean() < hit  # the velocity search is what finds it


def test_reverse_traversal_needs_both_directions():
    s = _diagonal(queries=30, rows=120, velocity=1, start=0, noise=0.1, boost=2.5)[:, ::-1].copy()  # rows run backwards
    truth = 119 - np.arange(30)
    forward = sequence_scores(s, SequenceSettings(length=8))
    both = sequence_scores(s, SequenceSettings(length=8, both_directions=True))
    assert (both.argmax(1) == truth)[7:].mean() >= 0.95 > (forward.argmax(1) == truth)[7:].mean()


def test_flexible_trajectory_follows_a_variable_speed():
    rng = np.random.default_rng(3)
    steps = rng.integers(1, 4, size=40)
    truth = 10 + np.concatenate([[0], np.cumsum(steps[:-1])])
    s = rng.normal(0.3, 0.1, size=(40, truth.max() + 20)).astype(np.float32)
    s[np.arange(40), truth] += 0.3
    line = sequence_scores(s, SequenceSettings(length=8))
    flex = sequence_scores(s, SequenceSettings(length=8, trajectory="flexible", turn_penalty=0.0))
    assert (flex.argmax(1) == truth)[7:].mean() > (line.argmax(1) == truth)[7:].mean()
    assert (flex.argmax(1) == truth)[7:].mean() >= 0.9


def test_online_matches_offline_row_by_row(small_matrix):
    for settings in (
        SequenceSettings(length=4),
        SequenceSettings(length=3, contrast_window=4),
        SequenceSettings(length=3, trajectory="flexible"),
        SequenceSettings(length=3, trajectory="flexible", turn_penalty=0.03),
    ):
        online = OnlineSequenceMatcher(settings)
        rows = [online.push(r) for r in small_matrix]
        np.testing.assert_allclose(np.stack(rows), sequence_scores(small_matrix, settings), rtol=1e-6, atol=1e-6)
        assert online.ready
        online.reset()
        assert not online.ready


def test_hub_correction_centres_each_map_row_on_the_running_query_mean(small_matrix):
    """With the correction, scores equal the uncorrected scores of S[t, j] − Σ_{u≤t} S[u, j] / (t + 1 + prior)."""
    from vprkit.retrieval.sequence import HUB_PRIOR_QUERIES

    s = small_matrix.astype(np.float64)
    centred = (s - np.cumsum(s, 0) / (np.arange(1, len(s) + 1)[:, None] + HUB_PRIOR_QUERIES)).astype(np.float32)
    for settings in (
        SequenceSettings(length=4),
        SequenceSettings(length=3, trajectory="flexible"),
        SequenceSettings(length=5, anchor="centre"),
    ):
        raw = SequenceSettings(
            **{**{f: getattr(settings, f) for f in settings.__dataclass_fields__}, "hub_correction": False}
        )
        np.testing.assert_allclose(
            sequence_scores(small_matrix, settings), sequence_scores(centred, raw), rtol=1e-5, atol=1e-5
        )
    # A "hub" column, high for every query, wins uncorrected and no longer after the correction.
    hub = np.full((12, 6), 0.2, np.float32)
    hub[:, 5] = 0.6
    hub[np.arange(12), np.arange(12) % 5] = 0.55
    raw = sequence_scores(hub, SequenceSettings(length=1, hub_correction=False))
    fixed = sequence_scores(hub, SequenceSettings(length=1))
    assert (raw.argmax(1) == 5).all()
    assert (fixed[3:].argmax(1) == np.arange(3, 12) % 5).all()


def test_chunking_does_not_change_scores(small_matrix, monkeypatch):
    import vprkit.retrieval.sequence as seq

    whole = sequence_scores(small_matrix, SequenceSettings(length=4))
    monkeypatch.setattr(seq, "CHUNK_ELEMENTS", 1)  # one query per chunk
    np.testing.assert_array_equal(sequence_scores(small_matrix, SequenceSettings(length=4)), whole)


def test_top_k_is_best_first_and_padded():
    rows, scores = top_k(np.array([[0.1, 0.9, 0.5]], np.float32), 5)
    assert rows.tolist() == [[1, 2, 0, -1, -1]]
    assert scores[0, 0] == pytest.approx(0.9) and np.isneginf(scores[0, 3:]).all()


def test_bad_settings_and_route_order_are_one_clear_error():
    with pytest.raises(ConfigError, match="sequence length"):
        SequenceSettings(length=0)
    with pytest.raises(ConfigError, match="velocities"):
        SequenceSettings(min_velocity=3, max_velocity=1)
    with pytest.raises(ConfigError, match="unknown sequence trajectory"):
        SequenceSettings(trajectory="curvy")
    with pytest.raises(ConfigError, match="finite"):
        sequence_scores(np.array([[np.nan, 1.0]]))
    check_route_order(["a/0001.png", "a/0002.png", "a/0010.png"])
    with pytest.raises(ConfigError, match="not in sorted"):
        check_route_order(["b.png", "a.png"])
    path = np.c_[np.arange(50.0), np.zeros(50)]
    check_route_order(poses=path)
    with pytest.raises(ConfigError, match="not in route order"):
        check_route_order(poses=np.random.default_rng(0).permutation(path))


def test_centre_anchor_is_the_past_and_future_halves_through_the_cell(small_matrix):
    settings = SequenceSettings(length=5, anchor="centre", hub_correction=False)
    got = sequence_scores(small_matrix, settings)
    s = small_matrix.astype(np.float64)
    q, n = s.shape
    velocities = settings.velocities
    ref = np.empty((q, n))
    for t in range(q):
        for j in range(n):
            halves = []
            for sign, steps in ((-1, 2), (1, 2)):  # length 5: two queries before, two after
                best = -np.inf
                for v in velocities:
                    total = 0.0
                    for k in range(1, steps + 1):
                        tk, jk = t + sign * k, j + sign * int(np.round(v * k))
                        if not 0 <= tk < q:
                            total += s[t].mean()
                        elif 0 <= jk < n:
                            total += s[tk, jk]
                        else:
                            total += s[tk].mean()
                    best = max(best, total)
                halves.append(best)
            ref[t, j] = (s[t, j] + sum(halves)) / 5
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="future"):
        OnlineSequenceMatcher(settings)
