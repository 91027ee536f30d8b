"""Issue 26, item 5: no request builds re-ranking state, and a prepared state follows the live map's writes."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

import vprkit.rerank.reranker as reranker_module
from vprkit import pipeline
from vprkit.errors import StateNotPreparedError
from vprkit.pipeline.live import LiveMap

RERANK = "storage"
# A refused re-ranking answers from the files on disk: well under the seconds a fit or a backbone pass takes.
REFUSAL_SECONDS = 2.0


def _frame(corridor_dir, folder: str, i: int) -> np.ndarray:
    return np.asarray(Image.open(corridor_dir / folder / f"{i:07d}.jpg"))


@pytest.fixture
def no_candidate_extraction(monkeypatch):
    """Fail the test if re-ranking runs the backbone over map images (a fit, or candidates computed)."""

    def refuse(*args, **kwargs):
        raise AssertionError("re-ranking ran the backbone over the map's images during a request")

    monkeypatch.setattr(reranker_module, "extract", refuse)


def _prepare(map_dir) -> None:
    reranker = pipeline.get_reranker(pipeline.open_map(map_dir, read_only=True), RERANK)
    reranker.prepare(progress=False)
    reranker.close()


def test_an_unprepared_rerank_is_refused_at_once_and_plain_localize_still_answers(
    map_dir, corridor_dir, no_candidate_extraction
):
    live = LiveMap.open(map_dir)
    frame = _frame(corridor_dir, "ref", 5)
    start = time.perf_counter()
    with pytest.raises(StateNotPreparedError, match=f"vprkit rerank prepare MAP --rerank {RERANK}"):
        live.localize({"q": frame}, top_k=3, rerank=RERANK)
    assert time.perf_counter() - start < REFUSAL_SECONDS
    assert not list(map_dir.glob("extensions/patches-*/*"))  # nothing fitted nor saved
    assert live.localize({"q": frame}, top_k=3)[0].matches[0].key == "0000005.jpg"


def test_a_state_named_at_start_up_is_prepared_there_and_saved(map_dir, corridor_dir, monkeypatch):
    LiveMap.open(map_dir, prepare_rerank=[RERANK])  # fits and computes before serving: a start-up, not a request
    assert list(map_dir.glob("extensions/patches-*/state.npz")) and list(map_dir.glob("extensions/patches-*/rows-*"))
    monkeypatch.setattr(reranker_module, "extract", lambda *a, **k: (_ for _ in ()).throw(AssertionError("extract")))
    live = LiveMap.open(map_dir)  # a later start reads it back
    found = live.localize({"q": _frame(corridor_dir, "ref", 5)}, top_k=3, rerank=RERANK)[0]
    assert found.matches[0].key == "0000005.jpg" and found.matches[0].score_kind == "fused_zscore"


def test_a_partly_prepared_state_is_refused_not_completed(map_dir, corridor_dir, monkeypatch):
    _prepare(map_dir)
    for shard in (map_dir / "extensions").glob("patches-*/rows-*.npz"):
        shard.unlink()  # the fitted state stays, the images' patches are gone
    monkeypatch.setattr(reranker_module, "extract", lambda *a, **k: (_ for _ in ()).throw(AssertionError("extract")))
    live = LiveMap.open(map_dir)
    with pytest.raises(StateNotPreparedError, match="20 of 20 map images lack saved patches"):
        live.localize({"q": _frame(corridor_dir, "ref", 1)}, top_k=3, rerank=RERANK)


def test_a_prepared_state_follows_adds_and_removes_without_a_rebuild(map_dir, corridor_dir, monkeypatch):
    _prepare(map_dir)
    live = LiveMap.open(map_dir, prepare_rerank=[RERANK])
    built: list[str] = []
    real = reranker_module.make_reranker
    monkeypatch.setattr(reranker_module, "extract", lambda *a, **k: (_ for _ in ()).throw(AssertionError("extract")))
    import vprkit.pipeline.localization as localization

    monkeypatch.setattr(
        localization, "make_reranker", lambda options, **kw: built.append(options.settings.name) or real(options, **kw)
    )
    frame = _frame(corridor_dir, "ref", 5)
    first = live.localize({"q": frame}, top_k=3, rerank=RERANK)[0]
    assert first.matches[0].key == "0000005.jpg" and first.matches[0].score_kind == "fused_zscore"
    shards_before = len(list((map_dir / "extensions").glob("patches-*/rows-*.npz")))
    added = _frame(corridor_dir, "query", 40)
    live.add_place(added, "added.png", None)
    assert len(list((map_dir / "extensions").glob("patches-*/rows-*.npz"))) == shards_before + 1
    live.remove_place("0000002.jpg")  # rows after it move down: the kept re-ranker renumbers
    found = live.localize({"q": added}, top_k=3, rerank=RERANK)[0]
    assert found.matches[0].key == "added.png"
    again = live.localize({"q": frame}, top_k=5, rerank=RERANK)[0]
    assert built == []  # built once at start-up (before the counter), never again
    # a fresh start reads the same state (the added place's payload was saved with it) and ranks the same
    monkeypatch.undo()
    fresh = LiveMap.open(map_dir, prepare_rerank=[RERANK])
    for query, kept in ((added, found), (frame, again)):
        other = fresh.localize({"q": query}, top_k=len(kept.matches), rerank=RERANK)[0]
        assert [m.key for m in other.matches] == [m.key for m in kept.matches]
        assert np.allclose([m.score for m in other.matches], [m.score for m in kept.matches], atol=1e-4)
    digest_folder = next((map_dir / "extensions").glob("patches-*"))
    assert any("added.png" in str(k) for s in sorted(digest_folder.glob("rows-*.npz")) for k in np.load(s)["keys"])


def test_over_http_an_unprepared_rerank_is_a_prompt_409_naming_the_command(
    map_dir, corridor_dir, serve, no_candidate_extraction
):
    running = serve(map_dir)
    own = (corridor_dir / "ref" / "0000005.jpg").read_bytes()
    start = time.perf_counter()
    refused = running.client.post("/localize", content=own, params={"rerank": "performance"})
    assert refused.status_code == 409, refused.text
    assert "vprkit rerank prepare MAP --rerank performance" in refused.text
    plain = running.client.post("/localize", content=own)
    assert plain.status_code == 200 and time.perf_counter() - start < 2 * REFUSAL_SECONDS


def test_a_maps_own_stored_reranking_follows_writes(tmp_path, corridor_dir, monkeypatch):
    """A map built with --rerank stores its patches with each row: adds and removes keep serving it, unbuilt."""
    from vprkit.images import FolderImages
    from vprkit.presets import resolve

    keys = [f"{i:07d}.jpg" for i in range(20)]
    out = tmp_path / "map"
    pipeline.build_map(FolderImages(corridor_dir / "ref", keys), out, resolve(rerank=RERANK), progress=False)
    live = LiveMap.open(out)
    monkeypatch.setattr(reranker_module, "extract", lambda *a, **k: (_ for _ in ()).throw(AssertionError("extract")))
    built: list[str] = []
    import vprkit.pipeline.localization as localization

    real = localization.make_reranker
    monkeypatch.setattr(
        localization, "make_reranker", lambda options, **kw: built.append(options.settings.name) or real(options, **kw)
    )
    frame = _frame(corridor_dir, "ref", 9)
    assert live.localize({"q": frame}, top_k=3)[0].matches[0].score_kind == "fused_zscore"
    added = _frame(corridor_dir, "query", 40)
    live.add_place(added, "added.png", None)
    live.remove_place("0000001.jpg")  # rows after it move down
    assert live.localize({"q": added}, top_k=3)[0].matches[0].key == "added.png"
    assert live.localize({"q": frame}, top_k=3)[0].matches[0].key == "0000009.jpg"
    assert built == []  # the map's own, built at start-up (before the counter) and kept across the writes


def test_a_maps_own_reranking_without_stored_patches_is_prepared_at_start_up(tmp_path, corridor_dir, monkeypatch):
    """A map built for a re-ranking without storing its patches: the start-up prepares it, requests never do."""
    from vprkit.images import FolderImages
    from vprkit.presets import resolve

    keys = [f"{i:07d}.jpg" for i in range(20)]
    out = tmp_path / "map"
    config = resolve(rerank=RERANK, store_rerank=False)
    pipeline.build_map(FolderImages(corridor_dir / "ref", keys), out, config, progress=False)
    assert not list(out.glob("extensions/patches-*/*"))
    live = LiveMap.open(out)
    monkeypatch.setattr(reranker_module, "extract", lambda *a, **k: (_ for _ in ()).throw(AssertionError("extract")))
    found = live.localize({"q": _frame(corridor_dir, "ref", 7)}, top_k=3)[0]
    assert found.matches[0].key == "0000007.jpg" and found.rerank == RERANK
    assert list(out.glob("extensions/patches-*/state.npz"))
