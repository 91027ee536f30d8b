"""VLAD against AnyLoc's formulation, raw vs unit centres, and AnyLoc's vocabulary files.

``anyloc_vlad`` below is written from AnyLoc's definition (utilities.py ``VLAD.generate`` /
``generate_res_vec`` with fast_pytorch_kmeans 0.1.6 ``predict`` in cosine mode), image by image and
cluster by cluster, in float64, without any vprkit helper:

- labels: argmax over centres of ``(x/(‖x‖+1e-8)) · (c/(‖c‖+1e-8))`` on the *raw* descriptors;
- residuals: ``x/‖x‖ − c`` against the raw (non-unit) centres;
- for each cluster that received a descriptor: sum its residuals, L2-normalise (intra-norm);
  clusters that received none stay zero;
- concatenate, L2-normalise. Several images: one VLAD each (``generate_multi``).
"""

import math

import numpy as np
import pytest
import torch

from vprkit.aggregation import AGGREGATORS
from vprkit.aggregation.vlad import VLAD, Vocabulary, fit_vocabulary, hard_vlad
from vprkit.backbones.base import DenseFeatures
from vprkit.errors import ConfigError, VocabularyMismatchError


def anyloc_vlad(descs: np.ndarray, c_centers: np.ndarray) -> np.ndarray:
    x = np.asarray(descs, np.float64)
    c = np.asarray(c_centers, np.float64)
    k, d = c.shape
    xs = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)
    cs = c / (np.linalg.norm(c, axis=1, keepdims=True) + 1e-8)
    labels = np.argmax(xs @ cs.T, axis=1)
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    vlad = np.zeros(k * d)
    for j in set(labels.tolist()):
        s = np.zeros(d)
        for i in np.flatnonzero(labels == j):
            s += xn[i] - c[j]
        vlad[j * d : (j + 1) * d] = s / max(np.linalg.norm(s), 1e-12)
    return vlad / max(np.linalg.norm(vlad), 1e-12)


