"""``vprkit train RECIPE`` and ``vprkit add-pca CHECKPOINT IMAGES``: training runs whose checkpoints are presets."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import pipeline


@click.command("train")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--fresh", is_flag=True, help="Start over instead of resuming from the run folder's last.pt.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(recipe: Path, fresh: bool, quiet: bool) -> None:
    """Train the head (and unfrozen backbone blocks) that RECIPE (TOML, or YAML with PyYAML) describes.

    Writes RUN/best.ckpt — usable as `--preset RUN/best.ckpt` by map build, localize and eval.
    """
    s = pipeline.train(recipe, resume=not fresh, progress=not quiet)
    best = s.get("best") or {}
    shown = "  ".join(f"{k} {v:.3f}" for k, v in best.items() if k.startswith("R@"))
    click.echo(f"best epoch {best.get('epoch')}: {shown}" if shown else f"finished at epoch {best.get('epoch')}")
    click.echo(f"{s['head_dim']}-d head, trained in {s['train_seconds']:.0f} s")
    click.echo(f"checkpoint: {s['checkpoint']}")
    click.echo(f"use it with: vprkit map build IMAGES --out MAP --preset {s['checkpoint']}")


@click.command("add-pca")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("images", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dim", type=click.IntRange(1), required=True, help="Output dimension.")
@click.option("--whiten", is_flag=True, help="Whitened PCA.")
@click.option(
    "--sample", type=click.IntRange(2), default=2000, show_default=True, help="Images the PCA is fitted on (at most)."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="New checkpoint (default: <stem>-pca<D>[w].ckpt beside CHECKPOINT).",
)
def add_pca(checkpoint: Path, images: Path, dim: int, whiten: bool, sample: int, out: Path | None) -> None:
    """Append a PCA / whitening layer fitted on a sample of IMAGES to a trained CHECKPOINT (Patch-NetVLAD's add_pca)."""
    path = pipeline.add_pca(checkpoint, images, dim=dim, whiten=whiten, sample=sample, out=out)
    info = json.loads(Path(path).read_text())
    click.echo(
        f"{info['pca']['dim']}-d {'whitened ' if whiten else ''}PCA fitted on {info['pca']['fitted_on']} images → {path}"
    )


def register(group: click.Group) -> None:
    group.add_command(train)
    group.add_command(add_pca)
