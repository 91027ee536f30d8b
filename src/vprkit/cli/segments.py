"""``vprkit explain``: why a query matched its best map image (SegVLAD SuperSegment pairs)."""

from __future__ import annotations

import click

from .. import pipeline


@click.command("explain")
@click.argument("map_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("query", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    "out",
    default="why.png",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="PNG to write: query and best match with the matched SuperSegments in shared colours.",
)
@click.option("--top", default=5, show_default=True, type=click.IntRange(1, 20), help="How many segment pairs to draw.")
@click.option(
    "--rank", default=1, show_default=True, type=click.IntRange(1, 100), help="Explain the N-th match (1 = best)."
)
def explain_cmd(map_dir: str, query: str, out: str, top: int, rank: int) -> None:
    """Draw QUERY beside its best match in MAP_DIR with the strongest matched SuperSegments."""
    exp = pipeline.explain(map_dir, query, out=out, top=top, rank=rank - 1)
    for line in exp.lines():
        click.echo(line)
    click.echo(f"wrote {out}")


def register(group: click.Group) -> None:
    group.add_command(explain_cmd)
