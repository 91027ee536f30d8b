"""The HTTP face of a live map: FastAPI routes over :class:`vprkit.pipeline.live.LiveMap`, nothing deeper.

Routes (the OpenAPI schema at ``/openapi.json``, interactive docs at ``/docs``):

- ``POST /localize`` — an image (multipart field ``image``, or the raw bytes as the body) → the top-K
  places and the position estimate; query ``top_k``, ``rerank``, ``verify=N`` (check the top N answers
  geometrically: :mod:`vprkit.pipeline.verify`). With ``stream=ID`` (and optionally
  ``sequence_length=L``, default 10) the frame is localised together with the earlier frames of the
  client's stream ``ID`` (sequence matching, :mod:`.sequences`); ``DELETE /streams/{id}`` (key required,
  as every write) ends a stream, which otherwise expires after ``ServiceLimits.stream_ttl_s`` unused.
- ``POST /places`` — an image and its pose → a new place, on disk before the answer.
- ``GET /places?offset=&limit=`` (a page of places in row order), ``GET /places/{id}``,
  ``PATCH /places/{id}`` (pose), ``DELETE /places/{id}``.
- ``GET /health``, ``GET /map`` (both say when the folder changed on disk), ``POST /admin/reload`` (key
  required: serve the folder as it is now, without a restart).

Every answer carries ``X-Request-ID`` (the client's, or generated) and ``X-Server-Time`` (:mod:`.stamp`).

Bad input is a 4xx with ``{"detail": "..."}``, never a 500: the key is checked and every body
bounded before it is read (:mod:`.guard`: 401, 413), images are decoded by the library (422 with the
reason), unknown fields and parameters are 422, unknown ids 404, a taken id 409, a map being built
by another process 409, a damaged map 503, a full disk 507. An unexpected failure is a one-line 500
(the traceback goes to the server log, never to the client). Parsing, decoding and the model run in
the threadpool, so the event loop keeps answering ``/health`` while models run. ``/map`` shows
filesystem paths only to requests carrying the key.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import (
    ConfigError,
    DatasetError,
    ImageReadError,
    MapDamagedError,
    MapError,
    ReadOnlyMapError,
    StateNotPreparedError,
    StorageFullError,
    VPRKitError,
)
from ..pipeline.live import LiveMap, PlaceExistsError, UnknownPlaceError
from ..pipeline.verify import VerifySettings
from ..presets import list_rerank_configs
from ..uploads import DecodeBusyError
from .reload import ServedMap
from .stamp import RequestStamp, request_id, request_time
from .forms import FormError, parse_multipart
from .guard import API_KEY_HEADER, KEY_REQUIRED, RequestGuard, is_api_key
from .limits import DEFAULT_LIMITS, ServiceLimits
from .sequences import StreamTable, TooManyStreamsError, check_stream_id, localize_in_stream

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_TOP_K = 10
MAX_TOP_K = 100
IMAGE_FIELD = "image"
MULTIPART = "multipart/form-data"
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
# Form / query fields of a pose (POST /places).
POSE_FIELDS = ("easting", "northing", "lat", "lon", "heading", "timestamp")
KEY_FIELD = "key"
# What each upload route accepts; anything else is a 422 naming it (a typo must not pass silently).
LOCALIZE_PARAMS = frozenset({"top_k", "rerank", "stream", "sequence_length", "verify"})
MAX_VERIFY = 10  # answers checked per request at most: each costs a match and a two-view fit (≈ 20–40 ms)
LIST_PARAMS = frozenset({"offset", "limit"})
# GET /places pages: a page of 1000 places is about 100 KB of JSON.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
PLACE_FIELDS = frozenset({KEY_FIELD, *POSE_FIELDS})
# /map without the key: no filesystem paths (these fields, and any string that is an absolute path).
PATH_FIELDS = frozenset({"map_dir", "images_root", "path", "root"})
WINDOWS_ABSOLUTE = re.compile(r"^[A-Za-z]:[\\/]")

# The most specific class wins (walked along the exception's MRO): the status of each library error.
ERROR_STATUS: dict[type[VPRKitError], int] = {
    UnknownPlaceError: 404,
    PlaceExistsError: 409,
    TooManyStreamsError: 503,  # every stream slot is in use: retry later, or end a stream
    DecodeBusyError: 503,  # the decode budget stayed full: retry later (wins over ImageReadError by the MRO)
    MapDamagedError: 503,  # a map file damaged or not belonging: nothing trustworthy to answer from
    StorageFullError: 507,  # disk full or quota: nothing was kept
    ReadOnlyMapError: 409,  # the map (or one of its folders) cannot be written
    StateNotPreparedError: 409,  # e.g. re-ranking state not prepared: the message names the command
    MapError: 409,  # e.g. the map is being built by another process right now
    ImageReadError: 422,
    ConfigError: 422,
    DatasetError: 422,  # a lat/lon outside UTM's range
    VPRKitError: 400,
}


def error_status(exc: VPRKitError) -> int:
    """The HTTP status of a library error (see :data:`ERROR_STATUS`)."""
    for cls in type(exc).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 400


# An OSError escaping the library: the status by errno, and what the client is told (never the path).
OSERROR_STATUS: dict[int, tuple[int, str]] = {
    errno.ENOSPC: (507, "the map's disk is full: nothing was kept"),
    errno.EDQUOT: (507, "the map's disk quota is exhausted: nothing was kept"),
    errno.EFBIG: (507, "a map file reached the file size limit: nothing was kept"),
    errno.ENAMETOOLONG: (422, "the place's key makes a file name longer than the file system allows"),
    errno.EROFS: (409, "the map is on a read-only file system"),
    errno.EACCES: (409, "the map cannot be written (permission denied)"),
    errno.EPERM: (409, "the map cannot be written (operation not permitted)"),
    errno.EEXIST: (409, "the place's key conflicts with an existing file or folder of the map"),
    errno.ENOTDIR: (409, "the place's key conflicts with an existing file of the map"),
    errno.EISDIR: (409, "the place's key conflicts with an existing folder of the map"),
}
OSERROR_DEFAULT = (409, "the map could not be read or written")


def oserror_answer(exc: OSError) -> tuple[int, str]:
    """(status, one-line detail) of an OSError from the map's files: 507 when storage ran out, else 409/422."""
    status, detail = OSERROR_STATUS.get(exc.errno or 0, OSERROR_DEFAULT)
    reason = exc.strerror or type(exc).__name__
    return status, detail if reason.lower() in detail.lower() else f"{detail} ({reason})"


