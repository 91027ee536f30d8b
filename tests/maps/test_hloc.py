"""hloc interoperability: global-features HDF5 and retrieval pairs, read back with hloc's own logic.

hloc's readers are re-implemented here from its code (``hloc/utils/io.py:list_h5_names``,
``hloc/pairs_from_retrieval.py:get_descriptors`` / ``pairs_from_score_matrix``,
``hloc/utils/parsers.py:parse_retrieval``) so the test needs neither hloc nor pycolmap.
"""

from __future__ import annotations

import json
from collections import defaultdict

import h5py
import numpy as np
import pytest
import torch

from vprkit.errors import MapError
from vprkit.maps import FaissIndex, MapStore
from vprkit.maps.hloc import (
    DESCRIPTOR,
    export_map,
    import_features,
    list_global_names,
    read_global_features,
    read_pairs,
    retrieval_pairs,
    retrieve,
    write_global_features,
    write_pairs,
)


# ---- hloc's readers, as its code has them ----------------------------------------------------
def hloc_list_h5_names(path):
    names = []
    with h5py.File(str(path), "r", libver="latest") as fd:

        def visit_fn(_, obj):
            if isinstance(obj, h5py.Dataset):
                names.append(obj.parent.name.strip("/"))

        fd.visititems(visit_fn)
    return list(set(names))


def hloc_get_descriptors(names, path, key="global_descriptor"):
    with h5py.File(str(path), "r", libver="latest") as fd:
        desc = [fd[n][key].__array__() for n in names]
    return torch.from_numpy(np.stack(desc, 0)).float()


def hloc_pairs_from_score_matrix(scores, invalid, num_select, min_score=None):
    invalid = torch.from_numpy(invalid)
    if min_score is not None:
        invalid |= scores < min_score
    scores.masked_fill_(invalid, float("-inf"))
    topk = torch.topk(scores, num_select, dim=1)
    indices = topk.indices.cpu().numpy()
    valid = topk.values.isfinite().cpu().numpy()
    return [(i, indices[i, j]) for i, j in zip(*np.where(valid))]


def hloc_parse_retrieval(path):
    retrieval = defaultdict(list)
    with open(path, "r") as f:
        for p in f.read().rstrip("\n").split("\n"):
            if len(p) == 0:
                continue
            q, r = p.split()
            retrieval[q].append(r)
    return dict(retrieval)


# ---- helpers --------------------------------------------------------------------------------
def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _small_map(tmp_path, keys, vectors, images_root=None):
    d = tmp_path / "map"
    store = MapStore(d)
    store.write_shard(keys, vectors)
    store.consolidate()
    FaissIndex.build(store.read_global()).save(d / "index.faiss")
    (d / "map.json").write_text(
        json.dumps(
            {
                "config": {"name": "test", "store_dtype": "float32"},
                "images_root": images_root,
                "descriptor_dim": vectors.shape[1],
            }
        )
    )
    return d


KEYS = ["a.jpg", "seq1/0001.jpg", "seq1/0002.jpg", "seq2/deep/x.png", "b.jpg"]


def test_export_is_read_by_hlocs_parser(tmp_path):
    rng = np.random.default_rng(0)
    vec = _unit(rng, len(KEYS), 16)
    from PIL import Image

    root = tmp_path / "images"
    for k in KEYS[:2]:
        (root / k).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30)).save(root / k)
    m = _small_map(tmp_path, KEYS, vec, str(root))
    out = tmp_path / "global-feats.h5"
    res = export_map(m, out)
    assert res == {"path": str(out), "images": 5, "dim": 16}
    assert sorted(hloc_list_h5_names(out)) == sorted(KEYS) == list_global_names(out)
    with h5py.File(out, "r") as f:
        assert isinstance(f["seq1"], h5py.Group) and isinstance(f["seq2/deep"], h5py.Group)  # nested groups
        assert f["seq1/0001.jpg"][DESCRIPTOR].dtype == np.float32 and f["seq1/0001.jpg"][DESCRIPTOR].shape == (16,)
        assert list(f["a.jpg/image_size"][()]) == [40, 30] and "image_size" not in f["b.jpg"]
    got = hloc_get_descriptors(KEYS, out).numpy()
    np.testing.assert_array_equal(got, vec)
    # a prefix places the map's images under a folder of hloc's image_dir
    export_map(m, tmp_path / "p.h5", prefix="db/", image_size=False)
    assert sorted(hloc_list_h5_names(tmp_path / "p.h5")) == sorted("db/" + k for k in KEYS)


