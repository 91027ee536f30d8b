"""``vprkit weights``: the model zoo's checkpoint files — list them, fetch them, verify them."""

from __future__ import annotations

import click

from ..errors import ConfigError, VPRKitError
from ..presets import list_presets
from ..zoo import ZOO_WEIGHTS, iter_weights, weights_path, weights_status, zoo_cache_dir, zoo_entry_of
from .output import echo_json


def _presets_using() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for config in list_presets():
        entry = zoo_entry_of(config)
        if entry is not None:
            out.setdefault(entry.name, []).append(config.name)
    return out


def _names(names: tuple[str, ...], every: bool) -> list[str]:
    if every and names:
        raise click.UsageError("give entry names or --all, not both")
    if not names and not every:
        raise click.UsageError("name the entries (see `vprkit weights list`) or pass --all")
    for name in names:
        ZOO_WEIGHTS.get(name)  # an unknown name is one error line listing the known ones
    return list(ZOO_WEIGHTS) if every else list(names)


@click.group("weights")
def weights() -> None:
    """The model zoo's weight files (cached in $VPRKIT_CACHE/zoo, default ~/.cache/vprkit/zoo)."""


@weights.command("list")
@click.option("--check", is_flag=True, help="Also hash each cached file against its expected SHA-256.")
@click.option("--json", "as_json", is_flag=True)
def list_weights(check: bool, as_json: bool) -> None:
    """Every zoo checkpoint: presets using it, licence, official URL, and whether it is cached."""
    users = _presets_using()
    rows = []
    for entry in iter_weights():
        status = weights_status(entry.name, check=check)
        rows.append(
            {
                "name": entry.name,
                "presets": users.get(entry.name, []),
                "licence": entry.licence,
                "source": entry.source,
                "url": entry.urls[0],
                "file": str(status.path),
                "cached": status.present,
                "bytes": status.size_bytes,
                "sha256_published": entry.sha256,
                "status": status.verdict,
            }
        )
    if as_json:
        echo_json({"cache": str(zoo_cache_dir()), "weights": rows})
        return
    click.echo(f"zoo weights (cache: {zoo_cache_dir()})")
    for r in rows:
        click.echo(f"{r['name']:<28} {r['status']:<22} {r['licence']:<10} presets: {', '.join(r['presets']) or '-'}")
        click.echo(f"{'':<28} {r['url']}")


@weights.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every entry (several GB).")
def fetch(names: tuple[str, ...], every: bool) -> None:
    """Download zoo checkpoints into the cache (verified; nothing is left behind on failure)."""
    failed = 0
    for name in _names(names, every):
        try:
            path = weights_path(name)
        except VPRKitError as exc:
            failed += 1
            click.echo(f"error: {exc}", err=True)
            continue
        click.echo(f"{name}: {path}")
    if failed:
        raise SystemExit(2)


@weights.command("verify")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True)
def verify(names: tuple[str, ...], as_json: bool) -> None:
    """Hash cached checkpoints against their SHA-256 (published, or recorded at first download); exit 2 on damage."""
    chosen = list(names) or [e.name for e in iter_weights() if weights_status(e.name).present]
    for name in chosen:
        ZOO_WEIGHTS.get(name)
    statuses = [weights_status(name, check=True) for name in chosen]
    damaged = [s.name for s in statuses if s.verdict.startswith("DAMAGED")]
    if as_json:
        echo_json(
            {
                "weights": [
                    {"name": s.name, "file": str(s.path), "sha256": s.sha256, "status": s.verdict} for s in statuses
                ]
            }
        )
    else:
        if not statuses:
            click.echo(f"no zoo weights are cached in {zoo_cache_dir()}")
        for s in statuses:
            click.echo(f"{s.name:<28} {s.verdict}")
    if damaged:
        raise ConfigError(f"damaged: {', '.join(damaged)}; fetch them again (`vprkit weights fetch NAME`)")


def register(group: click.Group) -> None:
    group.add_command(weights)