def without_paths(value: Any) -> Any:
    """``value`` (a JSON-like summary) without filesystem paths: :data:`PATH_FIELDS` and absolute path strings."""
    if isinstance(value, dict):
        return {k: without_paths(v) for k, v in value.items() if k not in PATH_FIELDS and not _is_path(v)}
    if isinstance(value, list):
        return [without_paths(v) for v in value if not _is_path(v)]
    return value


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and (
        os.path.isabs(value) or value.startswith("~") or bool(WINDOWS_ABSOLUTE.match(value))
    )


def _unknown(names, known: frozenset[str], what: str) -> None:
    """422 naming the first of ``names`` not in ``known``."""
    for name in names:
        if name not in known:
            raise HTTPException(422, f"unknown {what} {name!r}; known: {', '.join(sorted(known))}")


# ---- response models (documentation of the answers; /openapi.json shows them) -------------------
class Open(BaseModel):
    """Fields beyond the documented ones pass through (the library may add more)."""

    model_config = ConfigDict(extra="allow")


class Position(BaseModel):
    easting: float = Field(description="metres, in the map's frame")
    northing: float = Field(description="metres, in the map's frame")


class MatchOut(Open):
    id: str = Field(description="the place's id (its key in the map)")
    image: str | None = Field(None, description="the same key, as the library names it")
    row: int | None = Field(None, description="the place's row in the map")
    score: float | None = Field(None, description="the ranking score, higher is better (see score_kind)")
    score_kind: str | None = Field(None, description="what the score is: a cosine, or a re-ranking score")
    cosine: float | None = Field(None, description="cosine similarity of the global descriptors")
    position: list[float] | None = Field(None, description="[easting, northing] of the place, null when unknown")
    heading_deg: float | None = Field(None, description="the place's heading, when the map records it")


class EstimateOut(Open):
    """Where the query was taken, from the top matches (``spread_<unit>`` says how far they lie apart)."""

    position: list[float] | None = Field(None, description="[easting, northing] estimated from the top matches")
    heading_deg: float | None = None
    confidence: float | None = Field(None, description="in [0, 1]")
    unknown: bool | None = Field(None, description="true when the query looks like no place of the map")


