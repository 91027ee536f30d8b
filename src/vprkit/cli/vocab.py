"""``vprkit vocab``: domain vocabularies (build, find domains, pick one for a new map)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import pipeline
from ..presets import DEFAULT_PRESET, resolve
from .core import memory_budget_option


@click.group("vocab")
def vocab() -> None:
    """VLAD vocabularies shared across maps of one domain (AnyLoc)."""


@vocab.command("build")
@click.option("--domain", required=True, help="Name of the domain vocabulary (e.g. indoor, urban).")
@click.argument("datasets", nargs=-1, required=True)
@click.option("--preset", default=DEFAULT_PRESET, show_default=True)
@click.option("--k", type=click.IntRange(1), default=None, help="Clusters (default: the preset's).")
@click.option(
    "--max-mb",
    type=click.IntRange(1),
    default=None,
    help="RAM cap for the descriptor sample alone (wins over its --memory-budget share).",
)
@memory_budget_option
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Write here instead of the vocabularies folder."
)
def build(
    domain: str,
    datasets: tuple[str, ...],
    preset: str,
    k: int | None,
    max_mb: int | None,
    memory_budget: int | None,
    out: Path | None,
) -> None:
    """Pool sub-sampled database descriptors of DATASETS into one vocabulary."""
    changes = {}
    if k:
        changes["k"] = k
    if max_mb:
        changes["max_bytes"] = max_mb * 2**20
    config = resolve(preset, memory_budget_mb=memory_budget, vocabulary=changes or None)
    path = pipeline.build_domain_vocabulary(domain, list(datasets), config, out=out)
    click.echo(f"domain vocabulary {domain!r} from {', '.join(datasets)} → {path}")
    click.echo(f"use it with: vprkit map build IMAGES --out MAP --preset {preset} --vocab domain:{domain}")


@vocab.command("domains")
@click.argument("datasets", nargs=-1, required=True)
@click.option("--preset", default=DEFAULT_PRESET, show_default=True)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("domains.png"),
    show_default=True,
    help="Scatter plot PNG (one colour per dataset).",
)
def domains(datasets: tuple[str, ...], preset: str, out: Path) -> None:
    """Project per-image GeM descriptors with PCA and show how DATASETS cluster into domains."""
    analysis = pipeline.analyse_dataset_domains(list(datasets), preset, plot=out)
    for name, c in zip(analysis.names, analysis.centroids()):
        click.echo(f"  {name:<24} centroid ({c[0]:+.3f}, {c[1]:+.3f})")
    click.echo("suggested domains: " + "; ".join("{" + ", ".join(g) + "}" for g in analysis.groups))
    click.echo(f"plot: {out}")


@vocab.command("pick")
@click.argument("images_dir", type=click.Path(path_type=Path))
@click.option("--preset", default=DEFAULT_PRESET, show_default=True)
def pick(images_dir: Path, preset: str) -> None:
    """Which domain vocabulary suits the images in IMAGES_DIR (nearest in the domain PCA space)."""
    name, dists = pipeline.pick_domain(images_dir, preset)
    for k, v in sorted(dists.items(), key=lambda kv: kv[1]):
        click.echo(f"  {k:<20} distance {v:.4f}")
    click.echo(f"nearest domain: {name}  (use --vocab domain:{name}, or --vocab auto)")


def register(group: click.Group) -> None:
    group.add_command(vocab)
