"""``vprkit match-two``: the Patch-NetVLAD debugging view (two images, their inlier patch matches)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("match-two")
@click.argument("image_a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("image_b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", default="match.png", show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG to write: both images side by side with the inlier patch matches.")
@click.option("--rerank", "rerank", default="performance", show_default=True,
              help="Re-ranking preset (performance, speed, storage, …; see `vprkit presets`).")
@click.option("--preset", default=None, help="Global preset giving backbone and image size (without --map; default: the default preset).")
@click.option("--map", "map_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Use this map's backbone and fitted patch state, so the score is the one re-ranking computes.")
def match_two_cmd(image_a: Path, image_b: Path, out: Path, rerank: str, preset: str | None, map_dir: Path | None) -> None:
    """Match IMAGE_A against IMAGE_B with patch descriptors, print the score and draw the matches."""
    from ..pipeline import match_two

    tm = match_two(image_a, image_b, rerank=rerank, preset=preset, map_dir=map_dir, out=out)
    for line in tm.lines():
        click.echo(line)
    click.echo(f"wrote {out}")


def register(group: click.Group) -> None:
    group.add_command(match_two_cmd)
