"""The map folder's three JSON records, typed: ``map.json``, ``build.json`` and ``index.json``.

- ``map.json`` (:class:`MapManifest`): what the map is — its settings, where its images came from
  (runs), the frame of its poses, the models' identities, counts, the index's factory and size, and
  what the last build or change did. Written when a build finishes and at every change.
- ``build.json`` (:class:`BuildRecord`): the settings a build records before its first shard, and the
  vocabulary's K and checksum, so that a resumed or later build can be refused when they differ.
- ``index.json`` (:class:`IndexManifest`): the FAISS index of the map — factory, options (one
  spelling, :mod:`vprkit.maps.index_options`), what it was trained on, its shard files.

Each file has one reader and one atomic writer here. A reader checks every field it knows (type and
allowed values) and raises one :class:`~vprkit.errors.MapError` naming the file and the field
(``map.json: field 'counts.images' must be an integer ≥ 0, got 'x'``); fields written by other
versions are kept as they are (``extra``), and fields that older versions did not write read as
their defaults, so every map written so far still opens.
"""

from __future__ import annotations

import copy
import json
import numbers
import os
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, TypeVar

from ..config import Config
from ..errors import ConfigError, MapDamagedError, MapError
from ..io import atomic_write_json
from .index_options import DESCRIPTOR_DTYPE_NAMES, canonical_options, check_index_option
from .verify import new_map_id

MAP_FILE = "map.json"
# The settings a build writes before its first shard; a resumed or later build must match them.
BUILD_FILE = "build.json"
INDEX_MANIFEST_FILE = "index.json"
VOCAB_FILE = "vocabulary.npz"  # the map's VLAD vocabulary; map.json → vocabulary records its checksum
CRS_KINDS = ("utm", "local")
INDEX_MANIFEST_BACKENDS = ("faiss",)  # the backends that write index.json (Milvus keeps milvus.json)


# ---- checking one field ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """What a field holds, in words for the error (``an integer ≥ 0``), and the test of a value."""

    what: str
    test: Callable[[Any], bool]
    nullable: bool = False
    error: type[MapError] = MapError  # MapDamagedError for values no vprkit writes (a path outside the map)

    def __call__(self, value: Any, source: str, path: str) -> Any:
        if value is None and self.nullable:
            return None
        if not self.test(value):
            raise self.error(
                f"{source}: field '{path}' must be {self.what}{' or null' if self.nullable else ''}, "
                f"got {_shown(value)}"
            )
        return value

    def or_null(self) -> "Check":
        return Check(self.what, self.test, nullable=True, error=self.error)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(low: int | None = None, high: int | None = None) -> Check:
    words = "an integer" + (f" ≥ {low}" if low is not None else "") + (f" ≤ {high}" if high is not None else "")
    return Check(words, lambda v: _is_int(v) and (low is None or v >= low) and (high is None or v <= high))


def one_of(*choices: str) -> Check:
    return Check("one of " + ", ".join(repr(c) for c in choices), lambda v: isinstance(v, str) and v in choices)


def _relative_file(value: Any) -> bool:
    """A path inside the map folder (relative, no ``..``): a crafted manifest must not point elsewhere."""
    if not isinstance(value, str) or not value:
        return False
    path = PurePosixPath(value)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in value and "\x00" not in value


TEXT = Check("a string", lambda v: isinstance(v, str))
NUMBER = Check("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool))
OBJECT = Check("an object", lambda v: isinstance(v, Mapping))
TEXT_LIST = Check("a list of strings", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v))
HEX = "0123456789abcdef"
MAP_ID = Check("a map id (hexadecimal)", lambda v: isinstance(v, str) and 8 <= len(v) <= 64 and set(v) <= set(HEX))
CHECKSUM = Check(
    "a SHA-256 (64 hexadecimal digits)", lambda v: isinstance(v, str) and len(v) == 64 and set(v) <= set(HEX)
)
MAP_FILE_NAME = Check("a file name inside the map folder", _relative_file, error=MapDamagedError)


