"""``vprkit serve MAP_DIR``: the live localiser over HTTP (the work is :mod:`vprkit.service`'s)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..uploads import MEGABYTE, configure_decoding
from .core import device_option

BYTES_PER_MB = 1024 * 1024
DEFAULT_MAX_UPLOAD_MB = 20.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The service's limits as options: option name → (ServiceLimits field, default, click type, help). The defaults
# are vprkit.service.limits' (repeated here so that `vprkit --help` does not import the [service] extra;
# tests/service/test_cli_serve.py keeps them equal).
_POSITIVE = click.FloatRange(min=0, min_open=True)
LIMITS = {
    "max_model_requests": (
        "max_model_requests",
        16,
        click.IntRange(min=1),
        "Model and write requests handled at once (more: 503 with Retry-After); /health never waits for them.",
    ),
    "max_connections": (
        "max_connections",
        256,
        click.IntRange(min=0),
        "Open connections in all; when full, the longest-idle one makes room (0: no cap).",
    ),
    "max_connections_per_client": (
        "max_connections_per_client",
        16,
        click.IntRange(min=0),
        "Open connections per client address (0: no cap; behind a reverse proxy, raise it or use 0).",
    ),
    "header_timeout": ("header_timeout_s", 10.0, _POSITIVE, "Seconds a client has to send a complete request head."),
    "body_timeout": (
        "body_timeout_s",
        15.0,
        _POSITIVE,
        "Longest silence in seconds while a request body arrives (longer: 408).",
    ),
    "min_body_rate": (
        "min_body_rate",
        1024.0,
        _POSITIVE,
        "Bytes/s a request body must average once --body-timeout has passed (slower: 408).",
    ),
    "keep_alive_timeout": (
        "keep_alive_timeout_s",
        5.0,
        _POSITIVE,
        "Seconds an idle connection is kept open between requests.",
    ),
}
LIMIT_OPTIONS = {name: field for name, (field, *_) in LIMITS.items()}  # option → ServiceLimits field
DEFAULTS = {field: default for field, default, *_ in LIMITS.values()}  # ServiceLimits field → default


def with_limit_options(command):
    """``command`` with one option per entry of :data:`LIMITS` (``--max-model-requests`` …)."""
    for name, (_, default, kind, text) in reversed(LIMITS.items()):
        command = click.option(
            f"--{name.replace('_', '-')}", name, default=default, show_default=True, type=kind, help=text
        )(command)
    return command


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
@with_limit_options
@click.option(
    "--prepare-rerank",
    "prepare_rerank",
    multiple=True,
    metavar="NAME",
    help="Prepare this re-ranking preset's saved state at start-up when missing (repeatable), so that "
    "?rerank=NAME is answered from it; without it such a request is a 409 naming `vprkit rerank prepare`.",
)
@click.option(
    "--decode-budget-mb",
    "decode_budget_mb",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Memory for uploaded images being decoded at once, in MB (default: two of the largest admitted; "
    "beyond it an upload waits, then 503).",
)
@click.option(
    "--max-decoded-mb",
    "max_decoded_mb",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest decoded size of one uploaded image in MB (bit depth × channels × pixels; larger: 422). "
    "Default: 40 Mpx × 4 bytes.",
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
    prepare_rerank: tuple[str, ...],
    decode_budget_mb: float | None,
    max_decoded_mb: float | None,
    **limit_options: float,
) -> None:
    """Serve MAP_DIR over HTTP: POST /localize, POST/PATCH/DELETE /places, GET /health, GET /map (docs at /docs).

    The model and the map are loaded once; added places are on disk before the answer. Slow, idle and
    greedy clients are bounded by the limits below (see vprkit.service.limits for why each default).
    """
    # FastAPI and uvicorn are the optional [service] extra, and 0.4 s that `vprkit --help` need not load.
    from ..service import ServiceLimits
    from ..service import serve as serve_map

    limits = ServiceLimits(**{LIMIT_OPTIONS[name]: value for name, value in limit_options.items()})
    configure_decoding(
        budget_bytes=None if decode_budget_mb is None else int(decode_budget_mb * MEGABYTE),
        max_decoded_bytes=None if max_decoded_mb is None else int(max_decoded_mb * MEGABYTE),
    )

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
        limits=limits,
        prepare_rerank=prepare_rerank,
        on_ready=ready,
    )


def register(group: click.Group) -> None:
    """Add this topic's commands to ``group``."""
    group.add_command(serve)
