"""Proof that vprkit's DINOv2 is the official network, loads both checkpoint layouts, and feeds AnyLoc VLAD.

Everything runs offline on random weights. The references below are written from the block
equations (conv patch embedding, [CLS, registers, patches] tokens, pre-norm attention/MLP blocks
with LayerScale) in float64 and read the *official* state-dict key names directly, so they share
no code with ``vprkit.backbones.dinov2`` beyond the tensors they are given.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from vprkit.aggregation.vlad import hard_vlad
from vprkit.backbones import BACKBONES, build_backbone
from vprkit.backbones import dinov2 as dv2
from vprkit.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from vprkit.errors import ConfigError, WeightsNotFoundError

PATCH = 14
FACETS = ("query", "key", "value", "token")
# Tiny ViTs: 4×4 position grid, so 56×56 px is the native (no interpolation) size.
TINY = dict(embed_dim=48, depth=3, num_heads=4, pos_grid=4)
TINY_G = dict(TINY, ffn="swiglu")  # ViT-G's SwiGLU FFN layout on a tiny model
NATIVE = TINY["pos_grid"] * PATCH
REL_TOL = 1e-5


# ------------------------------------------------------------------------------------------------
# Random checkpoints in the official torch.hub layout, built from the key list by hand.


def swiglu_hidden(dim: int) -> int:
    return (int(4 * dim * 2 / 3) + 7) // 8 * 8


def official_state_dict(cfg: dict, registers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ``dinov2_*_pretrain.pth``-style state dict (gammas and norms random too, so every
    parameter matters)."""
    g = torch.Generator().manual_seed(seed)
    d, depth, m = cfg["embed_dim"], cfg["depth"], cfg["pos_grid"]

    def rnd(*shape: int, std: float = 0.05, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(*shape, generator=g)

    sd = {
        "cls_token": rnd(1, 1, d, std=0.5),
        "pos_embed": rnd(1, m * m + 1, d, std=0.5),
        "mask_token": torch.zeros(1, d),
        "patch_embed.proj.weight": rnd(d, 3, PATCH, PATCH),
        "patch_embed.proj.bias": rnd(d),
        "norm.weight": rnd(d, std=0.2, mean=1.0),
        "norm.bias": rnd(d),
    }
    if registers:
        sd["register_tokens"] = rnd(1, registers, d, std=0.5)
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": rnd(d, std=0.2, mean=1.0),
                p + "norm1.bias": rnd(d, std=0.1),
                p + "attn.qkv.weight": rnd(3 * d, d, std=0.15),
                p + "attn.qkv.bias": rnd(3 * d, std=0.1),
                p + "attn.proj.weight": rnd(d, d, std=0.1),
                p + "attn.proj.bias": rnd(d),
                p + "ls1.gamma": rnd(d, std=0.3, mean=0.5),
                p + "norm2.weight": rnd(d, std=0.2, mean=1.0),
                p + "norm2.bias": rnd(d, std=0.1),
                p + "ls2.gamma": rnd(d, std=0.3, mean=0.5),
            }
        )
        if cfg.get("ffn") == "swiglu":
            h = swiglu_hidden(d)
            sd.update(
                {
                    p + "mlp.w12.weight": rnd(2 * h, d, std=0.1),
                    p + "mlp.w12.bias": rnd(2 * h),
                    p + "mlp.w3.weight": rnd(d, h, std=0.1),
                    p + "mlp.w3.bias": rnd(d),
                }
            )
        else:
            sd.update(
                {
                    p + "mlp.fc1.weight": rnd(4 * d, d, std=0.1),
                    p + "mlp.fc1.bias": rnd(4 * d),
                    p + "mlp.fc2.weight": rnd(d, 4 * d, std=0.1),
                    p + "mlp.fc2.bias": rnd(d),
                }
            )
    return sd


