"""One typed configuration: option schemas, validation, resolve(), re-ranking in the config, device, environment."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vprkit import options as opts
from vprkit.config import Config, ImageSpec, VocabularyConfig, check_device
from vprkit.environment import RESULT_VARIABLES, VARIABLES, recorded_environment
from vprkit.errors import ConfigError
from vprkit.presets import (
    DEFAULT_PRESET,
    get_rerank_config,
    list_presets,
    list_rerank_configs,
    map_extensions_for,
    patch_options,
    resolve,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "vprkit"
HEAVY = (
    "torch",
    "numpy",
    "faiss",
    "h5py",
    "PIL",
    "vprkit.backbones",
    "vprkit.aggregation",
    "vprkit.maps",
    "vprkit.rerank",
    "vprkit.segments",
    "vprkit.images",
    "vprkit.pipeline",
    "vprkit.retrieval",
)


# ---- resolving is light ---------------------------------------------------------------------------


def test_resolving_a_preset_imports_no_library():
    code = (
        "import sys, vprkit.presets as p\n"
        "p.resolve('effnet2-vlad-ma4'); p.resolve('anyloc-vits14'); p.resolve('segvlad-slic', rerank='speed')\n"
        "p.get_rerank_config('performance-xfeat'); [p.resolve(c.name) for c in p.list_presets()]\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_preset_validates_and_roundtrips():
    names = {c.name for c in list_presets()}
    assert {
        "effnet-vlad",
        "effnet2-vlad-ma4",
        "netvlad-vgg16",
        "anyloc-vits14",
        "anyloc-gem-vitb14",
        "dinov2-cls-vitg14",
        "segvlad-slic",
        "segvlad-sam",
        "effnet2-vlad-x3",
    } <= names
    assert DEFAULT_PRESET in names
    for c in list_presets():
        assert resolve(c.name) == c
        assert Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert {r.name for r in list_rerank_configs()} == {
        "performance",
        "performance-reference",
        "speed",
        "storage",
        "performance-patch-only",
        "speed-patch-only",
        "storage-patch-only",
        "performance-xfeat",
        "speed-xfeat",
        "performance-disk",
        "speed-disk",
    }


# ---- typed options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(backbone_options={"blok": 10}),
            r"backbone 'efficientnet-lite2': unknown option 'blok' \(did you mean 'block'\?\)",
        ),
        (
            dict(backbone_options={"block": "10"}),
            r"option 'block' = '10' is not allowed; allowed: an integer ≥ 0 and ≤ 20 or None",
        ),
        (dict(backbone_options={"block": 21}), r"'block' = 21 is not allowed \(out of range\)"),
        (dict(backbone="efficientnet-lite3"), r"unknown backbone 'efficientnet-lite3' \(did you mean"),
        (dict(aggregator="vald"), r"unknown aggregator 'vald' \(did you mean 'vlad'\?\)"),
        (dict(aggregator_options={"assignments": 0}), r"aggregator 'vlad': option 'assignments' = 0"),
        (dict(aggregator_options={"assignments": 97}), r"'assignments' = 97 is more than the vocabulary's K = 96"),
        (
            dict(aggregator_options={"centres": "rwa"}),
            r"'centres' = 'rwa' \(did you mean 'raw'\?\).*allowed: one of 'unit', 'raw'",
        ),
        (dict(aggregator_options={"k": 32}), r"'k' = 32 differs from the vocabulary's K = 96"),
        (dict(aggregator="cls", aggregator_options={}), r"aggregator 'cls' needs a backbone with a global token"),
        (dict(retriever="segvlad"), r"retriever 'segvlad' needs the 'segments' extension"),
        (dict(retriever_options={"k_prime": 5}), r"retriever 'global': unknown option 'k_prime'; allowed: \(none"),
        (dict(extensions={"patchs": {}}), r"unknown extension 'patchs' \(did you mean 'patches'\?\)"),
        (dict(extensions={"patches": {"dtype": "int4"}}), r"extension 'patches': option 'dtype' = 'int4'"),
        (dict(extensions={"patches": {"scales": [[0, 1]]}}), r"option 'scales'"),
        (
            dict(extensions={"patches": {"backbone": "xfeat", "backbone_options": {"weight": "x"}}}),
            r"patch backbone 'xfeat': unknown option 'weight' \(did you mean 'weights'\?\)",
        ),
        (
            dict(extensions={"segments": {"segmenter": "slic", "segmenter_options": {"n_segment": 5}}}),
            r"segmenter 'slic': unknown option 'n_segment' \(did you mean 'n_segments'\?\)",
        ),
        (dict(extensions={"segments": {"segmenter": "slci"}}), r"unknown segmenter 'slci' \(did you mean 'slic'\?\)"),
        (
            dict(extensions={"segments": {"whiten": "sometimes"}}),
            r"option 'whiten' = 'sometimes'.*true or false or one of 'auto'",
        ),
    ],
)
def test_bad_options_are_named_with_what_is_allowed(change, message):
    with pytest.raises(ConfigError, match=message):
        resolve(DEFAULT_PRESET, **change)


def test_dinov2_options_and_their_combinations():
    with pytest.raises(ConfigError, match=r"'facet' = 'valeu' \(did you mean 'value'\?\)"):
        resolve("anyloc-vits14", backbone_options={"facet": "valeu"})
    with pytest.raises(ConfigError, match=r"'layer' = 12 does not exist; allowed: 0..11"):
        resolve("anyloc-vits14", backbone_options={"layer": 12})
    with pytest.raises(ConfigError, match="final_norm"):
        resolve("anyloc-vits14", backbone_options={"layer": 3, "final_norm": True})
    with pytest.raises(ConfigError, match=r"unknown keys \['dept'\] \(did you mean 'depth'\?\)"):
        resolve("anyloc-vits14", backbone_options={"config": {"dept": 3}})
    tiny = resolve(
        "anyloc-vits14",
        backbone_options={
            "layer": 1,
            "pretrained": False,
            "weights": Path("w.pth"),
            "config": {"embed_dim": 32, "depth": 3, "num_heads": 2},
        },
    )
    assert tiny.backbone_options["layer"] == 1
    with pytest.raises(ConfigError, match="allowed: 0..2"):
        resolve("anyloc-vits14", backbone_options={"layer": 3, "config": {"depth": 3}})


def test_unknown_preset_field_and_vocabulary_setting_suggest_the_name():
    with pytest.raises(ConfigError, match=r"unknown preset 'effnet2-vlad-ma5' \(did you mean 'effnet2-vlad-ma4'\?\)"):
        resolve("effnet2-vlad-ma5")
    with pytest.raises(ConfigError, match=r"unknown Config field 'batchsize' \(did you mean 'batch_size'\?\)"):
        resolve(DEFAULT_PRESET, batchsize=4)
    with pytest.raises(ConfigError, match=r"unknown vocabulary setting 'kk' \(did you mean 'k'\?\)"):
        resolve(DEFAULT_PRESET, vocabulary={"kk": 4})
    with pytest.raises(ConfigError, match=r"unknown re-ranking preset 'sped' \(did you mean 'speed'\?\)"):
        resolve(DEFAULT_PRESET, rerank="sped")


def test_every_schema_default_is_valid():
    for (kind, name), sch in opts.SCHEMAS.items():
        for o in sch.options:
            opts.check_option(f"{kind} {name!r}", o, o.default)


# ---- schemas cannot drift from the factories --------------------------------------------------------


def _parameters(factory, injected=()) -> dict[str, object]:
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.name not in ("self", *injected) and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def _assert_matches(kind: str, name: str, params: dict[str, object]) -> None:
    sch = opts.schema(kind, name)
    declared = sch.defaults()
    for key in set(declared) - set(params):
        assert (kind, name, key) in opts.PENDING, f"{kind} {name}: schema option {key!r} is not a factory parameter"
    assert set(params) <= set(declared), (
        f"{kind} {name}: factory options {sorted(set(params) - set(declared))} lack a schema"
    )
    for key, default in params.items():
        assert declared[key] == default, (
            f"{kind} {name}: option {key!r} defaults to {default!r}, schema says {declared[key]!r}"
        )


def test_schemas_match_the_factories_signatures():
    from vprkit.aggregation import AGGREGATORS
    from vprkit.backbones import BACKBONES
    from vprkit.backbones.efficientnet import EfficientNetLite

    for name in BACKBONES.names():
        factory = EfficientNetLite if name.startswith("efficientnet") else BACKBONES.get(name)
        _assert_matches("backbone", name, _parameters(factory, ("variant",)))
    for name in AGGREGATORS.names():
        _assert_matches("aggregator", name, _parameters(AGGREGATORS.get(name), ("backbone_dim", "vocabulary")))
    assert set(opts.names("backbone")) == set(BACKBONES.names())
    assert set(opts.names("aggregator")) == set(AGGREGATORS.names())


def test_stage_schemas_match_their_code():
    import vprkit.rerank  # noqa: F401 - registers the patches extension
    import vprkit.segments  # noqa: F401 - registers segmenters, the segments extension, the segvlad retriever
    from vprkit.maps.extensions import EXTENSIONS
    from vprkit.rerank import extension as patches
    from vprkit.retrieval import RETRIEVERS
    from vprkit.segments import retriever as segvlad
    from vprkit.segments.base import SEGMENTERS

    for name in SEGMENTERS.names():
        _assert_matches("segmenter", name, _parameters(SEGMENTERS.get(name)))
    assert set(opts.names("segmenter")) == set(SEGMENTERS.names())
    _assert_matches("extension", "patches", dict(patches.DEFAULTS))
    seg = opts.schema("extension", "segments").defaults()
    assert {k: v for k, v in seg.items() if k != "fit_images"} == segvlad.DEFAULTS
    assert set(opts.names("extension")) == set(EXTENSIONS.names())
    assert set(opts.schema("retriever", "segvlad").names()) == set(segvlad.SegVLADRetriever.OPTIONS)
    assert set(opts.names("retriever")) == set(RETRIEVERS.names())
    from vprkit.segments import voting
    from vprkit.segments.sam import MODEL_TYPES

    assert opts.SEGVLAD_VOTINGS == voting.VOTINGS and opts.SAM_MODEL_TYPES == MODEL_TYPES
    assert opts.PATCH_DTYPES == patches.STORAGE_DTYPES


def test_model_tables_match_the_backbones():
    from efficientnet_lite_pytorch import EfficientNet

    from vprkit.backbones import dinov2, efficientnet

    assert {a: (c.embed_dim, c.depth, c.default_layer) for a, c in dinov2.ARCHS.items()} == opts.DINOV2_ARCHS
    assert opts.DINOV2_MODELS == dinov2.MODEL_NAMES and opts.DINOV2_FACETS == dinov2.FACETS
    assert set(opts.VIT_CONFIG_FIELDS) == set(dinov2.ViTConfig.__dataclass_fields__)
    for variant, (default, n) in opts.EFFICIENTNET_BLOCKS.items():
        assert efficientnet.VARIANTS[variant][0] == default
        assert len(EfficientNet.from_name(variant)._blocks) == n


# ---- resolve(): the one assembly ---------------------------------------------------------------------


def test_resolve_applies_every_setting():
    c = resolve(
        "anyloc-vits14",
        image_size=(112, 224),
        memory_budget_mb=64,
        float16=True,
        vocabulary="domain:indoor",
        rerank="speed",
        device="cuda:1",
        batch_size=1,
    )
    assert c.image == ImageSpec((112, 224), "resize_crop")  # the preset's resize mode is kept
    assert (c.memory_budget_mb, c.store_dtype, c.vocabulary.source, c.device, c.batch_size) == (
        64,
        "float16",
        "domain:indoor",
        "cuda:1",
        1,
    )
    assert c.rerank == get_rerank_config("speed")
    assert c.extensions["patches"] == map_extensions_for("speed", c)["patches"]
    assert "patches" not in resolve(DEFAULT_PRESET, rerank="speed", store_rerank=False).extensions
    v = resolve(DEFAULT_PRESET, vocabulary={"k": 64, "max_bytes": 2**20}).vocabulary
    assert (v.k, v.max_bytes, v.source) == (64, 2**20, "map")
    # made absolute: map.json records it and later commands may run from another folder
    assert resolve(DEFAULT_PRESET, weights="w.pth").backbone_options == {
        "block": 14,
        "weights": str(Path.cwd() / "w.pth"),
    }
    custom = Config(backbone="efficientnet-lite0", aggregator="gem")
    assert resolve(custom) is custom


def test_cli_assembles_through_resolve():
    from vprkit.cli.core import _config

    flags = _config("effnet-vlad", True, "storage", "domain:x", None, 32, (120, 160), "cpu")
    assert flags == resolve(
        "effnet-vlad",
        float16=True,
        rerank="storage",
        vocabulary="domain:x",
        memory_budget_mb=32,
        image_size=(120, 160),
        device="cpu",
    )


# ---- re-ranking is configuration ---------------------------------------------------------------------


def test_rerank_config_roundtrips_with_the_config():
    c = resolve(DEFAULT_PRESET, rerank="performance-xfeat")
    d = json.loads(json.dumps(c.to_dict()))
    assert d["rerank"]["scales"] == [[2, 1], [5, 1], [8, 1]] and d["rerank"]["backbone"] == "xfeat"
    assert Config.from_dict(d) == c
    old = {k: v for k, v in c.to_dict().items() if k not in ("rerank", "device")}  # a map.json of earlier versions
    loaded = Config.from_dict(old)
    assert loaded.rerank is None and loaded.device == "auto"


def test_rerank_config_checks():
    base = get_rerank_config("performance")
    with pytest.raises(ConfigError, match="3 patch scales but 2 weights"):
        base.replace(weights=(0.5, 0.5))
    with pytest.raises(ConfigError, match=r"unknown spatial scorer 'ransca' \(did you mean 'ransac'\?\)"):
        base.replace(scorer="ransca")
    with pytest.raises(ConfigError, match="global_weight"):
        base.replace(global_weight=1.5)
    with pytest.raises(ConfigError, match="at least 2 candidates"):
        base.replace(shortlist=1)
    with pytest.raises(ConfigError, match="int4"):
        base.replace(dtype="int4")
    with pytest.raises(ConfigError, match=r"patch backbone 'disk': unknown option 'pixelnorm'"):
        base.replace(backbone="disk", backbone_options={"pixelnorm": False})
    with pytest.raises(ConfigError, match="unknown backbone 'xfaet'"):
        base.replace(backbone="xfaet")


def test_patch_options_lend_a_netvlad_checkpoint():
    vgg = resolve("netvlad-vgg16", aggregator_options={"checkpoint": "/ck/pitts.pth.tar"})
    assert patch_options("speed", vgg)["checkpoint"] == "/ck/pitts.pth.tar"
    assert "checkpoint" not in patch_options("speed-xfeat", vgg)  # a local-feature backbone has its own layer
    assert patch_options(get_rerank_config("storage"))["dtype"] == "int8"


# ---- device -------------------------------------------------------------------------------------------


def test_device_is_checked_without_torch_and_does_not_change_the_map():
    for ok in ("auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"):
        assert check_device(ok) == ok
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "", None, "mps:1"):
        with pytest.raises(ConfigError, match="device"):
            Config(device=bad)
    with pytest.raises(ConfigError, match=r"did you mean 'cuda'"):
        resolve(DEFAULT_PRESET, device="cdua")
    a = resolve(DEFAULT_PRESET)
    b = resolve(DEFAULT_PRESET, device="cpu", memory_budget_mb=64, rerank="speed", store_rerank=False)
    assert a.map_settings() == b.map_settings() and a.to_dict() != b.to_dict()
    assert a.map_settings() != resolve(DEFAULT_PRESET, float16=True).map_settings()


def test_config_keeps_its_behaviour():
    c = Config()
    assert c.image == ImageSpec() and c.rerank is None and c.device == "auto"
    assert c.replace(batch_size=4).batch_size == 4
    assert dataclasses.replace(c.vocabulary, k=8) == VocabularyConfig(k=8)
    from vprkit.images import ImageSpec as FromImages

    assert FromImages is ImageSpec
    with pytest.raises(ConfigError, match="image size"):
        ImageSpec((240.5, 320))


# ---- environment ----------------------------------------------------------------------------------------


def test_every_environment_variable_read_is_documented():
    read = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        read |= set(re.findall(r"\"((?:VPRKIT|HF|TORCH|XDG)_[A-Z_]+)\"", text))
        read |= set(re.findall(r"environ(?:\.get)?[\[(]\"([A-Z_]+)\"", text))
    documented = {v.name for v in VARIABLES}
    assert read <= documented, f"undocumented: {sorted(read - documented)}"


def test_recorded_environment_keeps_the_result_changing_ones():
    env = {
        "VPRKIT_CACHE": "/c",
        "VPRKIT_OFFLINE": "1",
        "TORCH_HOME": "/t",
        "VPRKIT_ONEDNN": "0",
        "HOME": "/h",
        "VPRKIT_DATA": "",
    }
    assert recorded_environment(env) == {"TORCH_HOME": "/t", "VPRKIT_CACHE": "/c", "VPRKIT_ONEDNN": "0"}
    assert "VPRKIT_OFFLINE" not in RESULT_VARIABLES and "VPRKIT_SAM_CHECKPOINT" in RESULT_VARIABLES


@pytest.mark.parametrize("seed", ["x", -1, 1.5, True])
def test_a_vocabulary_seed_that_is_not_a_whole_number_is_refused(seed):
    """A map.json edited to seed 'x' reached numpy's SeedSequence (a TypeError) when the calibration was fitted."""
    with pytest.raises(ConfigError, match="seed"):
        VocabularyConfig(seed=seed)
