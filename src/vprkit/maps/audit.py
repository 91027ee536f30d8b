"""``vprkit map verify``: every file of a map read in full and compared with what the map recorded of it.

Opening a map checks sizes and cheap fingerprints (:mod:`vprkit.maps.verify`); this reads every byte: the
full SHA-256 of each derived file against ``index.json`` (or the file's own record), the identity and the
content checksum (descriptors and keys, recorded when written) of each store file, the store's layout and
keys (no key twice), the vocabulary's checksum, the calibration's checksum of itself and saved re-ranking
state. One :class:`FileCheck` per file; the map is good when no verdict is a failure.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py

from ..aggregation.vlad import Vocabulary
from ..errors import MapDamagedError, MapError, VocabularyMismatchError
from .extensions import EXTENSIONS_DIR
from .index import INDEX_FILE, MANIFEST_FILE
from .manifest import MAP_FILE, VOCAB_FILE, MapManifest, read_index_manifest, read_manifest
from .store import LIVE_DIR, STORE_FILE, MapStore, check_content, file_map_id
from .verify import checksum_matches, confined, fingerprint_file, record_path, sha256_file

CALIBRATION_FILE = "calibration.json"  # written by vprkit.retrieval.estimate (which imports maps, not the reverse)
# Saved re-ranking state and rows, one folder per set of options (vprkit.rerank.saved).
SAVED_STATE_GLOBS = ("*/state.npz", "*/rows-*.npz")
# Verdicts: these three are good; anything else names what is wrong.
GOOD_VERDICTS = ("ok", "unrecorded", "fingerprint only")


@dataclass(frozen=True)
class FileCheck:
    """One file of the map: what was recorded of it, what it is, and the verdict."""

    file: str
    recorded: str
    actual: str
    verdict: str

    @property
    def good(self) -> bool:
        return self.verdict in GOOD_VERDICTS


def _short(digest: str | None) -> str:
    return "-" if not digest else digest[:16]


def verify_map(map_dir: str | os.PathLike) -> list[FileCheck]:
    """Every file of ``map_dir`` checked in full (reads all of it). A folder that is not a map is a MapError."""
    d = Path(map_dir)
    manifest = read_manifest(d)
    checks = [FileCheck(MAP_FILE, "-", f"map id {manifest.map_id or '-'}", "ok" if manifest.map_id else "unrecorded")]
    checks.append(_vocabulary(d, manifest))
    checks += _store_files(d, manifest)
    checks += _index_files(d)
    checks.append(_calibration(d))
    checks += _saved_state(d)
    return [c for c in checks if c is not None]


def _vocabulary(d: Path, manifest: MapManifest) -> FileCheck | None:
    path = d / VOCAB_FILE
    if not path.exists():
        return None if manifest.vocabulary is None else FileCheck(VOCAB_FILE, "recorded", "missing", "missing")
    recorded = manifest.vocabulary.checksum if manifest.vocabulary else None
    try:
        actual = Vocabulary.load(path).checksum
    except (VocabularyMismatchError, MapError, OSError, ValueError, KeyError) as exc:
        return FileCheck(VOCAB_FILE, _short(recorded), f"unreadable ({exc})", "damaged")
    if recorded is None:
        return FileCheck(VOCAB_FILE, "-", _short(actual), "unrecorded")
    return FileCheck(VOCAB_FILE, _short(recorded), _short(actual), "ok" if actual == recorded else "changed")


def _store_files(d: Path, manifest: MapManifest) -> list[FileCheck]:
    """Each store file's identity and layout, then the store as a whole (dimension, keys given once)."""
    store = MapStore(d)
    paths = store.current_files()
    out = []
    for path in paths:
        name = path.relative_to(d).as_posix()
        try:
            with h5py.File(path, "r") as f:
                owner = file_map_id(f)
                content = check_content(f, path)
        except MapDamagedError as exc:
            out.append(FileCheck(name, "content checksum", str(exc), "changed"))
            continue
        except (OSError, KeyError, ValueError, TypeError) as exc:
            out.append(FileCheck(name, manifest.map_id or "-", f"unreadable ({exc})", "damaged"))
            continue
        verdict = "unrecorded" if owner is None or manifest.map_id is None or content is None else "ok"
        if owner is not None and manifest.map_id is not None and owner != manifest.map_id:
            verdict = "another map's"
        shown = f"map id {owner or '-'}, content " + ("-" if content is None else "matches")
        out.append(FileCheck(name, f"map id {manifest.map_id or '-'}", shown, verdict))
    try:
        store.check_belongs(manifest.map_id, manifest.descriptor_dim)
        whole = FileCheck(f"{STORE_FILE} + {LIVE_DIR}/", "keys once, one dimension", f"{len(store)} rows", "ok")
    except MapError as exc:
        whole = FileCheck(f"{STORE_FILE} + {LIVE_DIR}/", "keys once, one dimension", str(exc), "damaged")
    return out + [whole]


