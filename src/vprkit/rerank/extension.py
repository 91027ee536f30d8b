"""Patch descriptors in a map: the ``patches`` map extension (and its on-the-fly twin).

At build time every map image's patch descriptors (all scales of the re-ranking preset) are stored
under ``extras/patches/<row>`` as ``s<P>x<stride>`` arrays (float16, float32 or int8), plus the
feature grid they came from, so patch centres can be recomputed instead of stored. The fitted state
— NetVLAD centres and α, and the patch PCA/WPCA — lives in ``MAP_DIR/extensions/patches.npz``.

By default the patches come from the map's own dense features (the same backbone pass as the
global descriptor). With ``backbone=NAME`` (e.g. ``xfeat``, ``disk``) a second, local-feature
network is run on the same prepared pixels, with its own NetVLAD vocabulary fitted at build time.

int8 storage keeps each unit-norm patch descriptor as ``round(127·x / max|x|)``; the scale is not
stored because descriptors are re-normalised on reading (only directions matter for matching).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..aggregation.base import l2n
from ..aggregation.netvlad import NetVLADLayer, alpha_from_margin
from ..aggregation.vlad import assignment_margin, fit_vocabulary
from ..backbones.base import Backbone, DenseFeatures, build_backbone
from ..checkpoints import read_netvlad_checkpoint
from ..zoo import zoo_part
from ..errors import ConfigError, MapError
from ..maps.extensions import EXTENSIONS, MapExtension
from ..numerics import NORM_FLOOR
from .patches import PatchProjection, PatchScale, integral_patch_vlad, patch_centres, patch_grid_positions
from .scoring import PatchSet

if TYPE_CHECKING:
    from ..images import Batch

GROUP = "patches"
STORAGE_DTYPES = ("float16", "float32", "int8")
INT8_MAX = 127
DEFAULTS: dict[str, Any] = {
    "scales": [[5, 1]],  # [patch size, stride] in feature-map cells
    "pca_dim": 512,  # 0 = no projection; capped at the raw K·D and the sample size
    "whiten": False,
    "dtype": "float16",
    "backbone": None,  # None = the map's backbone; or a registered name such as "xfeat", "disk"
    "backbone_options": {},
    "k": 32,  # NetVLAD clusters when the patch backbone is not the map's (own vocabulary)
    "checkpoint": None,  # a NetVLAD / Patch-NetVLAD checkpoint: its NetVLAD layer and WPCA replace fitting
    "zoo": None,  # a zoo NetVLAD entry (Relja's .mat models): its layer and whitening replace fitting
    "weights": None,  # that entry's file (default: the zoo cache)
    "fit_images": 100,
    "fit_patches": 10000,
    "seed": 0,
}
# Options that define what is stored; the others (fit sample sizes, seed) only affect how it was fitted.
STORED_FORMAT_KEYS = (
    "scales",
    "pca_dim",
    "whiten",
    "dtype",
    "backbone",
    "backbone_options",
    "k",
    "checkpoint",
    "zoo",
    "weights",
)


def scale_key(scale: PatchScale) -> str:
    return f"s{scale.size}x{scale.stride}"


def quantise_int8(x: np.ndarray) -> np.ndarray:
    peak = np.maximum(np.abs(x).max(1, keepdims=True), NORM_FLOOR)
    return np.round(x / peak * INT8_MAX).astype(np.int8)


class PatchesExtension(MapExtension):
    """Computes, stores and decodes multi-scale NetVLAD patch descriptors (see module docs)."""

    group = GROUP
    needs_fit = True

    def __init__(self, options: Mapping[str, Any], backbone: Backbone, vocabulary):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown '{GROUP}' options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        super().__init__({**DEFAULTS, **dict(options)}, backbone, vocabulary)
        o = self.options
        self.scales = [PatchScale(int(s[0]), int(s[1]) if len(s) > 1 else 1) for s in o["scales"]]
        if not self.scales:
            raise ConfigError("re-ranking needs at least one patch scale")
        if o["dtype"] not in STORAGE_DTYPES:
            raise ConfigError(f"patch storage dtype must be one of {STORAGE_DTYPES}, got {o['dtype']!r}")
        self.feature_backbone = (
            backbone if o["backbone"] is None else build_backbone(o["backbone"], **dict(o["backbone_options"]))
        )
        self.own_vocabulary = o["backbone"] is not None or vocabulary is None
        self.layer: NetVLADLayer | None = None
        self.projection: PatchProjection | None = None
        if o["checkpoint"]:
            self._load_checkpoint(str(o["checkpoint"]))
        elif o["zoo"]:
            self._load_zoo(str(o["zoo"]), o["weights"])

    def _load_checkpoint(self, path: str) -> None:
        """Trained NetVLAD (+ WPCA) from a checkpoint: nothing left to fit."""
        ck = read_netvlad_checkpoint(path)
        if ck.dim != self.feature_backbone.dim:
            raise ConfigError(
                f"{path}: NetVLAD expects {ck.dim}-d features, backbone {self.feature_backbone.name} gives "
                f"{self.feature_backbone.dim}-d (use the checkpoint's VGG16 backbone, vgg16-conv5)"
            )
        self.layer = NetVLADLayer(ck.num_clusters, ck.dim, bias=ck.assign_bias is not None)
        self.layer.load_weights(ck.centroids, ck.assign_weight, ck.assign_bias)
        self.layer.eval()
        self.alpha = float("nan")  # trained weights: α no longer describes them
        if ck.wpca_weight is not None and int(self.options["pca_dim"]) > 0:
            self.projection = PatchProjection.from_linear(
                ck.wpca_weight.numpy(), None if ck.wpca_bias is None else ck.wpca_bias.numpy()
            )
        self.needs_fit = False

    def _load_zoo(self, zoo: str, weights: str | None) -> None:
        """The zoo NetVLAD's trained layer and whitening (Patch-NetVLAD on Relja's models): nothing left to fit."""
        state = zoo_part(zoo, weights, "aggregator")
        centroids, assign = state["layer.centroids"].float(), state["layer.assign.weight"].float()
        if centroids.shape[1] != self.feature_backbone.dim:
            raise ConfigError(
                f"zoo {zoo}: NetVLAD expects {centroids.shape[1]}-d features, backbone {self.feature_backbone.name} "
                f"gives {self.feature_backbone.dim}-d"
            )
        bias = state.get("layer.assign.bias")
        self.layer = NetVLADLayer(centroids.shape[0], centroids.shape[1], bias=bias is not None)
        self.layer.load_weights(centroids, assign.reshape(assign.shape[0], -1), None if bias is None else bias.float())
        self.layer.eval()
        self.alpha = float("nan")
        if "wpca.weight" in state and int(self.options["pca_dim"]) > 0:
            self.projection = PatchProjection.from_linear(state["wpca.weight"].numpy(), state["wpca.bias"].numpy())
        self.needs_fit = False

    def stores_same_as(self, options: Mapping[str, Any]) -> bool:
        """Whether patches stored with these settings serve a re-ranker that wants ``options``."""
        full = {**DEFAULTS, **dict(options)}
        return all(self.options[k] == full[k] for k in STORED_FORMAT_KEYS)

    # ---- features ----------------------------------------------------------------------------
    @property
    def stride(self) -> int:
        return self.feature_backbone.stride

    def features(self, pixels: np.ndarray | torch.Tensor, map_features: DenseFeatures | None = None) -> DenseFeatures:
        """Dense features the patches are built from: the map's own, or the patch backbone's."""
        if self.options["backbone"] is None and map_features is not None:
            return map_features
        x = torch.as_tensor(np.asarray(pixels, np.float32))
        m = self.feature_backbone.size_multiple
        h, w = x.shape[-2:]
        th, tw = max(m, h // m * m), max(m, w // m * m)
        if (th, tw) != (h, w):  # the patch net needs a multiple of its own stride
            x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
        with torch.inference_mode():
            return self.feature_backbone(x)

    # ---- descriptors -------------------------------------------------------------------------
    def _require_fitted(self) -> NetVLADLayer:
        if self.layer is None:
            raise MapError("the patch descriptors are not fitted yet (fit the 'patches' extension or rebuild the map)")
        return self.layer

    def raw_patches(self, cells: torch.Tensor) -> list[torch.Tensor]:
        """One image's ``h×w×D`` cells → per scale, NetVLAD patch descriptors before projection."""
        return integral_patch_vlad(cells, self._require_fitted(), self.scales)

    def describe(self, cells: torch.Tensor, stride: int) -> list[PatchSet]:
        """Full-precision patch sets of one image (used for queries and for on-the-fly candidates)."""
        grid = (int(cells.shape[0]), int(cells.shape[1]))
        sets = []
        for scale, raw in zip(self.scales, self.raw_patches(cells)):
            desc = self.projection(raw) if self.projection is not None else raw
            sets.append(self.patch_set(desc, scale, grid, stride))
        return sets

    @staticmethod
    def patch_set(desc: torch.Tensor, scale: PatchScale, grid: tuple[int, int], stride: int) -> PatchSet:
        _, rows, cols = scale.effective(grid)
        return PatchSet(
            desc,
            patch_centres(scale, grid, stride),
            patch_grid_positions(scale, grid),
            (rows, cols),
            float(stride * scale.stride),
        )

    def describe_batch(self, batch: "Batch", features: DenseFeatures) -> list[list[PatchSet]]:
        feats = self.features(batch.pixels, features)
        cells = feats.patches.float()
        return [self.describe(cells[i], feats.stride) for i in range(len(cells))]

    # ---- MapExtension ---------------------------------------------------------------------------
    def fit(self, samples: Iterable[tuple["Batch", DenseFeatures]]) -> None:
        """NetVLAD centres (own vocabulary only) and α from the sample's cells, then the patch PCA."""
        o = self.options
        cells: list[torch.Tensor] = []
        for batch, features in samples:
            feats = self.features(batch.pixels, features).patches.float()
            cells.extend(feats[i] for i in range(len(feats)))
            if len(cells) >= int(o["fit_images"]):
                break
        if not cells:
            raise MapError("no readable images to fit the patch descriptors on")
        flat = torch.cat([c.reshape(-1, c.shape[-1]) for c in cells]).numpy()
        if self.own_vocabulary:
            meta = {"identity": self.feature_backbone.identity(), "name": f"patches:{self.feature_backbone.name}"}
            centres = fit_vocabulary(flat, int(o["k"]), meta, seed=int(o["seed"])).centres
        else:
            centres = self.vocabulary.centres
        alpha = alpha_from_margin(assignment_margin(flat, centres))
        self.layer = NetVLADLayer.from_centres(centres, alpha).eval()
        self.alpha = alpha
        pca_dim = int(o["pca_dim"])
        if pca_dim <= 0:
            return
        self.projection = PatchProjection.fit(self._projection_sample(cells), pca_dim, bool(o["whiten"]))

    def _projection_sample(self, cells: list[torch.Tensor]) -> np.ndarray:
        """At most ``fit_patches`` raw patch descriptors, drawn evenly from every sample image.

        Sub-sampling image by image keeps only the sample in memory (one image's raw patches
        at a time, not all of them: 0.8 GB for 100 images of K·D = 11,520).
        """
        rng = np.random.default_rng(int(self.options["seed"]))
        per_image = -(-int(self.options["fit_patches"]) // len(cells))  # ceil
        picked = []
        for c in cells:
            raw = torch.cat(self.raw_patches(c))
            if len(raw) > per_image:
                raw = raw[torch.from_numpy(np.sort(rng.choice(len(raw), per_image, replace=False)))]
            picked.append(raw.numpy())
        return np.concatenate(picked)

    def state(self) -> dict[str, np.ndarray]:
        if self.options["checkpoint"] or self.options["zoo"]:
            return {}  # the checkpoint is the state
        layer = self._require_fitted()
        st = {"centres": layer.centroids.detach().numpy(), "alpha": np.float64(self.alpha)}
        if self.projection is not None:
            st.update(self.projection.state("pca_"))
        return st

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.alpha = float(state["alpha"])
        self.layer = NetVLADLayer.from_centres(state["centres"], self.alpha).eval()
        self.projection = PatchProjection.from_state(state, "pca_") if "pca_components" in state else None

    def encode(self, batch: "Batch", features: DenseFeatures) -> list[dict[str, np.ndarray]]:
        feats = self.features(batch.pixels, features)
        out = []
        for i in range(len(feats)):
            cells = feats.patches[i].float()
            payload = {"grid": np.asarray(cells.shape[:2], np.int32)}
            for scale, ps in zip(self.scales, self.describe(cells, feats.stride)):
                payload[scale_key(scale)] = self._store(ps.descriptors.numpy())
            out.append(payload)
        return out

    def _store(self, desc: np.ndarray) -> np.ndarray:
        dtype = self.options["dtype"]
        return quantise_int8(desc) if dtype == "int8" else desc.astype(dtype)

    def decode(self, payload: Mapping[str, np.ndarray]) -> list[PatchSet]:
        """A stored payload → per-scale patch sets (descriptors re-normalised float32)."""
        grid = tuple(int(v) for v in payload["grid"])
        sets = []
        for scale in self.scales:
            key = scale_key(scale)
            if key not in payload:
                raise MapError(f"stored patches lack scale {key}; the map was built with other re-ranking settings")
            desc = l2n(torch.from_numpy(np.asarray(payload[key]).astype(np.float32)))
            sets.append(self.patch_set(desc, scale, grid, self.stride))
        return sets

    def bytes_per_image(self, grid: tuple[int, int]) -> int:
        """Stored bytes of one image with a ``grid`` feature map (for reports)."""
        per = {"float16": 2, "float32": 4, "int8": 1}[self.options["dtype"]]
        dim = (
            self.projection.dim
            if self.projection is not None
            else self._require_fitted().num_clusters * self._require_fitted().dim
        )
        n = 0
        for s in self.scales:
            _, r, c = s.effective(grid)
            n += r * c
        return n * dim * per


EXTENSIONS.register(GROUP, PatchesExtension)