class StreamOut(BaseModel):
    id: str
    sequence_length: int = Field(description="frames a sequence spans")
    frames: int = Field(description="frames of the stream localised so far, this one included")
    window_frames: int = Field(description="frames this answer rests on (up to sequence_length)")
    started: str | None = Field(
        None, description="why this frame starts the stream anew: created, expired, sequence length changed, restarted"
    )


class LocalizeOut(Open):
    query: str
    request_id: str | None = Field(None, description="this request's id (also the X-Request-ID header)")
    server_time: str | None = Field(None, description="when the request arrived, by the server's clock (UTC, ISO 8601)")
    seconds: float = Field(description="extraction and search time of this query")
    matches: list[MatchOut] = Field(description="best first")
    estimate: EstimateOut | None = None
    error: str | None = None
    stream: StreamOut | None = Field(None, description="with stream=ID: the stream this frame was localised in")


class PlaceOut(BaseModel):
    id: str
    row: int = Field(description="the place's row in the map (rows after a deleted one move down)")
    position: Position | None = None
    heading: float | None = Field(None, description="degrees in [0, 360)")
    timestamp: float | None = Field(None, description="seconds")


class PoseIn(BaseModel):
    """A pose: easting+northing (metres) or lat+lon (WGS84, projected into the map's frame); fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")

    easting: float | None = None
    northing: float | None = None
    lat: float | None = None
    lon: float | None = None
    heading: float | None = Field(None, description="degrees")
    timestamp: float | None = Field(None, description="seconds")


class PlaceListOut(BaseModel):
    total: int = Field(description="places in the map")
    offset: int
    limit: int
    places: list[PlaceOut] = Field(description="rows offset … offset + limit - 1, in row order")


class ReloadOut(BaseModel):
    reloaded: bool
    places_before: int
    places: int
    seconds: float = Field(description="time to open the folder again (models included)")


class DeletedOut(BaseModel):
    deleted: PlaceOut
    places: int = Field(description="places left in the map")


class HealthOut(BaseModel):
    status: str = Field(description="ok, or stale when the map folder changed on disk (POST /admin/reload)")
    changed_on_disk: bool = Field(False, description="another process replaced the map since it was opened")
    places: int
    uptime_seconds: float
    version: str


class ErrorOut(BaseModel):
    detail: Any


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image as a multipart file field `image`, or its raw bytes as the body (image/*, "
        "application/octet-stream).",
        "content": {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_PLACE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image as a multipart file field `image` with optional form fields `key`, "
        "`easting`+`northing` or `lat`+`lon`, `heading`, `timestamp`; or the raw bytes as the body "
        "with those fields as query parameters.",
        "content": {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {
                        IMAGE_FIELD: {"type": "string", "format": "binary"},
                        "key": {"type": "string"},
                        **{f: {"type": "number"} for f in POSE_FIELDS},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
_ERRORS = {s: {"model": ErrorOut} for s in (401, 404, 409, 413, 415, 422)}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            413, f"upload of {int(declared):,} bytes is larger than this service accepts ({limit:,} bytes)"
        )
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise HTTPException(413, f"upload is larger than this service accepts ({limit:,} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request, limit: int) -> bytes:
    """The body of a multipart or raw image upload, read within ``limit`` bytes (see :func:`unpack_upload`)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != MULTIPART and not ctype.startswith(RAW_IMAGE_TYPES):
        raise HTTPException(
            415,
            f"send the image as {MULTIPART} (field '{IMAGE_FIELD}') or as raw bytes "
            f"(image/*, application/octet-stream), not {ctype}",
        )
    return await read_body(request, limit)


def unpack_upload(body: bytes, content_type: str, known_fields: frozenset[str]) -> tuple[bytes, str, dict[str, str]]:
    """(image bytes, its name, form fields) of an upload body; CPU work, so called in the threadpool.

    A multipart form must hold one file field ``image`` and only fields of ``known_fields`` (422 otherwise).
    """
    if content_type.split(";")[0].strip().lower() != MULTIPART:
        if not body:
            raise HTTPException(422, "no image in the request body")
        return body, "upload", {}
    try:
        parts = parse_multipart(body, content_type)
    except FormError as exc:
        raise HTTPException(422, f"unreadable multipart body ({exc})") from None
    _unknown((p.name for p in parts), known_fields | {IMAGE_FIELD}, "form field")
    files = [p for p in parts if p.name == IMAGE_FIELD and p.filename is not None]
    if len(files) != 1 or any(p.name == IMAGE_FIELD and p.filename is None for p in parts):
        raise HTTPException(422, f"a multipart upload needs exactly one file field named '{IMAGE_FIELD}'")
    fields: dict[str, str] = {}
    for part in parts:
        if part.filename is None:
            try:
                fields[part.name] = part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise HTTPException(422, f"form field {part.name!r} is not UTF-8 text") from None
    return files[0].data, files[0].filename or IMAGE_FIELD, fields


