"""Trainable heads over (cached) backbone features: GeM, NetVLAD from k-means, MixVPR, spatial layout, the zoo's
heads (CosPlace's gem-fc, BoQ, SALAD), + a linear projection.

:func:`build_head` returns a :class:`~vprkit.aggregation.projection.TrainedHead` — the same module
the ``trained`` aggregator rebuilds from a checkpoint, so the trained state dict loads unchanged
at inference. Dimensions derive from the features: the backbone's dim and, for MixVPR and the layout head, its grid
(BoQ and SALAD attend over any number of cells, so they take any grid). SALAD also reads the backbone's global
(CLS) token: :func:`check_features` refuses, in one line, features that do not carry it.
NetVLAD is initialised from k-means on a sample of the training features (centres and α).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..aggregation.projection import Projection, TrainedHead
from ..errors import ConfigError

HEADS = ("gem", "netvlad", "mixvpr", "layout", "mean", "gem-fc", "boq", "salad")
# Heads whose layer sizes depend on the feature grid (filled in from the features they train on).
GRID_HEADS = ("mixvpr", "layout")
# Heads that read the backbone's global (CLS) token besides its patches (DenseFeatures.global_token).
GLOBAL_TOKEN_HEADS = ("salad",)
# Heads with nothing to learn (without a projection): every seed trains the same head, so no ensemble of them.
PARAMETERLESS_HEADS = ("mean",)
# Heads that start as an identity on the backbone's channels (``[head] start_slice`` moves it).
SLICED_HEADS = ("layout",)
DEFAULT_NETVLAD_K = 64
KMEANS_SAMPLE = 50_000


def head_options(name: str, options: Mapping[str, Any] | None, grid: tuple[int, int]) -> dict[str, Any]:
    """The inner head's options with what derives from the features filled in (MixVPR's grid, NetVLAD's K)."""
    opts = {k: v for k, v in dict(options or {}).items() if k != "trainable"}
    if name in GRID_HEADS:
        opts.setdefault("height", int(grid[0]))
        opts.setdefault("width", int(grid[1]))
        if (opts["height"], opts["width"]) != tuple(grid):
            raise ConfigError(
                f"{name} height×width {opts['height']}×{opts['width']} differs from the features' grid {grid}"
            )
    if name == "netvlad":
        opts.setdefault("k", DEFAULT_NETVLAD_K)
    return opts


def check_features(name: str, features: Any) -> None:
    """Refuse (one line) to train ``name`` on features that lack what it reads: SALAD needs the global tokens.

    ``features`` is a training feature source (:mod:`vprkit.training.features`); its
    ``missing_global_tokens()`` says why it has none (an older cache to rebuild, or a backbone without a
    CLS token). Checked before any step, so a run does not stop at its first batch.
    """
    missing = getattr(features, "missing_global_tokens", None)
    reason = missing() if missing is not None else None
    if name in GLOBAL_TOKEN_HEADS and reason:
        raise ConfigError(f"head {name!r} reads the backbone's global (CLS) token, but {reason}")


def start_slice(value: Any, name: str) -> tuple[int, int] | None:
    """``[head] start_slice = [i, n]`` checked: a layout head's identity start on slice ``i`` of ``n`` (None: slice 0)."""
    if value is None:
        return None
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
        or not 0 <= value[0] < value[1]
    ):
        raise ConfigError(f"[head] start_slice must be [i, n] with 0 ≤ i < n, got {value!r}")
    if name not in SLICED_HEADS:
        raise ConfigError(
            f"[head] start_slice is for heads that start as an identity on the backbone's channels "
            f"({', '.join(SLICED_HEADS)}), not {name!r}"
        )
    return int(value[0]), int(value[1])


def start_on_slice(head: TrainedHead, i: int, n: int) -> None:
    """Move a layout head's identity start to slice ``i`` of ``n`` of the backbone's channels.

    The layout head starts as the truncated identity (output channel j = backbone channel j), so two
    half-width heads trained with different seeds start on the *same* half of the channels and stay
    near-copies. Starting member ``i`` of ``n`` at channel ``i·C/n`` (output j = backbone channel
    ``(i·C/n + j) mod C``) makes their starts disjoint when ``n × out_channels ≤ C``.
    """
    inner = head.head
    conv = inner.conv
    out_c, in_c = conv.weight.shape[:2]
    offset = (i * in_c) // n
    c = inner.kernel // 2
    with torch.no_grad():
        conv.weight[:, :, c, c] = 0.0
        conv.weight[torch.arange(out_c), (offset + torch.arange(out_c)) % in_c, c, c] = 1.0


def build_head(
    name: str,
    backbone_dim: int,
    grid: tuple[int, int],
    options: Mapping[str, Any] | None = None,
    projection: int | None = None,
    sample: np.ndarray | None = None,
    seed: int = 0,
    slice_of: tuple[int, int] | None = None,
) -> TrainedHead:
    """A trainable head. ``sample``: local descriptors NetVLAD's k-means initialisation needs; ``slice_of = (i, n)``:
    a layout head's identity start on slice ``i`` of ``n`` of the backbone's channels (:func:`start_on_slice`)."""
    opts = head_options(name, options, grid)
    head = TrainedHead(backbone_dim, head=name, head_options=opts, projection=None, trainable=True)
    if slice_of is not None:
        start_slice(list(slice_of), name)
        start_on_slice(head, *slice_of)
    if not head.head.is_fitted:
        if sample is None:
            raise ConfigError(f"head {name!r} must be fitted first (k-means): give a descriptor sample")
        head.fit(sample, seed=seed)
        head.requires_grad_(True)
    if projection is not None:
        head.add_projection(Projection(head.dim, int(projection)))
        head.requires_grad_(True)
    return head
