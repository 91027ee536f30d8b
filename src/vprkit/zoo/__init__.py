"""The model zoo: the VPR methods practitioners use, loadable from their official checkpoints.

Ground level (no stage package is imported, and no torch at import): the stages' modules given
``zoo=NAME`` call :func:`load_part` to fill themselves from the checkpoint, and the presets module
registers :func:`zoo_presets`.

- :mod:`.weights` — :class:`ZooWeights` (URL, SHA-256, format, layout, licence, reported recall), the
  cache (``$VPRKIT_CACHE/zoo``), verified downloads, and the offline error naming the URL;
- :mod:`.formats` — reading ``torch``, ``safetensors``, Lightning (without Lightning) and ``.mat`` files;
- :mod:`.layouts` — official parameter names → vprkit's (``backbone.*`` / ``aggregator.*``);
- one module per family (``cosplace``, ``boq``, ``mixvpr``, ``salad``, ``netvlad``, ``anyloc``): its
  weights entries, layouts and presets.
"""

from __future__ import annotations

from ..config import Config
from . import anyloc, boq, cosplace, mixvpr, netvlad, salad
from .formats import READERS, read_container
from .layouts import LAYOUTS, load_part, register_layout, renamed, zoo_part, zoo_state
from .weights import (
    ZOO_WEIGHTS,
    ZooWeights,
    cached_path,
    file_sha256,
    iter_weights,
    register_weights,
    weights_path,
    weights_status,
    zoo_cache_dir,
)

FAMILIES = (cosplace, boq, mixvpr, salad, netvlad, anyloc)


def zoo_presets() -> list[Config]:
    """Every zoo family's presets, in family order."""
    return [config for family in FAMILIES for config in family.PRESETS]


def zoo_entry_of(config: Config) -> ZooWeights | None:
    """The zoo weights a preset loads (its backbone's or aggregator's ``zoo`` option, or a ``zoo:`` vocabulary), if any."""
    name = config.backbone_options.get("zoo") or config.aggregator_options.get("zoo")
    if not name and str(config.vocabulary.source).startswith("zoo:"):
        name = config.vocabulary.source.split(":", 1)[1]
    return ZOO_WEIGHTS.get(name) if name else None


__all__ = [
    "LAYOUTS",
    "READERS",
    "ZOO_WEIGHTS",
    "ZooWeights",
    "cached_path",
    "file_sha256",
    "iter_weights",
    "load_part",
    "read_container",
    "register_layout",
    "register_weights",
    "renamed",
    "weights_path",
    "weights_status",
    "zoo_cache_dir",
    "zoo_entry_of",
    "zoo_part",
    "zoo_presets",
    "zoo_state",
]
