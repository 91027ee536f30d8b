"""The model zoo's weight files: where each comes from, where it is kept, and that it is the right file.

A :class:`ZooWeights` entry names one published checkpoint (MegaLoc's ``model.safetensors``, a CosPlace
``.pth``, NetVLAD's MATLAB ``.mat`` …): its official URL(s), its SHA-256 where the authors publish one
(or where it was measured), its container format and the *layout* that turns its official parameter
names into vprkit's (:mod:`vprkit.zoo.layouts`). Files are found in this order:

1. an explicit path (``--weights PATH``: a file, or a folder holding the file);
2. vprkit's cache, ``$VPRKIT_CACHE/zoo/<entry>/<filename>`` (one folder per entry: several projects
   call their file ``model.safetensors``);
3. a download from each URL in turn into that folder (atomic: a temporary file renamed when complete and
   verified) — unless offline (``VPRKIT_OFFLINE=1``), where the one-line error names the URL, the
   expected file name and where to put it.

Verification: a known SHA-256 must match (a mismatching download is deleted and refused; a mismatching
local file is refused). Where no hash is published, the hash of the first download is recorded beside the
file (``<filename>.sha256``) and later reads are checked against it (trust on first use, said so by
``vprkit weights verify``). Pure Python: no torch here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import ConfigError, WeightsNotFoundError
from ..registry import Registry

FORMATS = ("torch", "safetensors", "lightning", "mat")
HASH_CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_S = 60.0
RECORDED_HASH_SUFFIX = ".sha256"


@dataclass(frozen=True)
class ZooWeights:
    """One published checkpoint of a zoo model.

    ``layout``: the name of the function in :data:`vprkit.zoo.layouts.LAYOUTS` that maps the file's
    official keys to vprkit's (``backbone.*`` / ``aggregator.*``); ``format``: one of :data:`FORMATS`;
    ``sha256``: lower-case hex, or ``None`` where the authors publish none (recorded at first download).
    """

    name: str
    filename: str
    urls: tuple[str, ...]
    format: str
    layout: str
    licence: str
    source: str
    sha256: str | None = None
    size_bytes: int | None = None
    reported: str = ""  # the authors' reported recall, with where it is reported
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"zoo weights {self.name!r}: format must be one of {FORMATS}, got {self.format!r}")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ConfigError(f"zoo weights {self.name!r}: sha256 must be 64 lower-case hex digits")


ZOO_WEIGHTS: Registry[ZooWeights] = Registry("zoo weights")


def register_weights(entry: ZooWeights) -> ZooWeights:
    ZOO_WEIGHTS.register(entry.name, entry)
    return entry


def vprkit_cache_dir() -> Path:
    """``$VPRKIT_CACHE`` or ``~/.cache/vprkit``: where vprkit puts weights it downloads (every backbone's too)."""
    return Path(os.environ.get("VPRKIT_CACHE", Path.home() / ".cache" / "vprkit"))


def zoo_cache_dir() -> Path:
    """``$VPRKIT_CACHE/zoo`` (default ``~/.cache/vprkit/zoo``)."""
    return vprkit_cache_dir() / "zoo"


def cached_path(entry: ZooWeights) -> Path:
    """Where the cache keeps ``entry``'s file (whether or not it is there)."""
    return zoo_cache_dir() / entry.name / entry.filename


def offline() -> bool:
    """True when downloads are disabled (``VPRKIT_OFFLINE=1`` or Hugging Face's offline flag)."""
    return any(os.environ.get(v, "0") not in ("", "0", "false", "False") for v in ("VPRKIT_OFFLINE", "HF_HUB_OFFLINE"))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def expected_sha256(entry: ZooWeights, path: Path) -> tuple[str | None, str]:
    """The hash ``path`` must have and where that hash comes from (``published``, ``recorded``, ``none``)."""
    if entry.sha256:
        return entry.sha256, "published"
    recorded = path.with_name(path.name + RECORDED_HASH_SUFFIX)
    if recorded.is_file():
        return recorded.read_text().split()[0].strip().lower(), "recorded at first download"
    return None, "none"


def check_file(entry: ZooWeights, path: Path) -> str:
    """Refuse ``path`` unless its SHA-256 is the expected one; returns its hash."""
    digest = file_sha256(path)
    want, origin = expected_sha256(entry, path)
    if want is not None and digest != want:
        raise WeightsNotFoundError(
            f"{path} is not {entry.name}'s {entry.filename}: its SHA-256 is {digest[:12]}…, expected {want[:12]}… "
            f"({origin}); delete it and fetch again (`vprkit weights fetch {entry.name}`)"
        )
    return digest


SNIFF_BYTES = 128


def container_problem(fmt: str, head: bytes) -> str | None:
    """Why the first bytes of a download cannot be a ``fmt`` file (None when they can).

    A file host that answers with a web page (a quota notice, a sign-in or share page) must not become a
    "checkpoint" whose hash is then recorded as the right one.
    """
    if head.lstrip()[:15].lower().startswith((b"<!doctype", b"<html", b"<?xml", b'{"')):
        return "the server sent a web page, not the file"
    if fmt in ("torch", "lightning") and not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return "not a torch checkpoint (neither a zip archive nor a pickle)"
    if fmt == "safetensors" and (len(head) < 9 or head[8:9] != b"{"):
        return "not a safetensors file (no JSON header)"
    if fmt == "mat" and not head.startswith(b"MATLAB"):
        return "not a MATLAB .mat file"
    return None


def download(entry: ZooWeights, dest: Path) -> Path:
    """Fetch ``entry`` from its URLs in turn into ``dest``; verified before the rename makes it visible."""
    from ..io import atomic_path, clean_orphans  # numpy-importing: resolving a preset must stay library-free

    clean_orphans(dest.parent)
    errors = []
    for url in entry.urls:
        try:
            with atomic_path(dest) as tmp:
                with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    shutil.copyfileobj(resp, out)
                with open(tmp, "rb") as f:
                    problem = container_problem(entry.format, f.read(SNIFF_BYTES))
                if problem:
                    raise WeightsNotFoundError(problem)
                digest = file_sha256(tmp)
                if entry.sha256 and digest != entry.sha256:
                    raise WeightsNotFoundError(
                        f"SHA-256 {digest[:12]}… differs from the published {entry.sha256[:12]}…"
                    )
            if not entry.sha256:
                dest.with_name(dest.name + RECORDED_HASH_SUFFIX).write_text(f"{digest}  {url}\n")
            return dest
        except Exception as exc:  # no network here is the normal case on offline machines
            errors.append(f"{url}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    raise WeightsNotFoundError(
        f"weights for {entry.name} could not be downloaded ({'; '.join(errors)}); download {entry.urls[0]} "
        f"and save it as {dest} (or pass --weights PATH)"
    )


def weights_path(name: str, explicit: str | os.PathLike | None = None, *, fetch: bool = True) -> Path:
    """The verified local file of zoo entry ``name``: ``explicit`` → the cache → a download (see the module doc)."""
    entry = ZOO_WEIGHTS.get(name)
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_dir():
            p = p / entry.filename
        if not p.is_file():
            raise WeightsNotFoundError(f"weights for {name}: {p} does not exist")
        return p  # an explicit file may be a fine-tuned checkpoint in the official format: no hash to match
    dest = cached_path(entry)
    if dest.is_file():
        check_file(entry, dest)
        return dest
    if entry.extra.get("archive"):
        raise WeightsNotFoundError(
            f"weights for {name} are published only inside {entry.extra['archive']} ({entry.urls[0]}): download it "
            f"and copy its {entry.extra.get('member', entry.filename)} to {dest} (or pass --weights PATH to the file)"
        )
    if not fetch or offline():
        why = "downloads are disabled (VPRKIT_OFFLINE)" if offline() else "fetching was not asked for"
        raise WeightsNotFoundError(
            f"weights for {name} not found: {why}; download {entry.urls[0]} and save it as {dest} "
            f"(or pass --weights PATH to the file)"
        )
    return download(entry, dest)


@dataclass(frozen=True)
class WeightsStatus:
    """What ``vprkit weights list|verify`` prints for one entry."""

    name: str
    path: Path
    present: bool
    size_bytes: int | None
    sha256: str | None
    verdict: str


def weights_status(name: str, *, check: bool = False) -> WeightsStatus:
    """``name``'s cached file: present or not, and with ``check`` its hash against the expected one."""
    entry = ZOO_WEIGHTS.get(name)
    path = cached_path(entry)
    if not path.is_file():
        return WeightsStatus(name, path, False, None, None, "missing")
    size = path.stat().st_size
    if not check:
        return WeightsStatus(name, path, True, size, None, "present (not checked)")
    digest = file_sha256(path)
    want, origin = expected_sha256(entry, path)
    if want is None:
        verdict = "no published SHA-256 and none recorded: cannot be checked"
    else:
        verdict = f"ok ({origin} SHA-256)" if digest == want else f"DAMAGED: SHA-256 differs from the {origin} one"
    return WeightsStatus(name, path, True, size, digest, verdict)


def iter_weights() -> Iterator[ZooWeights]:
    for name in ZOO_WEIGHTS:
        yield ZOO_WEIGHTS.get(name)