def hub_to_hf_by_hand(sd: dict[str, torch.Tensor], depth: int, dim: int) -> dict[str, torch.Tensor]:
    """The Hugging Face ``Dinov2Model`` names (transformers' convert_dinov2_to_hf.py mapping)."""
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    if "register_tokens" in sd:
        hf["embeddings.register_tokens"] = sd["register_tokens"]
    for i in range(depth):
        s, t = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = sd[s + f"attn.qkv.{kind}"]
            hf[t + f"attention.attention.query.{kind}"] = qkv[:dim].clone()
            hf[t + f"attention.attention.key.{kind}"] = qkv[dim : 2 * dim].clone()
            hf[t + f"attention.attention.value.{kind}"] = qkv[2 * dim :].clone()
            hf[t + f"attention.output.dense.{kind}"] = sd[s + f"attn.proj.{kind}"]
            hf[t + f"norm1.{kind}"] = sd[s + f"norm1.{kind}"]
            hf[t + f"norm2.{kind}"] = sd[s + f"norm2.{kind}"]
            if s + "mlp.w12.weight" in sd:
                hf[t + f"mlp.weights_in.{kind}"] = sd[s + f"mlp.w12.{kind}"]
                hf[t + f"mlp.weights_out.{kind}"] = sd[s + f"mlp.w3.{kind}"]
            else:
                hf[t + f"mlp.fc1.{kind}"] = sd[s + f"mlp.fc1.{kind}"]
                hf[t + f"mlp.fc2.{kind}"] = sd[s + f"mlp.fc2.{kind}"]
        hf[t + "layer_scale1.lambda1"] = sd[s + "ls1.gamma"]
        hf[t + "layer_scale2.lambda1"] = sd[s + "ls2.gamma"]
    return hf


# ------------------------------------------------------------------------------------------------
# An independent float64 reference from the equations.


def ref_pos_embed(pos: torch.Tensor, h: int, w: int, registers: bool) -> torch.Tensor:
    """The official interpolate_pos_encoding: offset 0.1 + scale_factor (plain) / size + antialias (_reg)."""
    m = math.isqrt(pos.shape[1] - 1)
    if (h, w) == (m, m):
        return pos
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
    if registers:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    else:
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic")
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)], 1)


