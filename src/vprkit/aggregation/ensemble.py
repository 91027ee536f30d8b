"""An ensemble of aggregators: each member's L2-normalised output, scaled, concatenated (then optional projections).

    y = P( [ √w₁·L2(m₁(x)), …, √w_M·L2(m_M(x)) ] ),   Σ wᵢ = 1 (equal by default: wᵢ = 1/M)

so the cosine of two ensemble descriptors is the weighted mean of the members' cosines
(``⟨y, y'⟩ = Σ wᵢ ⟨mᵢ, mᵢ'⟩``) and ``y`` is unit-norm. ``dim`` is the sum of the members' dims,
or the last projection's output (a PCA fitted on the concatenation: ``vprkit add-pca``, a recipe's
``[post] pca``). Why: heads trained independently (another seed, another sampler order) make
partly independent errors; averaging their similarities keeps what they agree on.

``members`` is a mapping ``name → {"aggregator": NAME, "options": {...}}`` (any registered
aggregator but an ensemble; its options are checked against its schema), kept in that order. The
learned state is a standard state dict (``members.<name>.…``, ``projections.<i>.…``); ``state``
reads one saved by ``torch.save(ensemble.state_dict())`` (``weights_only``), which also rebuilds
the members' own projections and centres (``trained`` members) and the ensemble's projections from
its keys. Members that need a vocabulary (a ``trained`` head fused with the map's VLAD, ``vlad``)
are given the map's; their VLAD centres never come from the state. ``fit`` fits the members that
learn from a sample (member ``i`` with ``seed + i``). Parameters are frozen unless ``trainable=True``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..backbones.base import DenseFeatures
from ..errors import ConfigError
from ..options import Option, Schema, register_schema, validate_options
from .base import AGGREGATORS, Aggregator, l2n
from .projection import CENTRE_KEY, Projection, TrainedHead, _accepts, read_state

MEMBER_KEYS = ("aggregator", "options")


def _wants_vocabulary(name: str, options: Mapping[str, Any]) -> bool:
    factory = AGGREGATORS.get(name)
    wants = getattr(factory, "wants_vocabulary", None)
    return bool(wants(dict(options))) if wants is not None else bool(getattr(factory, "needs_vocabulary", False))


def member_specs(members: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """``members`` checked: ``name → (aggregator, options)``, in the given order (ConfigError on anything else)."""
    if not isinstance(members, Mapping) or not members:
        raise ConfigError("ensemble: give members = {name: {aggregator = NAME, options = {...}}, ...} (at least one)")
    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    for key, spec in members.items():
        key = str(key)
        if not key or "." in key:
            raise ConfigError(f"ensemble: member name {key!r} must be non-empty and contain no '.'")
        if not isinstance(spec, Mapping) or "aggregator" not in spec:
            raise ConfigError(f"ensemble member {key!r}: give {{aggregator = NAME, options = {{...}}}}, got {spec!r}")
        unknown = sorted(set(spec) - set(MEMBER_KEYS))
        if unknown:
            raise ConfigError(f"ensemble member {key!r}: unknown keys {unknown}; allowed: {', '.join(MEMBER_KEYS)}")
        name = str(spec["aggregator"])
        if name == Ensemble.name:
            raise ConfigError(f"ensemble member {key!r}: an ensemble cannot be a member (list its members instead)")
        if name not in AGGREGATORS:
            raise ConfigError(
                f"ensemble member {key!r}: unknown aggregator {name!r}; choose one of "
                f"{', '.join(n for n in AGGREGATORS.names() if n != Ensemble.name)}"
            )
        options = dict(spec.get("options") or {})
        options.pop("trainable", None)  # the ensemble's own switch decides
        validate_options("aggregator", name, options, where=f"ensemble member {key!r}:")
        specs[key] = (name, options)
    return specs


class Ensemble(Aggregator):
    """Members' L2-normalised outputs, each scaled by ``√wᵢ``, concatenated; then the projections its state holds."""

    name = "ensemble"

    def __init__(
        self,
        backbone_dim: int,
        members: Mapping[str, Mapping[str, Any]] | None = None,
        weights: Mapping[str, float] | None = None,
        state: str | os.PathLike | None = None,
        vocabulary=None,
        trainable: bool = False,
    ):
        super().__init__(backbone_dim)
        specs = member_specs(members)
        self.weights = self._weights(specs, weights)
        self.members = nn.ModuleDict()
        for key, (name, options) in specs.items():
            factory = AGGREGATORS.get(name)
            opts = dict(options)
            if _wants_vocabulary(name, options):
                if vocabulary is None:
                    raise ConfigError(
                        f"ensemble member {key!r} ({name}) needs the map's vocabulary (the map build provides it)"
                    )
                opts["vocabulary"] = vocabulary
            if _accepts(factory, "trainable"):
                opts["trainable"] = bool(trainable)
            self.members[key] = factory(backbone_dim, **opts)
        self.projections = nn.ModuleList()
        self.state = None if state is None else str(state)
        if state is not None:
            self._load(read_state(state))
        self.learns_from_sample = any(getattr(m, "learns_from_sample", False) for m in self.members.values())
        self.requires_grad_(bool(trainable))

    @staticmethod
    def _weights(specs: Mapping[str, Any], weights: Mapping[str, float] | None) -> list[float]:
        if weights is None:
            return [1.0 / len(specs)] * len(specs)
        if not isinstance(weights, Mapping) or set(map(str, weights)) != set(specs):
            raise ConfigError(
                f"ensemble: weights must give every member ({', '.join(specs)}) its share, got {weights!r}"
            )
        w = {str(k): v for k, v in weights.items()}
        if any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v)
            for v in w.values()
        ):
            raise ConfigError(f"ensemble: member weights must be positive numbers, got {weights!r}")
        total = float(sum(w.values()))
        return [float(w[k]) / total for k in specs]

    def _load(self, loaded: Mapping[str, torch.Tensor]) -> None:
        """Load a saved ensemble state, first rebuilding the layers its keys show (projections, centres)."""
        try:
            self._rebuild_and_load(loaded)
        except ConfigError as exc:
            if str(exc).startswith("ensemble state"):
                raise
            raise ConfigError(f"ensemble state {self.state} does not fit members {list(self.members)}: {exc}") from None

    def _rebuild_and_load(self, loaded: Mapping[str, torch.Tensor]) -> None:
        fused = [f"members.{k}.vlad." for k, m in self.members.items() if getattr(m, "vlad", None) is not None]
        loaded = {k: v for k, v in loaded.items() if not any(k.startswith(p) for p in fused)}
        for key, member in self.members.items():
            if not isinstance(member, TrainedHead):
                continue
            prefix = f"members.{key}."
            i = len(member.projections)
            while f"{prefix}projections.{i}.weight" in loaded:
                out_dim, in_dim = loaded[f"{prefix}projections.{i}.weight"].shape
                member.add_projection(Projection(int(in_dim), int(out_dim)))
                i += 1
            if f"{prefix}{CENTRE_KEY}" in loaded:
                member.set_centre(loaded[f"{prefix}{CENTRE_KEY}"])
        i = 0
        while f"projections.{i}.weight" in loaded:
            out_dim, in_dim = loaded[f"projections.{i}.weight"].shape
            self.add_projection(Projection(int(in_dim), int(out_dim)))
            i += 1
        missing, unexpected = self.load_state_dict(loaded, strict=False)
        missing = [k for k in missing if not any(k.startswith(p) for p in fused)]
        if missing or unexpected:
            raise ConfigError(
                f"ensemble state {self.state} does not fit members {list(self.members)}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )

    @classmethod
    def wants_vocabulary(cls, options: dict[str, Any]) -> bool:
        members = options.get("members")
        if not isinstance(members, Mapping):
            return False
        return any(_wants_vocabulary(name, opts) for name, opts in member_specs(members).values())

    def add_projection(self, layer: Projection) -> None:
        """Append a projection (e.g. a PCA fitted on the ensemble's output) after the concatenation."""
        if layer.in_features != self.dim:
            raise ConfigError(f"a projection from {layer.in_features}-d cannot follow this {self.dim}-d ensemble")
        self.projections.append(layer)

    @property
    def concat_dim(self) -> int:
        return sum(int(m.dim) for m in self.members.values())

    @property
    def head_dim(self) -> int:
        """The output dim (as a trained head's: what a ``[post]`` step or ``add-pca`` projects from)."""
        return self.dim

    @property
    def dim(self) -> int:
        return self.projections[-1].out_features if len(self.projections) else self.concat_dim

    @property
    def is_fitted(self) -> bool:
        return all(m.is_fitted for m in self.members.values())

    def fit(self, descriptors, **options: Any) -> None:
        """Fit every member that learns from a sample; member ``i`` with ``seed + i`` (so k-means members differ)."""
        seed = options.pop("seed", None)
        for i, m in enumerate(self.members.values()):
            if getattr(m, "learns_from_sample", False) or not m.is_fitted:
                m.fit(descriptors, **options, **({} if seed is None else {"seed": int(seed) + i}))

    def member_outputs(self, features: DenseFeatures) -> list[torch.Tensor]:
        """Each member's L2-normalised descriptors (unscaled), in member order."""
        return [l2n(m(features)) for m in self.members.values()]

    def forward(self, features: DenseFeatures) -> torch.Tensor:
        parts = self.member_outputs(features)
        dtype = parts[0].dtype
        x = torch.cat([math.sqrt(w) * p.to(dtype) for w, p in zip(self.weights, parts)], dim=1)
        for p in self.projections:
            x = p(x)
        return x

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "members": {k: m.identity() for k, m in self.members.items()},
            "weights": [round(w, 6) for w in self.weights],
            "projections": [p.out_features for p in self.projections],
            "state": Path(self.state).name if self.state else None,
        }


AGGREGATORS.register("ensemble", Ensemble)
register_schema(
    Schema(
        "aggregator",
        "ensemble",
        (
            Option(
                "members",
                "mapping",
                None,
                "name → {aggregator, options}: the members, concatenated in this order (required)",
                nullable=True,
            ),
            Option(
                "weights",
                "mapping",
                None,
                "name → share of the similarity (normalised to sum 1; default equal)",
                nullable=True,
            ),
            Option(
                "state",
                "path",
                None,
                "the ensemble's state dict (members' trained state and projections)",
                nullable=True,
            ),
            Option("trainable", "bool", False, "learn the members when training"),
        ),
        doc="an ensemble: members' normalised outputs concatenated (cosine = mean of the members' cosines)",
    )
)
