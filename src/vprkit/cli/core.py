"""Core commands: ``map build``, ``map info``, ``localize``, ``eval``, ``presets``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import pipeline
from ..config import check_device
from ..datasets import load_dataset
from ..environment import describe as describe_environment
from ..maps import verification_report
from ..options import describe as describe_options
from ..pipeline import distributed
from ..pipeline.sequences import DEFAULT_STREAM_BATCH, FILE_STREAM_BATCH, localize_stream
from ..presets import DEFAULT_PRESET, list_presets, list_rerank_configs, resolve
from ..zoo import zoo_entry_of
from ..pipeline.verify import DEFAULT_PIPELINE as DEFAULT_LOCAL_FEATURES
from ..streams import CameraFrames, FolderFrames, VideoFrames
from .output import echo_json, to_json

# Shared by `map build`, `eval` and `vocab build`: the one RAM setting (Config.memory_budget_mb).
memory_budget_option = click.option(
    "--memory-budget",
    "memory_budget",
    type=click.IntRange(1),
    default=None,
    metavar="MB",
    help="Cap the RAM of vocabulary and map building (descriptor pool, feature cache, decode buffer) at about MB.",
)


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
    "--image-size",
    "image_size",
    default=None,
    metavar="WxH",
    callback=_parse_image_size,
    help="Resize images to WIDTHxHEIGHT instead of the preset's size (e.g. 224x112 for Nordland's 64×32 frames).",
)


# Shared by `localize` and `loops`: the shape of a sequence's trajectory (with --sequence-length).
trajectory_option = click.option(
    "--trajectory",
    type=click.Choice(["line", "flexible"]),
    default="line",
    show_default=True,
    help="With --sequence-length: straight lines (steady speed) or paths whose speed may change every frame.",
)


# Shared by `map build`, `localize` and `eval`: where the networks run (Config.device).
device_option = click.option(
    "--device",
    default=None,
    metavar="DEVICE",
    help="Run the networks on auto (CUDA, then MPS, then CPU; the default) | cpu | cuda | cuda:N | mps.",
)


def _config(
    preset: str | None,
    float16: bool = False,
    extensions_from_rerank: str | None = None,
    vocab: str | None = None,
    weights: Path | None = None,
    memory_budget: int | None = None,
    image_size: tuple[int, int] | None = None,
    device: str | None = None,
    segments: str | None = None,
):
    """The command's flags → :func:`vprkit.presets.resolve` (the Python API's one assembly, validated)."""
    if extensions_from_rerank == pipeline.RERANK_OFF:
        extensions_from_rerank = None
    return resolve(
        preset,
        float16=float16,
        rerank=extensions_from_rerank,
        vocabulary=vocab,
        weights=weights,
        memory_budget_mb=memory_budget,
        image_size=image_size,
        device=device,
        segments=segments,
    )


# Shared by `map build` and `eval`: SegVLAD's segment retrieval on the preset's own backbone.
segments_option = click.option(
    "--segments",
    default=None,
    metavar="SEGVLAD_PRESET",
    help="Retrieve by SegVLAD with this SegVLAD preset's segment settings on the preset's own backbone "
    "(e.g. --preset boq-dinov2 --segments segvlad-grid).",
)


def _with_index(config, backend: str | None, options: tuple[str, ...]):
    """``--index-backend`` / ``--index-option KEY=VALUE`` (values parsed as JSON when they are JSON) → the config."""
    if backend is None and not options:
        return config
    parsed = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--index-option")
        try:
            parsed[key.strip()] = json.loads(value)
        except ValueError:
            parsed[key.strip()] = value
    return resolve(
        config, index_backend=backend or config.index_backend, index_options={**config.index_options, **parsed}
    )


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
@click.option(
    "--weights", type=click.Path(path_type=Path), default=None, help="Backbone checkpoint (e.g. DINOv2 .pth)."
)
@memory_budget_option
@image_size_option
@device_option
@click.option(
    "--on-change",
    "on_change",
    type=click.Choice(["refuse", "reencode"]),
    default="refuse",
    show_default=True,
    help="An image whose content differs from the map's entry of the same name: refuse, or re-encode it.",
)
@click.option(
    "--on-duplicate",
    "on_duplicate",
    type=click.Choice(["error", "new-place", "replace"]),
    default="error",
    show_default=True,
    help="An image from another folder whose name is in the map with other content: refuse, keep it as a "
    "new place (key runN/NAME), or replace the map's entry.",
)
@click.option(
    "--crs",
    default=None,
    help="Frame of easting,northing poses: utm:33N, epsg:32633 or local (default: "
    "UTM for lat/lon, else the map's, else local metres).",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    metavar="[ADDRESS]",
    help="Encode on Ray (map extensions too: --rerank, SegVLAD): alone or 'local' starts a local instance; "
    "'auto', HEAD:6379 or ray://HEAD:10001 joins a cluster.",
)
@click.option(
    "--replicas",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="With --ray: model replicas encoding in parallel.",
)
@click.option("--index-backend", "index_backend", default=None, help="Index backend: faiss (default) | milvus.")
@click.option(
    "--index-option",
    "index_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="Index backend option (repeatable; JSON values), e.g. uri=http://host:19530, index_type=HNSW.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@segments_option
def map_build(
    images_dir: Path,
    out: Path,
    poses: Path | None,
    preset: str,
    float16: bool,
    rerank: str | None,
    vocab: str | None,
    weights: Path | None,
    memory_budget: int | None,
    image_size: tuple[int, int] | None,
    device: str | None,
    on_change: str,
    on_duplicate: str,
    crs: str | None,
    ray_address: str | None,
    replicas: int,
    index_backend: str | None,
    index_option: tuple[str, ...],
    quiet: bool,
    segments: str | None,
) -> None:
    """Extract, aggregate and store descriptors of every image in IMAGES_DIR (resumable, one writer at a time)."""
    config = _config(preset, float16, rerank, vocab, weights, memory_budget, image_size, device, segments)
    config = _with_index(config, index_backend, index_option)
    if ray_address is not None:
        info = distributed.build_map_ray(
            images_dir,
            out,
            config,
            address=ray_address,
            replicas=replicas,
            poses=poses,
            progress=not quiet,
            on_change=on_change,
            on_duplicate=on_duplicate,
            crs=crs,
        )
    else:
        info = pipeline.build_map(
            images_dir,
            out,
            config,
            poses=poses,
            progress=not quiet,
            on_change=on_change,
            on_duplicate=on_duplicate,
            crs=crs,
        )
    c, last = info["counts"], info["last_build"]
    extra = "".join(
        f", {last[k]} {label}"
        for k, label in (
            ("reencoded", "re-encoded"),
            ("new_places", "duplicate names kept as new places"),
            ("copies", "identical copies"),
            ("poses_updated", "poses updated"),
        )
        if last.get(k)
    )
    click.echo(
        f"map {out}: {c['images']} images ({last['new_images']} new{extra}), {info['descriptor_dim']}-d "
        f"descriptors ({info['config']['name']}), {c['failed']} unreadable, built in {last['seconds']:.1f} s"
    )


@map_group.command("info")
@click.argument("map_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def map_info(map_dir: Path, as_json: bool) -> None:
    """Counts, settings, bytes per image, poses (count, extent, CRS, headings, timestamps) and runs of a map."""
    info = pipeline.map_info(map_dir)
    if as_json:
        echo_json(info)
        return
    click.echo(f"map {map_dir}  (vprkit {info['vprkit_version']}, preset {info['config']['name']})")
    click.echo(f"  images: {info['counts']['images']}  unreadable: {info['counts'].get('failed', 0)}")
    if info.get("stale_counts"):
        recorded = ", ".join(f"{k} {v}" for k, v in info["stale_counts"].items())
        click.echo(f"  note: map.json recorded {recorded} (stale); the counts shown are the store's and the index's")
    click.echo(
        f"  descriptor: {info['descriptor_dim']}-d {info['config']['store_dtype']}, index {info['index']['factory']}"
    )
    for group, nbytes in info["bytes_per_image"].items():
        click.echo(f"  bytes/image {group:>12}: {nbytes:,.0f}")
    serving = info.get("serving")
    if serving:
        per, ram = serving["disk_bytes_per_place"], serving["ram_bytes"]
        parts = ", ".join(f"{name} {per[name]:,.0f}" for name in ("store", "index", "descriptors") if per.get(name))
        click.echo(
            f"  disk bytes/place: {parts or '-'}; RAM to serve: {ram['total'] / 2**20:,.1f} MiB "
            f"(index {ram['index'] / 2**20:,.1f} MiB in {serving['shards']} file(s))"
        )
    for line in _poses_lines(info["poses"]):
        click.echo(line)
    click.echo(f"  runs: {len(info['runs'])}")
    for r in info["runs"]:
        note = f"  ({r['note']})" if r.get("note") else ""
        click.echo(
            f"    {r.get('run')}: {r.get('images', 0)} images from {r.get('images_root') or 'decoded frames'}{note}"
        )
    click.echo(f"  updated: {info['updated']}")


@map_group.command("verify")
@click.argument("map_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def map_verify(map_dir: Path, as_json: bool) -> None:
    """Read every file of a map in full and compare it with what the map recorded (exit 2 when one is wrong)."""
    report = verification_report(map_dir)
    if as_json:
        echo_json(report)
    else:
        rows = [(f["file"], f["recorded"], f["actual"], f["verdict"]) for f in report["files"]]
        widths = [max(len(r[i]) for r in [("file", "recorded", "actual", "verdict"), *rows]) for i in range(3)]
        for row in [("file", "recorded", "actual", "verdict"), *rows]:
            click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
        if not report["good"]:
            verdict = "DAMAGED (see above)"
        elif report["unrecorded"]:
            verdict = f"no damage found; {report['unrecorded']} file(s) carry no record yet (given at the next write)"
        else:
            verdict = "every file is the map's own"
        click.echo(f"map {map_dir}: {verdict}")
    if not report["good"]:
        raise click.exceptions.Exit(2)


def _poses_lines(p: dict) -> list[str]:
    """The poses block of ``map info``: count, CRS, extent (metres, and degrees for UTM), headings, timestamps."""
    crs = p["crs"]
    frame = (
        f"UTM zone {crs['zone']}{crs.get('hemisphere', 'N')} (EPSG:{crs.get('epsg')})"
        if crs.get("kind") == "utm"
        else f"local {crs.get('unit', 'm')}"
    )
    lines = [f"  poses: {p['with_pose']} of {p['images']} images, CRS {frame}"]
    if p.get("extent"):
        e = p["extent"]
        lines.append(
            f"    extent: easting {e['easting'][0]:.2f} … {e['easting'][1]:.2f} m, "
            f"northing {e['northing'][0]:.2f} … {e['northing'][1]:.2f} m"
        )
    if p.get("extent_latlon"):
        e = p["extent_latlon"]
        lines.append(
            f"    extent: lat {e['lat'][0]:.6f} … {e['lat'][1]:.6f}°, lon {e['lon'][0]:.6f} … {e['lon'][1]:.6f}°"
        )
    lines.append(
        f"    with heading: {p['with_heading']}   with timestamp: {p['with_timestamp']}"
        + (f" ({p['time_range'][0]} … {p['time_range'][1]})" if p.get("time_range") else "")
    )
    outside = {k: v for k, v in (p.get("out_of_range") or {}).items() if v}
    if outside:
        lines.append(
            "    outside the valid range (stored before values were checked; left out above, fix with "
            f"`vprkit map set-pose`): {', '.join(f'{v} {k}' for k, v in outside.items())}"
        )
    return lines


@map_group.command("remove")
@click.argument("map_dir", type=click.Path(path_type=Path))
@click.argument("keys", nargs=-1)
@click.option(
    "--from-file",
    "from_file",
    type=click.Path(path_type=Path),
    default=None,
    help="A text file of keys to remove, one per line (blank lines and # comments skipped).",
)
def map_remove(map_dir: Path, keys: tuple[str, ...], from_file: Path | None) -> None:
    """Remove images (by key, as `localize` prints them) from MAP_DIR: store, index and derived data."""
    wanted = list(keys)
    if from_file is not None:
        try:
            text = from_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.UsageError(f"cannot read {from_file}: {exc}") from None
        wanted += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not wanted:
        raise click.UsageError("give the KEYs to remove, or --from-file")
    done = pipeline.remove_places(map_dir, wanted)
    click.echo(f"map {map_dir}: removed {len(done['removed'])} image(s), {done['images']} left")


@map_group.command("set-pose")
@click.argument("map_dir", type=click.Path(path_type=Path))
@click.option(
    "--poses",
    required=True,
    type=click.Path(path_type=Path),
    help="CSV: image,easting,northing (m) or image,lat,lon, optional heading,timestamp.",
)
def map_set_pose(map_dir: Path, poses: Path) -> None:
    """Set the poses (and headings/timestamps) of images already in MAP_DIR from a CSV."""
    done = pipeline.update_place_poses(map_dir, poses)
    rep = done["report"] or {}
    crs = done["crs"] or {}
    frame = f"UTM zone {crs['zone']}{crs.get('hemisphere', 'N')}" if crs.get("kind") == "utm" else "local metres"
    click.echo(
        f"map {map_dir}: {done['updated']} pose(s) changed ({rep.get('n_matched', 0)} of "
        f"{rep.get('n_poses', 0)} row(s) matched an image; {frame})"
    )


@click.command("localize")
@click.argument("map_dir", type=click.Path(path_type=Path))
@click.argument("queries", nargs=-1, required=False, type=click.Path(path_type=Path))
@click.option("--video", type=click.Path(path_type=Path), default=None, help="Localise the frames of a video file.")
@click.option(
    "--camera", type=click.IntRange(0), default=None, metavar="N", help="Localise frames of camera N (OpenCV)."
)
@click.option(
    "--frames",
    "frames_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Localise the images of a folder as a stream, in sorted name (time) order.",
)
@click.option("--every", type=click.IntRange(1), default=1, show_default=True, help="Streams: keep every N-th frame.")
@click.option("--max-frames", "max_frames", type=click.IntRange(1), default=None, help="Streams: stop after N frames.")
@click.option(
    "--every-frame",
    "every_frame",
    is_flag=True,
    help="--camera: localise every frame in order, even when the model is slower than the camera "
    "(default: the newest frame, so answers stay current; skipped frames show as gaps in the frame numbers).",
)
@click.option(
    "--sequence-length",
    "sequence_length",
    type=click.IntRange(1),
    default=None,
    metavar="L",
    help="Streams: score each frame with the L−1 frames before it (sequence matching; map in route order).",
)
@trajectory_option
@click.option(
    "--jsonl",
    "jsonl",
    type=click.Path(path_type=Path),
    default=None,
    help="Streams: also write one JSON object per frame to this file (flushed per frame).",
)
@click.option("--top-k", default=10, show_default=True, type=click.IntRange(1))
@click.option(
    "--rerank",
    default=None,
    help="Re-rank the shortlist with this re-ranking preset (performance | speed | storage …), or 'none'. "
    "Default: the re-ranking the map was built with (--rerank on map build), if any.",
)
@click.option(
    "--verify",
    type=click.IntRange(0),
    default=0,
    metavar="N",
    help="Check the top N answers with local features and a two-view model (0: off): the answer's inliers "
    "enter its confidence, and its rotation relative to the matched map image is reported.",
)
@click.option(
    "--verify-rerank",
    "verify_rerank",
    is_flag=True,
    help="--verify: also reorder the checked answers by inliers (experimental: it loses R@1 on Corridor today; README).",
)
@click.option(
    "--local-features",
    "local_features",
    default=DEFAULT_LOCAL_FEATURES,
    show_default=True,
    help="--verify: the local features (xfeat | xfeat-lighterglue | disk-lightglue).",
)
@click.option(
    "--intrinsics",
    default=None,
    metavar="FX,FY,CX,CY",
    help="--verify: the query camera in pixels of the query files ('fx,fy,cx,cy' or 'f'); default: each file's "
    "EXIF focal length, else an assumed focal (rotations then flagged uncalibrated).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per query; streams: one line per frame).")
@device_option
def localize(
    map_dir: Path,
    queries: tuple[Path, ...],
    video: Path | None,
    camera: int | None,
    frames_dir: Path | None,
    every: int,
    max_frames: int | None,
    every_frame: bool,
    sequence_length: int | None,
    trajectory: str,
    jsonl: Path | None,
    top_k: int,
    rerank: str | None,
    verify: int,
    verify_rerank: bool,
    local_features: str,
    intrinsics: str | None,
    as_json: bool,
    device: str | None,
) -> None:
    """Top-K places of MAP_DIR for each QUERY image, or for each frame of --video / --camera / --frames."""
    streams = [
        name for name, v in (("--video", video), ("--camera", camera), ("--frames", frames_dir)) if v is not None
    ]
    if len(streams) + bool(queries) != 1:
        raise click.UsageError("give query images, or exactly one of --video, --camera, --frames")
    if not streams and (sequence_length is not None or jsonl is not None):
        raise click.UsageError("--sequence-length and --jsonl apply to streams (--video, --camera, --frames)")
    if trajectory != "line" and sequence_length is None:
        raise click.UsageError("--trajectory needs --sequence-length")
    extra = {} if device is None else {"device": check_device(device)}
    if every_frame and camera is None:
        raise click.UsageError("--every-frame applies to --camera (files are always read frame by frame)")
    checks = _verify_settings(verify, verify_rerank, local_features, intrinsics, bool(streams))
    if checks is not None:
        extra["verify"] = checks
    if streams:
        if video is not None:
            frames = VideoFrames(video, every, max_frames)
        elif camera is not None:
            frames = CameraFrames(camera, every, max_frames, every_frame=every_frame)
        else:
            frames = FolderFrames(frames_dir, every, max_frames)
        live = camera is not None  # a camera: the lowest latency
        _localize_stream(map_dir, frames, live, sequence_length, trajectory, jsonl, top_k, rerank, as_json, extra)
        return
    results = pipeline.localize(map_dir, list(queries), top_k=top_k, rerank=rerank, unreadable="report", **extra)
    failed = [r for r in results if r.error is not None]
    applied = next((r.rerank for r in results if r.error is None), None)
    if applied is not None and rerank is None:
        click.echo(
            f"re-ranked with '{applied}', the re-ranking this map was built for (--rerank none: global retrieval only)",
            err=True,
        )
    if as_json:
        echo_json([r.to_dict() for r in results])
    else:
        for r in results:
            if r.error is not None:
                continue
            _print_result(r)
    for r in failed:
        click.echo(f"not localised: {r.error}", err=True)
    if failed:
        raise click.exceptions.Exit(1)  # the good queries' results are above; say that some failed


def _verify_settings(top_n: int, rerank: bool, features: str, intrinsics: str | None, stream: bool):
    """``--verify`` and its options as :class:`~vprkit.pipeline.VerifySettings`, or None; misuse is a usage error."""
    given = [flag for flag, on in (("--verify-rerank", rerank), ("--intrinsics", intrinsics is not None)) if on]
    if features != DEFAULT_LOCAL_FEATURES:
        given.append("--local-features")
    if not top_n:
        if given:
            raise click.UsageError(f"{', '.join(given)} need(s) --verify N")
        return None
    if stream:
        raise click.UsageError("--verify applies to query images (not to --video / --camera / --frames streams)")
    return pipeline.VerifySettings(top_n=top_n, features=features, rerank=rerank, intrinsics=intrinsics)


def _print_result(r) -> None:
    click.echo(f"{r.query}  ({1000 * r.seconds:.0f} ms)")
    if getattr(r, "estimate", None) is not None:
        click.echo(f"  {r.estimate.line()}")
    for rank, m in enumerate(r.matches, 1):
        pos = "" if m.position is None else f"  at ({m.position[0]:.1f}, {m.position[1]:.1f})"
        kind = getattr(m, "score_kind", "score")
        cos = "" if kind == "cosine" or getattr(m, "cosine", None) is None else f" (cosine {m.cosine:.4f})"
        click.echo(f"  {rank:>3}. {m.key}  {kind} {m.score:.4f}{cos}{pos}")


def _localize_stream(
    map_dir: Path,
    frames,
    live: bool,
    sequence_length: int | None,
    trajectory: str,
    jsonl: Path | None,
    top_k: int,
    rerank: str | None,
    as_json: bool,
    extra: dict,
) -> None:
    """``localize --video/--camera/--frames``: results printed (or JSON lines) as frames are localised."""
    sink = open(jsonl, "w", encoding="utf-8") if jsonl is not None else None  # a log of the stream: lines as they come
    failed = 0
    try:
        batch = DEFAULT_STREAM_BATCH if live else FILE_STREAM_BATCH
        sequence = {"trajectory": trajectory} if sequence_length is not None else None
        seen = 0  # frames localised so far: the evidence a sequence score rests on
        for r in localize_stream(
            map_dir,
            frames,
            top_k=top_k,
            sequence_length=sequence_length,
            sequence=sequence,
            rerank=rerank,
            batch_frames=batch,
            **extra,
        ):
            record = r.to_dict()
            if sequence_length is not None and r.error is None:
                seen += 1
                record["sequence_frames"] = min(seen, sequence_length)
            line = to_json(record)
            if sink is not None:
                sink.write(line + "\n")
                sink.flush()
            if r.error is not None:
                failed += 1
                click.echo(f"not localised: {r.error}", err=True)
            elif as_json:
                click.echo(line)
            else:
                _print_result(r)
    finally:
        if sink is not None:
            sink.close()
    if failed:
        raise click.exceptions.Exit(1)


@click.command("eval")
@click.argument("dataset")
@click.option("--preset", default=DEFAULT_PRESET, show_default=True)
@click.option(
    "--rerank",
    default=None,
    help="Re-ranking preset (performance | speed | storage …), or 'none'; the map also stores its patches.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Write the map, per-query CSVs, JSON summary, curves and an HTML report here.",
)
@click.option(
    "--data-root",
    type=click.Path(path_type=Path),
    envvar="VPRKIT_DATA",
    help="Folder holding named datasets (default: $VPRKIT_DATA, else ./datasets).",
)
@click.option("--queries", "queries_sub", default=None, help="Query subfolder for sequence datasets (e.g. winter).")
@click.option(
    "--database", "database_sub", default=None, help="Database subfolder for sequence datasets (e.g. summer)."
)
@click.option(
    "--no-positive",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="Queries with no positive: count as failures (VPR-methods-evaluation) or leave out (SegVLAD).",
)
@click.option(
    "--positive-dist-threshold",
    "positive_dist_threshold",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="M",
    help="Positives within M metres (layouts with positions; default: the format's, 25 m for street-level sets).",
)
@click.option("--float16", is_flag=True)
@click.option("--vocab", default=None, help="VLAD vocabulary: map (default) | domain:NAME | auto | PATH.npz")
@click.option(
    "--weights", type=click.Path(path_type=Path), default=None, help="Backbone checkpoint (e.g. DINOv2 .pth)."
)
@memory_budget_option
@image_size_option
@device_option
@click.option(
    "--save-predictions",
    "save_predictions",
    default=0,
    type=click.IntRange(0),
    metavar="N",
    help="With --out: draw the worst and best queries beside their top N predictions (predictions/, report.html).",
)
@click.option(
    "--sequence-length",
    "sequence_length",
    type=click.IntRange(1),
    default=None,
    metavar="L",
    help="Sequential datasets (e.g. nordland-64x32): score each query with the L−1 queries before it.",
)
@click.option("--quiet", is_flag=True)
@segments_option
def evaluate(
    dataset: str,
    preset: str,
    rerank: str | None,
    out: Path | None,
    data_root: Path | None,
    queries_sub: str | None,
    database_sub: str | None,
    no_positive: str,
    positive_dist_threshold: float | None,
    float16: bool,
    vocab: str | None,
    weights: Path | None,
    memory_budget: int | None,
    image_size: tuple[int, int] | None,
    device: str | None,
    save_predictions: int,
    sequence_length: int | None,
    quiet: bool,
    segments: str | None,
) -> None:
    """Build a map of DATASET's database, localise its queries and print Recall@1/5/10/20."""
    config = _config(
        preset, float16, rerank, vocab, weights, memory_budget, image_size, device, segments
    )  # validate before touching data
    options = {
        k: v
        for k, v in {
            "queries": queries_sub,
            "database": database_sub,
            "positive_dist_threshold": positive_dist_threshold,
        }.items()
        if v
    }
    ds = load_dataset(dataset, data_root=data_root, **options)
    summary = pipeline.evaluate(
        ds,
        config,
        out=out,
        rerank=rerank,
        no_positive=no_positive,
        progress=not quiet,
        log=click.echo,
        save_predictions=save_predictions,
        **({"sequence_length": sequence_length} if sequence_length is not None else {}),
    )
    rec = summary["recall"]
    t = summary["timing"]
    size = config.image.size
    click.echo(
        f"{summary['dataset']}  preset {summary['preset']}"
        + (f" at {size[1]}×{size[0]}" if size else "")
        + (f"  rerank {summary['rerank']}" if summary.get("rerank") else "")
        + (f"  sequence length {sequence_length}" if sequence_length is not None else "")
    )
    click.echo(
        f"  database {summary['counts']['database']}  queries {summary['counts']['queries']}  "
        f"(no-positive queries: {rec.get('n_no_positive', 0)}, policy {rec.get('no_positive_policy')})"
    )
    click.echo("  " + "  ".join(f"R@{n} {rec[f'R@{n}']:.3f}" for n in pipeline.RECALL_NS if f"R@{n}" in rec))
    click.echo(
        f"  map {t['map_images_per_s']} images/s   queries {t['ms_per_query']} ms/query   peak RSS {summary['peak_rss_mb']} MB"
    )
    if summary.get("estimates"):
        e = summary["estimates"]
        right = "n/a" if e["accepted_correct_share"] is None else f"{e['accepted_correct_share']:.3f}"
        click.echo(
            f"  estimates: {e['with_confidence']}/{e['frames']} with a confidence, unknown {e['unknown_share']:.3f}, "
            f"accepted {e['accepted']} of which right {right}"
        )
    if out is not None:
        click.echo(
            f"  wrote {out / 'report.html'} (self-contained report), summary.json, per_query.csv, topn.csv, "
            f"recall and precision-recall curves" + (", predictions/" if save_predictions else "")
        )