def _form_pose(fields: dict[str, str]) -> dict[str, float]:
    pose: dict[str, float] = {}
    for name in POSE_FIELDS:
        text = fields.get(name)
        if text is None or not text.strip():
            continue
        try:
            pose[name] = float(text)
        except ValueError:
            raise HTTPException(422, f"field {name!r} must be a number, got {text!r}") from None
    return pose


def create_app(
    live: LiveMap | ServedMap,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    title: str = "vprkit live localiser",
    limits: ServiceLimits = DEFAULT_LIMITS,
    reopen: Callable[[], LiveMap] | None = None,
    stream_clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The FastAPI app serving ``live`` (one loaded model and map). ``api_key``: required for writes when given;
    ``limits``: the request limits of :mod:`.limits` (the connection limits are the server's, see :mod:`.server`);
    ``reopen``: how ``POST /admin/reload`` opens the folder again (default: ``LiveMap.open(live.dir)``);
    ``stream_clock``: the seconds streams expire by (monotonic; tests pass a fake one)."""
    live = live if isinstance(live, ServedMap) else ServedMap(live, reopen)
    if max_upload_bytes < 1:
        raise ConfigError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
    if api_key is not None and not api_key:
        raise ConfigError("the API key is empty; give a non-empty key or none")
    app = FastAPI(
        title=title,
        version=__version__,
        description="Visual place recognition over a live map: localise images, add, move and remove places.",
    )
    _add_error_handlers(app, limits, map_dirs=(str(live.dir), str(Path(live.dir).resolve())))
    # Outside the routes (and inside Starlette's last-resort error handler): the key and body limits are
    # checked before any body is read, and model requests take a slot.
    app.add_middleware(RequestGuard, api_key=api_key, limits=limits, max_upload_bytes=max_upload_bytes)
    app.add_middleware(RequestStamp)  # outermost: the guard's own answers (401, 413, 503) carry the id too
    _add_status_routes(app, live, api_key, started=time.time())
    streams = StreamTable(limits, clock=stream_clock)
    app.state.streams = streams
    _add_localize_route(app, live, max_upload_bytes, streams)
    _add_stream_routes(app, streams, _key_check(api_key))
    _add_place_routes(app, live, max_upload_bytes, _key_check(api_key))
    _add_admin_routes(app, live, _key_check(api_key))
    return app


def _add_error_handlers(app: FastAPI, limits: ServiceLimits, map_dirs: tuple[str, ...] = ()) -> None:
    """Library errors by :data:`ERROR_STATUS`, OSErrors by :data:`OSERROR_STATUS` (anything else: the guard's
    one-line 500, see :mod:`.guard`)."""

    @app.exception_handler(VPRKitError)
    async def _library_error(_: Request, exc: VPRKitError) -> JSONResponse:
        status = error_status(exc)
        # a 503 is "come back later": say when, as the request guard's own 503s do
        headers = {"Retry-After": str(int(limits.retry_after_s))} if status == 503 else None
        detail = str(exc)
        for folder in sorted(map_dirs, key=len, reverse=True):  # clients never learn where the map lives
            detail = detail.replace(folder, "MAP_DIR")
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(OSError)
    async def _os_error(request: Request, exc: OSError) -> JSONResponse:
        status, detail = oserror_answer(exc)
        logger.warning("%s %s: %s (%s)", request.method, request.url.path, detail, exc)
        return JSONResponse({"detail": detail}, status_code=status)


def _key_check(api_key: str | None) -> Callable[..., None]:
    """The dependency that guards writes: 401 unless the request carries ``api_key`` (nothing to check without one).

    :class:`.guard.RequestGuard` has already refused such requests before their body was read; this
    second check documents the header in the OpenAPI schema and holds if the app runs without the guard.
    """
    key_header = APIKeyHeader(
        name=API_KEY_HEADER,
        auto_error=False,
        description="required for POST/PATCH/DELETE /places when the service has a key",
    )

    def require_key(given: str | None = Depends(key_header)) -> None:
        if api_key is None:
            return
        if not is_api_key(given, api_key):
            raise HTTPException(401, KEY_REQUIRED, headers={"WWW-Authenticate": API_KEY_HEADER})

    return require_key


def _add_status_routes(app: FastAPI, live: LiveMap, api_key: str | None, started: float) -> None:
    """``GET /health`` (uptime counted from ``started``) and ``GET /map`` (paths only for the key's holder)."""

    @app.get("/health", response_model=HealthOut, summary="Liveness, the number of places, a map changed on disk")
    async def health() -> HealthOut:
        # On the event loop itself: no lock, no threadpool, so it answers while every worker thread is busy.
        changed = live.changed_on_disk  # one stat of map.json
        return HealthOut(
            status="stale" if changed else "ok",
            places=len(live),
            uptime_seconds=round(time.time() - started, 3),
            version=__version__,
            changed_on_disk=changed,
        )

    @app.get("/map", summary="The served map: settings, counts, index, frame (filesystem paths only with the key)")
    def map_info(request: Request) -> dict[str, Any]:
        info = {**live.info(), **live.status()}
        return info if is_api_key(request.headers.get(API_KEY_HEADER), api_key) else without_paths(info)


def _add_admin_routes(app: FastAPI, served: ServedMap, require_key: Callable[..., None]) -> None:
    """``POST /admin/reload``: serve the map folder as it is on disk now (after a ``vprkit map build`` into it)."""

    @app.post(
        "/admin/reload",
        response_model=ReloadOut,
        responses=_ERRORS,
        dependencies=[Depends(require_key)],
        summary="Open the map folder again and serve it (the old map answers until then)",
    )
    async def reload(request: Request) -> dict[str, Any]:
        _unknown(request.query_params.keys(), frozenset(), "query parameter")
        return await run_in_threadpool(served.reload)


def _add_localize_route(app: FastAPI, live: LiveMap, max_upload_bytes: int, streams: StreamTable) -> None:
    """``POST /localize``: the upload is read on the event loop, parsing, decoding and search run in the threadpool."""
    rerank_names = {c.name for c in list_rerank_configs()}
    known = ", ".join(sorted(rerank_names))

    @app.post(
        "/localize",
        response_model=LocalizeOut,
        responses={**_ERRORS, 503: {"model": ErrorOut}},
        openapi_extra=_UPLOAD_BODY,
        summary="Localise one image (or the next frame of a stream): the top-K places and the position estimate",
    )
    async def localize(
        request: Request,
        top_k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="places to return"),
        rerank: str | None = Query(
            None, description=f"re-ranking preset: {known}, or none; default: the re-ranking the map was built for"
        ),
        stream: str | None = Query(
            None, description="your stream's id: the frame is localised with that stream's earlier frames"
        ),
        sequence_length: int | None = Query(None, description="frames a stream's sequence spans (default 10)"),
        verify: int = Query(
            0,
            ge=0,
            le=MAX_VERIFY,
            description="check the top N answers with local features and a two-view model (0: off): the answer's "
            "inliers enter its confidence; estimate.verification gives its rotation relative to the matched image",
        ),
    ) -> JSONResponse:
        _unknown(request.query_params.keys(), LOCALIZE_PARAMS, "query parameter")
        if rerank is not None and rerank != "none" and rerank not in rerank_names:
            raise HTTPException(422, f"unknown re-ranking preset {rerank!r}; known: {known}")
        if stream is None and sequence_length is not None:
            raise HTTPException(422, "sequence_length applies to a stream: add stream=ID")
        if stream is not None and verify:
            raise HTTPException(422, "verify applies to single images, not to a stream's frames")
        if stream is not None:
            if rerank not in (None, "none"):
                raise HTTPException(422, "re-ranking and sequence matching (stream) are not combined; choose one")
            streams.settings(sequence_length)  # a bad id or length is a 422 before the upload is read
            check_stream_id(stream)
        body = await read_upload(request, max_upload_bytes)
        content_type = request.headers.get("content-type", "")

        def work() -> dict[str, Any]:
            data, name, _ = unpack_upload(body, content_type, frozenset())
            picture = live.decode(data, name)
            if stream is not None:
                out = localize_in_stream(streams, live, stream, sequence_length, name, picture, top_k)
            else:
                checks = VerifySettings(top_n=verify) if verify else None
                result = live.localize({name: picture}, top_k=top_k, rerank=rerank, verify=checks)[0]
                if result.error is not None:
                    raise ImageReadError(result.error)
                out = result.to_dict()
            for match in out.get("matches", []):
                match.setdefault("id", match.get("image"))
            return {**out, "request_id": request_id(request.scope), "server_time": request_time(request.scope)}

        return JSONResponse(await run_in_threadpool(work))


def _add_stream_routes(app: FastAPI, streams: StreamTable, require_key: Callable[..., None]) -> None:
    """``DELETE /streams/{id}``: end a stream now (it would otherwise expire after ``stream_ttl_s`` unused)."""

    @app.delete(
        "/streams/{stream_id}",
        responses=_ERRORS,
        dependencies=[Depends(require_key)],
        summary="End a stream (its next frame starts a new one)",
    )
    def end_stream(stream_id: str) -> dict[str, Any]:
        check_stream_id(stream_id)
        if not streams.end(stream_id):
            raise HTTPException(404, f"no stream {stream_id!r} (never started, ended or expired)")
        return {"ended": stream_id, "streams": len(streams)}


def _add_place_routes(app: FastAPI, live: LiveMap, max_upload_bytes: int, require_key: Callable[..., None]) -> None:
    """``POST /places``, ``GET``/``PATCH``/``DELETE /places/{id}``: writes need ``require_key``, durable on answer."""

    @app.post(
        "/places",
        response_model=PlaceOut,
        status_code=201,
        responses={**_ERRORS, 503: {"model": ErrorOut}, 507: {"model": ErrorOut}},
        openapi_extra=_PLACE_BODY,
        dependencies=[Depends(require_key)],
        summary="Add an image and its pose as a new place (durable on answer)",
    )
    async def add_place(
        request: Request,
        key: str | None = Query(None, description="the new place's id (default: generated)"),
        easting: float | None = Query(None),
        northing: float | None = Query(None),
        lat: float | None = Query(None),
        lon: float | None = Query(None),
        heading: float | None = Query(None),
        timestamp: float | None = Query(None),
    ) -> JSONResponse:
        _unknown(request.query_params.keys(), PLACE_FIELDS, "query parameter")
        body = await read_upload(request, max_upload_bytes)
        content_type = request.headers.get("content-type", "")
        given = dict(easting=easting, northing=northing, lat=lat, lon=lon, heading=heading, timestamp=timestamp)

        def work() -> dict[str, Any]:
            data, _, fields = unpack_upload(body, content_type, PLACE_FIELDS)
            pose = {**{k: v for k, v in given.items() if v is not None}, **_form_pose(fields)}
            return live.add_place(data, fields.get(KEY_FIELD) or key, pose)

        return JSONResponse(await run_in_threadpool(work), status_code=201)

    @app.get("/places", response_model=PlaceListOut, responses=_ERRORS, summary="The places, in row order, a page")
    def list_places(
        request: Request,
        offset: int = Query(0, ge=0, description="the first row to return"),
        limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="places to return"),
    ) -> dict[str, Any]:
        _unknown(request.query_params.keys(), LIST_PARAMS, "query parameter")
        total, places = live.places(offset, limit)
        return {"total": total, "offset": offset, "limit": limit, "places": places}

    @app.get("/places/{key:path}", response_model=PlaceOut, responses=_ERRORS, summary="One place")
    def get_place(key: str) -> dict[str, Any]:
        return live.place(key)

    @app.patch(
        "/places/{key:path}",
        response_model=PlaceOut,
        responses={**_ERRORS, 503: {"model": ErrorOut}, 507: {"model": ErrorOut}},
        dependencies=[Depends(require_key)],
        summary="Change a place's pose (fields left out stay as they are; durable on answer)",
    )
    def update_place(key: str, pose: PoseIn) -> dict[str, Any]:
        return live.update_pose(key, pose.model_dump(exclude_none=True))

    @app.delete(
        "/places/{key:path}",
        response_model=DeletedOut,
        responses={**_ERRORS, 503: {"model": ErrorOut}, 507: {"model": ErrorOut}},
        dependencies=[Depends(require_key)],
        summary="Remove a place (durable on answer)",
    )
    def delete_place(key: str) -> dict[str, Any]:
        deleted = live.remove_place(key)
        return {"deleted": deleted, "places": len(live)}
