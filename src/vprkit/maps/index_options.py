"""The FAISS index options: one vocabulary and one spelling, from CLI flag to ``Config.index_options`` to index.json.

Each option is declared once — name, type, default, meaning — in the table :mod:`vprkit.options`
keeps for every component (schema ``("index", "faiss")``): config validation checks presets
against it, ``vprkit map compress`` builds its flags from it (``ef_search`` → ``--ef-search``) and
the index manifest records options under its names. This module is what the maps read of that
table: the defaults, the check of a set of options, the spelling older files used (read, never
written) and FAISS's own parameter names, used only at the FAISS call.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from ..errors import ConfigError
from ..options import Option, check_option, did_you_mean, schema

FAISS_SCHEMA = schema("index", "faiss")
# Spellings written by earlier vprkit versions (index.json ``options``, map.json ``config.index_options``).
OLD_SPELLINGS = {"efSearch": "ef_search"}
# vprkit's name → the name FAISS's ParameterSpace knows, for the query-time parameters set on a FAISS index.
FAISS_PARAMETERS = {"nprobe": "nprobe", "ef_search": "efSearch"}
# Options a process serving a map may change without retraining (the others are fixed by the trained index).
QUERY_OPTIONS = ("nprobe", "ef_search", "rescore")
# "… (0 = off)" in an option's meaning: what a zero does, said beside the value when options are printed.
_ZERO_MEANS = re.compile(r"\(0 = ([^)]*)\)")


def canonical_name(name: str) -> str:
    """The one spelling of an index option (older files' ``efSearch`` reads as ``ef_search``)."""
    return OLD_SPELLINGS.get(name, name)


# FAISS refuses to search with nprobe 0 (IndexIVF::search: 'cur_nprobe > 0') and an HNSW search with efSearch 0
# finds one row: both take at least 1 here, whatever lower bound the table states.
SEARCH_BREADTH_MIN = {"nprobe": 1, "ef_search": 1}


def _as_declared(opt: Option) -> Option:
    """A table option under its one spelling, with FAISS's own lower bound where the table's is lower."""
    name = canonical_name(opt.name)
    floor = SEARCH_BREADTH_MIN.get(name)
    low = opt.low if floor is None or (opt.low is not None and opt.low >= floor) else floor
    return dataclasses.replace(opt, name=name, low=low)


FAISS_OPTIONS: dict[str, Option] = {canonical_name(o.name): _as_declared(o) for o in FAISS_SCHEMA.options}
DEFAULT_FAISS_OPTIONS: dict[str, Any] = {name: o.default for name, o in FAISS_OPTIONS.items()}
# The dtypes the full-precision copy kept for re-scoring may have.
DESCRIPTOR_DTYPE_NAMES: tuple[str, ...] = tuple(FAISS_OPTIONS["descriptors_dtype"].choices or ())


def canonical_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` under their one spelling; when a file holds both spellings of one option the current one wins."""
    given = dict(options or {})
    out = {canonical_name(k): v for k, v in given.items() if k in OLD_SPELLINGS}
    out.update({k: v for k, v in given.items() if k not in OLD_SPELLINGS})
    return out


def check_index_option(name: str, value: Any) -> Any:
    """``value`` if option ``name`` takes it (ints as int), else one ConfigError naming it, with a did-you-mean."""
    opt = FAISS_OPTIONS.get(name)
    if opt is None:
        raise ConfigError(
            f"index 'faiss': unknown option {name!r}{did_you_mean(name, FAISS_OPTIONS)}; "
            f"allowed: {', '.join(FAISS_OPTIONS)}"
        )
    check_option("index 'faiss'", opt, value)
    return int(value) if value is not None and "int" in opt.types else value


def faiss_options(options: Mapping[str, Any] | None, seed: int | None = None) -> dict[str, Any]:
    """Every FAISS option: :data:`DEFAULT_FAISS_OPTIONS` updated with ``options``, each checked (one spelling:
    files of older versions are read through :func:`canonical_options`, callers' options are not translated).

    ``seed`` fills the ``seed`` option when it is unset (the map's vocabulary seed, by its documented default).
    """
    merged = dict(DEFAULT_FAISS_OPTIONS)
    for name, value in dict(options or {}).items():
        merged[name] = check_index_option(name, value)
    if merged["seed"] is None and seed is not None:
        merged["seed"] = int(seed)
    return merged


def faiss_parameters(options: Mapping[str, Any]) -> dict[str, Any]:
    """The query-time options under FAISS's own parameter names (``ef_search`` → ``efSearch``)."""
    return {faiss_name: options[name] for name, faiss_name in FAISS_PARAMETERS.items() if name in options}


def describe_options(options: Mapping[str, Any]) -> str:
    """One line of the options applied, in the table's order: ``nprobe=16 … rescore=0 (off) …``."""
    parts = []
    for name, opt in FAISS_OPTIONS.items():
        if name not in options:
            continue
        value = options[name]
        zero = _ZERO_MEANS.search(opt.doc)
        parts.append(f"{name}={value}" + (f" ({zero.group(1)})" if zero and value == 0 else ""))
    return "index options: " + " ".join(parts)
