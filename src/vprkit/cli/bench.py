"""Benchmarking and interoperability commands: ``compare`` and ``hloc export`` / ``hloc import``."""

from __future__ import annotations

from pathlib import Path

import click

from .. import pipeline
from ..presets import list_presets, list_rerank_configs
from .core import _parse_image_size, memory_budget_option
from .output import echo_json


@click.command("compare")
@click.argument("datasets", nargs=-1, required=True)
@click.option(
    "--presets",
    "presets",
    multiple=True,
    required=True,
    help="Presets to compare; several after one --presets (effnet2-vlad-ma4 effnet-vlad) or repeated. "
    "PRESET+RERANK names one re-ranked method (effnet2-vlad-ma4+speed); a bare preset is crossed "
    "with every --rerank mode.",
)
@click.option(
    "--rerank",
    "reranks",
    multiple=True,
    help="Re-ranking modes to cross with every preset: none | speed | storage | performance (several allowed).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write every run (out/DATASET/METHOD) and comparison.{md,csv,html,json}, changes.csv here.",
)
@click.option("--baseline", default=None, help="Method the others are compared with per query (default: the first).")
@click.option(
    "--changes-at",
    "n",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="A query counts as right when a positive is within the top N.",
)
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    envvar="VPRKIT_DATA",
    help="Folder holding named datasets (default: $VPRKIT_DATA, else ./datasets).",
)
@click.option("--no-positive", type=click.Choice(["fail", "skip"]), default="fail", show_default=True)
@click.option(
    "--image-size",
    "image_size",
    default=None,
    metavar="WxH",
    callback=_parse_image_size,
    help="Resize images to WIDTHxHEIGHT for every preset.",
)
@click.option("--float16", is_flag=True)
@memory_budget_option
@click.option(
    "--save-predictions",
    "save_predictions",
    default=0,
    type=click.IntRange(0),
    metavar="N",
    help="Also draw prediction galleries with each query's top N in every run folder.",
)
@click.option("--quiet", is_flag=True)
@click.pass_context
def compare(
    ctx: click.Context,
    datasets: tuple[str, ...],
    presets: tuple[str, ...],
    reranks: tuple[str, ...],
    out: Path | None,
    baseline: str | None,
    n: int,
    data_root: Path | None,
    no_positive: str,
    image_size,
    float16: bool,
    memory_budget: int | None,
    save_predictions: int,
    quiet: bool,
) -> None:
    """Evaluate several presets (× re-ranking modes) on several DATASETS; print one table and per-query changes.

    Example: vprkit compare corridor nordland-64x32:600 --presets effnet2-vlad-ma4 effnet-vlad
    --rerank none speed --out cmp/
    """
    # `--presets a b` and `--rerank none speed`: click gives options one value; the rest arrive as
    # arguments. Names of presets / re-ranking modes among the arguments move to their option.
    datasets, presets, reranks = _split_lists(datasets, presets, reranks)
    options = {
        k: v
        for k, v in {"image_size": image_size, "float16": float16 or None, "memory_budget_mb": memory_budget}.items()
        if v
    }
    result = pipeline.compare(
        list(datasets),
        list(presets),
        list(reranks) or [None],
        out=out,
        baseline=baseline,
        n=n,
        no_positive=no_positive,
        resolve_options=options,
        save_predictions=save_predictions,
        progress=not quiet,
        log=click.echo if not quiet else (lambda _: None),
        data_root=data_root,
    )
    click.echo(result["markdown"])
    if result["files"]:
        click.echo("wrote " + ", ".join(result["files"]) + " (the queries each method fixes and breaks: changes.csv)")


def _split_lists(datasets, presets, reranks):
    preset_names = {c.name for c in list_presets()}
    rerank_names = {s.name for s in list_rerank_configs()} | {"none"}
    ds, ps, rs = [], list(presets), list(reranks)

    def is_method(a: str) -> bool:  # a preset, or PRESET+RERANK
        name, _, mode = a.partition("+")
        return name in preset_names and (not mode or mode in rerank_names)

    for a in datasets:
        if is_method(a) and a not in ps:
            ps.append(a)
        elif a in rerank_names and rs:
            rs.append(a)
        else:
            ds.append(a)
    if not ds:
        raise click.UsageError("no dataset given")
    return ds, ps, rs


@click.group("hloc")
def hloc_group() -> None:
    """Exchange global descriptors with hloc (Hierarchical-Localization)."""


@hloc_group.command("export")
@click.argument("map_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="hloc global features file (.h5).")
@click.option(
    "--pairs", type=click.Path(path_type=Path), default=None, help="Also write retrieval pairs (pairs-*.txt)."
)
@click.option(
    "--queries",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder of query images for --pairs (described with the map's model).",
)
@click.option("--top-k", default=20, show_default=True, type=click.IntRange(1))
@click.option("--db-prefix", default="", help="Prefix of database image names (e.g. db/).")
@click.option("--query-prefix", default="", help="Prefix of query image names (e.g. query/).")
def hloc_export(
    map_dir: Path, out: Path, pairs: Path | None, queries: Path | None, top_k: int, db_prefix: str, query_prefix: str
) -> None:
    """Write MAP_DIR's global descriptors as hloc global features (and retrieval pairs for --queries)."""
    res = pipeline.export_hloc(
        map_dir, out, pairs=pairs, queries=queries, top_k=top_k, db_prefix=db_prefix, query_prefix=query_prefix
    )
    click.echo(f"wrote {res['path']}: {res['images']} database images, {res['dim']}-d")
    if "pairs" in res:
        click.echo(f"wrote {res['pairs_path']}: {res['pairs']} pairs for {res['queries']} queries (top {top_k})")


@hloc_group.command("import")
@click.argument("features", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Map directory to create.")
@click.option("--preset", default=None, help="The vprkit preset that produced the descriptors, if one did.")
@click.option(
    "--prefix",
    "prefixes",
    multiple=True,
    help="Import only images whose name starts with this (e.g. db/; repeatable), as hloc's db_prefix.",
)
@click.option("--normalize", is_flag=True, help="L2-normalise the descriptors (scores become cosines).")
@click.option("--json", "as_json", is_flag=True)
def hloc_import(
    features: Path, out: Path, preset: str | None, prefixes: tuple[str, ...], normalize: bool, as_json: bool
) -> None:
    """Make a map from an hloc global-features FEATURES file (for retrieval by descriptor)."""
    info = pipeline.import_hloc(features, out, preset=preset, normalize=normalize, prefix=list(prefixes) or None)
    if as_json:
        echo_json(info)
        return
    click.echo(f"map {out}: {info['counts']['images']} images, {info['descriptor_dim']}-d descriptors from {features}")
    click.echo(f"  queries: {info['imported']['queries']}")


def register(group: click.Group) -> None:
    group.add_command(compare)
    group.add_command(hloc_group)