def _index_files(d: Path) -> list[FileCheck]:
    """Each file ``index.json`` lists against its recorded SHA-256 (its fingerprint when only that was kept)."""
    try:
        manifest = read_index_manifest(d)
    except MapError as exc:
        return [FileCheck(MANIFEST_FILE, "-", str(exc), "damaged")]
    if manifest is None:
        exists = (d / INDEX_FILE).exists()
        return [FileCheck(INDEX_FILE, "-", "present" if exists else "missing", "unrecorded")]
    own = read_manifest(d).map_id
    out = []
    if manifest.map_id is not None and own is not None and manifest.map_id != own:
        out.append(FileCheck(MANIFEST_FILE, f"map id {own}", f"map id {manifest.map_id}", "another map's"))
    records = [*manifest.shards, manifest.descriptors, manifest.trained]
    for record in (r for r in records if r is not None):
        out.append(_recorded_file(d, record.file, record.size, record.sha256, record.fingerprint))
    return out


def _recorded_file(d: Path, name: str, size: int | None, sha256: str | None, fingerprint: str | None) -> FileCheck:
    try:
        path = confined(d, name)
    except MapError as exc:
        return FileCheck(name, "-", str(exc), "outside the map")
    if not path.exists():
        return FileCheck(name, _short(sha256 or fingerprint), "missing", "missing")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return FileCheck(name, f"{size:,} bytes", f"{actual_size:,} bytes", "changed")
    if sha256 is not None:
        actual = sha256_file(path)
        return FileCheck(name, _short(sha256), _short(actual), "ok" if actual == sha256 else "changed")
    if fingerprint is not None:
        actual = fingerprint_file(path)
        return FileCheck(
            name, _short(fingerprint), _short(actual), "fingerprint only" if actual == fingerprint else "changed"
        )
    return FileCheck(name, "-", _short(sha256_file(path)), "unrecorded")


def _calibration(d: Path) -> FileCheck | None:
    path = d / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return FileCheck(CALIBRATION_FILE, "-", f"unreadable ({exc})", "damaged")
    if not isinstance(data, dict):
        return FileCheck(CALIBRATION_FILE, "-", "not a JSON object", "damaged")
    recorded = data.get("sha256")
    if recorded is None:
        return FileCheck(CALIBRATION_FILE, "-", "no checksum", "unrecorded")
    return FileCheck(
        CALIBRATION_FILE,
        _short(recorded),
        "content " + ("matches" if checksum_matches(data) else "differs"),
        "ok" if checksum_matches(data) else "changed",
    )


def _saved_state(d: Path) -> list[FileCheck]:
    """Saved re-ranking state and rows against their records (size, SHA-256, map id)."""
    folder = d / EXTENSIONS_DIR
    out = []
    own = read_manifest(d).map_id
    found = sorted(p for pattern in SAVED_STATE_GLOBS for p in folder.glob(pattern)) if folder.is_dir() else []
    for path in found:
        name = path.relative_to(d).as_posix()
        rec = record_path(path)
        if not rec.exists():
            out.append(FileCheck(name, "-", _short(sha256_file(path)), "unrecorded"))
            continue
        try:
            data = json.loads(rec.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            out.append(FileCheck(name, "-", f"record unreadable ({exc})", "damaged"))
            continue
        owner = data.get("map_id") if isinstance(data, dict) else None
        if owner is not None and own is not None and owner != own:
            out.append(FileCheck(name, f"map id {own}", f"map id {owner}", "another map's"))
            continue
        out.append(_recorded_file(d, name, data.get("size"), data.get("sha256"), data.get("fingerprint")))
    return out


def verification_report(map_dir: str | os.PathLike) -> dict[str, Any]:
    """:func:`verify_map` as JSON-ready data: ``{"map", "good", "unrecorded" (files from before records, which get
    one at the map's next write), "files": [{file, recorded, actual, verdict}]}``."""
    checks = verify_map(map_dir)
    return {
        "map": str(map_dir),
        "good": all(c.good for c in checks),
        "unrecorded": sum(c.verdict == "unrecorded" for c in checks),
        "files": [asdict(c) for c in checks],
    }