def raw_centres(rng, k: int, d: int) -> np.ndarray:
    """Non-unit centres like AnyLoc's: means of unit vectors, norms in (0, 1); one zero centre (an emptied cluster)."""
    c = rng.normal(size=(k, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    c *= rng.uniform(0.2, 0.9, size=(k, 1))
    c[-1] = 0.0
    return c.astype(np.float32)


def test_vlad_equals_anyloc_with_raw_centres_empty_clusters_and_several_images():
    rng = np.random.default_rng(0)
    k, d = 12, 6
    c = raw_centres(rng, k, d)
    x = rng.normal(size=(4, 30, d)).astype(np.float32)  # 30 descriptors over 12 clusters: some stay empty
    voc = Vocabulary(c, {"centres": "raw"})
    agg = VLAD(d, voc, chunk=3)  # chunks of 3 images: B > 1 within and across chunks
    out = agg(DenseFeatures(torch.from_numpy(x).reshape(4, 5, 6, d), 16, (80, 96))).numpy()
    empty_seen = False
    for b in range(4):
        ref = anyloc_vlad(x[b], c)
        np.testing.assert_allclose(out[b], ref, atol=1e-5)
        empty_seen |= bool((np.abs(ref.reshape(k, d)).sum(1) == 0).any())
    assert empty_seen, "the data should leave some clusters empty"


def test_raw_centres_differ_from_dot_product_assignment():
    # with non-unit centres, the dot product prefers long centres; cosine (AnyLoc) does not
    c = np.array([[1.0, 0.0], [0.0, 0.3]], np.float32)  # the second centre is short
    x = np.array([[[0.6, 0.8]]], np.float32)  # cosine: closer to centre 2 (0.8 > 0.6); dot: centre 1 (0.6 > 0.24)
    v = hard_vlad(torch.from_numpy(x), torch.from_numpy(c))[0].numpy().reshape(2, 2)
    assert np.abs(v[0]).sum() == 0 and np.abs(v[1]).sum() > 0
    np.testing.assert_allclose(v.ravel(), anyloc_vlad(x[0], c), atol=1e-6)
    # residual against the raw centre, not the unit one
    r = np.array([0.6, 0.8 - 0.3])
    np.testing.assert_allclose(v[1], r / np.linalg.norm(r), atol=1e-6)


def test_zero_centre_is_never_preferred_over_a_positive_cosine():
    c = np.array([[0.0, 0.0], [0.5, 0.0]], np.float32)
    x = torch.tensor([[[1.0, 0.2], [0.3, 1.0]]])
    v = hard_vlad(x, torch.from_numpy(c))[0].reshape(2, 2)
    assert float(v[0].abs().sum()) == 0.0 and torch.isfinite(v).all()


def test_multiple_assignment_with_raw_centres_matches_per_descriptor_reference():
    rng = np.random.default_rng(1)
    c = raw_centres(rng, 8, 5)
    x = rng.normal(size=(2, 25, 5)).astype(np.float32)
    for m in (1, 2, 3):
        out = VLAD(5, Vocabulary(c, {"centres": "raw"}), assignments=m)(
            DenseFeatures(torch.from_numpy(x).reshape(2, 5, 5, 5), 16, (80, 80))
        )
        for b in range(2):
            xn = x[b] / np.linalg.norm(x[b], axis=1, keepdims=True)
            cs = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
            sums = np.zeros((8, 5))
            for desc in xn:
                for j in np.argsort(-(cs @ desc), kind="stable")[:m]:
                    sums[j] += desc - c[j]
            n = np.linalg.norm(sums, axis=1, keepdims=True)
            sums = np.where(n > 0, sums / np.maximum(n, 1e-12), 0.0).ravel()
            np.testing.assert_allclose(out[b].numpy(), sums / np.linalg.norm(sums), atol=1e-5)
        if m == 1:
            np.testing.assert_allclose(out.numpy(), np.stack([anyloc_vlad(x[b], c) for b in range(2)]), atol=1e-5)


def test_fit_vocabulary_raw_centres_are_plain_means_of_their_cluster():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 6)).astype(np.float32) + np.array([2.0, 0, 0, 0, 0, 0], np.float32)
    unit = fit_vocabulary(x, 8, seed=3, centres="unit")
    raw = fit_vocabulary(x, 8, seed=3, centres="raw")
    assert unit.kind == "unit" and raw.kind == "raw" and raw.metadata["centres"] == "raw"
    assert unit.checksum != raw.checksum
    np.testing.assert_allclose(np.linalg.norm(unit.centres, axis=1), 1.0, atol=1e-5)
    norms = np.linalg.norm(raw.centres, axis=1)
    assert (norms < 1.0).all() and (norms > 0.3).all()
    # each raw centre is the plain mean of the normalised descriptors nearest (by cosine) to the k-means centre
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.argmax(xn @ unit.centres.T, axis=1)
    for j in range(8):
        np.testing.assert_allclose(raw.centres[j], xn[labels == j].mean(0), atol=1e-5)
    # the caller's array is not modified
    assert not np.allclose(np.linalg.norm(x, axis=1), 1.0)
    with pytest.raises(ConfigError, match="centre kind"):
        fit_vocabulary(x, 8, centres="normalised")


def test_raw_multi_vocabulary_sets_are_raw_too():
    x = np.random.default_rng(4).normal(size=(500, 5)).astype(np.float32)
    voc = fit_vocabulary(x, 4, sets=2, centres="raw")
    assert voc.sets == 2 and (np.linalg.norm(voc.alternates[0], axis=1) < 1).all()


def test_centre_kind_survives_save_and_old_files_load_as_unit(tmp_path):
    x = np.random.default_rng(5).normal(size=(300, 4)).astype(np.float32)
    raw = fit_vocabulary(x, 4, centres="raw")
    back = Vocabulary.load(raw.save(tmp_path / "raw.npz"))
    assert back.kind == "raw" and back.checksum == raw.checksum
    # a vocabulary file written before the kind was recorded: no "centres" entry, same checksum rules
    old = Vocabulary(np.eye(4, dtype=np.float32), {"name": "old", "k": 4})
    path = old.save(tmp_path / "old.npz")
    with np.load(path) as z:
        assert "centres" not in str(z["metadata"])
    loaded = Vocabulary.load(path)
    assert loaded.kind == "unit" and loaded.checksum == old.checksum
    with pytest.raises(ConfigError, match="centre kind"):
        Vocabulary(np.eye(2, dtype=np.float32), {"centres": "weird"})


