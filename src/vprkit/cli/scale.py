"""``vprkit map compress``: replace a map's index with a compressed one (parsing and printing only)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("compress")
@click.argument("map_dir", type=click.Path(path_type=Path))
@click.option("--index", "factory", required=True, metavar="FACTORY",
              help='FAISS index factory string, e.g. "PCA1024,OPQ64,IVF1024,PQ64", "PCA256,HNSW32", "PCA512,SQ8".')
@click.option("--sample", type=click.IntRange(1), default=None, help="Training rows (seeded sample; default 65536).")
@click.option("--seed", type=int, default=None, help="Sample and k-means seed (default: the map's vocabulary seed).")
@click.option("--rescore", type=click.IntRange(0), default=None,
              help="Re-score this many candidates exactly from full-precision descriptors kept on disk (0 = off).")
@click.option("--nprobe", type=click.IntRange(1), default=None, help="IVF lists visited per query (default 16).")
@click.option("--ef-search", "ef_search", type=click.IntRange(1), default=None, help="HNSW candidates per query (default 64).")
@click.option("--shard-rows", "shard_rows", type=click.IntRange(0), default=None,
              help="Rows per index file (0 = one file); adds write only the last shard.")
@click.option("--json", "as_json", is_flag=True, help="Print the index record and footprint as JSON.")
def map_compress(map_dir: Path, factory: str, sample: int | None, seed: int | None, rescore: int | None,
                 nprobe: int | None, ef_search: int | None, shard_rows: int | None, as_json: bool) -> None:
    """Train a compressed index for MAP_DIR on a bounded seeded sample and swap it in atomically."""
    from ..pipeline.scale import compress_map

    result = compress_map(map_dir, factory, sample=sample, seed=seed, rescore=rescore, nprobe=nprobe,
                          ef_search=ef_search, shard_rows=shard_rows)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    fp = result["footprint"]
    per = fp["disk_bytes_per_place"]
    trained = result["trained_on"]
    click.echo(f"map {map_dir}: index {factory} over {result['ntotal']} places "
               f"(trained on {trained.get('sample', 0)} rows, seed {trained.get('seed', '-')}) "
               f"in {result['build_seconds']:.1f} s")
    click.echo(f"  index: {per['index']} bytes/place ({per['index_codes']} of codes), {fp['shards']} file(s); "
               f"re-score shortlist: {result['options']['rescore'] or 'off'}"
               + (f" from {per['descriptors']} bytes/place on disk" if per["descriptors"] else ""))
    click.echo(f"  RAM to serve: {fp['ram_bytes']['total'] / 2**20:.1f} MiB")


def register(group: click.Group) -> None:
    """Add ``map compress`` to the ``map`` group."""
    group.commands["map"].add_command(map_compress)
