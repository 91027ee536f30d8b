"""The verifier (top-n budget, time budget, feature cache) and the local-feature re-ranker on real Corridor images."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from vprkit.images import Batch, Geometry
from vprkit.rerank import Intrinsics, LocalFeatureReranker, Verifier, make_local_features
from vprkit.rerank.verification import FeatureCache, batch_images, inlier_bonus
from vprkit.retrieval import QueryBatch

SIZE = (320, 240)
QUERY = 40


@pytest.fixture(scope="module")
def xfeat():
    return make_local_features("xfeat")


@pytest.fixture(scope="module")
def corridor(shared_datasets):
    def load(key: str) -> np.ndarray:
        img = Image.open(shared_datasets / "corridor" / key).convert("RGB")
        return np.asarray(img.resize(SIZE, Image.BILINEAR))

    return load


def ref(i: int) -> str:
    return f"ref/{i:07d}.jpg"


class CountingLoader:
    def __init__(self, load):
        self.load, self.calls = load, Counter()

    def __call__(self, key: str) -> np.ndarray:
        self.calls[key] += 1
        return self.load(key)


def test_verifies_the_top_n_and_extracts_each_map_image_once(xfeat, corridor):
    loader = CountingLoader(corridor)
    verifier = Verifier(loader, xfeat, top_n=3)
    keys = [ref(95), ref(QUERY), ref(10), ref(70), ref(20)]
    query = corridor(f"query/{QUERY:07d}.jpg")
    first = verifier.verify(query, keys)
    assert [c.key for c in first.candidates] == keys[:3] and not first.skipped and not first.budget_spent
    assert first.best.key == ref(QUERY) and first.best.rank == 1
    assert first.best.inliers > 1.5 * max(c.inliers for c in first.candidates if c.key != ref(QUERY))
    assert all(c.seconds > 0 and not c.cached for c in first.candidates)
    second = verifier.verify(query, keys)
    assert all(c.cached and c.extract_seconds < c.seconds for c in second.candidates)
    assert [c.inliers for c in second.candidates] == [c.inliers for c in first.candidates]
    assert loader.calls == Counter(keys[:3])  # extracted once, never the unverified ones
    doc = json.loads(json.dumps(first.to_dict()))
    assert doc["candidates"][1]["key"] == ref(QUERY) and doc["candidates"][1]["inliers"] == first.best.inliers


def test_time_budget_stops_after_the_first_candidate(xfeat, corridor):
    verifier = Verifier(corridor, xfeat, top_n=5, time_budget=0.0)
    keys = [ref(i) for i in (QUERY, 41, 42, 43, 44)]
    v = verifier.verify(corridor(f"query/{QUERY:07d}.jpg"), keys)
    assert [c.key for c in v.candidates] == keys[:1] and v.skipped == keys[1:] and v.budget_spent
    assert v.to_dict()["skipped"] == keys[1:]


def test_feature_cache_is_bounded_lru(xfeat, corridor):
    feats = {k: xfeat.extract(corridor(k)) for k in (ref(1), ref(2), ref(3))}
    cache = FeatureCache(max_bytes=feats[ref(1)].nbytes + feats[ref(2)].nbytes + 1)
    cache.put(ref(1), feats[ref(1)])
    cache.put(ref(2), feats[ref(2)])
    assert cache.get(ref(1)) is feats[ref(1)]  # now most recent
    cache.put(ref(3), feats[ref(3)])
    assert cache.get(ref(2)) is None and cache.get(ref(1)) is not None and cache.nbytes <= cache.max_bytes
    cache.discard([ref(1), ref(3)])
    assert len(cache) == 0 and cache.nbytes == 0


def query_batch(images: list[np.ndarray]) -> QueryBatch:
    pixels = np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255
    batch = Batch([f"q{i}" for i in range(len(images))], pixels, [])
    return QueryBatch(batch, None, np.zeros((len(images), 4), np.float32))


def test_reranker_puts_the_verified_place_first(xfeat, corridor):
    keys = [ref(i) for i in range(111)]
    reranker = LocalFeatureReranker(Verifier(corridor, xfeat, top_n=5), keys, shortlist=8)
    assert reranker.shortlist == 8
    queries = [corridor(f"query/{q:07d}.jpg") for q in (QUERY, 90)]
    # global shortlists with the true place at rank 3 and rank 2, cosines close; -1 pads the second
    rows = np.array([[95, 10, 70, QUERY, 20, 60, 30, 5], [15, 50, 90, 100, 3, 77, -1, -1]])
    scores = np.array(
        [[0.80, 0.79, 0.79, 0.78, 0.77, 0.70, 0.69, 0.68], [0.61, 0.60, 0.60, 0.58, 0.55, 0.50, -np.inf, -np.inf]],
        np.float32,
    )
    out_rows, out_scores = reranker.rerank(query_batch(queries), rows, scores)
    assert out_rows.shape == rows.shape and out_scores.dtype == np.float32
    assert out_rows[0, 0] == QUERY and out_rows[1, 0] == 90
    assert (out_scores[:, :-1] >= out_scores[:, 1:]).all()  # best first (-inf pads last)
    assert list(out_rows[0, 5:]) == [60, 30, 5] and list(out_rows[1, 5:]) == [77, -1, -1]  # unverified: global order
    assert sorted(out_rows[0]) == sorted(rows[0])
    assert [len(v.candidates) for v in reranker.last] == [5, 5]
    assert reranker.last[0].best.key == ref(QUERY)
    assert not reranker.last[0].best.result.calibrated  # no camera given: assumed focal


def test_reranker_maps_the_query_camera_onto_the_prepared_image(xfeat, corridor):
    keys = [ref(i) for i in range(111)]
    reranker = LocalFeatureReranker(Verifier(corridor, xfeat, top_n=1), keys)
    batch = query_batch([corridor(f"query/{QUERY:07d}.jpg")])
    batch.batch.geometries = [Geometry((120, 160), (2.0, 2.0), (0, 0), (240, 320))]  # the 160×120 file, doubled
    camera = Intrinsics.parse("80", size=(160, 120))
    reranker.rerank(batch, np.array([[QUERY]]), np.array([[0.9]], np.float32), intrinsics=[camera])
    result = reranker.last[0].best.result
    assert result.calibrated and result.intrinsics_source == "given" and result.model != "none"


def test_reranker_takes_explicit_images_and_follows_removed_rows(xfeat, corridor):
    keys = [ref(i) for i in range(111)]
    verifier = Verifier(corridor, xfeat, top_n=2)
    reranker = LocalFeatureReranker(verifier, keys)
    images = [corridor(f"query/{QUERY:07d}.jpg")]
    blank = query_batch([np.zeros((240, 320, 3), np.uint8)])  # the batch's pixels are ignored
    rows, scores = np.array([[70, QUERY, 3]]), np.array([[0.9, 0.89, 0.5]], np.float32)
    out_rows, _ = reranker.rerank(blank, rows, scores, images=images)
    assert out_rows[0, 0] == QUERY
    assert verifier.cache.get(ref(70)) is not None
    reranker.rows_changed(np.array([70]))
    assert verifier.cache.get(ref(70)) is None and reranker.keys[70] == ref(71) and len(reranker.keys) == 110


def test_batch_images_round_trip_and_bonus(corridor):
    img = corridor(ref(5))
    assert np.array_equal(batch_images(query_batch([img]))[0], img)
    bonus = inlier_bonus(np.array([0, 50, 1000]))
    assert bonus[0] == 0 and bonus[1] == pytest.approx(0.25) and bonus[1] < bonus[2] < 0.5
