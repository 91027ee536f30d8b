"""Re-ranking state of a map built without it, fitted once and saved into the map.

A map built without ``--rerank`` can still be re-ranked: the patch state (NetVLAD centres and α,
the patch PCA) is fitted on a sample of the map's images, and candidates' patch descriptors are
computed from the map's images. Both are expensive (minutes for the fit on a large map; a backbone
pass per shortlist image), so both are saved the first time and read back on every later call:

``MAP_DIR/extensions/patches-<digest>/``
  ``state.npz``           the fitted state (the same arrays as a built map's ``extensions/patches.npz``)
                          and ``options`` (JSON) it was fitted with;
  ``rows-NNNNNN.npz``     candidates' patch payloads computed by one call: ``keys`` and ``sha256``
                          (what each payload describes) and ``<i>/<array>`` per image, as the
                          ``patches`` extension stores them.

``<digest>`` hashes the options that decide the state and the stored format, so presets never share
a folder. A payload is used only for a map row with the same image key *and* content hash: an image
re-encoded into the map is computed again. Files are only ever added, each written to a temporary
name and renamed into place while holding the map's write lock (:func:`vprkit.maps.lock.map_write_lock`),
so readers sharing the map never see a partial file and two savers never race. When the lock is
taken (a build is running) or the folder cannot be written, the state stays in memory and the log
says how to save it (``vprkit rerank prepare MAP --rerank NAME``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import MapDamagedError, MapError
from ..io import atomic_write_bytes, load_npz
from ..maps.extensions import EXTENSIONS_DIR
from ..maps.lock import map_write_lock
from ..maps.manifest import ensure_map_identity, map_identity
from ..maps.verify import check_record, write_record
from .extension import GROUP, STORED_FORMAT_KEYS, PatchesExtension

logger = logging.getLogger(__name__)

STATE_FILE = "state.npz"
SHARD_PATTERN = "rows-*.npz"
# Hex digits of the options' SHA-256 naming the folder: collisions between a map's few presets are
# out of reach, and the name stays readable.
DIGEST_CHARS = 12
# Options that decide the fitted state beyond the stored format (a different sample is a different state).
FIT_KEYS = ("fit_images", "fit_patches", "seed")
# What numpy and zipfile raise on a damaged .npz (truncated, emptied, a flipped bit failing the CRC).
NPZ_DAMAGE = (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile)


def state_digest(options: Mapping[str, object]) -> str:
    """A short hash of the options that decide what is fitted and stored."""
    picked = {k: options.get(k) for k in (*STORED_FORMAT_KEYS, *FIT_KEYS)}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:DIGEST_CHARS]


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class SavedState:
    """The ``patches-<digest>`` folder of one map for one set of patch options (see module docs).

    ``writable=False`` never writes (nor takes the lock): what is computed stays in memory.
    """

    def __init__(
        self,
        map_dir: str | Path,
        extension: PatchesExtension,
        writable: bool = True,
        log: Callable[[str], None] = logger.info,
    ):
        self.map_dir = Path(map_dir)
        self.extension = extension
        self.digest = state_digest(extension.options)
        self.folder = self.map_dir / EXTENSIONS_DIR / f"{GROUP}-{self.digest}"
        self.writable = writable
        self.log = log
        self.saves = 0  # files written by this object (state and shards), for reports and tests
        self._warned = False

    # ---- the fitted state ----------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    def load_state(self) -> bool:
        """Load the saved state into the extension; ``False`` if none was saved."""
        if not self.state_path.exists():
            return False
        try:
            check_record(self.state_path, map_identity(self.map_dir))  # another map's state, or changed since saved
            state = load_npz(self.state_path)
        except (*NPZ_DAMAGE, MapError) as exc:
            self.log(f"re-ranking state {self.state_path} is unreadable ({exc}); fitting it again")
            return False
        state.pop("options", None)
        self.extension.load_state(state)
        return True

    def save_state(self) -> bool:
        """Save the extension's fitted state (under the map's write lock); ``False`` if it could not be."""
        state = self.extension.state()
        options = json.dumps({k: self.extension.options.get(k) for k in (*STORED_FORMAT_KEYS, *FIT_KEYS)}, default=str)
        return self._write(self.state_path, {**state, "options": np.asarray(options)})

    # ---- candidates' patches -------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(self.folder.glob(SHARD_PATTERN)) if self.folder.is_dir() else []

    def index(self, keys: Sequence[str], sha256: Sequence[bytes]) -> dict[int, tuple[Path, int]]:
        """Map row → (shard, item) of every saved payload whose image key and content hash match the map's."""
        row_of = {(k, bytes(h)): r for r, (k, h) in enumerate(zip(keys, sha256))}
        found: dict[int, tuple[Path, int]] = {}
        map_id = map_identity(self.map_dir)
        for shard in self.shards():
            try:
                check_record(shard, map_id)  # another map's rows, or changed since saved: computed again
                with np.load(shard, allow_pickle=False) as z:
                    names, hashes = z["keys"], z["sha256"]
            except (*NPZ_DAMAGE, MapError) as exc:
                self.log(f"ignoring unreadable re-ranking shard {shard} ({exc})")
                continue
            for i, (k, h) in enumerate(zip(names, hashes)):
                r = row_of.get((k.decode() if isinstance(k, bytes) else str(k), bytes(h)))
                if r is not None:
                    found[r] = (shard, i)
        return found

    @staticmethod
    def read(shard: Path, item: int) -> dict[str, np.ndarray]:
        """The payload of ``item`` in ``shard`` (as :meth:`PatchesExtension.encode` made it)."""
        prefix = f"{item}/"
        try:
            with np.load(shard, allow_pickle=False) as z:
                return {n[len(prefix) :]: z[n] for n in z.files if n.startswith(prefix)}
        except NPZ_DAMAGE as exc:
            raise MapDamagedError(
                f"re-ranking rows {shard} are damaged ({type(exc).__name__}: {str(exc)[:80]}); delete the file and "
                f"run `vprkit rerank prepare MAP --rerank NAME` again"
            ) from None

    def save_rows(
        self, keys: Sequence[str], sha256: Sequence[bytes], payloads: Sequence[Mapping[str, np.ndarray]]
    ) -> Path | None:
        """Save newly computed payloads as one shard; its path, or ``None`` if not saved."""
        if not payloads:
            return None
        arrays: dict[str, np.ndarray] = {
            "keys": np.asarray([k.encode() for k in keys]),
            "sha256": np.asarray(list(sha256)),
        }
        for i, p in enumerate(payloads):
            arrays.update({f"{i}/{name}": np.asarray(a) for name, a in p.items()})
        existing = self.shards()
        number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        path = self.folder / f"rows-{number:06d}.npz"
        return path if self._write(path, arrays) else None

    # ---- writing -------------------------------------------------------------------------------
    def _write(self, path: Path, arrays: Mapping[str, np.ndarray]) -> bool:
        if not self.writable:
            self._say_unsaved("the map was opened without saving")
            return False
        try:
            with map_write_lock(self.map_dir):
                if path.name != STATE_FILE:  # a concurrent saver may have taken the number: take the next free one
                    while path.exists():
                        number = int(path.stem.split("-")[1]) + 1
                        path = path.with_name(f"rows-{number:06d}.npz")
                atomic_write_bytes(path, _npz_bytes(arrays))
                write_record(path, ensure_map_identity(self.map_dir))  # a copied or edited file is not loaded
        except (MapError, OSError) as exc:
            self._say_unsaved(str(exc))
            return False
        self.saves += 1
        return True

    def _say_unsaved(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            self.log(
                f"re-ranking state kept in memory only ({why}); save it once with "
                f"`vprkit rerank prepare {self.map_dir} --rerank NAME` or build the map with --rerank NAME"
            )
