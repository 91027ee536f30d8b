"""DINOv2 ViT-S/B/L/G 14 (with and without registers), truncated at a block, with AnyLoc facets.

A self-contained PyTorch re-implementation of the official ``facebookresearch/dinov2``
``DinoVisionTransformer`` (no ``transformers`` or ``xformers`` at run time), so the official
torch.hub checkpoints load into it key for key. Hugging Face ``Dinov2Model`` /
``Dinov2WithRegistersModel`` checkpoints are converted to that layout by :func:`hf_to_hub`.

Why a re-implementation rather than ``torch.hub.load``: hub needs the network (code *and*
weights), and AnyLoc only needs the network up to one block. Here computation stops at the
requested ``layer``: for the ``token`` facet after that block, for ``key``/``query``/``value``
right after that block's ``qkv`` projection, and later blocks are never even built.

Facets (AnyLoc's definitions; ``layer`` is a 0-based block index):

* ``query`` / ``key`` / ``value``: block ``layer``'s attention input projection
  ``qkv(norm1(x))`` split into three ``D``-wide slices (heads concatenated, i.e. the raw slice);
* ``token``: the output of block ``layer`` (optionally through the final LayerNorm, as the
  official ``get_intermediate_layers(norm=True)`` does, with ``final_norm=True``).

Only patch tokens go to :attr:`DenseFeatures.patches`; CLS and register tokens are dropped.
:attr:`DenseFeatures.global_token` is the CLS row *of the same facet* (the CLS token's value
vector for ``facet="value"``, the CLS output token for ``facet="token"``), so a caller that wants a
global descriptor gets one consistent with the patches.

Exactness notes (checked against the official code): LayerNorm eps 1e-6; LayerScale ``gamma``
on both residual branches; exact-erf GELU MLP for S/B/L and the fused SwiGLU FFN (``mlp.w12``,
``mlp.w3``; hidden width ``(int(4·D·2/3) + 7) // 8 · 8`` = 4096 for ViT-G) for G; position
embeddings added to CLS + patches *before* the register tokens are inserted after CLS; the
position grid (37×37 for the 518-px checkpoints) is used as is at its native size and
bicubically resampled otherwise — with ``scale_factor = (n + 0.1) / 37`` and no antialias for the
original models, with an explicit output ``size`` and ``antialias=True`` for the ``_reg`` models,
exactly as the official hub entry points configure ``interpolate_offset`` /
``interpolate_antialias`` (and as AnyLoc, which loads the models through torch.hub, sees them).
Hugging Face weights are the same tensors, but recent ``transformers.Dinov2Model`` versions resample
the plain models' positions to an explicit size without the offset, so *their* outputs differ
slightly from ours (and upstream's) at non-native sizes; at 518 px they agree.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, WeightsNotFoundError
from ..zoo import zoo_part
from .base import BACKBONES, Backbone, DenseFeatures, unit_parameters
from .weights import resolve_weights

FACETS = ("query", "key", "value", "token")
QKV_FACETS = FACETS[:3]  # their order is the order of the slices in the fused qkv projection
LAYERNORM_EPS = 1e-6
PATCH_SIZE = 14
CHECKPOINT_IMAGE_SIZE = 518  # the official checkpoints carry position embeddings for 518 px
NUM_REGISTERS = 4  # the "_reg" models (Darcet et al., "Vision Transformers Need Registers")
DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
RANDOM_INIT_SEED = 0  # pretrained=False models are reproducible random networks
HF_REPOS = {"vits14": "dinov2-small", "vitb14": "dinov2-base", "vitl14": "dinov2-large", "vitg14": "dinov2-giant"}


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of one DINOv2 model; everything the module shapes derive from."""

    embed_dim: int
    depth: int
    num_heads: int
    default_layer: int  # AnyLoc's best layer for the value facet (paper ablation, K = 32)
    ffn: str = "mlp"  # "mlp" (fc1 → GELU → fc2) or "swiglu" (w12 → SiLU-gate → w3)
    mlp_ratio: float = 4.0
    patch_size: int = PATCH_SIZE
    pos_grid: int = CHECKPOINT_IMAGE_SIZE // PATCH_SIZE
    num_registers: int = 0
    interpolate_offset: float = 0.1  # the official kludge; 0 means "interpolate to an explicit size"
    interpolate_antialias: bool = False

    @property
    def ffn_hidden(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.ffn == "swiglu":
            # SwiGLUFFNFused keeps the parameter count of a 4·D MLP: 2/3 of it, rounded up to 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden


ARCHS: dict[str, ViTConfig] = {
    "vits14": ViTConfig(embed_dim=384, depth=12, num_heads=6, default_layer=10),
    "vitb14": ViTConfig(embed_dim=768, depth=12, num_heads=12, default_layer=10),
    "vitl14": ViTConfig(embed_dim=1024, depth=24, num_heads=16, default_layer=20),
    "vitg14": ViTConfig(embed_dim=1536, depth=40, num_heads=24, default_layer=31, ffn="swiglu"),
}


def model_config(name: str) -> ViTConfig:
    """The :class:`ViTConfig` of ``dinov2_vit{s,b,l,g}14[_reg]``."""
    m = re.fullmatch(r"dinov2_(vit[sblg]14)(_reg)?", name)
    if not m or m.group(1) not in ARCHS:
        raise ConfigError(f"unknown DINOv2 model {name!r}; known: {', '.join(MODEL_NAMES)}")
    cfg = ARCHS[m.group(1)]
    if m.group(2):
        # the official register models interpolate to an explicit size with antialiasing
        cfg = replace(cfg, num_registers=NUM_REGISTERS, interpolate_offset=0.0, interpolate_antialias=True)
    return cfg


MODEL_NAMES = tuple(f"dinov2_{arch}{reg}" for arch in ARCHS for reg in ("", "_reg"))


def checkpoint_filename(name: str) -> str:
    """Official torch.hub file name, e.g. ``dinov2_vits14_reg4_pretrain.pth``."""
    base = name.removesuffix("_reg")
    return f"{base}_reg{NUM_REGISTERS}_pretrain.pth" if name.endswith("_reg") else f"{base}_pretrain.pth"


def checkpoint_url(name: str) -> str:
    """Official download address: ``{base}/{dinov2_vits14}/{file}``."""
    return f"{DINOV2_BASE_URL}/{name.removesuffix('_reg')}/{checkpoint_filename(name)}"


def hf_repo_id(name: str) -> str:
    """Hugging Face repository of the same weights, e.g. ``facebook/dinov2-with-registers-small``."""
    arch = name.removeprefix("dinov2_").removesuffix("_reg")
    size = HF_REPOS[arch].removeprefix("dinov2-")
    return f"facebook/dinov2-with-registers-{size}" if name.endswith("_reg") else f"facebook/dinov2-{size}"


# ----------------------------------------------------------------------------------------------
# The network. Module and parameter names follow the official code so that state dicts match.


def _onednn_linear_works() -> bool:
    """Whether oneDNN's fused linear kernels exist here and agree with ``F.linear`` (checked once).

    Why bother: on this kind of CPU (AMD EPYC) PyTorch's fp32 ``F.linear`` goes to MKL's sgemm,
    which runs ~1.4× slower than oneDNN's JIT kernels, and oneDNN also fuses the GELU into ``fc1``
    (ViT-S/14 at 224 px: ~1.4× more images/s overall). The op is internal to PyTorch (inductor uses
    it), so it is probed on a tiny problem and replaced by ``F.linear`` if it is missing or wrong.
    ``VPRKIT_ONEDNN=0`` turns it off.
    """
    if os.environ.get("VPRKIT_ONEDNN", "1") in ("0", "false", "False") or not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
        ref = F.linear(x, w, b)
        checks = [
            (op.default(x, w, b, "none", [], ""), ref),
            (op.default(x, w, b, "gelu", [], "none"), F.gelu(ref)),
        ]
        return all(torch.allclose(got, want, rtol=1e-5, atol=1e-5) for got, want in checks)
    except Exception:  # noqa: BLE001 - any failure means "use the portable path"
        return False


_ONEDNN: bool | None = None


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN for float32 CPU work that autograd does not track (the fused op has no backward)."""
    global _ONEDNN
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if _ONEDNN is None:
        _ONEDNN = _onednn_linear_works()
    return _ONEDNN


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """``F.linear`` (optionally followed by exact-erf GELU) on ``…×in`` inputs."""
    if _use_onednn(x, weight):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise.default(
            flat, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else ""
        )
        return out.view(*x.shape[:-1], weight.shape[0])
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (``gamma``), as in CaiT/DINOv2."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (output rows = [q | k | v])."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """``B×N×D`` → ``(B·N)×D`` attention output before ``proj`` (heads concatenated)."""
        b, n, d = x.shape
        # B×N×3D → 3×B×heads×N×head_dim; the 1/sqrt(head_dim) scale is SDPA's default
        qkv = linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b * n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.context(x), self.proj.weight, self.proj.bias).view(x.shape)


class Mlp(nn.Module):
    """fc1 → exact GELU → fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.fc1.weight, self.fc1.bias, gelu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.hidden(x), self.fc2.weight, self.fc2.bias)