def test_import_round_trip_and_retrieve(tmp_path):
    rng = np.random.default_rng(1)
    vec = _unit(rng, len(KEYS), 8)
    feats = write_global_features(tmp_path / "feats.h5", KEYS, vec * 2.0, as_half=True)  # hloc's default float16
    info = import_features(feats, tmp_path / "imported")
    assert info["imported"]["from"] == str(feats.resolve()) and info["counts"]["images"] == 5
    assert info["imported"]["norms"]["max"] == pytest.approx(2.0, rel=1e-3)
    assert "descriptor" in info["imported"]["queries"]
    on_disk = json.loads((tmp_path / "imported" / "map.json").read_text())
    assert on_disk["imported"]["format"].startswith("hloc") and on_disk["config"]["backbone"] == "hloc-import"
    store = MapStore(tmp_path / "imported")
    assert store.keys() == sorted(KEYS)
    order = [KEYS.index(k) for k in store.keys()]
    np.testing.assert_allclose(store.read_global(), (vec * 2.0)[order], atol=2e-3)
    # retrieval by descriptor: the image's own descriptor comes back first
    res = retrieve(tmp_path / "imported", vec, top_k=3)
    assert [r[0][0] for r in res] == KEYS and all(len(r) == 3 for r in res)
    # export the imported map again: same names and (float16-rounded) values
    export_map(tmp_path / "imported", tmp_path / "again.h5")
    names, again = read_global_features(tmp_path / "again.h5")
    assert names == sorted(KEYS)
    np.testing.assert_allclose(again, store.read_global())
    with pytest.raises(MapError, match="already holds a map"):
        import_features(feats, tmp_path / "imported")
    part = import_features(feats, tmp_path / "part", prefix=["seq1/", "b"])
    assert MapStore(tmp_path / "part").keys() == ["b.jpg", "seq1/0001.jpg", "seq1/0002.jpg"]
    assert part["imported"]["prefix"] == ["seq1/", "b"]
    with pytest.raises(MapError, match="starts with"):
        import_features(feats, tmp_path / "none", prefix="zzz/")
    norm = import_features(feats, tmp_path / "normed", normalize=True)
    assert norm["imported"]["normalized"]
    np.testing.assert_allclose(np.linalg.norm(MapStore(tmp_path / "normed").read_global(), axis=1), 1, atol=1e-5)


def test_import_rejects_local_features(tmp_path):
    with h5py.File(tmp_path / "local.h5", "w") as f:
        f.create_group("a.jpg").create_dataset("keypoints", data=np.zeros((3, 2)))
    with pytest.raises(MapError, match="no 'global_descriptor'"):
        import_features(tmp_path / "local.h5", tmp_path / "m")
    with pytest.raises(MapError, match="cannot be an hloc image name"):
        write_global_features(tmp_path / "x.h5", ["../a.jpg"], np.zeros((1, 2)))


def test_pairs_match_hlocs_pairs_from_retrieval(tmp_path):
    rng = np.random.default_rng(2)
    db_names = [f"db/{i:03d}.jpg" for i in range(30)]
    q_names = [f"query/{i:02d}.jpg" for i in range(7)] + ["db/004.jpg"]  # one query is also a database image
    db = _unit(rng, 30, 12)
    q = _unit(rng, 8, 12)
    q[-1] = db[4]
    k = 5
    ours = retrieval_pairs(q_names, q, db_names, db, k, min_score=0)
    sim = torch.einsum("id,jd->ij", torch.from_numpy(q), torch.from_numpy(db))
    invalid = np.array(q_names)[:, None] == np.array(db_names)[None]
    ref = [(q_names[i], db_names[j]) for i, j in hloc_pairs_from_score_matrix(sim, invalid, k, min_score=0)]
    assert [(a, b) for a, b, _ in ours] == ref
    assert all(b != "db/004.jpg" for a, b, _ in ours if a == "db/004.jpg")  # never paired with itself
    path = write_pairs(tmp_path / "pairs-netvlad.txt", ours)
    assert hloc_parse_retrieval(path) == read_pairs(path)
    parsed = hloc_parse_retrieval(path)
    assert list(parsed) == list(dict.fromkeys(a for a, _ in ref))
    # scores come back sorted within each query
    for name in q_names:
        s = [sc for a, _, sc in ours if a == name]
        assert s == sorted(s, reverse=True)


def test_cli_export_and_import(tmp_path):
    from click.testing import CliRunner

    from vprkit.cli import cli

    rng = np.random.default_rng(3)
    m = _small_map(tmp_path, KEYS, _unit(rng, len(KEYS), 8))
    runner = CliRunner()
    res = runner.invoke(cli, ["hloc", "export", str(m), "--out", str(tmp_path / "g.h5"), "--db-prefix", "db/"])
    assert res.exit_code == 0, res.output
    assert "5 database images, 8-d" in res.output
    assert sorted(hloc_list_h5_names(tmp_path / "g.h5")) == sorted("db/" + k for k in KEYS)
    res = runner.invoke(cli, ["hloc", "export", str(m), "--out", str(tmp_path / "g2.h5"), "--pairs", "p.txt"])
    assert res.exit_code != 0 and "both --pairs and --queries" in str(res.exception)
    res = runner.invoke(cli, ["hloc", "import", str(tmp_path / "g.h5"), "--out", str(tmp_path / "imp"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["counts"]["images"] == 5 and info["imported"]["from"] == str((tmp_path / "g.h5").resolve())


def test_opening_an_imported_map_with_models_says_how_to_query_it(tmp_path):
    import h5py
    import numpy as np
    import pytest

    from vprkit import pipeline
    from vprkit.errors import MapError
    from vprkit.maps import hloc

    with h5py.File(tmp_path / "feats.h5", "w") as f:
        for i in range(3):
            f.create_dataset(
                f"db/img{i}.jpg/global_descriptor", data=np.random.default_rng(i).random(8).astype("float32")
            )
    hloc.import_features(tmp_path / "feats.h5", tmp_path / "map")
    with pytest.raises(MapError, match="query it with descriptors of that model"):
        pipeline.open_map(tmp_path / "map")
