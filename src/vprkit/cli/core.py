"""Core commands: ``map build``, ``map info``, ``localize``, ``eval``, ``presets``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import pipeline
from ..config import check_device
from ..presets import DEFAULT_PRESET, get_rerank_config, list_presets, list_rerank_configs, resolve

# Shared by `map build`, `eval` and `vocab build`: the one RAM setting (Config.memory_budget_mb).
memory_budget_option = click.option(
    "--memory-budget", "memory_budget", type=click.IntRange(1), default=None, metavar="MB",
    help="Cap the RAM of vocabulary and map building (descriptor pool, feature cache, decode buffer) at about MB.")


def _parse_image_size(ctx, param, value: str | None) -> tuple[int, int] | None:
    """``WIDTHxHEIGHT`` (as image sizes are usually written) → (height, width), or None."""
    if value is None:
        return None
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT, e.g. 320x240") from None
    if w < 1 or h < 1:
        raise click.BadParameter(f"{value!r}: width and height must be positive")
    return h, w


# Shared by `map build` and `eval`: the size images are resized to, overriding the preset's
# (the preset's resize mode is kept). Queries are resized as the map was built.
image_size_option = click.option(
    "--image-size", "image_size", default=None, metavar="WxH", callback=_parse_image_size,
    help="Resize images to WIDTHxHEIGHT instead of the preset's size (e.g. 224x112 for Nordland's 64×32 frames).")


# Shared by `map build`, `localize` and `eval`: where the networks run (Config.device).
device_option = click.option(
    "--device", default=None, metavar="DEVICE",
    help="Run the networks on auto (CUDA, then MPS, then CPU; the default) | cpu | cuda | cuda:N | mps.")


def _config(preset: str | None, float16: bool = False, extensions_from_rerank: str | None = None,
            vocab: str | None = None, weights: Path | None = None, memory_budget: int | None = None,
            image_size: tuple[int, int] | None = None, device: str | None = None):
    """The command's flags → :func:`vprkit.presets.resolve` (the Python API's one assembly, validated)."""
    return resolve(preset, float16=float16, rerank=extensions_from_rerank, vocabulary=vocab, weights=weights,
                   memory_budget_mb=memory_budget, image_size=image_size, device=device)


@click.group("map")
def map_group() -> None:
    """Build and inspect maps (descriptor store + index)."""


@map_group.command("build")
@click.argument("images_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Map directory to create or extend.")
@click.option("--poses", type=click.Path(path_type=Path), help="CSV: image,easting,northing (m) or image,lat,lon.")
@click.option("--preset", default=DEFAULT_PRESET, show_default=True, help="Named settings (see `vprkit presets`).")
@click.option("--float16", is_flag=True, help="Store descriptors as float16 (half the size).")
@click.option("--rerank", default=None, help="Also store patch descriptors for this re-ranking preset.")
@click.option("--vocab", default=None, help="VLAD vocabulary: map (default) | domain:NAME | auto | PATH.npz")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Backbone checkpoint (e.g. DINOv2 .pth).")
@memory_budget_option
@image_size_option
@device_option
@click.option("--on-change", "on_change", type=click.Choice(["refuse", "reencode"]), default="refuse", show_default=True,
              help="An image whose content differs from the map's entry of the same name: refuse, or re-encode it.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def map_build(images_dir: Path, out: Path, poses: Path | None, preset: str, float16: bool, rerank: str | None,
              vocab: str | None, weights: Path | None, memory_budget: int | None, image_size: tuple[int, int] | None,
              device: str | None, on_change: str, quiet: bool) -> None:
    """Extract, aggregate and store descriptors of every image in IMAGES_DIR (resumable, one writer at a time)."""
    config = _config(preset, float16, rerank, vocab, weights, memory_budget, image_size, device)
    info = pipeline.build_map(images_dir, out, config, poses=poses, progress=not quiet, on_change=on_change)
    c, last = info["counts"], info["last_build"]
    extra = "".join(f", {last[k]} {label}" for k, label in (("reencoded", "re-encoded"), ("poses_updated", "poses updated"))
                    if last.get(k))
    click.echo(f"map {out}: {c['images']} images ({last['new_images']} new{extra}), {info['descriptor_dim']}-d "
               f"descriptors ({info['config']['name']}), {c['failed']} unreadable, built in {last['seconds']:.1f} s")


@map_group.command("info")
@click.argument("map_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def map_info(map_dir: Path, as_json: bool) -> None:
    """Counts, settings and bytes per image of a map."""
    info = pipeline.map_info(map_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"map {map_dir}  (vprkit {info['vprkit_version']}, preset {info['config']['name']})")
    click.echo(f"  images: {info['counts']['images']}  unreadable: {info['counts']['failed']}")
    click.echo(f"  descriptor: {info['descriptor_dim']}-d {info['config']['store_dtype']}, index {info['index']['factory']}")
    for group, nbytes in info["bytes_per_image"].items():
        click.echo(f"  bytes/image {group:>12}: {nbytes:,.0f}")
    click.echo(f"  updated: {info['updated']}")


@click.command("localize")
@click.argument("map_dir", type=click.Path(path_type=Path))
@click.argument("queries", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", default=10, show_default=True, type=click.IntRange(1))
@click.option("--rerank", default=None, help="Re-rank the shortlist: performance | speed | storage.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per query).")
@device_option
def localize(map_dir: Path, queries: tuple[Path, ...], top_k: int, rerank: str | None, as_json: bool,
             device: str | None) -> None:
    """Top-K places of MAP_DIR for each QUERY image."""
    if rerank is not None:
        get_rerank_config(rerank)  # an unknown name fails before the map is opened
    extra = {} if device is None else {"device": check_device(device)}
    results = pipeline.localize(map_dir, list(queries), top_k=top_k, rerank=rerank, unreadable="report", **extra)
    failed = [r for r in results if r.error is not None]
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            if r.error is not None:
                continue
            click.echo(f"{r.query}  ({1000 * r.seconds:.0f} ms)")
            for rank, m in enumerate(r.matches, 1):
                pos = "" if m.position is None else f"  at ({m.position[0]:.1f}, {m.position[1]:.1f})"
                click.echo(f"  {rank:>3}. {m.key}  score {m.score:.4f}{pos}")
    for r in failed:
        click.echo(f"not localised: {r.error}", err=True)
    if failed:
        raise click.exceptions.Exit(1)  # the good queries' results are above; say that some failed


@click.command("eval")
@click.argument("dataset")
@click.option("--preset", default=DEFAULT_PRESET, show_default=True)
@click.option("--rerank", default=None, help="Re-ranking preset: performance | speed | storage.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Write the map, per-query CSVs, JSON summary, curves and an HTML report here.")
@click.option("--data-root", type=click.Path(path_type=Path), envvar="VPRKIT_DATA",
              help="Folder holding named datasets (default: $VPRKIT_DATA, else ./datasets).")
@click.option("--queries", "queries_sub", default=None, help="Query subfolder for sequence datasets (e.g. winter).")
@click.option("--database", "database_sub", default=None, help="Database subfolder for sequence datasets (e.g. summer).")
@click.option("--no-positive", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="Queries with no positive: count as failures (VPR-methods-evaluation) or leave out (SegVLAD).")
@click.option("--positive-dist-threshold", "positive_dist_threshold", type=click.FloatRange(min=0, min_open=True),
              default=None, metavar="M",
              help="Positives within M metres (layouts with positions; default: the format's, 25 m for street-level sets).")
@click.option("--float16", is_flag=True)
@click.option("--vocab", default=None, help="VLAD vocabulary: map (default) | domain:NAME | auto | PATH.npz")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Backbone checkpoint (e.g. DINOv2 .pth).")
@memory_budget_option
@image_size_option
@device_option
@click.option("--save-predictions", "save_predictions", default=0, type=click.IntRange(0), metavar="N",
              help="With --out: draw the worst and best queries beside their top N predictions (predictions/, report.html).")
@click.option("--quiet", is_flag=True)
def evaluate(dataset: str, preset: str, rerank: str | None, out: Path | None, data_root: Path | None,
             queries_sub: str | None, database_sub: str | None, no_positive: str,
             positive_dist_threshold: float | None, float16: bool,
             vocab: str | None, weights: Path | None, memory_budget: int | None, image_size: tuple[int, int] | None,
             device: str | None, save_predictions: int, quiet: bool) -> None:
    """Build a map of DATASET's database, localise its queries and print Recall@1/5/10/20."""
    import os

    from ..datasets import load_dataset

    if data_root is not None:
        os.environ["VPRKIT_DATA"] = str(data_root)
    config = _config(preset, float16, rerank, vocab, weights, memory_budget, image_size, device)  # validate before touching data
    options = {k: v for k, v in {"queries": queries_sub, "database": database_sub,
                                 "positive_dist_threshold": positive_dist_threshold}.items() if v}
    ds = load_dataset(dataset, **options)
    summary = pipeline.evaluate(ds, config, out=out, rerank=rerank, no_positive=no_positive,
                                progress=not quiet, log=click.echo, save_predictions=save_predictions)
    rec = summary["recall"]
    t = summary["timing"]
    size = config.image.size
    click.echo(f"{summary['dataset']}  preset {summary['preset']}" + (f" at {size[1]}×{size[0]}" if size else "")
               + (f"  rerank {rerank}" if rerank else ""))
    click.echo(f"  database {summary['counts']['database']}  queries {summary['counts']['queries']}  "
               f"(no-positive queries: {rec.get('n_no_positive', 0)}, policy {rec.get('no_positive_policy')})")
    click.echo("  " + "  ".join(f"R@{n} {rec[f'R@{n}']:.3f}" for n in pipeline.RECALL_NS if f"R@{n}" in rec))
    click.echo(f"  map {t['map_images_per_s']} images/s   queries {t['ms_per_query']} ms/query   peak RSS {summary['peak_rss_mb']} MB")
    if out is not None:
        click.echo(f"  wrote {out / 'report.html'} (self-contained report), summary.json, per_query.csv, topn.csv, "
                   f"recall and precision-recall curves" + (", predictions/" if save_predictions else ""))


@click.command("presets")
@click.option("--options", "show_options", is_flag=True, help="Also list every component's typed options.")
@click.option("--environment", "show_environment", is_flag=True, help="Also list the VPRKIT_* (and cache) variables read.")
def presets(show_options: bool, show_environment: bool) -> None:
    """List the named presets (global, then re-ranking presets for --rerank)."""
    for c in list_presets():
        click.echo(f"{c.name:<24} {c.description}" + ("  [default]" if c.name == DEFAULT_PRESET else ""))
    click.echo("\nre-ranking presets (--rerank NAME):")
    for s in list_rerank_configs():
        click.echo(f"{s.name:<24} {s.description}")
    if show_options:
        from ..options import describe

        click.echo("\ncomponent options (backbone_options, aggregator_options, …):")
        for line in describe():
            click.echo(line)
    if show_environment:
        from ..environment import describe as describe_environment

        click.echo("\nenvironment variables:")
        for line in describe_environment():
            click.echo(line)


def register(group: click.Group) -> None:
    group.add_command(map_group)
    group.add_command(localize)
    group.add_command(evaluate)
    group.add_command(presets)