class SwiGLUFFN(nn.Module):
    """ViT-G's feed-forward: ``w3(silu(x1) · x2)`` with ``[x1 | x2] = w12(x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = linear(x, self.w12.weight, self.w12.bias).chunk(2, dim=-1)
        return F.silu(x1) * x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.hidden(x), self.w3.weight, self.w3.bias)


class Block(nn.Module):
    """Pre-norm transformer block: ``x += ls1(attn(norm1(x)))``; ``x += ls2(mlp(norm2(x)))``.

    Each LayerScale and its residual add are one ``addcmul`` pass. With ``qkv_only`` only
    ``norm1`` and ``attn.qkv`` are built: the last block of a model cut for a key/query/value facet
    needs nothing else (for ViT-G that saves ~85 MB of unused weights).
    """

    def __init__(self, cfg: ViTConfig, qkv_only: bool = False):
        super().__init__()
        d = cfg.embed_dim
        self.qkv_only = qkv_only
        self.norm1 = nn.LayerNorm(d, eps=LAYERNORM_EPS)
        self.attn = Attention(d, cfg.num_heads)
        if qkv_only:
            del self.attn.proj
            return
        self.ls1 = LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=LAYERNORM_EPS)
        self.mlp = SwiGLUFFN(d, cfg.ffn_hidden) if cfg.ffn == "swiglu" else Mlp(d, cfg.ffn_hidden)
        self.ls2 = LayerScale(d)

    def facet(self, x: torch.Tensor, which: str) -> torch.Tensor:
        """One ``D``-wide slice (query, key or value) of ``qkv(norm1(x))``; only that slice is computed."""
        d = x.shape[-1]
        i = QKV_FACETS.index(which)
        w, b = self.attn.qkv.weight[i * d : (i + 1) * d], self.attn.qkv.bias[i * d : (i + 1) * d]
        return linear(self.norm1(x), w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qkv_only:
            raise RuntimeError("this block was built for a qkv facet only and has no attention output or MLP")
        b, n, d = x.shape
        attn = linear(self.attn.context(self.norm1(x)), self.attn.proj.weight, self.attn.proj.bias)
        flat = torch.addcmul(x.reshape(b * n, d), attn, self.ls1.gamma)
        flat = torch.addcmul(flat, self.mlp(self.norm2(flat)), self.ls2.gamma)
        return flat.view(b, n, d)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution → ``B×(h·w)×D`` tokens (row-major)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], cfg: ViTConfig) -> torch.Tensor:
    """Position embeddings (``1×(1+M²)×D``, CLS first) for an ``h×w`` patch grid.

    Identical to the official ``interpolate_pos_encoding``: returned unchanged at the native
    ``M×M`` grid; otherwise bicubic in float32, with ``scale_factor=((h+off)/M, (w+off)/M)`` when
    ``interpolate_offset`` is set (the output size is then ``floor(h+off) = h``, but PyTorch maps
    coordinates with the given scale, which is what the checkpoints were evaluated with) and with an
    explicit ``size`` otherwise.
    """
    h, w = grid
    m = cfg.pos_grid
    if (h, w) == (m, m):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    d = pos_embed.shape[-1]
    patch_pos = patch_pos.float().reshape(1, m, m, d).permute(0, 3, 1, 2)
    if cfg.interpolate_offset:
        scale = (float(h + cfg.interpolate_offset) / m, float(w + cfg.interpolate_offset) / m)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", antialias=cfg.interpolate_antialias)
    else:
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", antialias=cfg.interpolate_antialias)
    if tuple(patch_pos.shape[-2:]) != (h, w):  # pragma: no cover - guards the float kludge
        raise RuntimeError(f"position-embedding interpolation gave {tuple(patch_pos.shape[-2:])}, expected {(h, w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, d).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


# ----------------------------------------------------------------------------------------------
# Checkpoints: file reading, layout conversion, resolution.

_HF_RENAMES = (
    # (regex on the Hugging Face key, replacement in the hub layout); q/k/v are handled separately
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^layernorm\.", "norm."),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # FSDP "block_chunks" naming: blocks.<chunk>.<i>.
_WRAPPER_PREFIXES = ("module.", "backbone.", "dinov2.", "model.")


def is_hf_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.")) for k in state_dict)


def hf_to_hub(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict to the hub layout.

    Renames every tensor and concatenates each layer's separate ``query``/``key``/``value``
    projections into the fused ``qkv`` (rows ``[q; k; v]``, the order the official attention
    splits them in). Keys it does not know (a classifier head, pooler) are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _HF_QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in _HF_RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
    for (layer, kind), parts in qkv.items():
        if set(parts) != set(QKV_FACETS):
            raise ConfigError(f"Hugging Face checkpoint has only {sorted(parts)} projections in layer {layer}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[f] for f in QKV_FACETS], dim=0)
    return out


def normalise_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Any supported checkpoint → hub layout with flat ``blocks.<i>.`` names.

    Unwraps ``{"model"|"state_dict"|"teacher": …}`` training checkpoints, strips DDP/wrapper
    prefixes, converts the Hugging Face layout and un-chunks FSDP ``blocks.<chunk>.<i>.`` names.
    """
    for wrapper in ("model", "state_dict", "teacher"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    sd: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        sd[key] = value
    if is_hf_layout(sd):
        sd = hf_to_hub(sd)
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in sd.items()}


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _load_tensor_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ModuleNotFoundError as exc:
            raise ConfigError(f"{path} is a .safetensors file; reading it needs `pip install safetensors`") from exc
        return load_file(str(path), device="cpu")
    try:
        # memory-mapped: a model cut at block 31 of ViT-G never reads the other blocks' 1.3 GB
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zipfile) serialisation cannot be mapped
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read DINOv2 weights from {path} ({exc})") from exc


