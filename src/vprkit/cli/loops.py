"""`vprkit loops`: loop-closure detection over one traversal (parsing and printing only)."""

from __future__ import annotations

from pathlib import Path

import click

from ..pipeline.sequences import detect_loops
from ..presets import DEFAULT_PRESET, resolve
from .core import device_option, image_size_option, memory_budget_option, trajectory_option
from .output import echo_json

# Candidates shown on the terminal (all of them go to loops.csv with --out).
SHOWN_CANDIDATES = 10


@click.command("loops")
@click.argument("sequence_dir", type=click.Path(path_type=Path))
@click.option(
    "--exclude-recent",
    "exclude_recent",
    type=click.IntRange(0),
    default=50,
    show_default=True,
    metavar="N",
    help="Never match a frame with the N frames just before it (the same place a moment ago).",
)
@click.option(
    "--sequence-length",
    "sequence_length",
    type=click.IntRange(1),
    default=None,
    metavar="L",
    help="Score candidates as sequences of L frames (SeqSLAM-style); default: single frames.",
)
@trajectory_option
@click.option(
    "--contrast-window",
    "contrast_window",
    type=click.IntRange(2),
    default=None,
    metavar="R",
    help="With --sequence-length: SeqSLAM's local contrast normalisation over R frames (off by default).",
)
@click.option(
    "--ground-truth",
    "ground_truth",
    type=click.Path(path_type=Path),
    default=None,
    help="poses.csv (image,easting,northing or image,lat,lon) or a binary frames×frames matrix (.npy, .csv).",
)
@click.option(
    "--radius",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    metavar="M",
    help="With a poses CSV: frames within M metres are the same place.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write loops.csv (candidates, best first), loops.json and loops_pr.png here (and the frames' map).",
)
@click.option("--preset", default=DEFAULT_PRESET, show_default=True, help="Named settings (see `vprkit presets`).")
@memory_budget_option
@image_size_option
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def loops(
    sequence_dir: Path,
    exclude_recent: int,
    sequence_length: int | None,
    trajectory: str,
    contrast_window: int | None,
    ground_truth: Path | None,
    radius: float,
    out: Path | None,
    preset: str,
    memory_budget: int | None,
    image_size: tuple[int, int] | None,
    device: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Match each frame of SEQUENCE_DIR (sorted names = time order) against all earlier frames outside a window."""
    if (contrast_window is not None or trajectory != "line") and sequence_length is None:
        raise click.UsageError("--contrast-window and --trajectory need --sequence-length")
    config = resolve(preset, memory_budget_mb=memory_budget, image_size=image_size, device=device)
    summary = detect_loops(
        sequence_dir,
        config,
        exclude_recent=exclude_recent,
        sequence_length=sequence_length,
        sequence=None if sequence_length is None else {"contrast_window": contrast_window, "trajectory": trajectory},
        ground_truth=ground_truth,
        radius=radius,
        out=out,
        progress=not quiet,
        log=(lambda _: None) if as_json else click.echo,
    )
    candidates, keys = summary.pop("candidates"), summary.pop("keys")
    if as_json:
        summary.pop("curve", None)
        echo_json(summary)
        return
    click.echo(
        f"{summary['frames']} frames, {summary['n_candidates']} with an earlier frame outside the last "
        f"{exclude_recent}; scores: {summary['score_kind']}"
    )
    if "average_precision" in summary:
        click.echo(
            f"  loops in the ground truth: {summary['n_with_loop']} frames   top-1 correct: "
            f"{summary['n_correct_top1']}   average precision {summary['average_precision']:.3f}   "
            f"recall at 100% precision {summary['recall_at_100_precision']:.3f}"
        )
    order = [i for i in sorted(range(len(keys)), key=lambda i: -float(candidates.score[i])) if candidates.match[i] >= 0]
    for i in order[:SHOWN_CANDIDATES]:
        click.echo(f"  {keys[i]}  ↔  {keys[int(candidates.match[i])]}  score {float(candidates.score[i]):.4f}")
    if out is not None:
        click.echo(
            f"  wrote {summary['csv']}"
            + (f", {summary['plot']}" if "plot" in summary else "")
            + f", {Path(out) / 'loops.json'}"
        )


def register(group: click.Group) -> None:
    """Add this topic's commands to ``group``."""
    group.add_command(loops)