def ref_layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def reference(sd, pixels, num_heads, layer, facet, final_norm=False, dtype=torch.float64):
    """Patch features (B×h×w×D) and CLS of ``facet`` at block ``layer`` (float64 unless ``dtype``)."""
    sd = {k: v.to(dtype) for k, v in sd.items()}
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1)
    x = (pixels.to(dtype) - mean) / std
    b, _, hp, wp = x.shape
    h, w = hp // PATCH, wp // PATCH
    tok = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    tok = tok.flatten(2).transpose(1, 2)  # B×(h·w)×D, row-major
    d = tok.shape[-1]
    regs = "register_tokens" in sd
    tok = torch.cat([sd["cls_token"].expand(b, 1, d), tok], 1) + ref_pos_embed(sd["pos_embed"], h, w, regs)
    if regs:  # registers go after CLS and get no position embedding
        r = sd["register_tokens"]
        tok = torch.cat([tok[:, :1], r.expand(b, -1, -1), tok[:, 1:]], 1)
    hd = d // num_heads
    for i in range(layer + 1):
        p = f"blocks.{i}."
        y = ref_layer_norm(tok, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
        if i == layer and facet != "token":
            out = {"query": q, "key": k, "value": v}[facet]
            break
        heads = lambda t: t.reshape(b, -1, num_heads, hd).transpose(1, 2)  # noqa: E731
        att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (att @ heads(v)).transpose(1, 2).reshape(b, -1, d)
        tok = tok + sd[p + "ls1.gamma"] * (o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"])
        y = ref_layer_norm(tok, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        if p + "mlp.w12.weight" in sd:
            x12 = y @ sd[p + "mlp.w12.weight"].T + sd[p + "mlp.w12.bias"]
            x1, x2 = x12.chunk(2, -1)
            m = (x1 * torch.sigmoid(x1) * x2) @ sd[p + "mlp.w3.weight"].T + sd[p + "mlp.w3.bias"]
        else:
            a = y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
            a = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
            m = a @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        tok = tok + sd[p + "ls2.gamma"] * m
        out = tok
    if final_norm:
        out = ref_layer_norm(out, sd["norm.weight"], sd["norm.bias"])
    first = 1 + (sd["register_tokens"].shape[1] if regs else 0)
    return out[:, first:].reshape(b, h, w, d), out[:, 0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def tiny_model(name, sd, layer, facet, config=TINY, **kw):
    model = build_backbone(name, pretrained=False, layer=layer, facet=facet, config=config, **kw)
    model.load_checkpoint(sd)
    return model


def pixels(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# (b) features equal the reference, for all facets, with and without registers, S- and G-style FFN.


@pytest.mark.parametrize("facet", FACETS)
@pytest.mark.parametrize(
    "name,config",
    [
        ("dinov2_vits14", TINY),
        ("dinov2_vits14_reg", TINY),
        ("dinov2_vitg14", TINY_G),
        ("dinov2_vitg14_reg", TINY_G),
    ],
)
def test_facets_match_reference_at_native_grid(name, config, facet):
    regs = dv2.NUM_REGISTERS if name.endswith("_reg") else 0
    sd = official_state_dict(config, regs)
    x = pixels(2, NATIVE, NATIVE)
    for layer in (1, config["depth"] - 1):
        feats = tiny_model(name, sd, layer, facet, config)(x)
        want, want_cls = reference(sd, x, config["num_heads"], layer, facet)
        assert feats.patches.shape == (2, TINY["pos_grid"], TINY["pos_grid"], config["embed_dim"])
        assert feats.stride == PATCH and feats.image_size == (NATIVE, NATIVE)
        assert rel_err(feats.patches, want) < REL_TOL
        assert rel_err(feats.global_token, want_cls) < REL_TOL


@pytest.mark.parametrize("facet", ["value", "token"])
@pytest.mark.parametrize("name,config", [("dinov2_vits14_reg", TINY), ("dinov2_vitg14", TINY_G)])
def test_portable_path_matches_reference(name, config, facet, monkeypatch):
    """Without oneDNN's fused kernels (other CPUs, other torch builds) the result is the same."""
    monkeypatch.setattr(dv2, "_ONEDNN", False)
    sd = official_state_dict(config, dv2.NUM_REGISTERS if name.endswith("_reg") else 0)
    x = pixels(2, NATIVE, NATIVE)
    feats = tiny_model(name, sd, config["depth"] - 1, facet, config)(x)
    want, want_cls = reference(sd, x, config["num_heads"], config["depth"] - 1, facet)
    assert rel_err(feats.patches, want) < REL_TOL and rel_err(feats.global_token, want_cls) < REL_TOL


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_position_interpolation_matches_official_formula(name):
    """At a non-native, non-square grid the position embeddings are resampled exactly as upstream."""
    regs = name.endswith("_reg")
    sd = official_state_dict(TINY, dv2.NUM_REGISTERS if regs else 0)
    h, w = 3 * PATCH, 6 * PATCH
    model = tiny_model(name, sd, TINY["depth"] - 1, "token")
    got = dv2.interpolate_pos_embed(model.pos_embed, (3, 6), model.cfg)
    assert torch.equal(got, ref_pos_embed(sd["pos_embed"], 3, 6, regs))
    # the plain and register models really do differ (offset+scale vs size+antialias)
    flipped = dataclasses.replace(
        model.cfg, interpolate_offset=0.0 if not regs else 0.1, interpolate_antialias=not regs
    )
    other = dv2.interpolate_pos_embed(model.pos_embed, (3, 6), flipped)
    assert not torch.allclose(got, other)
    x = pixels(1, h, w)
    want, want_cls = reference(sd, x, TINY["num_heads"], TINY["depth"] - 1, "token")
    feats = model(x)
    assert feats.grid == (3, 6)
    assert rel_err(feats.patches, want) < REL_TOL and rel_err(feats.global_token, want_cls) < REL_TOL


def test_final_norm_option_matches_reference():
    sd = official_state_dict(TINY, 0)
    x = pixels(1, NATIVE, NATIVE)
    model = tiny_model("dinov2_vits14", sd, 2, "token", final_norm=True)
    want, _ = reference(sd, x, TINY["num_heads"], 2, "token", final_norm=True)
    assert rel_err(model(x).patches, want) < REL_TOL
    assert model.identity()["final_norm"] is True


def test_full_size_vits14_value_and_token_match_reference():
    """The real ViT-S/14 shape (384-d, 6 heads, 37×37 positions) at 112×168 (an interpolated, non-square grid)."""
    cfg = dict(embed_dim=384, depth=12, num_heads=6, pos_grid=37)
    sd = official_state_dict(cfg, 0, seed=3)
    x = pixels(1, 8 * PATCH, 12 * PATCH)
    for layer, facet in ((10, "value"), (11, "token")):
        model = build_backbone("dinov2_vits14", pretrained=False, layer=layer, facet=facet)
        model.load_checkpoint(sd)
        assert model.dim == 384 and model.size_multiple == PATCH
        feats = model(x)
        want, want_cls = reference(sd, x, 6, layer, facet)
        assert feats.patches.shape == (1, 8, 12, 384)
        # Over 11–12 random blocks float32 rounding alone reaches a few 1e-5 (the textbook float32
        # computation of the same equations is that far from float64): ask to be as good within 3×.
        plain32, plain32_cls = reference(sd, x, 6, layer, facet, dtype=torch.float32)
        tol = max(REL_TOL, 3 * rel_err(plain32, want))
        assert rel_err(feats.patches, want) < tol
        assert rel_err(feats.global_token, want_cls) < max(REL_TOL, 3 * rel_err(plain32_cls, want_cls))


def test_autograd_path_equals_inference_path():
    """With gradients on, the portable ``F.linear`` path runs; it must give the same block output."""
    sd = official_state_dict(TINY, 0)
    model = tiny_model("dinov2_vits14", sd, 2, "token")
    tokens = model.prepare_tokens(model.normalise(pixels(1, NATIVE, NATIVE)))
    with torch.inference_mode():
        fast = model.blocks[0](tokens)
    with torch.enable_grad():
        plain = model.blocks[0](tokens)
    assert rel_err(fast, plain) < REL_TOL


# ------------------------------------------------------------------------------------------------
# (a) the same weights through the hub file, the chunked hub file, an HF file and an HF folder.


@pytest.mark.parametrize("name,config", [("dinov2_vits14", TINY), ("dinov2_vitg14_reg", TINY_G)])
def test_hub_and_hugging_face_layouts_give_the_same_features(tmp_path, name, config):
    regs = dv2.NUM_REGISTERS if name.endswith("_reg") else 0
    sd = official_state_dict(config, regs, seed=5)
    hub_file = tmp_path / dv2.checkpoint_filename(name)
    torch.save(sd, hub_file)
    chunked = {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in sd.items()}
    torch.save(chunked, tmp_path / "chunked.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    hf = hub_to_hf_by_hand(sd, config["depth"], config["embed_dim"])
    torch.save({f"dinov2.{k}": v for k, v in hf.items()}, tmp_path / "hf_classifier.bin")  # prefixed keys
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(hf, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "dinov2_with_registers" if regs else "dinov2",
                "hidden_size": config["embed_dim"],
                "num_hidden_layers": config["depth"],
                "num_attention_heads": config["num_heads"],
                "patch_size": PATCH,
                "use_swiglu_ffn": config.get("ffn") == "swiglu",
                **({"num_register_tokens": regs} if regs else {}),
            }
        )
    )
    x = pixels(2, NATIVE, 2 * NATIVE)
    for facet in ("value", "token"):
        kw = dict(layer=config["depth"] - 1, facet=facet, config=config)
        ref = build_backbone(name, weights=hub_file, **kw)(x)
        for source in (
            tmp_path,
            tmp_path / "chunked.pth",
            tmp_path / "legacy.pth",
            tmp_path / "hf_classifier.bin",
            folder,
        ):
            got = build_backbone(name, weights=source, **kw)(x)
            assert rel_err(got.patches, ref.patches) <= REL_TOL, source
            assert rel_err(got.global_token, ref.global_token) <= REL_TOL, source
    assert dv2.normalise_state_dict(hf).keys() == {k for k in sd}


def test_hf_folder_of_another_model_is_refused(tmp_path):
    sd = official_state_dict(TINY, 0)
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(hub_to_hf_by_hand(sd, TINY["depth"], TINY["embed_dim"]), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 768, "num_hidden_layers": TINY["depth"]}))
    with pytest.raises(ConfigError, match="hidden_size=768"):
        build_backbone("dinov2_vits14", weights=folder, layer=1, config=TINY)


def test_register_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(official_state_dict(TINY, 0), path)
    with pytest.raises(ConfigError, match="without register tokens"):
        build_backbone("dinov2_vits14_reg", weights=path, layer=1, config=TINY)


def test_safetensors_without_the_package_names_it(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    sd = hub_to_hf_by_hand(official_state_dict(TINY, 0), TINY["depth"], TINY["embed_dim"])
    try:
        from safetensors.torch import save_file
    except ModuleNotFoundError:
        (folder / "model.safetensors").write_bytes(b"\0" * 16)
        with pytest.raises(ConfigError, match="pip install safetensors"):
            build_backbone("dinov2_vits14", weights=folder, layer=1, config=TINY)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
        assert build_backbone("dinov2_vits14", weights=folder, layer=1, config=TINY).dim == TINY["embed_dim"]


# ------------------------------------------------------------------------------------------------
# Weight resolution: caches, then a clear error offline.


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    for var, sub in (
        ("VPRKIT_CACHE", "vprkit"),
        ("TORCH_HOME", "torch"),
        ("HF_HOME", "hf"),
        ("HF_HUB_CACHE", "hf/hub"),
        ("XDG_CACHE_HOME", "xdg"),
    ):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("VPRKIT_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitg14_reg"])
def test_missing_weights_error_names_the_file(empty_caches, name):
    with pytest.raises(WeightsNotFoundError) as err:
        build_backbone(name)
    msg = str(err.value)
    assert dv2.checkpoint_filename(name) in msg
    assert dv2.checkpoint_url(name) in msg and dv2.hf_repo_id(name) in msg
    assert dv2.checkpoint_filename("dinov2_vitg14_reg") == "dinov2_vitg14_reg4_pretrain.pth"
    assert (
        dv2.checkpoint_url("dinov2_vitg14_reg")
        == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"
    )


def test_weights_found_in_torch_hub_and_hugging_face_caches(empty_caches):
    sd = official_state_dict(TINY, 0, seed=7)
    x = pixels(1, NATIVE, NATIVE)
    kw = dict(layer=2, facet="value", config=TINY)
    hf_snapshot = empty_caches / "hf" / "hub" / "models--facebook--dinov2-small" / "snapshots" / "0123abc"
    hf_snapshot.mkdir(parents=True)
    torch.save(hub_to_hf_by_hand(sd, TINY["depth"], TINY["embed_dim"]), hf_snapshot / "pytorch_model.bin")
    newer = hf_snapshot.parent / "fedcba9"  # a newer snapshot that refs/main does not point to
    newer.mkdir()
    (newer / "pytorch_model.bin").write_bytes((hf_snapshot / "pytorch_model.bin").read_bytes())
    (hf_snapshot.parent.parent / "refs").mkdir()
    (hf_snapshot.parent.parent / "refs" / "main").write_text("0123abc")
    from_hf = build_backbone("dinov2_vits14", **kw)
    assert from_hf.weights_path == hf_snapshot
    hub_dir = empty_caches / "torch" / "hub" / "checkpoints"
    hub_dir.mkdir(parents=True)
    torch.save(sd, hub_dir / "dinov2_vits14_pretrain.pth")
    from_hub = build_backbone("dinov2_vits14", **kw)  # the torch hub file comes before the HF cache
    assert from_hub.weights_path == hub_dir / "dinov2_vits14_pretrain.pth"
    assert rel_err(from_hf(x).patches, from_hub(x).patches) <= REL_TOL


# ------------------------------------------------------------------------------------------------
# Early stopping, input checks, registry and identity.


@pytest.mark.parametrize("facet,blocks_run", [("value", 1), ("token", 2)])
def test_computation_stops_at_the_requested_layer(facet, blocks_run, monkeypatch):
    sd = official_state_dict(TINY, 0)
    model = tiny_model("dinov2_vits14", sd, 1, facet)
    assert len(model.blocks) == 2  # block 2 of 3 and the final norm are never built
    assert model.norm is None
    last = model.blocks[-1]
    assert (hasattr(last, "mlp"), hasattr(last.attn, "proj")) == ((True, True) if facet == "token" else (False, False))
    calls = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(lambda mod, args, i=i: calls.append(i))
    gemms = []
    monkeypatch.setattr(dv2, "linear", lambda *a, _orig=dv2.linear, **k: (gemms.append(a[1].shape), _orig(*a, **k))[1])
    model(pixels(1, NATIVE, NATIVE))
    assert calls == list(range(blocks_run))
    # a full block runs qkv, proj, fc1, fc2; a qkv facet then runs a single D-wide projection
    assert len(gemms) == 4 * blocks_run + (0 if facet == "token" else 1)
    if facet != "token":
        assert gemms[-1] == (TINY["embed_dim"], TINY["embed_dim"])  # just the value third of qkv


def test_random_weights_are_reproducible():
    """Two ``pretrained=False`` builds are the same network (a random-weight map and its queries agree)."""
    x = pixels(1, NATIVE, NATIVE)
    a = build_backbone("dinov2_vits14_reg", pretrained=False, layer=2, config=TINY)(x)
    b = build_backbone("dinov2_vits14_reg", pretrained=False, layer=2, config=TINY)(x)
    assert torch.equal(a.patches, b.patches)


def test_input_size_must_be_a_multiple_of_the_patch_size():
    model = tiny_model("dinov2_vits14", official_state_dict(TINY, 0), 1, "value")
    with pytest.raises(ValueError, match="multiples of 14"):
        model(torch.rand(1, 3, NATIVE + 1, NATIVE))
    with pytest.raises(ValueError, match="B×3×H×W"):
        model(torch.rand(3, NATIVE, NATIVE))


def test_registry_defaults_and_identity():
    expected = {
        "dinov2_vits14": (384, 10),
        "dinov2_vitb14": (768, 10),
        "dinov2_vitl14": (1024, 20),
        "dinov2_vitg14": (1536, 31),
    }
    for name, (dim, layer) in expected.items():
        for variant in (name, name + "_reg"):
            assert variant in BACKBONES
            cfg = dv2.model_config(variant)
            assert (cfg.embed_dim, cfg.default_layer, cfg.patch_size) == (dim, layer, PATCH)
            assert cfg.num_registers == (dv2.NUM_REGISTERS if variant.endswith("_reg") else 0)
    assert dv2.model_config("dinov2_vitg14").ffn_hidden == 4096  # SwiGLUFFNFused width for ViT-G
    model = build_backbone("dinov2_vits14", pretrained=False, facet="key", layer=3, config=dict(depth=4))
    ident = model.identity()
    assert ident["backbone"] == "dinov2_vits14" and ident["layer"] == 3 and ident["facet"] == "key"
    assert ident["dim"] == 384 and ident["stride"] == PATCH
    with pytest.raises(ConfigError, match="layer 12"):
        build_backbone("dinov2_vits14", pretrained=False, layer=12)
    with pytest.raises(ConfigError, match="facet"):
        build_backbone("dinov2_vits14", pretrained=False, facet="attn", config=TINY, layer=1)


# ------------------------------------------------------------------------------------------------
# (c) AnyLoc VLAD on these features equals a per-descriptor loop.


def loop_vlad(desc: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """AnyLoc hard VLAD one descriptor at a time (N×D, K×D → K·D), in float64."""
    k, d = centres.shape
    c = centres.double()
    sums = torch.zeros(k, d, dtype=torch.float64)
    for x in desc.double():
        x = x / x.norm()
        cos = [float(x @ c[j]) for j in range(k)]
        j = max(range(k), key=lambda i: cos[i])
        sums[j] += x - c[j]
    for j in range(k):
        n = sums[j].norm()
        if n > 0:
            sums[j] /= n
    v = sums.flatten()
    return v / v.norm()


@pytest.mark.parametrize("facet", ["value", "token"])
def test_vlad_on_dinov2_features_matches_loop_reference(facet):
    sd = official_state_dict(TINY, dv2.NUM_REGISTERS)
    feats = tiny_model("dinov2_vits14_reg", sd, 2, facet)(pixels(2, NATIVE, 2 * NATIVE))
    flat = feats.flat()
    g = torch.Generator().manual_seed(11)
    # centres drawn from the descriptors themselves (as k-means would), so clusters are populated
    centres = F.normalize(flat[0, torch.randperm(flat.shape[1], generator=g)[:5]], dim=-1)
    got = hard_vlad(flat, centres)
    assert got.shape == (2, 5 * feats.dim)
    for i in range(2):
        assert rel_err(got[i], loop_vlad(flat[i], centres)) < REL_TOL
