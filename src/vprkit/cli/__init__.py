"""The ``vprkit`` command: argument parsing and printing only; the work is done by :mod:`vprkit.pipeline`.

Each topic module (``core``, ``vocab``, ``rerank``, ``segments``) defines click commands and a
``register(group)`` function; adding a topic is a new module plus one entry in ``_TOPICS``.
"""

from __future__ import annotations

import importlib
import sys

import click

from ..errors import VPRKitError

_TOPICS = ("core", "vocab", "rerank", "segments")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vprkit")
def cli() -> None:
    """vprkit: visual place recognition — build maps of geotagged images, localise queries, evaluate."""


for _topic in _TOPICS:
    try:
        importlib.import_module(f"{__name__}.{_topic}").register(cli)
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_topic}":
            raise


def main() -> None:
    """Entry point: user-facing errors print as one line (no traceback) and exit with status 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except VPRKitError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted: completed shards are kept; run the same command again to resume", err=True)
        sys.exit(130)
