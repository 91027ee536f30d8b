"""What a build adds to a map: which images are new, changed, copies or duplicates, under which keys, in which run.

A map can take images from several folders (runs, ``map.json`` → ``runs``); each stored row records
its image's content and the run it came from (:class:`~vprkit.maps.store.StoredEntry`). Before a
build encodes anything, :func:`plan_build` compares the images it was given with those entries and
decides, by the build's policies, what happens to each one — so that a build is resumable (what is
stored is skipped), content-true (a changed picture is refused or re-encoded, never kept silently) and
keeps duplicate names apart. The plan is data; the composer executes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError, MapError
from ..images import FolderImages, ImageSource
from .mapdir import changed_entries, next_run_id
from .store import StoredEntry

# An image whose content changed since it was stored: refuse the build, or re-encode it in place.
CHANGE_POLICIES = ("refuse", "reencode")
# An image from another folder than the one that stored its name, with other content: refuse, keep it
# as a new place under the run's prefix (NEW_PLACE_PREFIX), or re-encode it in place of the map's.
DUPLICATE_POLICIES = ("error", "new-place", "replace")
NEW_PLACE_PREFIX = "run{run}/"


def check_build_policies(on_change: str, on_duplicate: str) -> None:
    """Refuse an unknown ``on_change`` / ``on_duplicate`` before any image is read."""
    if on_change not in CHANGE_POLICIES:
        raise ConfigError(f"on_change must be one of {CHANGE_POLICIES}, got {on_change!r}")
    if on_duplicate not in DUPLICATE_POLICIES:
        raise ConfigError(f"on_duplicate must be one of {DUPLICATE_POLICIES}, got {on_duplicate!r}")


def new_run(runs: Sequence[Mapping[str, Any]], source: ImageSource) -> dict[str, Any]:
    """The record of the run a build adds: its id, the folder its images come from (None: decoded frames), when."""
    root = str(source.root.resolve()) if isinstance(source, FolderImages) else None
    return {
        "run": next_run_id(runs),
        "images_root": root,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class BuildPlan:
    """What a build does with each of its images (``keys``: the source's names, in order)."""

    run: dict[str, Any]  # the run record this build adds to map.json
    target: dict[str, str]  # image name → the key it is stored under (its name, or ``run<N>/<name>``)
    todo: list[tuple[int, str]]  # (position in keys, name) of the images to encode now
    reencoded: list[str] = field(default_factory=list)  # names whose stored entry is replaced
    copies: list[str] = field(default_factory=list)  # identical copies of entries stored from another folder
    new_places: list[str] = field(default_factory=list)  # duplicate names kept as new places

    @property
    def todo_keys(self) -> set[str]:
        return {k for _, k in self.todo}


@dataclass
class _Comparison:
    """The images already in the map, sorted by what their stored entry says about them."""

    in_map: list[str]
    same_folder_changed: list[str]  # other content under the name, stored from this very folder
    foreign: list[str]  # other content under the name, stored from another folder
    copies: list[str]  # the same content, stored from another folder


def plan_build(
    source: ImageSource,
    keys: Sequence[str],
    stored: Mapping[str, StoredEntry],
    runs: Sequence[Mapping[str, Any]],
    previous_root: str | None,
    on_change: str,
    on_duplicate: str,
    out: object,
    log: Callable[[str], None],
) -> BuildPlan:
    """Decide, for every image of ``source``, whether it is encoded, skipped, re-encoded or kept as a new place.

    ``stored``: the map's entries (:meth:`MapStore.entry_table`, pending shards included); ``runs``: the
    recorded runs; ``previous_root``: the images folder of maps from before runs were recorded. Raises a
    :class:`MapError` naming the images when the policies refuse the build.
    """
    run = new_run(runs, source)
    root = run["images_root"]
    prefix = next(
        (r["key_prefix"] for r in runs if r.get("images_root") == root and r.get("key_prefix")),
        NEW_PLACE_PREFIX.format(run=run["run"]),
    )
    target = {k: (prefix + k if on_duplicate == "new-place" and prefix + k in stored else k) for k in keys}
    seen = _compare(source, keys, stored, target, runs, run, previous_root, log)
    _refuse_changes(seen, on_change, on_duplicate, prefix, source, out)
    reencode = set(seen.same_folder_changed) | (set(seen.foreign) if on_duplicate != "new-place" else set())
    new_places = seen.foreign if on_duplicate == "new-place" else []
    for k in new_places:
        target[k] = prefix + k
    if new_places:
        log(
            f"keeping {len(new_places)} image(s) whose names are in the map as new places '{prefix}<name>' "
            f"(e.g. {', '.join(new_places[:3])})"
        )
    if any(target[k] != k for k in keys):
        run["key_prefix"] = prefix
    todo = [(i, k) for i, k in enumerate(keys) if target[k] not in stored or k in reencode]
    reencoded = sorted(reencode)
    if reencoded:
        log(f"re-encoding {len(reencoded)} changed image(s) (e.g. {', '.join(reencoded[:3])})")
    return BuildPlan(run, target, todo, reencoded, seen.copies, list(new_places))


def _compare(
    source: ImageSource,
    keys: Sequence[str],
    stored: Mapping[str, StoredEntry],
    target: Mapping[str, str],
    runs: Sequence[Mapping[str, Any]],
    run: Mapping[str, Any],
    previous_root: str | None,
    log: Callable[[str], None],
) -> _Comparison:
    """Sort the images already in the map by content (changed or not) and by the folder their entry came from."""
    root = run["images_root"]
    in_map = [k for k in keys if target[k] in stored]
    view = {k: stored[target[k]] for k in in_map}
    root_of_run = {r.get("run"): r.get("images_root") for r in runs}
    root_of_run[run["run"]] = root  # rows of this run's interrupted attempt (shards) come from this folder

    def stored_root(k: str) -> str | None:
        entry_run = view[k].run
        return root_of_run.get(entry_run) if entry_run >= 0 else previous_root

    changed = changed_entries(source, in_map, view, [*runs, run], root, log)
    changed_set = set(changed)
    return _Comparison(
        in_map=in_map,
        same_folder_changed=[k for k in changed if stored_root(k) == root],
        foreign=[k for k in changed if stored_root(k) != root],
        copies=[k for k in in_map if stored_root(k) != root and k not in changed_set and view[k].sha256],
    )


def _refuse_changes(
    seen: _Comparison, on_change: str, on_duplicate: str, prefix: str, source: ImageSource, out: object
) -> None:
    """One error naming the images whose content differs from the map's, when the policies keep the map's."""
    refused = (seen.same_folder_changed if on_change == "refuse" else []) + (
        seen.foreign if on_duplicate == "error" and on_change == "refuse" else []
    )
    if not refused:
        return
    foreign = set(seen.foreign)
    dup = [k for k in refused if k in foreign]
    raise MapError(
        f"{len(refused)} image(s) in {source.describe()} differ from what {out} holds under the same name "
        f"(e.g. {', '.join(refused[:3])})"
        + (
            f"; {len(dup)} of them come from another folder than the map's images of those names "
            f"(e.g. {', '.join(dup[:3])}): keep both with --on-duplicate new-place (stored as "
            f"'{prefix}<name>'), or replace the map's with --on-duplicate replace"
            if dup
            else ""
        )
        + "; build into another --out, or re-encode them with --on-change reencode"
    )
