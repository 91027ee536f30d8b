"""Per-image payloads stored in a map beside the global descriptor (re-ranking patches, SuperSegments).

An extension is computed from the same dense features as the global descriptor, in the same pass,
so enabling one never re-runs the backbone. It may learn state from a sample of the map's images
first (a PCA, say); that state is saved in ``MAP_DIR/extensions/<group>.npz``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np

from ..backbones.base import Backbone, DenseFeatures
from ..errors import MapError
from ..io import atomic_savez, load_npz
from ..registry import Registry

if TYPE_CHECKING:
    from ..aggregation.vlad import Vocabulary
    from ..images import Batch
    from .store import MapStore

EXTENSIONS_DIR = "extensions"


class MapExtension:
    """Base class; subclasses set ``group`` and implement :meth:`encode`."""

    group: str = "extension"
    needs_fit: bool = False

    def __init__(self, options: Mapping[str, Any], backbone: Backbone, vocabulary: "Vocabulary | None"):
        self.options = dict(options)
        self.backbone = backbone
        self.vocabulary = vocabulary

    def fit(self, samples: Iterable[tuple["Batch", DenseFeatures]]) -> None:
        """Learn state from a sample of the map's images (only called when ``needs_fit``)."""

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned."""

    def encode(self, batch: "Batch", features: DenseFeatures) -> list[dict[str, np.ndarray]]:  # pragma: no cover
        """One dict of arrays per image of the batch (stored under ``extras/<group>/<row>``)."""
        raise NotImplementedError

    def finalize(self, store: "MapStore", map_dir: Path) -> None:
        """Called after the store is consolidated (e.g. to build a segment index from ``store``'s extras)."""

    # ---- persistence of the learned state ---------------------------------------------------
    def state_path(self, map_dir: Path) -> Path:
        return Path(map_dir) / EXTENSIONS_DIR / f"{self.group}.npz"

    def save_state(self, map_dir: Path) -> None:
        state = self.state()
        if state:
            atomic_savez(self.state_path(map_dir), **state)

    def try_load_state(self, map_dir: Path) -> bool:
        path = self.state_path(map_dir)
        if not path.exists():
            return False
        try:
            state = load_npz(path)
        except (ValueError, OSError) as exc:
            raise MapError(f"{path} is damaged ({exc}); rebuild the map") from None
        self.load_state(state)
        return True


EXTENSIONS: Registry[Callable[..., MapExtension]] = Registry("map extension")