def _safetensors_installed() -> bool:
    try:
        import safetensors  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def _hf_weight_file(folder: Path, readable_only: bool = False) -> Path | None:
    """The weight file of a Hugging Face model folder.

    Prefers ``model.safetensors`` when the ``safetensors`` package is installed, else
    ``pytorch_model.bin``; a folder with only ``model.safetensors`` is still returned (and reading it
    then says which package to install) unless ``readable_only``.
    """
    names = HF_WEIGHT_FILES if _safetensors_installed() else HF_WEIGHT_FILES[::-1]
    found = [folder / n for n in names if (folder / n).is_file()]
    if readable_only:
        found = [f for f in found if f.suffix != ".safetensors" or _safetensors_installed()]
    return found[0] if found else None


def _check_hf_config(folder: Path, cfg: ViTConfig, name: str) -> None:
    """Refuse an HF folder whose ``config.json`` describes another architecture (clearer than a shape error)."""
    path = folder / "config.json"
    if not path.is_file():
        return
    conf = json.loads(path.read_text())
    expected = {
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        "num_register_tokens": cfg.num_registers,
        "use_swiglu_ffn": cfg.ffn == "swiglu",
    }
    diffs = [f"{k}={conf[k]!r} (expected {v!r})" for k, v in expected.items() if k in conf and conf[k] != v]
    if cfg.num_registers and "num_register_tokens" not in conf:
        diffs.append("no register tokens (expected a dinov2-with-registers model)")
    if diffs:
        raise ConfigError(f"{folder} holds another model than {name}: " + ", ".join(diffs))


