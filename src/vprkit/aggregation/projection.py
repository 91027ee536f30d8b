"""Linear / whitening projections on a global descriptor, and the ``trained`` aggregator a training run saves.

:class:`Projection` is ``y = L2(W·x + b)``: a trainable linear head on any global descriptor, or
a fitted PCA / whitening (:meth:`Projection.from_pca`, from :class:`vprkit.numerics.PCA`: ``W =
diag(scale)·C``, ``b = −W·mean``; Patch-NetVLAD's ``add_pca``).

:class:`TrainedHead` (registered as ``trained``) is what a trained checkpoint's preset names: an
inner head (any registered aggregator that needs no vocabulary — ``gem``, ``netvlad`` with
``k=…``, ``mixvpr``; its options in ``head_options``) followed by zero or more projections, with
its learned state read from ``state`` (a ``torch.save``-d state dict, loaded with
``weights_only=True``). The projections' number and shapes come from the state file itself, so
``vprkit add-pca`` only writes a new state; ``projection=D`` adds a fresh trainable ``D``-d linear
layer (for training). ``vlad={k, assignments, weight}`` concatenates the default preset's kind of
VLAD (over the *map's own* vocabulary, so it needs one, built by the map build as for ``vlad``)
with the trained head, scaled so that the descriptor's cosine is ``weight·VLAD + (1 − weight)·head``:
the trained head brings what it learned (seasons), the map vocabulary keeps what generalises.

A head may also be *centred* (:meth:`TrainedHead.fit_centre`, :func:`add_centre`): the mean of its
outputs over the training images is subtracted and the result L2-normalised again. Why: every
image of a domain shares a large common component in a layout head's output (the same sky, rails
and hood in the same cells), which inflates every head cosine alike and so drowns the differences
between places; removing it makes the head's part of a fused cosine measure those differences.
The centre is saved in the state (``head_centre``), so a centred checkpoint needs no option.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..backbones.base import DenseFeatures
from ..errors import ConfigError
from ..numerics import PCA
from .base import AGGREGATORS, Aggregator, l2n
from .vlad import VLAD

# The state key of a centred head's centre (the mean training output, subtracted before re-normalising).
CENTRE_KEY = "head_centre"


class Projection(nn.Linear):
    """``L2(W·x + b)``: a linear (trainable) or PCA / whitening (fitted) projection of global descriptors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return l2n(super().forward(x))

    @classmethod
    def from_pca(
        cls, descriptors: np.ndarray | torch.Tensor, dim: int, whiten: bool = False, whiten_reg: float = 0.0
    ) -> "Projection":
        """PCA (``whiten``: whitened PCA, regularised by ``whiten_reg``) of an ``N×D`` descriptor sample."""
        x = (
            descriptors.detach().cpu().float().numpy()
            if isinstance(descriptors, torch.Tensor)
            else np.asarray(descriptors, np.float32)
        )
        pca = PCA.fit(x, dim, whiten=whiten, whiten_reg=whiten_reg)
        w = pca.components * pca.scales[:, None]
        b = -(w @ pca.mean)
        if pca.bias is not None:
            b = b + pca.bias
        layer = cls(x.shape[1], pca.dim)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w, np.float32)))
            layer.bias.copy_(torch.from_numpy(np.ascontiguousarray(b, np.float32)))
        return layer.requires_grad_(False)


