#!/usr/bin/env python
"""Replay every attack of issue 26 against a served Corridor map, on loopback, and print a verdict table.

The suite builds (or takes ``--map``) a small map of Corridor reference images with synthetic poses,
copies it for each case, starts ``vprkit serve`` as a subprocess on a free loopback port and plays, with a
timeout on everything:

1. out-of-range poses (easting 1e160, timestamps -1e12 and 1e308, heading -1e-20, lat 91, UTM zone 99,
   a pose CSV with 1e160) — then every answer must still be strict JSON (no NaN / Infinity);
2. damaged or swapped map files (descriptors.npy overwritten / truncated / empty, index.faiss overwritten or
   from another map, store.h5 from another map, an edited calibration.json, duplicate keys in an append
   file, index.json shard paths ``../x`` and ``/etc/hostname``, files of another preset) — each on a fresh
   copy, through ``vprkit localize --json`` and ``vprkit serve`` start-up;
3. 40 idle TCP connections, slow headers and a trickled chunked body;
4. four parallel 16-bit 6300² PNG uploads (peak RSS of the server process, ``VmHWM``);
5. ``?rerank=performance`` on a map without saved re-ranking state (and a plain localisation meanwhile);
6. a 50 MB and a junk PATCH body without the key;
7. two writers and three readers (per-client throughput, p90);
8. failed adds on a full disk (a small tmpfs, when this runs as root and may mount);
9. awkward keys (81 CJK characters, ``file.jpg/child.jpg``, a key naming a folder), read-only
   ``live-images/`` and ``live/``, an unknown form field;
10. ``/map`` without the key, ``?api_key=`` (and the access log), ``.tmp`` leftovers at start-up, bytes
    written by one add / delete.

A case passes only when the behaviour is what the issue's deliverables require: no 500, no traceback,
no silent wrong answer, no unbounded wait. A case that cannot be set up here (no mount, …) is NOT RUN
with the reason, never PASS. Exit status 1 when any case fails. Run::

    .venv/bin/python scripts/attack_service.py [--quick] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
VPRKIT = REPO / ".venv" / "bin" / "vprkit"
DEFAULT_DATA = Path(os.environ.get("VPRKIT_DATA", REPO.parent / "shared" / "datasets"))
KEY_ENV = "VPRKIT_ATTACK_API_KEY"
MAP_IMAGES = 40  # enough rows outside each row's window for the confidence's calibration
SPACING_M = 10.0  # synthetic easting of reference i: 10 i metres (the calibration's radius is 25 m)
QUERY_ROW = 3  # a row of the first index shard of the compressed copy
LIVE_SEED_KEY = "live-seed.jpg"  # a place added through the service while the pristine map is prepared
LIVE_SEED_IMAGE = 45  # Corridor reference used for it (not in the base map)
# Bounds (seconds) of one case step.
SERVE_START_S = 120.0
CLI_S = 180.0
REQUEST_S = 60.0
FAST_ANSWER_S = 5.0  # what "answered quickly" means for a refusal or /health
SLOW_CLIENT_BOUND_S = 30.0  # a slow header / trickled body must be cut within this
TRICKLE_EVERY_S = 2.0
IDLE_CONNECTIONS = 40
PNG_SIDE = 6300
PNG_PARALLEL = 4
MAX_RSS_INCREASE_MB = 512.0  # peak RSS increase allowed for the four parallel 16-bit PNGs
PATCH_BYTES = 50 * 1024 * 1024
CONFIDENCE_TOLERANCE = 0.1
COSINE_SELF = 0.99  # a map image queried against its own map scores at least this
WRITERS, READERS = 2, 3
MIX_SECONDS, MIX_SECONDS_QUICK = 20.0, 8.0
ALONE_SECONDS = 5.0
RERANK_BOUND_S, RERANK_BOUND_QUICK_S = 30.0, 15.0
MIN_READER_SHARE = 0.3  # readers keep at least this share of their throughput alone while writers write
MAX_READER_P90_S = 5.0
MAX_INDEX_WRITE_SHARE = 0.25  # an add / delete rewrites at most this share of the index files' bytes
INDEX_FILES = re.compile(r"^(index\.faiss|index-shards/.*|descriptors\.npy|index\.trained\.faiss)$")
JSON_CONSTANTS = ("NaN", "Infinity", "-Infinity")
PASS, FAIL, NOT_RUN = "PASS", "FAIL", "NOT RUN"


# ---- results ---------------------------------------------------------------------------------------
@dataclass
class Result:
    case: str
    item: int
    expected: str
    observed: str = ""
    verdict: str = NOT_RUN
    seconds: float = 0.0


class Verdict(Exception):
    """Raised inside a case to end it with a verdict and what was observed."""

    def __init__(self, verdict: str, observed: str):
        super().__init__(observed)
        self.verdict, self.observed = verdict, observed


def passed(observed: str) -> Verdict:
    return Verdict(PASS, observed)


def failed(observed: str) -> Verdict:
    return Verdict(FAIL, observed)


def not_run(reason: str) -> Verdict:
    return Verdict(NOT_RUN, reason)


class Suite:
    """Runs cases (``--quick``: the quick ones), each under its own bound, and collects the table."""

    def __init__(self, quick: bool, only: str | None):
        self.quick, self.only = quick, only
        self.results: list[Result] = []

    def run(self, name: str, item: int, expected: str, body: Callable[[], Verdict], quick: bool = True) -> None:
        if (self.quick and not quick) or (self.only and not re.search(self.only, name)):
            return
        result = Result(name, item, expected)
        start = time.monotonic()
        try:
            outcome = body()
        except Verdict as exc:
            outcome = exc
        except Exception as exc:  # noqa: BLE001 - the case could not complete: say so, never call it a pass
            dropped = type(exc).__module__.startswith(("httpx", "httpcore"))
            why = "the server dropped the connection without an answer" if dropped else "case could not complete"
            outcome = failed(f"{why}: {type(exc).__name__}: {str(exc)[:300]}")
        result.verdict, result.observed = outcome.verdict, outcome.observed
        result.seconds = round(time.monotonic() - start, 1)
        self.results.append(result)
        print(f"[{result.verdict:7}] {name} ({result.seconds:.1f} s): {result.observed}", file=sys.stderr, flush=True)

    def table(self) -> str:
        rows = ["| case | item | expected | observed | verdict |", "|---|---|---|---|---|"]
        for r in self.results:
            cells = [r.case, str(r.item), r.expected, r.observed, r.verdict]
            rows.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
        counts = {v: sum(r.verdict == v for r in self.results) for v in (PASS, FAIL, NOT_RUN)}
        rows.append("")
        rows.append(f"{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[NOT_RUN]} NOT RUN")
        return "\n".join(rows)


# ---- small helpers ----------------------------------------------------------------------------------
def strict_json(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN and ±Infinity (what browsers and most parsers refuse)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"invalid JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def one_line(text: str, limit: int = 160) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def require_loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise SystemExit(f"attack_service: refusing host {host!r}: this suite only attacks loopback addresses")


@dataclass
class CliRun:
    rc: int | None  # None: timed out (killed)
    out: str
    err: str
    seconds: float

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.err or self.rc == 3


class Env:
    """Where things are: the vprkit command, the environment of its processes, the datasets, the work folder."""

    def __init__(self, work: Path, data: Path, src: Path | None, host: str):
        self.work, self.data, self.host = work, data, host
        self.api_key = "atk-" + secrets.token_hex(12)
        self.env = dict(os.environ, **{KEY_ENV: self.api_key, "PYTHONUNBUFFERED": "1"})
        if src is not None:
            self.env["PYTHONPATH"] = str(src) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.vprkit = [str(VPRKIT)] if VPRKIT.exists() else [sys.executable, "-m", "vprkit.cli"]
        self._n = 0
        self.serve_help = self.cli(["serve", "--help"], 60).out
        self.serve_args: list[str] = []
        self.notes: list[str] = []

    def serve_option(self, arg: str) -> None:
        """Pass ``arg`` (``--flag`` or ``--flag=value``) to every ``vprkit serve`` when its help lists the flag."""
        flag = arg.split("=", 1)[0]
        if re.search(rf"(^|\s){re.escape(flag)}\b", self.serve_help):
            self.serve_args.append(arg)
        else:
            self.notes.append(f"serve option {flag} does not exist (not in `vprkit serve --help`): not passed")

    def cli(self, args: list[str], timeout: float = CLI_S) -> CliRun:
        start = time.monotonic()
        try:
            p = subprocess.run(
                self.vprkit + args, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
            )
            return CliRun(p.returncode, p.stdout, p.stderr, time.monotonic() - start)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            return CliRun(None, out, err, time.monotonic() - start)

    def fresh(self, source: Path, name: str) -> Path:
        """A private copy of ``source`` for one case (``work/cases/NN-name/map``)."""
        self._n += 1
        dest = self.work / "cases" / f"{self._n:02d}-{name}" / "map"
        shutil.copytree(source, dest, symlinks=True)
        return dest


# ---- the served map ---------------------------------------------------------------------------------
class Server:
    """``vprkit serve`` in a subprocess on a free loopback port; stdout and stderr kept in a log file."""

    def __init__(self, env: Env, map_dir: Path, key: bool = True, extra: list[str] | None = None):
        self.env, self.map_dir = env, map_dir
        self.port = free_port(env.host)
        self.url = f"http://[{env.host}]:{self.port}" if ":" in env.host else f"http://{env.host}:{self.port}"
        self.log_path = env.work / "logs" / f"serve-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = ["serve", str(map_dir), "--host", env.host, "--port", str(self.port)]
        if key:
            args += ["--api-key-env", KEY_ENV]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            env.vprkit + args + env.serve_args + (extra or []),
            env=env.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.ready = False

    def wait_ready(self, timeout: float = SERVE_START_S) -> bool:
        """True once ``/health`` answers 200; False when the process ended first (or the bound passed)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    self.ready = True
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        return False

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc status")

    def client(self, timeout: float = REQUEST_S):
        import httpx

        return httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self, kill: bool = False) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "Server":
        if not self.wait_ready():
            tail = one_line(self.log(), 300)
            self.stop(kill=True)
            raise RuntimeError(f"vprkit serve did not start: {tail}")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def image_bytes(env: Env, index: int, folder: str = "ref") -> bytes:
    return (env.data / "corridor" / folder / f"{index:07d}.jpg").read_bytes()