def read_checkpoint(
    path: str | os.PathLike, cfg: ViTConfig | None = None, name: str = "dinov2"
) -> dict[str, torch.Tensor]:
    """Read a hub ``.pth``, an HF ``.bin``/``.safetensors`` file, or an HF model folder → hub layout."""
    p = Path(path).expanduser()
    if p.is_dir():
        file = _hf_weight_file(p)
        if file is None:
            raise WeightsNotFoundError(f"weights for {name}: {p} contains none of {', '.join(HF_WEIGHT_FILES)}")
        if cfg is not None:
            _check_hf_config(p, cfg, name)
        p = file
    if not p.is_file():
        raise WeightsNotFoundError(f"weights for {name}: {p} does not exist")
    return normalise_state_dict(_load_tensor_file(p))


def hf_cache_dirs() -> list[Path]:
    """Candidate Hugging Face hub cache roots (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``)."""
    roots = [os.environ.get("HF_HUB_CACHE")]
    if os.environ.get("HF_HOME"):
        roots.append(str(Path(os.environ["HF_HOME"]) / "hub"))
    roots.append(str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub"))
    return [Path(r) for r in dict.fromkeys(r for r in roots if r)]


def hf_cached_snapshots(repo_id: str, roots: Iterable[Path] | None = None) -> list[Path]:
    """Snapshot folders of ``repo_id`` in the HF caches that hold a readable weight file, best first.

    Best = the snapshot ``refs/main`` points to, then the most recently modified.
    """
    ranked = []
    for root in hf_cache_dirs() if roots is None else roots:
        repo = root / f"models--{repo_id.replace('/', '--')}"
        snaps = repo / "snapshots"
        if not snaps.is_dir():
            continue
        ref = repo / "refs" / "main"
        main = ref.read_text().strip() if ref.is_file() else None
        for s in snaps.iterdir():
            if s.is_dir() and _hf_weight_file(s, readable_only=True):
                ranked.append((s.name == main, s.stat().st_mtime, s))
    return [s for *_, s in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True)]


