"""``vprkit match-two`` (the Patch-NetVLAD debugging view: two images, their inlier patch matches) and
``vprkit rerank prepare`` (save a map's re-ranking state once, for a map built without ``--rerank``)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import pipeline
from ..errors import MapError
from ..presets import get_rerank_config


@click.command("match-two")
@click.argument("image_a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("image_b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    default="match.png",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PNG to write: both images side by side with the inlier patch matches.",
)
@click.option(
    "--rerank",
    "rerank",
    default="performance",
    show_default=True,
    help="Re-ranking preset (performance, speed, storage, …; see `vprkit presets`).",
)
@click.option(
    "--preset",
    default=None,
    help="Global preset giving backbone and image size (without --map; default: the default preset).",
)
@click.option(
    "--map",
    "map_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Use this map's backbone and fitted patch state, so the score is the one re-ranking computes.",
)
def match_two_cmd(
    image_a: Path, image_b: Path, out: Path, rerank: str, preset: str | None, map_dir: Path | None
) -> None:
    """Match IMAGE_A against IMAGE_B with patch descriptors, print the score and draw the matches."""
    tm = pipeline.match_two(image_a, image_b, rerank=rerank, preset=preset, map_dir=map_dir, out=out)
    kind = getattr(tm, "score_kind", "score")
    cos = getattr(tm, "cosine", None)
    click.echo(
        f"{tm.image_a} ↔ {tm.image_b}  preset {tm.preset}  {kind} {tm.score:.4f}"
        + ("" if cos is None else f"  global cosine {cos:.4f}")
    )
    click.echo(
        f"  patch state: {getattr(tm, 'patch_state', '?')}"
        + ("" if map_dir is not None else " (scores not comparable with a map's; give --map for those)")
    )
    scale_kind = getattr(tm, "scale_score_kind", "score")
    for q, m, s in zip(tm.result.query_sets, tm.result.matches, tm.result.scores):
        click.echo(
            f"  patches on a {q.grid[0]}×{q.grid[1]} grid: {len(q)} query patches, {len(m)} mutual matches, "
            f"{int(s.inliers.sum())} inliers, {scale_kind} {s.value:.4f}"
        )
    click.echo(f"wrote {out}")


@click.group("rerank")
def rerank_group() -> None:
    """Re-ranking state of a map (Patch-NetVLAD patches)."""


@rerank_group.command("prepare")
@click.argument("map_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--rerank", "rerank", required=True, help="Re-ranking preset to prepare (performance, speed, storage, …)."
)
def prepare_cmd(map_dir: Path, rerank: str) -> None:
    """Fit MAP_DIR's patch state for a re-ranking preset and save every image's patches into the map.

    Afterwards `localize --rerank NAME` reads them as from a map built with --rerank NAME. A map
    that already stores them is left as it is.
    """
    settings = get_rerank_config(rerank)  # an unknown name fails before the map is opened
    m = pipeline.open_map(map_dir, read_only=True)
    reranker = pipeline.get_reranker(m, settings)
    try:
        computed = reranker.prepare(progress=True)
    finally:
        reranker.close()
    if reranker.stored:
        click.echo(f"{map_dir} already stores the patches of '{rerank}'")
        return
    if computed and not reranker.candidates.saved.saves:
        raise MapError(f"could not save into {map_dir} (see the message above): nothing was prepared")
    click.echo(f"'{rerank}' prepared in {map_dir}: {computed} images' patches computed and saved")


def register(group: click.Group) -> None:
    group.add_command(match_two_cmd)
    group.add_command(rerank_group)