def headers(env: Env) -> dict[str, str]:
    return {"X-API-Key": env.api_key}


def localize(client, data: bytes, name: str = "q.jpg", params: dict | None = None):
    return client.post("/localize", params=params or {}, files={"image": (name, data, "image/jpeg")})


def add_place(client, env: Env, data: bytes, key: str | None, fields: dict[str, str] | None = None):
    form = dict(fields or {})
    if key is not None:
        form["key"] = key
    return client.post("/places", headers=headers(env), data=form, files={"image": ("p.jpg", data, "image/jpeg")})


# ---- preparing the maps -----------------------------------------------------------------------------
@dataclass
class Maps:
    base: Path  # the served map's pristine copy: calibration.json written by a writable open
    live: Path  # the same with one place added through the service (live/append-*.h5, live-images/)
    compressed: Path  # the same, SQ8 in shards with descriptors.npy for re-scoring
    other: Path  # same preset, other Corridor images
    other_compressed: Path
    other_preset: Path  # another preset (other dimension) over the same images
    query_dir: Path  # the images of ``base`` (keys are file names there)
    query_key: str
    reference: dict  # the pristine answer to the query (top-1, cosine, confidence)


def _link_images(folder: Path, source: Path, indices: range) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in indices:
        name = f"{i:07d}.jpg"
        if not (folder / name).exists():
            os.symlink(source / name, folder / name)
        keys.append(name)
    return keys


def _build(env: Env, images: Path, out: Path, poses: Path, preset: str | None) -> Path:
    if (out / "map.json").exists():
        return out
    args = ["map", "build", str(images), "--out", str(out), "--poses", str(poses), "--quiet"]
    run = env.cli(args + (["--preset", preset] if preset else []), 600)
    if run.rc != 0:
        raise SystemExit(f"attack_service: building {out} failed: {one_line(run.err, 400)}")
    return out


def _compress(env: Env, source: Path, out: Path) -> Path:
    if not (out / "map.json").exists():
        shutil.copytree(source, out)
        args = ["map", "compress", str(out), "--index", "SQ8", "--rescore", "5", "--shard-rows", "16"]
        run = env.cli(args, 300)
        if run.rc != 0:
            raise SystemExit(f"attack_service: compressing {out} failed: {one_line(run.err, 400)}")
    return out