def find_weights(name: str, explicit: str | os.PathLike | None = None) -> Path:
    """Where the weights of ``name`` are: a file (hub or HF layout) or an HF model folder.

    Order: ``explicit`` (file, HF folder, or folder with the hub file) → the hub file in vprkit's
    cache and torch.hub's checkpoints → a Hugging Face cache snapshot of the same model →
    download of the hub file (unless offline). Raises :class:`WeightsNotFoundError` naming the file.
    """
    filename = checkpoint_filename(name)
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_dir() and not (p / filename).is_file() and _hf_weight_file(p) is not None:
            return p
        return resolve_weights(name, filename, p)
    try:
        return resolve_weights(name, filename)  # local caches only: no URL yet
    except WeightsNotFoundError:
        pass
    snapshots = hf_cached_snapshots(hf_repo_id(name))
    if snapshots:
        return snapshots[0]
    hint = (
        f"On a machine with internet, download {checkpoint_url(name)}; or pass weights=PATH to that file or "
        f"to a Hugging Face folder of {hf_repo_id(name)} (config.json + pytorch_model.bin or model.safetensors)."
    )
    return resolve_weights(name, filename, url=checkpoint_url(name), hint=hint)


# ----------------------------------------------------------------------------------------------
# The backbone.


def embed_tokens(
    x: torch.Tensor,
    patch_embed: PatchEmbed,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
    register_tokens: torch.Tensor | None,
    cfg: ViTConfig,
) -> torch.Tensor:
    """Normalised pixels → ``B×(1+R+h·w)×D`` tokens ``[CLS, registers, patches]`` (positions added before
    the registers are inserted after CLS, as the official code does)."""
    b, _, h, w = x.shape
    grid = (h // cfg.patch_size, w // cfg.patch_size)
    tokens = torch.cat([cls_token.expand(b, -1, -1), patch_embed(x)], dim=1)
    tokens = tokens + interpolate_pos_embed(pos_embed, grid, cfg)
    if register_tokens is not None:
        tokens = torch.cat([tokens[:, :1], register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
    return tokens


def check_patch_multiple(name: str, h: int, w: int, p: int) -> None:
    """A ViT reads whole patches: both image sides must be positive multiples of the patch size ``p``."""
    if h % p or w % p or h < p or w < p:
        raise ValueError(
            f"{name} needs image sides that are positive multiples of {p} px, got {h}×{w}; "
            f"centre-crop to {h // p * p}×{w // p * p} (image prep with size_multiple={p} does this)"
        )


class DINOv2(Backbone):
    """DINOv2 ViT cut at block ``layer``, returning one AnyLoc facet of the patch tokens.

    ``config`` overrides fields of the model's :class:`ViTConfig` (tests build tiny ViTs this way);
    ``final_norm`` applies the final LayerNorm to the ``token`` facet (official
    ``get_intermediate_layers(norm=True)`` / ``x_norm_patchtokens`` at the last layer).

    ``zoo=NAME`` fills the network from the ``backbone`` part of that zoo checkpoint (SALAD, MegaLoc,
    BoQ …; ``weights`` then names its file, see :mod:`vprkit.zoo`); ``pretrained`` is then ignored.
    What those heads consume is ``layer=depth-1, facet="token"`` with ``final_norm=True`` (SALAD and
    MegaLoc: the normed patch tokens and the normed CLS token, :attr:`DenseFeatures.global_token`).
    """

    size_multiple = PATCH_SIZE
    has_global_token = True

    def __init__(
        self,
        name: str = "dinov2_vits14",
        layer: int | None = None,
        facet: str = "value",
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        final_norm: bool = False,
        config: Mapping[str, Any] | None = None,
        zoo: str | None = None,
    ):
        super().__init__()
        cfg = model_config(name)
        if config:
            unknown = set(config) - set(ViTConfig.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"unknown DINOv2 config fields {sorted(unknown)}")
            cfg = replace(cfg, **config)
        if cfg.embed_dim % cfg.num_heads:
            raise ConfigError(f"embed_dim {cfg.embed_dim} is not a multiple of num_heads {cfg.num_heads}")
        layer = cfg.default_layer if layer is None else int(layer)
        if not 0 <= layer < cfg.depth:
            raise ConfigError(f"{name} has blocks 0..{cfg.depth - 1}; layer {layer} does not exist")
        if facet not in FACETS:
            raise ConfigError(f"unknown facet {facet!r}; choose one of {', '.join(FACETS)}")
        if final_norm and facet != "token":
            raise ConfigError("final_norm applies to the token facet only")
        self.name = name
        self.cfg = cfg
        self.config_overrides = dict(config or {})
        self.layer = layer
        self.facet = facet
        self.final_norm = final_norm
        self.stride = cfg.patch_size
        self.size_multiple = cfg.patch_size
        self.dim = cfg.embed_dim

        self.zoo = zoo
        # find the weights before building anything: a missing file is reported at once, not after
        # allocating (and randomly initialising) a billion parameters
        zoo_state = zoo_part(zoo, weights, "backbone") if zoo else None
        self.weights_path: Path | None = None
        if zoo is None and (pretrained or weights is not None):
            self.weights_path = find_weights(name, weights)
        # with weights, build on the meta device (no memory, no init) and adopt the loaded tensors
        with torch.device("cpu" if self.weights_path is None and zoo_state is None else "meta"):
            self._build(cfg, layer, facet, final_norm)
        if zoo_state is not None:
            self._load_zoo(zoo, zoo_state)
        elif self.weights_path is None:
            self._init_random()
        else:
            self.load_checkpoint(read_checkpoint(self.weights_path, cfg, name))
        self.eval()

    def _load_zoo(self, zoo: str, state: Mapping[str, torch.Tensor]) -> None:
        """Adopt the backbone part of zoo checkpoint ``zoo`` (official hub names after the zoo layout).

        A checkpoint of another size or variant is a :class:`WeightsNotFoundError` (one line), like every
        zoo part that does not fit.
        """
        try:
            self.load_checkpoint(state)
        except ConfigError as exc:
            raise WeightsNotFoundError(f"zoo weights {zoo}: {exc}") from None

    def _build(self, cfg: ViTConfig, layer: int, facet: str, final_norm: bool) -> None:
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid**2 + 1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, d)) if cfg.num_registers else None
        qkv_facet = facet in QKV_FACETS
        self.blocks = nn.ModuleList(Block(cfg, qkv_only=qkv_facet and i == layer) for i in range(layer + 1))
        self.norm = nn.LayerNorm(d, eps=LAYERNORM_EPS) if final_norm else None

    @torch.no_grad()
    def _init_random(self) -> None:
        """The official initialisation (truncated normal 0.02 linears and positions, LayerScale 1).

        Drawn from a generator with a fixed seed, so that ``pretrained=False`` models are the same
        network every time they are built: a map built and queried in separate processes with random
        weights (tests, benchmarks) gets matching descriptors.
        """
        g = torch.Generator().manual_seed(RANDOM_INIT_SEED)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, generator=g)
        nn.init.normal_(self.cls_token, std=1e-6, generator=g)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6, generator=g)
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=0.02, generator=g)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, generator=g)
                nn.init.zeros_(m.bias)

    def load_checkpoint(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a hub-layout state dict (see :func:`normalise_state_dict`), keeping only what this cut needs.

        Every tensor of the kept blocks must be present with the right shape; tensors of later
        blocks, the unused final norm and ``mask_token`` are ignored. A register-count mismatch is
        reported as the wrong model variant rather than as a shape error.
        """
        has_regs = "register_tokens" in state_dict
        if has_regs != bool(self.cfg.num_registers):
            want = "with" if self.cfg.num_registers else "without"
            raise ConfigError(
                f"{self.weights_path or 'checkpoint'} is a DINOv2 {'with' if has_regs else 'without'} register tokens, "
                f"but {self.name} is the model {want} them (use {'the _reg' if has_regs else 'the plain'} variant)"
            )
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        if missing:
            raise ConfigError(
                f"{self.weights_path or 'checkpoint'} is not a {self.name} checkpoint: {len(missing)} tensors are missing "
                f"(e.g. {', '.join(missing[:3])})"
            )
        bad = [
            f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if state_dict[k].shape != v.shape
        ]
        if bad:
            raise ConfigError(f"{self.weights_path or 'checkpoint'} does not fit {self.name}: " + "; ".join(bad[:3]))
        # Built on the meta device (no storage) the module adopts the tensors; they are copied first so
        # that no parameter stays backed by a memory-mapped file that could change underneath.
        on_meta = any(t.is_meta for t in own.values())
        tensors = {k: state_dict[k].to(torch.float32, copy=True) for k in own}
        self.load_state_dict(tensors, strict=True, assign=on_meta)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels → ``B×(1+R+h·w)×D`` tokens ``[CLS, registers, patches]``."""
        return embed_tokens(x, self.patch_embed, self.cls_token, self.pos_embed, self.register_tokens, self.cfg)

    def check_size(self, h: int, w: int) -> None:
        check_patch_multiple(self.name, h, w, self.cfg.patch_size)

    def extract(self, x: torch.Tensor) -> DenseFeatures:
        _, _, h, w = x.shape
        self.check_size(h, w)
        out = run_blocks(self.prepare_tokens(x), self.blocks, self.facet, self.norm)
        grid = (h // self.cfg.patch_size, w // self.cfg.patch_size)
        return dense_features(out, grid, 1 + self.cfg.num_registers, self.stride, (h, w))

    def _trainable_units(self) -> list[list[nn.Parameter]]:
        """The embedding (patch projection, CLS, positions, registers), then each kept block; the
        final LayerNorm (``final_norm``) belongs to the last block."""
        units = [unit_parameters(self.patch_embed, self.cls_token, self.pos_embed, self.register_tokens)]
        units += [unit_parameters(blk) for blk in self.blocks]
        units[-1] += unit_parameters(self.norm)
        return units

    def _split(self, last_blocks: int) -> tuple["DINOv2Prefix", "DINOv2Suffix"]:
        """The embedding and the blocks before the last ``last_blocks``, and those blocks (shared modules).

        The prefix's output is exactly what enters the later blocks when the model has no register
        tokens: the patch tokens (:attr:`DenseFeatures.patches`) and the CLS token
        (:attr:`DenseFeatures.global_token`), so a feature cache holding both restarts the sequence.
        Register tokens have no place in :class:`DenseFeatures`, so the ``_reg`` models are not split.
        """
        if self.cfg.num_registers:
            raise ConfigError(
                f"{self.name} carries {self.cfg.num_registers} register tokens, which a feature cache does not "
                "keep; train its unfrozen blocks on re-read images instead ([backbone] cache_prefix = false)"
            )
        if last_blocks >= len(self.blocks):
            raise ConfigError(
                f"{self.name} up to layer {self.layer} has {len(self.blocks)} transformer blocks; cannot split off "
                f"the last {last_blocks} (the prefix keeps the embedding and one block at least)"
            )
        keep = len(self.blocks) - last_blocks
        return DINOv2Prefix(self, keep), DINOv2Suffix(self, keep)

    def identity(self) -> dict[str, Any]:
        ident = {**super().identity(), "layer": self.layer, "facet": self.facet}
        if self.final_norm:
            ident["final_norm"] = True
        if self.config_overrides:
            ident["config"] = dict(self.config_overrides)
        if self.zoo:
            ident["zoo"] = self.zoo
        return ident


def run_blocks(tokens: torch.Tensor, blocks: Sequence[Block], facet: str, norm: nn.Module | None) -> torch.Tensor:
    """``tokens`` through ``blocks``; the last one gives the ``facet`` (``token``: its output, through ``norm`` if any)."""
    for blk in blocks[:-1]:
        tokens = blk(tokens)
    last = blocks[-1]
    if facet != "token":
        return last.facet(tokens, facet)
    out = last(tokens)
    return out if norm is None else norm(out)


def dense_features(
    out: torch.Tensor, grid: tuple[int, int], first_patch: int, stride: int, image_size: tuple[int, int]
) -> DenseFeatures:
    """``B×(1+R+h·w)×D`` tokens → the patch tokens as an ``h×w`` map and the CLS row as the global token."""
    patches = out[:, first_patch:].reshape(len(out), *grid, out.shape[-1]).contiguous()
    return DenseFeatures(patches, stride, image_size, out[:, 0].contiguous())


class DINOv2Prefix(Backbone):
    """The embedding and the first ``keep`` blocks of a :class:`DINOv2` (no registers), sharing its modules.

    What :meth:`~vprkit.backbones.base.Backbone.split` caches when only the last blocks train: a fixed
    function of the image, identified as the model cut after block ``keep − 1`` with the ``token`` facet
    (so a feature cache of it is keyed like one of that backbone). Its output keeps the CLS token as
    :attr:`DenseFeatures.global_token`: the later blocks attend to it.
    """

    size_multiple = PATCH_SIZE
    has_global_token = True

    def __init__(self, net: DINOv2, keep: int):
        super().__init__()
        self.name, self.cfg, self.keep = net.name, net.cfg, keep
        self.stride, self.size_multiple, self.dim = net.stride, net.size_multiple, net.dim
        self.patch_embed, self.cls_token, self.pos_embed = net.patch_embed, net.cls_token, net.pos_embed
        self.kept = nn.ModuleList(net.blocks[:keep])
        self.truncated_identity = {**net.identity(), "layer": keep - 1, "facet": "token"}
        self.truncated_identity.pop("final_norm", None)
        self.train(net.training)

    def extract(self, x: torch.Tensor) -> DenseFeatures:
        _, _, h, w = x.shape
        p = self.cfg.patch_size
        check_patch_multiple(self.name, h, w, p)
        tokens = embed_tokens(x, self.patch_embed, self.cls_token, self.pos_embed, None, self.cfg)
        out = run_blocks(tokens, self.kept, "token", None)
        return dense_features(out, (h // p, w // p), 1, self.stride, (h, w))

    def _optimise_for_inference(self) -> None:
        """Nothing to rewrite: the modules belong to the full backbone too."""

    def identity(self) -> dict[str, Any]:
        return dict(self.truncated_identity)


class DINOv2Suffix(nn.Module):
    """Blocks ``keep`` onwards of a :class:`DINOv2` (shared modules, final norm included): prefix features → its output."""

    def __init__(self, net: DINOv2, keep: int):
        super().__init__()
        self.name, self.facet = net.name, net.facet
        self.blocks = nn.ModuleList(net.blocks[keep:])
        self.norm = net.norm
        self.stride, self.dim = net.stride, net.dim
        self.train(net.training)

    def forward(self, feats: DenseFeatures) -> DenseFeatures:
        if feats.global_token is None:
            raise ConfigError(
                f"the last blocks of {self.name} need the cached prefix's CLS token, and these features have none "
                "(a feature cache written before vprkit kept it): delete the cache to rebuild it"
            )
        p = next(self.parameters())
        patches = feats.patches.to(device=p.device, dtype=p.dtype)
        cls = feats.global_token.to(device=p.device, dtype=p.dtype)
        tokens = torch.cat([cls[:, None], patches.reshape(len(patches), -1, patches.shape[-1])], dim=1)
        out = run_blocks(tokens, self.blocks, self.facet, self.norm)
        return dense_features(out, feats.grid, 1, self.stride, feats.image_size)


def _factory(name: str):
    def build(
        layer: int | None = None,
        facet: str = "value",
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        final_norm: bool = False,
        config: Mapping[str, Any] | None = None,
        zoo: str | None = None,
    ) -> DINOv2:
        return DINOv2(
            name,
            layer=layer,
            facet=facet,
            pretrained=pretrained,
            weights=weights,
            final_norm=final_norm,
            config=config,
            zoo=zoo,
        )

    cfg = model_config(name)
    build.__name__ = name
    build.__doc__ = (
        f"DINOv2 ViT-{name[10].upper()}/14{' with registers' if cfg.num_registers else ''}: {cfg.depth} blocks, "
        f"{cfg.embed_dim}-d; AnyLoc's default is layer {cfg.default_layer}, value facet."
    )
    return build


for _name in MODEL_NAMES:
    BACKBONES.register(_name, _factory(_name))

__all__ = [
    "ARCHS",
    "DINOv2",
    "FACETS",
    "MODEL_NAMES",
    "ViTConfig",
    "checkpoint_filename",
    "checkpoint_url",
    "find_weights",
    "hf_repo_id",
    "hf_to_hub",
    "interpolate_pos_embed",
    "model_config",
    "normalise_state_dict",
    "read_checkpoint",
]