def checked(
    check: Check, default: Any = None, *, key: str | None = None, required: bool = False, always: bool = False
) -> Any:
    """A record field read with ``check``. ``required``: a file without it is damaged; ``always``: written even when
    null (as vprkit has always written it); ``key``: its JSON name when it differs from the attribute's."""
    meta = {"check": check, "key": key, "required": required, "always": always}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def nested(record: type, default: Any = None, *, many: bool = False, always: bool = False) -> Any:
    """A field holding a record (``many``: a list of them)."""
    meta = {"record": record, "many": many, "always": always, "key": None, "required": False}
    return field(default_factory=list, metadata=meta) if many else field(default=default, metadata=meta)


R = TypeVar("R", bound="Record")


class Record:
    """A JSON object with typed fields; keys this version does not know are kept in ``extra``, in order."""

    extra: dict[str, Any]

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any], source: str | os.PathLike = "", _path: str = "") -> R:
        """The record of ``data``, each known field checked; a one-line MapError naming ``source`` and the field."""
        where = _source_name(source, cls)
        if not isinstance(data, Mapping):
            if not _path:
                raise MapError(f"{where} does not hold a JSON object; the map directory is damaged")
            raise MapError(f"{where}: field '{_path}' must be an object, got {_shown(data)}")
        values: dict[str, Any] = {}
        known = set()
        for f in fields(cls):
            if f.name == "extra":
                continue
            key = f.metadata.get("key") or f.name
            known.add(key)
            path = f"{_path}.{key}" if _path else key
            if key not in data:
                if f.metadata.get("required"):
                    raise MapError(f"{where} lacks '{path}'; the map directory is damaged (rebuild it)")
                continue
            values[f.name] = _read_value(f.metadata, data[key], where, path)
        values["extra"] = {k: copy.deepcopy(v) for k, v in data.items() if k not in known}
        record = cls(**values)
        record._check(where, _path)
        return record

    def _check(self, source: str, path: str) -> None:
        """Checks between fields (a record type adds its own)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, in the layout vprkit writes (fields in order, unknown keys last)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and not f.metadata.get("always"):
                continue
            out[f.metadata.get("key") or f.name] = _plain(value)
        out.update(_plain(self.extra))
        return out


def _source_name(source: str | os.PathLike, cls: type) -> str:
    return str(source) if str(source) else getattr(cls, "FILE", cls.__name__)


def _read_value(meta: Mapping[str, Any], value: Any, where: str, path: str) -> Any:
    record = meta.get("record")
    if record is None:
        return copy.deepcopy(meta["check"](value, where, path))
    if meta.get("many"):
        if not isinstance(value, list):
            raise MapError(f"{where}: field '{path}' must be a list, got {_shown(value)}")
        return [record.from_dict(v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    return None if value is None else record.from_dict(value, where, path)


def _plain(value: Any) -> Any:
    """JSON types only (records as objects, paths and other values as strings, as the writers' ``default=str``)."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


# ---- map.json --------------------------------------------------------------------------------------
@dataclass
class RunRecord(Record):
    """One source of the map's images (a build's folder, the live service's uploads): rows store its id."""

    run: int = checked(integer(-1), required=True)
    images_root: str | None = checked(TEXT.or_null(), always=True)
    started: str | None = checked(TEXT.or_null())
    note: str | None = checked(TEXT.or_null())
    key_prefix: str | None = checked(TEXT.or_null())  # duplicates kept as new places: "runN/<name>"
    new_images: int | None = checked(integer().or_null())
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CrsRecord(Record):
    """The frame of the map's poses: UTM (``zone``, ``hemisphere``, ``epsg``) or local metres."""

    kind: str = checked(one_of(*CRS_KINDS), required=True)
    zone: int | None = checked(integer(1, 60).or_null())
    hemisphere: str | None = checked(one_of("N", "S").or_null())
    epsg: int | None = checked(integer(1).or_null())
    unit: str | None = checked(TEXT.or_null())
    extra: dict[str, Any] = field(default_factory=dict)

    def _check(self, source: str, path: str) -> None:
        if self.kind == "utm" and self.zone is None:
            raise MapError(f"{source}: field '{path}.zone' must be an integer ≤ 60 for a UTM frame, got None")


@dataclass
class VocabularyRecord(Record):
    """The VLAD vocabulary the map's descriptors were encoded with (``vocabulary.npz`` must have this checksum)."""

    checksum: str = checked(TEXT, required=True)
    source: str | None = checked(TEXT.or_null())
    k: int | None = checked(integer(1).or_null())
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Counts(Record):
    """How many images the map holds and how many could not be read."""

    images: int = checked(integer(0), 0, always=True)
    failed: int = checked(integer(0), 0, always=True)
    ignored_files_by_extension: dict[str, Any] | None = checked(OBJECT.or_null())
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class IndexSection(Record):
    """``map.json`` → ``index``: the index's factory and size (the index itself is described by ``index.json``)."""

    factory: str | None = checked(TEXT.or_null())
    ntotal: int | None = checked(integer(0).or_null())
    options: dict[str, Any] | None = checked(OBJECT.or_null())
    trained_on: dict[str, Any] | None = checked(OBJECT.or_null())
    build_seconds: float | None = checked(NUMBER.or_null())
    extra: dict[str, Any] = field(default_factory=dict)

    def _check(self, source: str, path: str) -> None:
        if self.options is not None:
            self.options = _checked_options(self.options, source, f"{path}.options")


@dataclass
class MapManifest(Record):
    """``map.json``: what the map is. ``config`` is the map's resolved settings (:meth:`settings` reads them)."""

    FILE = MAP_FILE

    vprkit_version: str | None = checked(TEXT.or_null())
    map_id: str | None = checked(MAP_ID.or_null())  # the map's identity, also in its store files and index.json
    config: dict[str, Any] = checked(OBJECT, {}, required=True)
    images_root: str | None = checked(TEXT.or_null(), always=True)
    runs: list[RunRecord] = nested(RunRecord, many=True)
    crs: CrsRecord | None = nested(CrsRecord)
    backbone: dict[str, Any] | None = checked(OBJECT.or_null())
    aggregator: dict[str, Any] | None = checked(OBJECT.or_null())
    descriptor_dim: int | None = checked(integer(1).or_null())
    vocabulary: VocabularyRecord | None = nested(VocabularyRecord, always=True)
    counts: Counts | None = nested(Counts)
    index: IndexSection | None = nested(IndexSection)
    extensions: list[str] = checked(TEXT_LIST, [])
    environment: dict[str, Any] | None = checked(OBJECT.or_null())
    imported: dict[str, Any] | None = checked(OBJECT.or_null())  # maps imported from hloc: where from
    created: str | None = checked(TEXT.or_null())
    updated: str | None = checked(TEXT.or_null())
    last_build: dict[str, Any] | None = checked(OBJECT.or_null())
    last_change: dict[str, Any] | None = checked(OBJECT.or_null())
    extra: dict[str, Any] = field(default_factory=dict)

    def _check(self, source: str, path: str) -> None:
        self.config = _canonical_config(self.config)

    def settings(self, source: str | os.PathLike = MAP_FILE) -> Config:
        """The recorded settings as a :class:`Config`; a MapError when this vprkit cannot read them."""
        return recorded_config(self.config, source)


def _canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Recorded settings with the FAISS index options under their one spelling (older maps wrote ``efSearch``)."""
    out = dict(config)
    if isinstance(out.get("index_options"), Mapping) and out.get("index_backend", "faiss") == "faiss":
        out["index_options"] = canonical_options(out["index_options"])
    return out


def recorded_config(config: Mapping[str, Any], source: str | os.PathLike = MAP_FILE) -> Config:
    """A recorded ``config`` object as :class:`Config`; one MapError when this vprkit cannot read it."""
    try:
        return Config.from_dict(_canonical_config(config))
    except (ConfigError, TypeError, KeyError, ValueError) as exc:
        raise MapError(f"{source}: the recorded settings are not readable by this vprkit ({exc})") from None


def _checked_options(options: Mapping[str, Any], source: str, path: str) -> dict[str, Any]:
    """FAISS index options under their one spelling, each checked against the option table."""
    out = canonical_options(options)
    for name, value in out.items():
        try:
            out[name] = check_index_option(name, value)
        except ConfigError as exc:
            reason = str(exc).split(": ", 1)[-1]
            raise MapError(f"{source}: field '{path}.{name}' is not a valid index option ({reason})") from None
    return out


# ---- build.json ------------------------------------------------------------------------------------
@dataclass
class BuildVocabulary(Record):
    """The vocabulary the shards of a build were encoded with."""

    k: int = checked(integer(1), required=True)
    checksum: str = checked(TEXT, required=True)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildRecord(Record):
    """``build.json``: the settings a build records before its first shard, and its vocabulary once known."""

    FILE = BUILD_FILE

    config: dict[str, Any] = checked(OBJECT, {}, required=True)
    vprkit_version: str | None = checked(TEXT.or_null())
    map_id: str | None = checked(MAP_ID.or_null())  # created with the build; map.json keeps it
    vocabulary: BuildVocabulary | None = nested(BuildVocabulary)
    extra: dict[str, Any] = field(default_factory=dict)

    def _check(self, source: str, path: str) -> None:
        self.config = _canonical_config(self.config)

    def settings(self, source: str | os.PathLike = BUILD_FILE) -> Config:
        return recorded_config(self.config, source)


# ---- index.json ------------------------------------------------------------------------------------
@dataclass
class IndexShard(Record):
    """One index file, how many rows it holds and what it is (size, fingerprint, SHA-256: :mod:`.verify`)."""

    file: str = checked(MAP_FILE_NAME, required=True)
    rows: int = checked(integer(0), required=True)
    size: int | None = checked(integer(0).or_null())
    fingerprint: str | None = checked(CHECKSUM.or_null())
    sha256: str | None = checked(CHECKSUM.or_null())
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DescriptorsRecord(Record):
    """The full-precision copy of the descriptors kept for exact re-scoring (and what the file is)."""

    file: str = checked(MAP_FILE_NAME, required=True)
    dtype: str = checked(one_of(*DESCRIPTOR_DTYPE_NAMES), "float16")
    rows: int = checked(integer(0), 0)
    size: int | None = checked(integer(0).or_null())
    fingerprint: str | None = checked(CHECKSUM.or_null())
    sha256: str | None = checked(CHECKSUM.or_null())
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FileRecord(Record):
    """One derived file of the map: its name, size, fingerprint and (when known) SHA-256."""

    file: str = checked(MAP_FILE_NAME, required=True)
    size: int | None = checked(integer(0).or_null())
    fingerprint: str | None = checked(CHECKSUM.or_null())
    sha256: str | None = checked(CHECKSUM.or_null())
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class IndexManifest(Record):
    """``index.json``: the map's FAISS index — factory, options, what it was trained on and its files."""

    FILE = INDEX_MANIFEST_FILE

    backend: str = checked(one_of(*INDEX_MANIFEST_BACKENDS), "faiss")
    map_id: str | None = checked(MAP_ID.or_null())  # the map this index was built for
    dim: int | None = checked(integer(1).or_null())
    factory: str | None = checked(TEXT.or_null())
    options: dict[str, Any] = checked(OBJECT, {})
    ntotal: int = checked(integer(0), 0)
    trained_on: dict[str, Any] = checked(OBJECT, {})
    generation: int = checked(integer(0), 0)
    saved: str | None = checked(TEXT.or_null())
    shards: list[IndexShard] = nested(IndexShard, many=True)
    descriptors: DescriptorsRecord | None = nested(DescriptorsRecord, always=True)
    trained: FileRecord | None = nested(FileRecord)
    extra: dict[str, Any] = field(default_factory=dict)

    def _check(self, source: str, path: str) -> None:
        self.options = _checked_options(self.options, source, "options")


# ---- one reader and one writer per file ------------------------------------------------------------
def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file of the map, with one clear error when it is unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MapError(f"{path} is unreadable ({exc}); the map directory is damaged") from None
    if not isinstance(data, dict):
        raise MapError(f"{path} does not hold a JSON object; the map directory is damaged")
    return data


def read_manifest(map_dir: str | os.PathLike) -> MapManifest:
    """``map.json`` of ``map_dir``, checked; a clear error when the folder is not a map."""
    path = Path(map_dir) / MAP_FILE
    if not path.exists():
        raise MapError(f"{Path(map_dir)} is not a vprkit map (no {MAP_FILE}); build one with `vprkit map build`")
    return MapManifest.from_dict(read_json(path), path)


def read_build_record(map_dir: str | os.PathLike) -> BuildRecord | None:
    """``build.json`` of ``map_dir``, checked, or None when no build has recorded its settings there."""
    path = Path(map_dir) / BUILD_FILE
    return BuildRecord.from_dict(read_json(path), path) if path.exists() else None


def read_index_manifest(map_dir: str | os.PathLike) -> IndexManifest | None:
    """``index.json`` of ``map_dir``, checked, or None when the map has none (an index from before manifests)."""
    path = Path(map_dir) / INDEX_MANIFEST_FILE
    return IndexManifest.from_dict(read_json(path), path) if path.exists() else None


def _write(map_dir: str | os.PathLike, name: str, record: Record | Mapping[str, Any], cls: type[Record]) -> Path:
    path = Path(map_dir) / name
    if not isinstance(record, cls):
        record = cls.from_dict(record, path)  # what is written is checked as what is read
    if isinstance(record, (MapManifest, BuildRecord)) and record.map_id is None:  # new, or from before identities
        record.map_id = map_identity(map_dir) or new_map_id()
    return atomic_write_json(path, record.to_dict(), default=str)


def _recorded_id(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        value = read_json(path).get("map_id")
    except MapError:
        return None
    return value if isinstance(value, str) and value else None


def map_identity(map_dir: str | os.PathLike) -> str | None:
    """The map's identity: ``map.json``'s, else (a build not yet finished) ``build.json``'s; None for a map
    from before identities (it gets one at its next write)."""
    d = Path(map_dir)
    return _recorded_id(d / MAP_FILE) or _recorded_id(d / BUILD_FILE)


def ensure_map_identity(map_dir: str | os.PathLike) -> str | None:
    """The map's identity, stamped now on a map from before identities (a writer calls this before writing files
    that carry it). None when the folder holds no record yet (nothing to bind to)."""
    d = Path(map_dir)
    found = map_identity(d)
    if found is not None:
        return found
    if (d / MAP_FILE).exists():
        write_manifest(d, read_manifest(d))
    elif (d / BUILD_FILE).exists():
        record = read_build_record(d)
        if record is not None:
            write_build_record(d, record)
    return map_identity(d)


def write_manifest(map_dir: str | os.PathLike, manifest: MapManifest | Mapping[str, Any]) -> Path:
    """Replace ``map.json`` atomically (a reader sees the old file or the new one); a dict is checked first.

    A manifest without an identity takes the map's (or a new one): rebuilding ``map.json`` keeps the map's id."""
    return _write(map_dir, MAP_FILE, manifest, MapManifest)


def write_build_record(map_dir: str | os.PathLike, record: BuildRecord | Mapping[str, Any]) -> Path:
    """Replace ``build.json`` atomically; a dict is checked first (and given the map's identity, or a new one)."""
    return _write(map_dir, BUILD_FILE, record, BuildRecord)


def write_index_manifest(map_dir: str | os.PathLike, manifest: IndexManifest | Mapping[str, Any]) -> Path:
    """Replace ``index.json`` atomically — the swap that makes a new index current; a dict is checked first."""
    return _write(map_dir, INDEX_MANIFEST_FILE, manifest, IndexManifest)


def read_map_info(map_dir: str | os.PathLike) -> dict[str, Any]:
    """``map.json`` of ``map_dir`` as a dict (the checked manifest's :meth:`~MapManifest.to_dict`)."""
    return read_manifest(map_dir).to_dict()