def prepare_maps(env: Env, given: Path | None, cache: Path) -> Maps:
    """Build (once per ``cache`` folder) the base map, another map of the same preset and one of another preset."""
    corridor = env.data / "corridor" / "ref"
    cache.mkdir(parents=True, exist_ok=True)
    poses = cache / "poses.csv"
    poses.write_text(
        "image,easting,northing\n" + "".join(f"{i:07d}.jpg,{i * SPACING_M},0\n" for i in range(2 * MAP_IMAGES))
    )
    images = cache / "images"
    _link_images(images, corridor, range(MAP_IMAGES))
    other_images = cache / "other-images"
    _link_images(other_images, corridor, range(MAP_IMAGES, 2 * MAP_IMAGES))
    if given is not None:
        info = json.loads((given / "map.json").read_text())
        preset, built = info["config"]["name"], given
        query_dir = Path(info.get("images_root") or images)
    else:
        preset, built, query_dir = None, _build(env, images, cache / "built", poses, None), images
        info = json.loads((built / "map.json").read_text())
    other = _build(env, other_images, cache / "other", poses, preset or info["config"]["name"])
    other_name = "effnet-vlad" if info["config"]["name"] == "effnet-gem" else "effnet-gem"
    other_preset = _build(env, images, cache / "other-preset", poses, other_name)
    base = cache / "pristine"
    if not (base / "calibration.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(built, base)
        with Server(env, base):  # a writable open writes calibration.json
            pass
    live = cache / "pristine-live"
    if not (live / "live").is_dir():
        shutil.rmtree(live, ignore_errors=True)
        shutil.copytree(base, live)
        with Server(env, live) as server, server.client() as c:
            r = add_place(c, env, image_bytes(env, LIVE_SEED_IMAGE), LIVE_SEED_KEY)
            if r.status_code != 201:
                raise SystemExit(f"attack_service: seeding a live place failed: {r.status_code} {r.text[:200]}")
    compressed = _compress(env, base, cache / "pristine-compressed")
    other_compressed = _compress(env, other, cache / "other-compressed")
    query_key = sorted(p.name for p in query_dir.iterdir())[QUERY_ROW]
    reference = _reference_answer(env, base, query_dir / query_key, query_key)
    return Maps(base, live, compressed, other, other_compressed, other_preset, query_dir, query_key, reference)


def _reference_answer(env: Env, map_dir: Path, image: Path, key: str) -> dict:
    run = env.cli(["localize", str(map_dir), str(image), "--json", "--top-k", "3"])
    if run.rc != 0:
        raise SystemExit(f"attack_service: the pristine map does not answer: {one_line(run.err, 400)}")
    top = strict_json(run.out)[0]
    if top["matches"][0]["image"] != key:
        raise SystemExit(f"attack_service: the pristine map's top-1 for {key} is {top['matches'][0]['image']}")
    return {"confidence": (top.get("estimate") or {}).get("confidence"), "position": top["matches"][0]["position"]}


# ---- judging an answer ------------------------------------------------------------------------------
def judge_answer(answer: dict, key: str, reference: dict | None) -> str | None:
    """None when ``answer`` (one localisation) is the correct one for a map image ``key``; else what is wrong."""
    matches = answer.get("matches") or []
    if not matches:
        return f"no matches ({answer.get('error')})"
    ids = [m.get("image") or m.get("id") for m in matches]
    if ids[0] != key:
        return f"top-1 {ids[0]} (score {matches[0].get('score')}) instead of {key}"
    if len(set(ids)) != len(ids):
        return f"a place returned twice: {ids}"
    cosine = matches[0].get("cosine")
    if cosine is None or not cosine >= COSINE_SELF:
        return f"top-1 cosine {cosine} for an exact match"
    want = None if reference is None else reference.get("confidence")
    got = (answer.get("estimate") or {}).get("confidence")
    if want is not None and (got is None or abs(got - want) > CONFIDENCE_TOLERANCE):
        return f"confidence {got} for an exact match (pristine map: {want})"
    return None


def judge_cli(run: CliRun, key: str, reference: dict) -> tuple[str, str]:
    """(verdict, observed) of ``vprkit localize --json`` on a damaged map."""
    if run.rc is None:
        return FAIL, f"localize: no answer within {CLI_S:.0f} s"
    if run.traceback:
        return FAIL, f"localize: traceback / internal error (exit {run.rc}): {one_line(run.err)}"
    if run.rc != 0:
        errors = [ln for ln in run.err.splitlines() if ln.startswith("error:")]
        if run.rc == 2 and len(errors) == 1:
            return PASS, f"localize refused (exit 2): {errors[0][:150]}"
        return FAIL, f"localize exit {run.rc} without a one-line error: {one_line(run.err)}"
    try:
        answer = strict_json(run.out)[0]
    except ValueError as exc:
        return FAIL, f"localize exit 0, invalid JSON ({exc})"
    wrong = judge_answer(answer, key, reference)
    if wrong is not None:
        return FAIL, f"localize exit 0, silent wrong answer: {wrong}"
    warned = any("warning" in ln.lower() or "rebuil" in ln.lower() for ln in run.err.splitlines())
    return PASS, "localize: correct answer" + (" (with a warning)" if warned else " (no warning)")


def judge_serve(env: Env, map_dir: Path, image: bytes, key: str, reference: dict) -> tuple[str, str]:
    """(verdict, observed) of ``vprkit serve`` started on a damaged map, then one localisation."""
    server = Server(env, map_dir)
    try:
        if not server.wait_ready():
            if server.proc.poll() is None:
                return FAIL, f"serve: not ready within {SERVE_START_S:.0f} s"
            log, rc = server.log(), server.proc.returncode
            if "Traceback (most recent call last)" in log or rc == 3:
                return FAIL, f"serve: traceback at start-up (exit {rc}): {one_line(log)}"
            if rc != 2:
                return FAIL, f"serve: ended at start-up with exit {rc}: {one_line(log, 150)}"
            return PASS, f"serve refused to start (exit 2): {one_line(log, 150)}"
        with server.client() as c:
            r = localize(c, image, key)
        if r.status_code == 503:
            return PASS, f"serve: 503 {r.text[:150]}"
        if r.status_code != 200:
            return FAIL, f"serve: /localize answered {r.status_code} {r.text[:150]}"
        wrong = judge_answer(strict_json(r.text), key, reference)
        return (FAIL, f"serve: silent wrong answer: {wrong}") if wrong else (PASS, "serve: correct answer")
    finally:
        server.stop(kill=True)


# ---- item 2: damaged or swapped map files -----------------------------------------------------------
def _replace_npy_data(path: Path, data: Callable[[int], bytes]) -> None:
    """Keep the .npy header of ``path``, replace the bytes after it (same length: a valid file, other content)."""
    raw = path.read_bytes()
    header_len = 10 + int.from_bytes(raw[8:10], "little")
    path.write_bytes(raw[:header_len] + data(len(raw) - header_len))


def _random_float16(n: int) -> bytes:
    import numpy as np

    rng = np.random.default_rng(7)
    return rng.standard_normal(n // 2).astype(np.float16).tobytes() + b"\0" * (n % 2)


def _roll_index(path: Path) -> None:
    """The index's vectors shifted by one row: a valid index whose row i holds row i-1's descriptor."""
    import faiss
    import numpy as np

    index = faiss.read_index(str(path))
    vectors = index.reconstruct_n(0, index.ntotal)
    index.reset()
    index.add(np.ascontiguousarray(np.roll(vectors, 1, axis=0)))
    faiss.write_index(index, str(path))


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc, indent=2))


def _calibration_edit(doc: dict) -> None:
    doc["impostor"] = [0.9999] * len(doc.get("impostor") or [0.0])


def _duplicate_append(map_dir: Path) -> None:
    files = sorted((map_dir / "live").glob("append-*.h5"))
    if not files:
        raise not_run("the prepared live map has no live/append-*.h5")
    last = files[-1]
    number = int(re.sub(r"\D", "", last.stem)) + 1
    shutil.copy2(last, last.with_name(f"append-{number:0{len(last.stem) - len('append-')}d}.h5"))


def _shard_path(new: str, maps: "Maps") -> Callable[[Path], None]:
    def damage(map_dir: Path) -> None:
        shards = sorted((maps.other_compressed / "index-shards").glob("*.faiss"))
        shutil.copy2(shards[0], map_dir.parent / "x")  # what ../x would read: a shard of another map
        _edit_json(map_dir / "index.json", lambda d: d["shards"][0].__setitem__("file", new))

    return damage


def _copy_from(source: Path, *names: str) -> Callable[[Path], None]:
    def damage(map_dir: Path) -> None:
        for name in names:
            shutil.copy2(source / name, map_dir / name)

    return damage


@dataclass
class Damage:
    name: str
    source: str  # "base" | "compressed" | "live"
    damage: Callable[[Path], None]
    quick: bool = True  # every damage is in the quick subset (there: `localize` only, no `serve` start-up)
    query: str = "map"  # "map": the map image at QUERY_ROW; "live": the live seed place


def damages(maps: Maps) -> list[Damage]:
    descriptors = "descriptors.npy"
    return [
        Damage(
            "descriptors.npy overwritten", "compressed", lambda d: _replace_npy_data(d / descriptors, _random_float16)
        ),
        Damage("descriptors.npy truncated", "compressed", lambda d: _truncate(d / descriptors, 0.05)),
        Damage("descriptors.npy empty", "compressed", lambda d: (d / descriptors).write_bytes(b"")),
        Damage("index.faiss overwritten (rows shifted)", "base", lambda d: _roll_index(d / "index.faiss")),
        Damage("index.faiss from another map", "base", _copy_from(maps.other, "index.faiss")),
        Damage("store.h5 from another map", "base", _copy_from(maps.other, "store.h5")),
        Damage("calibration.json edited", "base", lambda d: _edit_json(d / "calibration.json", _calibration_edit)),
        Damage("append file with duplicate keys", "live", _duplicate_append, query="live"),
        Damage("index.json shard path ../x", "compressed", _shard_path("../x", maps)),
        Damage("index.json shard path /etc/hostname", "compressed", _shard_path("/etc/hostname", maps)),
        Damage("files of another preset", "base", _copy_from(maps.other_preset, "store.h5", "index.faiss")),
    ]


