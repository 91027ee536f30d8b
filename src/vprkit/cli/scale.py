"""``vprkit map compress``: replace a map's index with a compressed one (parsing and printing only).

Its index flags are made from the option table (:mod:`vprkit.options`, schema ``("index", "faiss")``, as
:mod:`vprkit.maps.index_options` reads it): one flag per option, spelled as the option with dashes
(``ef_search`` → ``--ef-search``), its help the option's meaning and default — so the flag,
``Config.index_options`` and ``index.json`` say the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from ..maps import FAISS_OPTIONS
from ..options import Option
from ..pipeline.scale import compress_map, describe_options
from .output import echo_json


def _index_flag(opt: Option) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one FAISS index option: type and range from the table, no default (not given = None)."""
    name = opt.name
    if opt.choices:
        kind: Any = click.Choice([str(c) for c in opt.choices])
    elif "int" in opt.types and (opt.low is not None or opt.high is not None):
        kind = click.IntRange(None if opt.low is None else int(opt.low), None if opt.high is None else int(opt.high))
    else:
        kind = int if "int" in opt.types else str
    default = "" if opt.default is None else f"; default {opt.default}"
    return click.option("--" + name.replace("_", "-"), name, type=kind, default=None, help=f"{opt.doc}{default}.")


def _index_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(list(FAISS_OPTIONS.values())):
        command = _index_flag(opt)(command)
    return command


@click.command("compress")
@click.argument("map_dir", type=click.Path(path_type=Path))
@click.option(
    "--index",
    "factory",
    required=True,
    metavar="FACTORY",
    help='FAISS index factory string, e.g. "PCA1024,OPQ64,IVF1024,PQ64", "PCA256,HNSW32", "PCA512,SQ8".',
)
@_index_flags
@click.option("--json", "as_json", is_flag=True, help="Print the index record and footprint as JSON.")
def map_compress(map_dir: Path, factory: str, as_json: bool, **options: Any) -> None:
    """Train a compressed index for MAP_DIR on a bounded seeded sample and swap it in atomically.

    An index option not given takes its default shown here (not what an earlier compress used).
    """
    result = compress_map(map_dir, factory, **options)
    if as_json:
        echo_json(result)
        return
    fp = result["footprint"]
    per = fp["disk_bytes_per_place"]
    trained = result["trained_on"]
    click.echo(
        f"map {map_dir}: index {factory} over {result['ntotal']} places "
        f"(trained on {trained.get('sample', 0)} rows, seed {trained.get('seed', '-')}) "
        f"in {result['build_seconds']:.1f} s"
    )
    click.echo(f"  {describe_options(result['options'])}")
    click.echo(
        f"  index: {per['index']} bytes/place ({per['index_codes']} of codes), {fp['shards']} file(s); "
        f"re-score shortlist: {result['options']['rescore'] or 'off'}"
        + (f" from {per['descriptors']} bytes/place on disk" if per["descriptors"] else "")
    )
    click.echo(f"  RAM to serve: {fp['ram_bytes']['total'] / 2**20:.1f} MiB")


def register(group: click.Group) -> None:
    """Add ``map compress`` to the ``map`` group."""
    group.commands["map"].add_command(map_compress)
