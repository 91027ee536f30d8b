"""Domain vocabularies: build from several datasets, analyse domains, pick the nearest for a new map."""

import numpy as np
import pytest
from PIL import Image

from vprkit import pipeline
from vprkit.aggregation.domains import PCA, suggest_groups
from vprkit.aggregation.vlad import Vocabulary
from vprkit.config import VocabularyConfig
from vprkit.images import ImageSpec
from vprkit.presets import resolve


def _dataset(root, n, style, seed):
    rng = np.random.default_rng(seed)
    for sub in ("database", "queries"):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            if style == "stripes":
                x = np.tile((np.sin(np.arange(64) * rng.uniform(0.3, 0.6)) * 120 + 128)[None, :, None], (48, 1, 3))
            else:
                x = rng.integers(0, 255, (6, 8, 3)).repeat(8, 0).repeat(8, 1)
            Image.fromarray(x.astype(np.uint8)).save(root / sub / f"{style}{i}.png")
    return root


@pytest.fixture
def config():
    return resolve("effnet-vlad").replace(image=ImageSpec((48, 64), "fixed"), vocabulary=VocabularyConfig(k=4))


def test_suggest_groups_joins_overlapping_clouds():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(0, 1, (50, 2)), rng.normal(0.5, 1, (50, 2)), rng.normal(20, 1, (50, 2))
    assert suggest_groups(["a", "b", "c"], [a, b, c]) == [["a", "b"], ["c"]]


def test_pca_recovers_main_axis():
    rng = np.random.default_rng(0)
    x = np.outer(rng.normal(size=200), [3.0, 4.0]) / 5 + rng.normal(scale=0.01, size=(200, 2))
    pca = PCA.fit(x, 1)
    assert abs(abs(pca.components[0] @ np.array([0.6, 0.8])) - 1) < 1e-3


def test_domain_vocabulary_build_analyse_and_pick(tmp_path, monkeypatch, config):
    monkeypatch.setenv("VPRKIT_VOCABULARIES", str(tmp_path / "vocabs"))
    stripes1 = _dataset(tmp_path / "stripes1", 6, "stripes", 0)
    stripes2 = _dataset(tmp_path / "stripes2", 6, "stripes", 1)
    blocks = _dataset(tmp_path / "blocks", 6, "blocks", 2)
    p1 = pipeline.build_domain_vocabulary("striped", [stripes1, stripes2], config, progress=False)
    pipeline.build_domain_vocabulary("blocky", [blocks], config, progress=False)
    voc = Vocabulary.load(p1)
    assert voc.k == 4 and voc.metadata["datasets"] == ["stripes1", "stripes2"]
    assert set(voc.metadata["dataset_gem_centroids"]) == {"stripes1", "stripes2"}
    analysis = pipeline.analyse_dataset_domains(
        [stripes1, stripes2, blocks], config, plot=tmp_path / "d.png", progress=False
    )
    assert (tmp_path / "d.png").stat().st_size > 1000
    assert ["blocks"] in analysis.groups
    # a new map of striped images picks the striped domain, and `--vocab auto` uses it
    new = _dataset(tmp_path / "new", 5, "stripes", 7)
    name, dists = pipeline.pick_domain(new / "database", config)
    assert name == "striped" and dists["striped"] < dists["blocky"]
    info = pipeline.build_map(
        new / "database",
        tmp_path / "map",
        config.replace(vocabulary=VocabularyConfig(k=4, source="auto")),
        progress=False,
        log=lambda s: None,
    )
    assert info["vocabulary"]["checksum"] == voc.checksum


def test_domain_vocabulary_of_other_backbone_is_refused(tmp_path, monkeypatch, config):
    monkeypatch.setenv("VPRKIT_VOCABULARIES", str(tmp_path / "vocabs"))
    ds = _dataset(tmp_path / "s", 4, "stripes", 0)
    pipeline.build_domain_vocabulary("striped", [ds], config, progress=False)
    other = config.replace(
        image=ImageSpec((96, 128), "fixed"), vocabulary=VocabularyConfig(k=4, source="domain:striped")
    )
    from vprkit.errors import VocabularyMismatchError

    with pytest.raises(VocabularyMismatchError, match="image"):
        pipeline.build_map(ds / "database", tmp_path / "map", other, progress=False)
    with pytest.raises(Exception, match="not found"):
        pipeline.build_map(
            ds / "database",
            tmp_path / "map2",
            config.replace(vocabulary=VocabularyConfig(k=4, source="domain:nope")),
            progress=False,
        )
