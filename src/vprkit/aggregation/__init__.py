"""Aggregation: dense features → one global descriptor per image (GeM, mean, CLS, VLAD, NetVLAD).

Every aggregator is a ``torch.nn.Module`` with the contract documented in :mod:`.base`.
"""

from __future__ import annotations

from .base import AGGREGATORS, NORM_FLOOR, Aggregator, l2n
from .gem import GeM, GlobalToken, Mean, gem_pool
from .netvlad import NetVLAD, NetVLADLayer
from . import boq, ensemble, gem_fc, layout, mixvpr, projection, salad  # noqa: F401  (importing registers them)
from .vlad import CENTRE_KINDS, VLAD, DescriptorSampler, Vocabulary, fit_vocabulary, hard_vlad

__all__ = [
    "AGGREGATORS",
    "NORM_FLOOR",
    "Aggregator",
    "l2n",
    "GeM",
    "Mean",
    "GlobalToken",
    "gem_pool",
    "NetVLAD",
    "NetVLADLayer",
    "VLAD",
    "CENTRE_KINDS",
    "Vocabulary",
    "fit_vocabulary",
    "hard_vlad",
    "DescriptorSampler",
]
