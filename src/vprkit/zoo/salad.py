"""Zoo family: salad (official checkpoints, their layouts and presets). Filled in by its owner."""

from __future__ import annotations

from ..config import Config

PRESETS: list[Config] = []