def _accepts(factory, name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A head's state dict saved by the trainer (tensors only, ``weights_only``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"trained head state {p} not found (it sits beside the checkpoint it belongs to)")
    return torch.load(p, map_location="cpu", weights_only=True)


class TrainedHead(Aggregator):
    """A trained head: ``head`` (with ``head_options``) then the projections its ``state`` holds (or ``projection=D``)."""

    name = "trained"

    def __init__(
        self,
        backbone_dim: int,
        head: str = "gem",
        head_options: Mapping[str, Any] | None = None,
        state: str | os.PathLike | None = None,
        projection: int | None = None,
        vlad: Mapping[str, Any] | None = None,
        vocabulary=None,
        trainable: bool = False,
    ):
        super().__init__(backbone_dim)
        if head == self.name or head not in AGGREGATORS:
            raise ConfigError(f"trained: unknown head {head!r}; choose a registered aggregator other than 'trained'")
        factory = AGGREGATORS.get(head)
        options = dict(head_options or {})
        wants = getattr(factory, "wants_vocabulary", None)
        if wants(options) if wants is not None else getattr(factory, "needs_vocabulary", False):
            raise ConfigError(
                f"trained: head {head!r} with {options} needs a vocabulary; give it its size instead "
                f"(netvlad: k=K) so the trained state replaces the vocabulary"
            )
        if _accepts(factory, "trainable"):
            options["trainable"] = bool(trainable)
        self.head_name = head
        self.head = factory(backbone_dim, **options)
        self.state = None if state is None else str(state)
        self.projections = nn.ModuleList()
        loaded = read_state(state) if state is not None else None
        if loaded is not None:  # a fused VLAD's centres come from the map's vocabulary, never from the state
            loaded = {k: v for k, v in loaded.items() if not k.startswith("vlad.")}
        self.register_buffer(CENTRE_KEY, None)
        if loaded is not None:
            i = 0
            while f"projections.{i}.weight" in loaded:
                out_dim, in_dim = loaded[f"projections.{i}.weight"].shape
                self.projections.append(Projection(int(in_dim), int(out_dim)))
                i += 1
        if projection is not None:
            self.add_projection(Projection(self.dim, int(projection)))
        if loaded is not None and CENTRE_KEY in loaded:
            self.set_centre(loaded[CENTRE_KEY])
        if loaded is not None:
            missing, unexpected = self.load_state_dict(loaded, strict=False)
            missing = [
                k
                for k in missing
                if not k.startswith(f"projections.{len(self.projections) - (projection is not None)}")
            ]
            if missing or unexpected:
                raise ConfigError(
                    f"trained head state {state} does not fit head {head!r} {dict(head_options or {})}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        self.vlad = None
        self.vlad_weight = 0.0
        if vlad:
            if vocabulary is None:
                raise ConfigError("trained: fusing with VLAD needs the map's vocabulary (the map build provides it)")
            v = dict(vlad)
            self.vlad_weight = float(v.get("weight", 0.5))
            if not 0.0 < self.vlad_weight < 1.0:
                raise ConfigError(f"trained: vlad weight must be in (0, 1), got {self.vlad_weight}")
            self.vlad = VLAD(backbone_dim, vocabulary, assignments=int(v.get("assignments", 1)), k=v.get("k"))
        self.requires_grad_(bool(trainable))

    @classmethod
    def wants_vocabulary(cls, options: dict[str, Any]) -> bool:
        return bool(options.get("vlad"))

    def add_projection(self, layer: Projection) -> None:
        if self.head_centre is not None:
            raise ConfigError(
                "this head is centred (its centre belongs to its current output): add projections "
                "before fitting the centre"
            )
        if layer.in_features != self.head_dim:
            raise ConfigError(f"a projection from {layer.in_features}-d cannot follow this {self.dim}-d head")
        self.projections.append(layer)

    def set_centre(self, centre: torch.Tensor | np.ndarray) -> None:
        """Subtract ``centre`` (a ``head_dim`` vector) from the head's output, then L2-normalise it again."""
        c = (
            torch.as_tensor(np.asarray(centre, np.float32) if isinstance(centre, np.ndarray) else centre)
            .float()
            .flatten()
        )
        if c.numel() != self.head_dim:
            raise ConfigError(f"a head centre must have the head's {self.head_dim} dims, got {c.numel()}")
        if not bool(torch.isfinite(c).all()):
            raise ConfigError("a head centre must be finite")
        self.head_centre = c.detach().clone()

    def head_forward(self, features: DenseFeatures) -> torch.Tensor:
        """The trained part alone: the inner head, its projections, and the centring when fitted."""
        x = self.head(features)
        for p in self.projections:
            x = p(x)
        if self.head_centre is not None:
            x = l2n(x - self.head_centre.to(x.device, x.dtype))
        return x

    @torch.no_grad()
    def fit_centre(self, features: Iterable[DenseFeatures]) -> torch.Tensor:
        """Centre the head on the mean of its (uncentred) outputs over ``features`` (batches of training images)."""
        self.head_centre = None
        total, count = None, 0
        for f in features:
            y = self.head_forward(f).double()
            total = y.sum(0) if total is None else total + y.sum(0)
            count += len(y)
        if not count:
            raise ConfigError("fitting a head centre needs at least one image")
        self.set_centre(total / count)
        return self.head_centre

    @property
    def head_dim(self) -> int:
        return self.projections[-1].out_features if len(self.projections) else self.head.dim

    @property
    def dim(self) -> int:
        return self.head_dim + (self.vlad.dim if self.vlad is not None else 0)

    @property
    def is_fitted(self) -> bool:
        return self.head.is_fitted

    def fit(self, descriptors, **options: Any) -> None:
        self.head.fit(descriptors, **options)

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        x = self.head_forward(features)
        if self.vlad is not None:  # cosine of the concatenation = weight·VLAD cosine + (1 − weight)·head cosine
            w = self.vlad_weight
            x = torch.cat([math.sqrt(w) * self.vlad(features).to(x.dtype), math.sqrt(1.0 - w) * x], dim=1)
        return x

    def identity(self) -> dict[str, Any]:
        ident = {
            **super().identity(),
            "head": self.head.identity(),
            "projections": [p.out_features for p in self.projections],
            "state": Path(self.state).name if self.state else None,
        }
        if self.head_centre is not None:  # only then: maps of uncentred heads keep their identity
            ident["centred"] = True
        return ident


def add_centre(head: TrainedHead, features: Iterable[DenseFeatures], out: str | os.PathLike) -> Path:
    """Fit ``head``'s centre on ``features`` (training images) and save its state (with ``head_centre``) to ``out``.

    The fused VLAD's centres are not saved (they come from the map's vocabulary), as the trainer does.
    """
    head.fit_centre(features)
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("vlad.")}
    p = Path(out)
    torch.save(state, p)
    return p


AGGREGATORS.register("trained", TrainedHead)