def _truncate(path: Path, fraction: float) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])


def damaged_file_case(env: Env, maps: Maps, damage: Damage, with_serve: bool) -> Verdict:
    source = {"base": maps.base, "compressed": maps.compressed, "live": maps.live}[damage.source]
    if damage.query == "live":
        key, image_path, reference = LIVE_SEED_KEY, env.data / "corridor" / "ref" / f"{LIVE_SEED_IMAGE:07d}.jpg", None
    else:
        key, image_path, reference = maps.query_key, maps.query_dir / maps.query_key, maps.reference
    map_dir = env.fresh(source, re.sub(r"\W+", "-", damage.name))
    damage.damage(map_dir)
    verdicts = [
        judge_cli(env.cli(["localize", str(map_dir), str(image_path), "--json", "--top-k", "3"]), key, reference)
    ]
    if with_serve:
        fresh = env.fresh(source, re.sub(r"\W+", "-", damage.name) + "-serve")
        damage.damage(fresh)
        verdicts.append(judge_serve(env, fresh, image_path.read_bytes(), key, reference))
    observed = "; ".join(o for _, o in verdicts)
    return failed(observed) if any(v == FAIL for v, _ in verdicts) else passed(observed)


# ---- item 1: out-of-range poses ---------------------------------------------------------------------
def _answers_valid(server: Server, env: Env, maps: Maps, added: bytes, with_cli: bool, n: int = 4) -> list[str]:
    """What is wrong with localisations (``n`` map images and the ``added`` one) and, ``with_cli``, the CLI's JSON
    on the served map (empty: nothing)."""
    import httpx

    problems = []
    keys = sorted(p.name for p in maps.query_dir.iterdir())[:n]
    queries = [(key, (maps.query_dir / key).read_bytes()) for key in keys] + [("the added image", added)]
    with server.client() as c:
        for key, data in queries:
            try:
                r = localize(c, data, "q.jpg")
            except httpx.HTTPError as exc:
                problems.append(f"/localize {key}: connection dropped without an answer ({type(exc).__name__})")
                continue
            try:
                strict_json(r.text)
                if r.status_code != 200:
                    problems.append(f"/localize {key}: {r.status_code} {r.text[:80]}")
            except ValueError as exc:
                problems.append(f"/localize {key}: {r.status_code}, invalid JSON ({exc})")
    commands = [["map", "info", str(server.map_dir), "--json"]]
    commands.append(["localize", str(server.map_dir), str(maps.query_dir / keys[0]), "--json", "--top-k", "3"])
    for args in commands if with_cli else []:
        run = env.cli(args)
        if run.rc != 0:
            problems.append(f"`vprkit {' '.join(args[:2])}` exit {run.rc}: {one_line(run.err, 100)}")
            continue
        try:
            strict_json(run.out)
        except ValueError as exc:
            problems.append(f"`vprkit {' '.join(args[:2])} --json` prints invalid JSON ({exc})")
    return problems


def bad_pose_case(server: Server, env: Env, maps: Maps, key: str, fields: dict[str, str], case: PoseCase) -> Verdict:
    """POST /places with an out-of-range pose field: a 422 naming the field; anything stored must stay valid."""
    image = image_bytes(env, 10, "query")
    with server.client() as c:
        r = add_place(c, env, image, key, fields)
        if r.status_code == 422 and re.search(case.named, r.text):
            return passed(f"422 {r.json().get('detail', '')}"[:200])
        if r.status_code != 201:
            return failed(f"{r.status_code} {r.text[:150]}")
        place = r.json()
        heading = place.get("heading")
        problems = _answers_valid(server, env, maps, image, case.with_cli)
        c.delete(f"/places/{key}", headers=headers(env))
    if case.heading_ok and not problems and heading is not None and 0.0 <= heading < 360.0:
        return passed(f"201, heading stored as {heading} (in [0, 360)); answers stay valid")
    stored = {k: place.get(k) for k in ("position", "heading", "timestamp")}
    detail = "; ".join(problems) if problems else "answers stay valid"
    return failed(f"201 accepted (stored {stored}); then: {detail}"[:600])


def patch_pose_case(server: Server, env: Env, maps: Maps, with_cli: bool) -> Verdict:
    import httpx

    with server.client() as c:
        try:
            r = c.patch(f"/places/{maps.query_key}", headers=headers(env), json={"easting": 1e160, "northing": 0})
        except httpx.HTTPError as exc:
            return failed(f"connection dropped without an answer ({type(exc).__name__}: {exc})")
        if r.status_code == 422 and "easting" in r.text:
            return passed(f"422 {r.text[:150]}")
        if r.status_code != 200:
            return failed(f"{r.status_code} {r.text[:150]}")
        problems = _answers_valid(server, env, maps, (maps.query_dir / maps.query_key).read_bytes(), with_cli)
        c.patch(f"/places/{maps.query_key}", headers=headers(env), json={"easting": QUERY_ROW * SPACING_M})
    return failed(f"200 accepted; then: {'; '.join(problems) or 'answers stay valid'}"[:600])


def utm_zone_case(env: Env) -> Verdict:
    folder = env.work / "cases" / "utm99"
    images = folder / "images"
    _link_images(images, env.data / "corridor" / "ref", range(2))
    poses = folder / "poses.csv"
    poses.write_text("image,easting,northing\n0000000.jpg,500000,5000000\n0000001.jpg,500010,5000000\n")
    args = ["map", "build", str(images), "--out", str(folder / "map"), "--poses", str(poses), "--crs", "utm:99N"]
    run = env.cli(args + ["--preset", "effnet-gem", "--quiet"])
    if run.traceback or run.rc is None:
        return failed(f"exit {run.rc}: {one_line(run.err)}")
    if run.rc == 2 and re.search(r"zone|99", run.err, re.I):
        return passed(f"exit 2: {one_line(run.err)}")
    return failed(f"exit {run.rc}: zone 99 accepted ({one_line(run.err or run.out)})")


def set_pose_csv_case(env: Env, maps: Maps) -> Verdict:
    map_dir = env.fresh(maps.base, "set-pose-1e160")
    csv = map_dir.parent / "poses.csv"
    csv.write_text(f"image,easting,northing\n{maps.query_key},1e160,0\n")
    run = env.cli(["map", "set-pose", str(map_dir), "--poses", str(csv)])
    if run.rc == 2 and not run.traceback and "easting" in run.err:
        return passed(f"exit 2: {one_line(run.err)}")
    if run.rc != 0:
        return failed(f"exit {run.rc}: {one_line(run.err)}")
    info = env.cli(["map", "info", str(map_dir), "--json"])
    try:
        strict_json(info.out)
        then = f"map info exit {info.rc}"
    except ValueError as exc:
        then = f"map info exit {info.rc}, invalid JSON ({exc})"
    return failed(f"exit 0: easting 1e160 stored; {then}")


@dataclass
class PoseCase:
    label: str
    fields: dict[str, str]
    named: str  # a 422 must match this (the field's name)
    heading_ok: bool = False  # a heading stored normalised into [0, 360) is right too
    with_cli: bool = True  # after an accepted add, check `map info --json` and `localize --json` too


