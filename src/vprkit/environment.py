"""Every environment variable vprkit reads, what it does, and which of them can change results.

:func:`recorded_environment` returns the ones that are set (with their values) among those that
can change what a map holds or what an evaluation measures; it is written into every map's
``map.json`` and every evaluation summary beside the resolved configuration, so a result can be
reproduced on another machine. Variables that only decide *whether* something works (offline
flags) are documented but not recorded.

| variable | read by | what it does | changes results |
|---|---|---|---|
| ``VPRKIT_CACHE`` | backbones.weights | where weights are looked for and downloaded (default ``~/.cache/vprkit``) | yes: which weight file is used |
| ``VPRKIT_VOCABULARIES`` | aggregation.vocabulary | folder of domain vocabularies (default ``$VPRKIT_CACHE/vocabularies``) | yes: which vocabulary ``--vocab domain:NAME`` uses |
| ``VPRKIT_DATA`` | datasets, ``vprkit eval --data-root`` | folder named datasets are found in (default ``./datasets``) | yes: which data is evaluated |
| ``VPRKIT_SAM_CHECKPOINT`` | segments.sam | SAM checkpoint when ``segmenter_options.checkpoint`` is unset | yes: which SAM model segments |
| ``VPRKIT_ONEDNN`` | backbones.dinov2 | ``0`` turns off oneDNN linear layers for DINOv2 on the CPU | yes: floating-point rounding of DINOv2 features |
| ``TORCH_HOME`` | backbones.weights | torch.hub's cache (``$TORCH_HOME/hub/checkpoints``: VGG16, DINOv2 files) | yes: which weight file is used |
| ``HF_HOME``, ``HF_HUB_CACHE`` | backbones.dinov2 | Hugging Face caches searched for DINOv2 weights | yes: which weight file is used |
| ``XDG_CACHE_HOME`` | backbones.weights, backbones.dinov2 | default root of the torch and Hugging Face caches | yes: which weight file is used |
| ``VPRKIT_OFFLINE``, ``HF_HUB_OFFLINE`` | backbones.weights | ``1`` forbids downloads (a missing file is an error naming where to put it) | no |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class EnvironmentVariable:
    name: str
    read_by: str
    effect: str
    changes_results: bool


VARIABLES: tuple[EnvironmentVariable, ...] = (
    EnvironmentVariable(
        "VPRKIT_CACHE",
        "vprkit.backbones.weights",
        "where weights are looked for and downloaded (default ~/.cache/vprkit)",
        True,
    ),
    EnvironmentVariable(
        "VPRKIT_VOCABULARIES",
        "vprkit.aggregation.vocabulary",
        "folder of domain vocabularies (default $VPRKIT_CACHE/vocabularies)",
        True,
    ),
    EnvironmentVariable(
        "VPRKIT_DATA",
        "vprkit.datasets.adapters, vprkit eval --data-root",
        "folder named datasets are found in (default ./datasets)",
        True,
    ),
    EnvironmentVariable(
        "VPRKIT_SAM_CHECKPOINT",
        "vprkit.segments.sam",
        "SAM checkpoint used when segmenter_options.checkpoint is unset",
        True,
    ),
    EnvironmentVariable(
        "VPRKIT_ONEDNN",
        "vprkit.backbones.dinov2",
        "0 turns off oneDNN linear layers for DINOv2 on the CPU (floating-point rounding)",
        True,
    ),
    EnvironmentVariable(
        "TORCH_HOME",
        "vprkit.backbones.weights",
        "torch.hub's cache ($TORCH_HOME/hub/checkpoints: VGG16, DINOv2 files)",
        True,
    ),
    EnvironmentVariable(
        "HF_HOME", "vprkit.backbones.dinov2", "Hugging Face home ($HF_HOME/hub searched for DINOv2)", True
    ),
    EnvironmentVariable("HF_HUB_CACHE", "vprkit.backbones.dinov2", "Hugging Face hub cache searched for DINOv2", True),
    EnvironmentVariable(
        "XDG_CACHE_HOME",
        "vprkit.backbones.weights, vprkit.backbones.dinov2",
        "default root of the torch and Hugging Face caches",
        True,
    ),
    EnvironmentVariable("VPRKIT_OFFLINE", "vprkit.backbones.weights", "1 forbids downloads", False),
    EnvironmentVariable(
        "HF_HUB_OFFLINE", "vprkit.backbones.weights", "1 forbids downloads (Hugging Face's flag)", False
    ),
)
RESULT_VARIABLES = tuple(v.name for v in VARIABLES if v.changes_results)


def recorded_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The result-changing variables of :data:`VARIABLES` that are set, with their values (sorted by name)."""
    env = os.environ if environ is None else environ
    return {name: env[name] for name in sorted(RESULT_VARIABLES) if env.get(name)}


def describe() -> list[str]:
    """One line per variable (for ``vprkit presets --environment`` and documentation)."""
    return [
        f"{v.name:<22} {'changes results' if v.changes_results else 'no effect on results':<21} {v.effect}"
        for v in VARIABLES
    ]