@click.command("presets")
@click.option("--options", "show_options", is_flag=True, help="Also list every component's typed options.")
@click.option(
    "--environment", "show_environment", is_flag=True, help="Also list the VPRKIT_* (and cache) variables read."
)
def presets(show_options: bool, show_environment: bool) -> None:
    """List the named presets (global, then re-ranking presets for --rerank)."""
    for c in list_presets():
        click.echo(f"{c.name:<24} {c.description}" + ("  [default]" if c.name == DEFAULT_PRESET else ""))
        entry = zoo_entry_of(c)
        if entry is not None:
            reported = f"; reported {entry.reported}" if entry.reported else ""
            click.echo(f"{'':<24} licence {entry.licence}{reported}; weights: {entry.name} (`vprkit weights fetch`)")
    click.echo("\nre-ranking presets (--rerank NAME):")
    for s in list_rerank_configs():
        click.echo(f"{s.name:<24} {s.description}")
    if show_options:
        click.echo("\ncomponent options (backbone_options, aggregator_options, …):")
        for line in describe_options():
            click.echo(line)
    if show_environment:
        click.echo("\nenvironment variables:")
        for line in describe_environment():
            click.echo(line)


def register(group: click.Group) -> None:
    group.add_command(map_group)
    group.add_command(localize)
    group.add_command(evaluate)
    group.add_command(presets)
