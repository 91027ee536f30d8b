"""``vprkit serve MAP_DIR``: the live localiser over HTTP (the work is :mod:`vprkit.service`'s)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .core import device_option

BYTES_PER_MB = 1024 * 1024
DEFAULT_MAX_UPLOAD_MB = 20.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _api_key(env: str | None, file: Path | None) -> str | None:
    """The API key from an environment variable or a file (never from the command line, where `ps` shows it)."""
    if env and file:
        raise click.UsageError("give the API key with --api-key-env or --api-key-file, not both")
    if env:
        key = os.environ.get(env, "").strip()
        if not key:
            raise click.UsageError(f"--api-key-env {env}: the environment variable is unset or empty")
        return key
    if file:
        try:
            key = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise click.UsageError(f"--api-key-file {file}: unreadable ({exc})") from None
        if not key:
            raise click.UsageError(f"--api-key-file {file} is empty")
        return key
    return None


@click.command("serve")
@click.argument("map_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option(
    "--api-key-env",
    "api_key_env",
    default=None,
    metavar="VAR",
    help="Require the key in environment variable VAR (header X-API-Key) for adding, moving and deleting places.",
)
@click.option(
    "--api-key-file",
    "api_key_file",
    default=None,
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The same, with the key read from FILE.",
)
@click.option(
    "--max-upload-mb",
    "max_upload_mb",
    default=DEFAULT_MAX_UPLOAD_MB,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest request body accepted (larger: 413).",
)
@device_option
@click.option("--no-access-log", "no_access_log", is_flag=True, help="Do not log every request.")
def serve(
    map_dir: Path,
    host: str,
    port: int,
    api_key_env: str | None,
    api_key_file: Path | None,
    max_upload_mb: float,
    device: str | None,
    no_access_log: bool,
) -> None:
    """Serve MAP_DIR over HTTP: POST /localize, POST/PATCH/DELETE /places, GET /health, GET /map (docs at /docs).

    The model and the map are loaded once; added places are on disk before the answer.
    """
    # FastAPI and uvicorn are the optional [service] extra, and 0.4 s that `vprkit --help` need not load.
    from ..service import serve as serve_map

    key = _api_key(api_key_env, api_key_file)
    if key is None and host not in LOOPBACK_HOSTS:
        click.echo(f"warning: no API key: anyone who can reach {host}:{port} can add and delete places", err=True)

    def ready(url: str) -> None:
        click.echo(f"serving {map_dir} at {url}  (API docs: {url}/docs; writes {'need X-API-Key' if key else 'open'})")

    serve_map(
        map_dir,
        host=host,
        port=port,
        api_key=key,
        max_upload_bytes=int(max_upload_mb * BYTES_PER_MB),
        device=device,
        access_log=not no_access_log,
        on_ready=ready,
    )


def register(group: click.Group) -> None:
    """Add this topic's commands to ``group``."""
    group.add_command(serve)