POSE_CASES = [
    PoseCase("easting 1e160", {"easting": "1e160", "northing": "0"}, "easting"),
    PoseCase("timestamp -1e12", {"easting": "5", "northing": "0", "timestamp": "-1e12"}, "timestamp"),
    PoseCase("timestamp 1e308", {"easting": "5", "northing": "0", "timestamp": "1e308"}, "timestamp"),
    PoseCase("heading -1e-20", {"easting": "5", "northing": "0", "heading": "-1e-20"}, "heading", heading_ok=True),
    # the served map is metric: a lat/lon is refused for that (the range itself: the CSV case below)
    PoseCase("lat 91", {"lat": "91", "lon": "0"}, "lat|geographic"),
]


def pose_csv_case(env: Env, column: str, value: str) -> Verdict:
    """``map build`` with a pose CSV holding one out-of-range value: exit 2 naming the column, before any work."""
    folder = env.work / "cases" / f"csv-{column}"
    images = folder / "images"
    _link_images(images, env.data / "corridor" / "ref", range(2))
    poses = folder / "poses.csv"
    good = {"lat": ("48.1", "11.5"), "easting": ("5", "0")}[column]
    other = "lon" if column == "lat" else "northing"
    poses.write_text(f"image,{column},{other}\n0000000.jpg,{value},{good[1]}\n0000001.jpg,{good[0]},{good[1]}\n")
    args = ["map", "build", str(images), "--out", str(folder / "map"), "--poses", str(poses)]
    run = env.cli(args + ["--preset", "effnet-gem", "--quiet"])
    if run.rc == 2 and not run.traceback and column in run.err:
        return passed(f"exit 2: {one_line(run.err)}")
    return failed(f"exit {run.rc}: {one_line(run.err or run.out)}" + (" (accepted)" if run.rc == 0 else ""))


def pose_cases(suite: Suite, env: Env, maps: Maps) -> None:
    server = Server(env, env.fresh(maps.base, "poses"))
    with server:
        for i, case in enumerate(POSE_CASES):
            case.with_cli = not suite.quick
            expected = "422 naming the field" + (" (or stored in [0, 360))" if case.heading_ok else "")
            suite.run(
                f"POST /places {case.label}",
                1,
                expected + "; answers stay strict JSON",
                lambda c=case, k=f"pose-{i}.jpg": bad_pose_case(server, env, maps, k, c.fields, c),
            )
        suite.run(
            "PATCH easting 1e160", 1, "422 naming easting", lambda: patch_pose_case(server, env, maps, not suite.quick)
        )
    suite.run(
        "UTM zone 99 (map build --crs utm:99N)", 1, "exit 2, one line naming the zone", lambda: utm_zone_case(env)
    )
    suite.run("pose CSV lat 91 (map build)", 1, "exit 2 naming lat", lambda: pose_csv_case(env, "lat", "91"))
    suite.run("set-pose CSV easting 1e160", 1, "exit 2 naming easting", lambda: set_pose_csv_case(env, maps))


