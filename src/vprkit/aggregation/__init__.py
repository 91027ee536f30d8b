"""Aggregation: dense features → one global descriptor per image (GeM, mean, CLS, VLAD, NetVLAD …)."""

from __future__ import annotations

import importlib

from .base import AGGREGATORS, Aggregator, l2n
from .vlad import VLAD, DescriptorSampler, Vocabulary, fit_vocabulary, hard_vlad

for _mod in ("gem", "vlad", "netvlad", "mixvpr", "pca"):
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _exc:  # a module not written yet
        if _exc.name != f"{__name__}.{_mod}":
            raise

__all__ = ["AGGREGATORS", "Aggregator", "l2n", "VLAD", "Vocabulary", "fit_vocabulary", "hard_vlad", "DescriptorSampler"]