def test_vlad_centres_option_is_validated_and_selects_what_fit_builds():
    x = np.random.default_rng(6).normal(size=(400, 5)).astype(np.float32)
    unit, raw = fit_vocabulary(x, 4), fit_vocabulary(x, 4, centres="raw")
    VLAD(5, raw, centres="raw")
    VLAD(5, unit)  # no requirement: either kind
    with pytest.raises(VocabularyMismatchError, match="rebuild it with centres='raw'"):
        VLAD(5, unit, centres="raw")
    with pytest.raises(ConfigError, match="centre kind"):
        VLAD(5, unit, centres="spherical")
    agg = VLAD(5, k=4, centres="raw")
    agg.fit(x)
    assert agg.vocabulary.kind == "raw" and agg.identity()["centres"] == "raw"
    np.testing.assert_allclose(agg.vocabulary.centres, raw.centres)
    assert "centres" not in VLAD(5, unit).identity()  # unit identities are unchanged
    assert AGGREGATORS.get("vlad")(5, vocabulary=raw, centres="raw").vocabulary is raw


def _write_anyloc(path, centres) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.as_tensor(centres), path)  # what AnyLoc's VLAD.fit caches: torch.save(self.c_centers, …)


def test_from_anyloc_reads_c_centers_pt_and_encodes_like_anyloc(tmp_path):
    rng = np.random.default_rng(7)
    c = raw_centres(rng, 4, 6)
    path = tmp_path / "cache" / "vocabulary" / "dinov2_vitg14" / "l31_value_c4" / "indoor" / "c_centers.pt"
    _write_anyloc(path, c)
    voc = Vocabulary.from_anyloc(path)
    assert voc.kind == "raw" and voc.k == 4 and voc.dim == 6
    np.testing.assert_array_equal(voc.centres, c)
    assert voc.metadata["domain"] == "indoor"
    assert voc.metadata["identity"] == {"backbone": "dinov2_vitg14", "layer": 31, "facet": "value", "dim": 6}
    voc.check_compatible({"backbone": "dinov2_vitg14", "layer": 31, "facet": "value", "dim": 6})
    with pytest.raises(VocabularyMismatchError, match="layer"):
        voc.check_compatible({"backbone": "dinov2_vitg14", "layer": 23, "facet": "value", "dim": 6})
    x = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    out = VLAD(6, voc, centres="raw")(DenseFeatures(torch.from_numpy(x), 14, (42, 56))).numpy()
    for b in range(2):
        np.testing.assert_allclose(out[b], anyloc_vlad(x[b].reshape(-1, 6), c), atol=1e-5)
    # and it can be kept as a vprkit vocabulary
    back = Vocabulary.load(voc.save(tmp_path / "indoor.npz"))
    assert back.kind == "raw" and back.checksum == voc.checksum
    # a file outside AnyLoc's layout: no identity, metadata from the caller
    other = tmp_path / "c_centers.pt"
    _write_anyloc(other, c.astype(np.float64))
    v2 = Vocabulary.from_anyloc(other, metadata={"name": "mine"})
    assert "identity" not in v2.metadata and v2.metadata["name"] == "mine" and v2.centres.dtype == np.float32


class _NotATensor:
    pass


def test_from_anyloc_refuses_other_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Vocabulary.from_anyloc(tmp_path / "none.pt")
    p = tmp_path / "dict.pt"
    torch.save({"c": torch.zeros(3, 2)}, p)
    with pytest.raises(ConfigError, match="K×D float tensor"):
        Vocabulary.from_anyloc(p)
    p = tmp_path / "vec.pt"
    torch.save(torch.zeros(5), p)
    with pytest.raises(ConfigError, match="K×D float tensor"):
        Vocabulary.from_anyloc(p)
    p = tmp_path / "pickle.pt"
    torch.save(_NotATensor(), p)  # an arbitrary pickle: weights_only refuses to unpickle it
    with pytest.raises(ConfigError, match="not a torch-saved tensor"):
        Vocabulary.from_anyloc(p)
    p = tmp_path / "text.pt"
    p.write_text("hello")
    with pytest.raises(ConfigError):
        Vocabulary.from_anyloc(p)


def test_hand_computed_raw_vlad():
    # centres of length 0.5 along x and y; residuals against them
    c = torch.tensor([[0.5, 0.0], [0.0, 0.5]])
    x = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    r1, r2 = torch.tensor([0.5, 0.0]), torch.tensor([0.0, 0.5])
    expected = torch.cat([r1 / r1.norm(), r2 / r2.norm()]) / math.sqrt(2)
    torch.testing.assert_close(hard_vlad(x, c)[0], expected)
