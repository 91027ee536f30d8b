"""The ``vprkit`` command: argument parsing and printing only; the work is done by :mod:`vprkit.pipeline`.

Each topic module (``core``, ``vocab``, ``rerank``, ``segments`` …) defines click commands and a
``register(group)`` function; adding a topic is a new module plus one entry in ``TOPICS``.
"""

from __future__ import annotations

import logging
import sys
import traceback

import click

from ..errors import VPRKitError
from . import bench, core, loops, rerank, scale, segments, serve, train, vocab, weights

TOPICS = (core, vocab, rerank, segments, bench, train, serve, loops, scale, weights)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vprkit")
def cli() -> None:
    """vprkit: visual place recognition — build maps of geotagged images, localise queries, evaluate."""


for _topic in TOPICS:
    _topic.register(cli)


class _MessageOnly(logging.Formatter):
    """Library messages as the CLI shows them: the message, prefixed with the level from warnings up."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message is logged, not to the stream of the moment it was made:
    a command run in-process (a notebook, click's test runner) may replace stderr and close the old one."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler assigns it; the current sys.stderr is always used
        pass


def show_library_logs(level: int = logging.INFO) -> None:
    """The library logs through ``logging``; the CLI shows its messages on stderr (stdout stays for results)."""
    handler = _CurrentStderr()
    handler.setFormatter(_MessageOnly())
    root = logging.getLogger("vprkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main() -> None:
    """Entry point: user-facing errors print as one line (no traceback) and exit with status 2."""
    show_library_logs()
    try:
        status = cli.main(standalone_mode=False)
        if isinstance(status, int) and status:  # a command's own exit status (e.g. some queries not localised)
            sys.exit(status)
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
    except OSError as exc:  # the disk or the system said no (full, read-only, permissions): not a bug
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        click.echo(f"error: {exc.strerror or exc}{where}", err=True)
        sys.exit(2)
    except Exception:  # a bug: show where, and ask for a report
        traceback.print_exc()
        click.echo(
            "internal error: this is a bug in vprkit, not in your input; please report it with the command "
            "you ran and the traceback above",
            err=True,
        )
        sys.exit(3)