# ---- item 3: idle and slow clients ------------------------------------------------------------------
def _connect(server: Server, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((server.env.host, server.port), timeout=timeout)


def _first_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    try:
        return call(), time.monotonic() - start
    except Exception as exc:  # noqa: BLE001 - reported as what the client saw
        return exc, time.monotonic() - start


def _status(r: Any) -> str:
    return str(r.status_code) if hasattr(r, "status_code") else f"{type(r).__name__}: {str(r)[:80]}"


def idle_connections_case(server: Server, maps: Maps) -> Verdict:
    import httpx

    sockets = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            sockets.append(_connect(server))
        time.sleep(0.5)
        health, t_health = _timed(lambda: httpx.get(server.url + "/health", timeout=FAST_ANSWER_S * 2))
        image = (maps.query_dir / maps.query_key).read_bytes()
        with server.client(REQUEST_S) as c:
            loc, t_loc = _timed(lambda: localize(c, image, maps.query_key))
    finally:
        for s in sockets:
            s.close()
    observed = f"/health {_status(health)} in {t_health:.1f} s, /localize {_status(loc)} in {t_loc:.1f} s"
    ok = _status(health) == "200" and _status(loc) == "200" and t_health <= FAST_ANSWER_S
    return passed(observed) if ok else failed(observed)


def trickle(server: Server, first: bytes, piece: bytes, bound: float) -> tuple[bool, float, str]:
    """Send ``first`` then ``piece`` every few seconds: (cut by the server, seconds, how)."""
    import select

    s = _connect(server)
    start = time.monotonic()
    try:
        s.sendall(first)
        while time.monotonic() - start < bound:
            readable, _, _ = select.select([s], [], [], TRICKLE_EVERY_S)
            if readable:
                data = s.recv(4096)
                how = f"answered {_first_line(data)}" if data else "closed"
                return True, time.monotonic() - start, how
            s.sendall(piece)
    except OSError as exc:
        return True, time.monotonic() - start, f"reset ({type(exc).__name__})"
    finally:
        s.close()
    return False, time.monotonic() - start, "still open"


class SlowClients:
    """Slow headers and a trickled chunked body, at the same time, with /health polled meanwhile (run once)."""

    def __init__(self, server: Server, bound: float):
        self.server, self.bound = server, bound
        self.results: dict[str, tuple[bool, float, str]] | None = None
        self.health_worst = 0.0

    def run(self) -> dict[str, tuple[bool, float, str]]:
        if self.results is not None:
            return self.results
        import httpx

        headers_only = b"GET /health HTTP/1.1\r\nHost: attack\r\n"
        chunked = (
            b"POST /localize HTTP/1.1\r\nHost: attack\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(trickle, self.server, headers_only, b"X-Slow: 1\r\n", self.bound)
            body = pool.submit(trickle, self.server, chunked, b"1\r\nA\r\n", self.bound)
            while not (slow.done() and body.done()):
                _, took = _timed(lambda: httpx.get(self.server.url + "/health", timeout=self.bound))
                self.health_worst = max(self.health_worst, took)
                time.sleep(1.0)
            self.results = {"headers": slow.result(), "body": body.result()}
        return self.results

    def verdict(self, which: str) -> Verdict:
        cut, seconds, how = self.run()[which]
        observed = f"{how} after {seconds:.0f} s (bound {self.bound:.0f} s); /health worst {self.health_worst:.1f} s"
        return passed(observed) if cut else failed(observed)


# ---- item 6: PATCH bodies ---------------------------------------------------------------------------
def raw_request(server: Server, head: bytes, body_size: int, bound: float) -> tuple[str, float]:
    """Send ``head`` then ``body_size`` junk bytes (in a thread); (status line or what happened, seconds to it)."""
    import select

    s = _connect(server, timeout=bound)
    start = time.monotonic()

    def send() -> None:
        try:
            s.sendall(head)
            chunk = b" " * (1 << 20)
            for lo in range(0, body_size, len(chunk)):
                s.sendall(chunk[: min(len(chunk), body_size - lo)])
        except OSError:
            pass  # the server closed early: its answer (if any) is read below

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        readable, _, _ = select.select([s], [], [], bound)
        if not readable:
            return "no answer", time.monotonic() - start
        data = s.recv(4096)
        line = _first_line(data) if data else "closed without an answer"
        return line, time.monotonic() - start
    except OSError as exc:
        return f"reset ({type(exc).__name__})", time.monotonic() - start
    finally:
        s.close()
        sender.join(bound)


def big_patch_case(server: Server, maps: Maps) -> Verdict:
    import httpx

    head = (
        f"PATCH /places/{maps.query_key} HTTP/1.1\r\nHost: attack\r\nContent-Type: application/json\r\n"
        f"Content-Length: {PATCH_BYTES}\r\nConnection: close\r\n\r\n"
    ).encode()
    before = server.peak_rss_mb()
    worst = [0.0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            _, took = _timed(lambda: httpx.get(server.url + "/health", timeout=30))
            worst[0] = max(worst[0], took)
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    line, seconds = raw_request(server, head, PATCH_BYTES, 30.0)
    time.sleep(0.5)
    stop.set()
    poller.join(35)
    grew = server.peak_rss_mb() - before
    observed = f"{line!r} after {seconds:.1f} s; peak RSS +{grew:.0f} MB; /health worst {worst[0]:.1f} s"
    ok = (" 401 " in f"{line} " or " 413 " in f"{line} ") and seconds <= FAST_ANSWER_S and worst[0] <= FAST_ANSWER_S
    return passed(observed) if ok and grew < 100 else failed(observed)


def junk_patch_case(server: Server, maps: Maps) -> Verdict:
    with server.client() as c:
        r = c.patch(
            f"/places/{maps.query_key}", content=b"\x00\xffnot json{", headers={"Content-Type": "application/json"}
        )
    observed = f"{r.status_code} {r.text[:120]}"
    return passed(observed) if r.status_code == 401 else failed(observed)


# ---- items 9 and 10: keys, read-only folders, form fields, /map, ?api_key=, leftovers, bytes written ------
def awkward_key_case(server: Server, env: Env, setup_key: str | None, key: str) -> Verdict:
    """Add ``setup_key`` (must succeed), then ``key``: 201 (and readable) or a 409 / 422 — never a 500."""
    with server.client() as c:
        if setup_key is not None:
            first = add_place(c, env, image_bytes(env, 20, "query"), setup_key)
            if first.status_code != 201:
                raise not_run(f"setting up {setup_key!r} answered {first.status_code} {first.text[:100]}")
        r = add_place(c, env, image_bytes(env, 21, "query"), key)
        observed = f"{r.status_code} {r.text[:150]}"
        if r.status_code in (409, 422):
            return passed(observed)
        if r.status_code == 201:
            got = c.get(f"/places/{key}")
            return passed(observed) if got.status_code == 200 else failed(f"{observed}; GET {got.status_code}")
    return failed(observed)


def unknown_field_case(server: Server, env: Env) -> Verdict:
    with server.client() as c:
        r = add_place(
            c, env, image_bytes(env, 22, "query"), "heding.jpg", {"easting": "1", "northing": "0", "heding": "90"}
        )
    observed = f"{r.status_code} {r.text[:150]}"
    return passed(observed) if r.status_code == 422 and "heding" in r.text else failed(observed)


def _mount(args: list[str]) -> str | None:
    """None when ``mount args`` worked, else why not."""
    if os.geteuid() != 0:
        return "not running as root (mount needed)"
    try:
        p = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount failed: {exc}"
    return None if p.returncode == 0 else f"mount {' '.join(args)} failed: {one_line(p.stderr)}"


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def read_only_folder_case(server: Server, env: Env, folder: str, key: str) -> Verdict:
    """Only ``folder`` of the served map read-only (a read-only bind mount: root ignores permission bits)."""
    path = server.map_dir / folder
    path.mkdir(exist_ok=True)
    why = _mount(["--bind", str(path), str(path)])
    if why is None:
        why = _mount(["-o", "remount,ro,bind", str(path)])
        if why is not None:
            _umount(path)
    if why is not None:
        raise not_run(why)
    try:
        with server.client() as c:
            r = add_place(c, env, image_bytes(env, 23, "query"), key)
            stored = c.get(f"/places/{key}").status_code
    finally:
        _umount(path)
    observed = f"{r.status_code} {r.text[:120]}; GET afterwards {stored}"
    return passed(observed) if r.status_code == 409 and stored == 404 else failed(observed)


def map_paths_case(server: Server) -> Verdict:
    with server.client() as c:
        r = c.get("/map")
    paths = re.findall(r'"(/[^"]*)"', r.text)
    observed = f"{r.status_code}; absolute paths shown: {paths[:3]}" if paths else f"{r.status_code}; no paths"
    return passed(observed) if r.status_code == 200 and not paths else failed(observed)


def query_key_case(server: Server, env: Env) -> Verdict:
    with server.client() as c:
        r = c.post(
            "/places",
            params={"api_key": env.api_key, "key": "query-key.jpg"},
            files={"image": ("p.jpg", image_bytes(env, 24, "query"), "image/jpeg")},
        )
        c.get("/health", params={"api_key": env.api_key})
    time.sleep(0.5)
    logged = env.api_key in server.log()
    observed = f"{r.status_code} {r.text[:100]}; key {'found' if logged else 'absent'} in the server's log"
    ok = r.status_code == 401 and "X-API-Key" in r.text and not logged
    return passed(observed) if ok else failed(observed)


def tmp_cleanup_case(env: Env, maps: Maps) -> Verdict:
    map_dir = env.fresh(maps.live, "tmp-leftovers")
    folder = map_dir / "live-images"
    folder.mkdir(exist_ok=True)
    leftovers = [folder / ".stale.jpg.a1b2c3d4.tmp", folder / "sub" / ".other.png.deadbeef.tmp"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half-written")
        old = time.time() - 3600
        os.utime(path, (old, old))
    with Server(env, map_dir):
        left = [p.name for p in leftovers if p.exists()]
    observed = f"left after start-up: {left}" if left else "removed at start-up"
    return failed(observed) if left else passed(observed)


def _snapshot(map_dir: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for p in map_dir.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(map_dir).as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _written(before: dict, after: dict) -> dict[str, int]:
    """Bytes written per file between two snapshots (a replaced file: all of it; one grown in place: the growth)."""
    out = {}
    for name, (ino, size, mtime) in after.items():
        old = before.get(name)
        if old is None or old[0] != ino:
            out[name] = size
        elif (old[1], old[2]) != (size, mtime):
            out[name] = size - old[1] if size > old[1] else size
    return out


def write_size_case(server: Server, env: Env, action: str) -> Verdict:
    before = _snapshot(server.map_dir)
    with server.client() as c:
        if action == "add":
            r = add_place(c, env, image_bytes(env, 30, "query"), "delta.jpg", {"easting": "3", "northing": "0"})
        else:
            r = c.delete("/places/delta.jpg", headers=headers(env))
    if r.status_code not in (200, 201):
        raise not_run(f"the {action} itself answered {r.status_code} {r.text[:100]}")
    after = _snapshot(server.map_dir)
    written = _written(before, after)
    index_total = sum(size for name, (_, size, _) in after.items() if INDEX_FILES.match(name))
    index_written = sum(n for name, n in written.items() if INDEX_FILES.match(name))
    share = index_written / max(index_total, 1)
    files = ", ".join(f"{k} {v / 1024:.0f} KB" for k, v in sorted(written.items(), key=lambda kv: -kv[1])[:4])
    observed = f"index files: {index_written / 1024:.0f} of {index_total / 1024:.0f} KB written ({share:.0%}); {files}"
    return passed(observed) if share <= MAX_INDEX_WRITE_SHARE else failed(observed)


# ---- item 5: re-ranking without saved state ---------------------------------------------------------
def rerank_case(env: Env, maps: Maps, bound: float) -> Verdict:
    server = Server(env, env.fresh(maps.base, "rerank"))
    image = (maps.query_dir / maps.query_key).read_bytes()
    try:
        with server:
            with ThreadPoolExecutor(2) as pool, server.client(bound) as c1, server.client(bound) as c2:
                rerank = pool.submit(_timed, lambda: localize(c1, image, maps.query_key, {"rerank": "performance"}))
                time.sleep(3.0)
                plain = pool.submit(_timed, lambda: localize(c2, image, maps.query_key))
                (r1, t1), (r2, t2) = rerank.result(), plain.result()
    finally:
        server.stop(kill=True)  # a server still building re-ranking state is not waited for
    text = getattr(r1, "text", "")
    detail = text[:120] + (f" … {text[-80:]}" if len(text) > 200 else text[120:200])
    observed = f"?rerank=performance: {_status(r1)} in {t1:.1f} s {detail}; plain localize meanwhile: {_status(r2)} in {t2:.1f} s"
    ok = _status(r1) == "409" and "rerank prepare" in text and t1 <= FAST_ANSWER_S
    ok = ok and _status(r2) == "200" and t2 <= FAST_ANSWER_S
    return passed(observed) if ok else failed(observed)


# ---- item 4: decoded memory of 16-bit PNGs ----------------------------------------------------------
def png16(side: int) -> bytes:
    """A side×side 16-bit greyscale PNG of one grey: under 100 KB on the wire, side²×2 bytes as stored, and far more
    once a decoder widens it (the issue's case: +730 MB per upload)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)  # bit depth 16, colour type 0 (greyscale)
    row = b"\x00" + b"\x80\x00" * side
    packer = zlib.compressobj(9)
    parts = [packer.compress(row) for _ in range(side)]
    parts.append(packer.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def memory_case(env: Env, maps: Maps, limit_mb: float) -> Verdict:
    png = png16(PNG_SIDE)
    with Server(env, env.fresh(maps.base, "png16")) as server:
        with server.client() as c:
            localize(c, (maps.query_dir / maps.query_key).read_bytes())  # warm: the model's own memory
        before = server.peak_rss_mb()

        def one(_: int):
            with server.client(180.0) as c:
                return _timed(lambda: c.post("/localize", content=png, headers={"Content-Type": "image/png"}))

        with ThreadPoolExecutor(PNG_PARALLEL) as pool:
            answers = list(pool.map(one, range(PNG_PARALLEL)))
        grew = server.peak_rss_mb() - before
    statuses = [_status(r) for r, _ in answers]
    slowest = max(t for _, t in answers)
    observed = (
        f"{PNG_PARALLEL}× {len(png) / 1024:.0f} KB 16-bit {PNG_SIDE}² PNG: {statuses}, slowest {slowest:.0f} s; "
        f"peak RSS {before:.0f} → {before + grew:.0f} MB (+{grew:.0f} MB, limit +{limit_mb:.0f})"
    )
    ok = all(s in ("200", "413", "422", "503") for s in statuses) and grew <= limit_mb
    return passed(observed) if ok else failed(observed)


# ---- item 7: writers and readers --------------------------------------------------------------------
def _clients(server: Server, env: Env, maps: Maps, writers: int, readers: int, seconds: float) -> dict[str, list]:
    """Each client's request latencies (writers add places, readers localise map images) for ``seconds``."""
    deadline = time.monotonic() + seconds
    keys = sorted(p.name for p in maps.query_dir.iterdir())

    def reader(n: int) -> list[float]:
        times = []
        with server.client(REQUEST_S) as c:
            while time.monotonic() < deadline:
                key = keys[(n * 7 + len(times)) % len(keys)]
                r, took = _timed(lambda: localize(c, (maps.query_dir / key).read_bytes(), key))
                times.append(took if _status(r) == "200" else float("inf"))
        return times

    def writer(n: int) -> list[float]:
        times = []
        with server.client(REQUEST_S) as c:
            while time.monotonic() < deadline:
                image = image_bytes(env, 40 + (n * 31 + len(times)) % 70, "query")
                r, took = _timed(lambda: add_place(c, env, image, f"mix-{n}-{len(times)}-{secrets.token_hex(3)}.jpg"))
                times.append(took if _status(r) == "201" else float("inf"))
        return times

    with ThreadPoolExecutor(writers + readers) as pool:
        futures = {f"reader {i}": pool.submit(reader, i) for i in range(readers)}
        futures.update({f"writer {i}": pool.submit(writer, i) for i in range(writers)})
        return {name: f.result() for name, f in futures.items()}


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else (values[0] if values else float("inf"))


def mix_case(env: Env, maps: Maps, seconds: float) -> Verdict:
    with Server(env, env.fresh(maps.live, "writers-readers")) as server:
        alone = _clients(server, env, maps, 0, READERS, ALONE_SECONDS)
        mixed = _clients(server, env, maps, WRITERS, READERS, seconds)
    alone_rate = sum(len(v) for v in alone.values()) / ALONE_SECONDS
    reads = [t for name, v in mixed.items() if name.startswith("reader") for t in v]
    mixed_rate = len(reads) / seconds
    failures = sum(1 for v in mixed.values() for t in v if t == float("inf"))
    per_client = ", ".join(f"{name}: {len(v)} req, p90 {_p90(v):.1f} s" for name, v in sorted(mixed.items()))
    observed = (
        f"readers alone {alone_rate:.1f} req/s; with {WRITERS} writers {mixed_rate:.1f} req/s over {seconds:.0f} s "
        f"(p90 {_p90(reads):.1f} s; {failures} failed); {per_client}"
    )
    ok = mixed_rate >= MIN_READER_SHARE * alone_rate and _p90(reads) <= MAX_READER_P90_S and failures == 0
    return passed(observed) if ok else failed(observed)


# ---- item 8: failed adds on a full disk -------------------------------------------------------------
DISK_MARGIN_BYTES = 400 * 1024  # free space beyond the map's own bytes: a few adds fit, then the disk is full
FULL_DISK_ADDS = 40


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _fill_disk(server: Server, env: Env) -> tuple[list[str], list[tuple[str, int, str]]]:
    """Add places until three fail: (added keys, [(failed key, status (0: no answer), detail)])."""
    import httpx

    added, refused = [], []
    with server.client() as c:
        for i in range(FULL_DISK_ADDS):
            key = f"full-{i}.jpg"
            try:
                r = add_place(c, env, image_bytes(env, 50 + i, "query"), key, {"easting": "1", "northing": "0"})
            except httpx.HTTPError as exc:
                refused.append((key, 0, f"connection dropped ({type(exc).__name__})"))
                if len(refused) >= 3:
                    break
                continue
            if r.status_code == 201:
                added.append(key)
            else:
                refused.append((key, r.status_code, r.text[:100]))
                if len(refused) >= 3:
                    break
    return added, refused


def disk_full_case(env: Env, maps: Maps) -> Verdict:
    mount_point = env.work / "cases" / "tmpfs"
    mount_point.mkdir(parents=True, exist_ok=True)
    size_kb = (_du(maps.base) + DISK_MARGIN_BYTES) // 1024
    why = _mount(["-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount_point)])
    if why is not None:
        raise not_run(why)
    try:
        map_dir = mount_point / "map"
        shutil.copytree(maps.base, map_dir)
        with Server(env, map_dir) as server:
            added, refused = _fill_disk(server, env)
            if not refused:
                raise not_run(f"{FULL_DISK_ADDS} adds fitted in a {size_kb} KB tmpfs")
            with server.client() as c:
                traces = [k for k, _, _ in refused if c.get(f"/places/{k}").status_code != 404]
                served = c.get("/health").json()["places"]
        traces += [k for k, _, _ in refused if (map_dir / "live-images" / k).exists()]
        info = env.cli(["map", "info", str(map_dir), "--json"])
        counted = strict_json(info.out).get("counts", {}).get("images") if info.rc == 0 else f"exit {info.rc}"
        restart = Server(env, map_dir)
        started = restart.wait_ready()
        log, rc = restart.log(), restart.proc.poll()
        restart.stop(kill=True)
    finally:
        _umount(mount_point)
    statuses = sorted({s for _, s, _ in refused})
    crashed = "Traceback (most recent call last)" in log or rc == 3
    restart_text = "started" if started else f"exit {rc}: {one_line(log, 100)}"
    observed = (
        f"{len(added)} added, then {statuses} ({refused[0][2]!r}); traces of failed adds: {sorted(set(traces))}; "
        f"served {served}, map info counts {counted}; restart on the full disk: {restart_text}"
    )
    ok = statuses == [507] and not traces and served == counted and not crashed and (started or rc == 2)
    return passed(observed) if ok else failed(observed)


# ---- the run ----------------------------------------------------------------------------------------
def service_cases(suite: Suite, env: Env, maps: Maps, slow_bound: float) -> None:
    """The cases sharing one served copy of the live map (items 3, 6, 9, 10)."""
    server = Server(env, env.fresh(maps.live, "served"))
    with server:
        suite.run(
            f"{IDLE_CONNECTIONS} idle TCP connections",
            3,
            f"/health and /localize answer 200, /health within {FAST_ANSWER_S:.0f} s",
            lambda: idle_connections_case(server, maps),
        )
        slow = SlowClients(server, slow_bound)
        background = threading.Thread(target=slow.run, daemon=True)
        background.start()  # 30 s of trickling, while the cases below run
        suite.run(
            "PATCH 50 MB body without key",
            6,
            f"401/413 within {FAST_ANSWER_S:.0f} s, /health unaffected, RSS +<100 MB",
            lambda: big_patch_case(server, maps),
        )
        suite.run("PATCH junk body without key", 6, "401", lambda: junk_patch_case(server, maps))
        suite.run("GET /map without key", 10, "no filesystem paths", lambda: map_paths_case(server))
        suite.run(
            "?api_key= in the query string",
            10,
            "401 naming X-API-Key; key absent from the log",
            lambda: query_key_case(server, env),
        )
        for label, setup, key in (
            ("key of 81 CJK characters", None, "地" * 81 + ".jpg"),
            ("key of 100 CJK characters", None, "地" * 100 + ".jpg"),
            ("key file.jpg/child.jpg under a place", "file.jpg", "file.jpg/child.jpg"),
            ("key equal to a live-images folder", "folder/a.jpg", "folder"),
        ):
            suite.run(
                label,
                9,
                "201 (readable) or 409/422, never 500",
                lambda s=setup, k=key: awkward_key_case(server, env, s, k),
            )
        suite.run("unknown form field heding=90", 9, "422 naming the field", lambda: unknown_field_case(server, env))
        for folder in ("live-images", "live"):
            suite.run(
                f"read-only {folder}/ only",
                9,
                "409, nothing stored",
                lambda f=folder: read_only_folder_case(server, env, f, f"ro-{f}.jpg"),
            )
        for action in ("add", "delete"):
            suite.run(
                f"bytes written by one {action}",
                10,
                f"≤ {MAX_INDEX_WRITE_SHARE:.0%} of the index files' bytes",
                lambda a=action: write_size_case(server, env, a),
            )
        background.join(slow_bound + 60)
        for which, label in (("headers", "slow headers (slowloris)"), ("body", "trickled chunked body")):
            suite.run(label, 3, f"connection cut within {slow_bound:.0f} s", lambda w=which: slow.verdict(w))


def run_all(suite: Suite, env: Env, maps: Maps, args: argparse.Namespace) -> None:
    pose_cases(suite, env, maps)
    for damage in damages(maps):
        suite.run(
            damage.name,
            2,
            "refused with one line, or a correct answer; serve: refuses / 503 / correct",
            lambda d=damage: damaged_file_case(env, maps, d, with_serve=not suite.quick),
            quick=damage.quick,
        )
    service_cases(suite, env, maps, args.slow_bound)
    suite.run(
        "?rerank=performance without saved state",
        5,
        f"409 naming `vprkit rerank prepare` within "
        f"{FAST_ANSWER_S:.0f} s; a plain localize meanwhile within {FAST_ANSWER_S:.0f} s",
        lambda: rerank_case(env, maps, args.rerank_bound),
    )
    suite.run(".tmp leftovers in live-images/", 10, "removed at start-up", lambda: tmp_cleanup_case(env, maps))
    suite.run(
        f"{PNG_PARALLEL} parallel 16-bit {PNG_SIDE}² PNGs",
        4,
        f"no 5xx; peak RSS +≤{args.max_rss_increase_mb:.0f} MB",
        lambda: memory_case(env, maps, args.max_rss_increase_mb),
    )
    mix_seconds = MIX_SECONDS_QUICK if suite.quick else MIX_SECONDS
    suite.run(
        f"{WRITERS} writers + {READERS} readers",
        7,
        f"readers keep ≥{MIN_READER_SHARE:.0%} of their rate, p90 ≤ {MAX_READER_P90_S:.0f} s, no failures",
        lambda: mix_case(env, maps, mix_seconds),
    )
    suite.run(
        "add on a full disk (tmpfs)",
        8,
        "507, no trace, counts right, restart starts or refuses in one line",
        lambda: disk_full_case(env, maps),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick subset (what tests/service runs)")
    parser.add_argument("--map", type=Path, default=None, help="serve a copy of this map instead of building one")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to serve on (others are refused)")
    parser.add_argument("--json-out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown-out", type=Path, default=None, help="write the table here")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="datasets folder holding corridor/")
    parser.add_argument("--cache", type=Path, default=None, help="keep the built maps here and reuse them")
    parser.add_argument("--src", type=Path, default=None, help="run the vprkit package found in this folder")
    parser.add_argument("--only", default=None, help="only cases whose name matches this regular expression")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `vprkit serve` option (if it exists)")
    parser.add_argument("--slow-bound", type=float, default=SLOW_CLIENT_BOUND_S)
    parser.add_argument("--rerank-bound", type=float, default=None, help="longest wait for the ?rerank= answer")
    parser.add_argument("--max-rss-increase-mb", type=float, default=MAX_RSS_INCREASE_MB)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = require_loopback(args.host)
    if not (args.data / "corridor" / "ref").is_dir():
        raise SystemExit(f"attack_service: no Corridor images under {args.data} (set VPRKIT_DATA or --data)")
    work = Path(tempfile.mkdtemp(prefix="vprkit-attack-"))
    started = time.monotonic()
    try:
        env = Env(work, args.data, args.src, host)
        for arg in args.serve_arg:
            env.serve_option(arg)
        maps = prepare_maps(env, args.map, args.cache or work / "maps")
        print(f"maps ready in {time.monotonic() - started:.0f} s under {work}", file=sys.stderr, flush=True)
        suite = Suite(args.quick, args.only)
        run_all(suite, env, maps, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    table = suite.table()
    header = f"attack_service ({'quick' if args.quick else 'full'}, {time.monotonic() - started:.0f} s)"
    notes = "".join(f"\nnote: {n}" for n in env.notes)
    print(f"{header}{notes}\n\n{table}")
    if args.markdown_out:
        args.markdown_out.write_text(f"{header}{notes}\n\n{table}\n")
    if args.json_out:
        document = {"quick": args.quick, "notes": env.notes, "results": [asdict(r) for r in suite.results]}
        args.json_out.write_text(json.dumps(document, indent=2, ensure_ascii=False))
    return 1 if any(r.verdict == FAIL for r in suite.results) else 0


if __name__ == "__main__":
    sys.exit(main())
