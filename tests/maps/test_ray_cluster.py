"""The Ray map build on a Ray cluster joined by address: a real local head started by ``ray start``.

The in-process tests (test_ray_build.py) start Ray with ``ray.init``; this one runs the path a
cluster takes — a separate head (GCS, raylet, workers spawned by it from the venv) and a driver
that joins it by address, ``vprkit map build --ray 127.0.0.1:<port>`` — and checks the map equals
the single-process one. The driver is a process of its own, as a user's is: Ray keeps per-process
state (its authentication mode among it) once this test process has run a local instance.

Only the processes of the head started here are stopped: they are found by the session the test
gave ``ray start --block`` (never ``ray stop``, which stops every Ray process on the machine, other
people's included).

Authentication: Ray 2.60 (the version installed here) turns token authentication on for ``ray start`` whenever a token is
found (``~/.ray/auth_token``, which any earlier local Ray may have written), and a driver joining
by address then needs ``RAY_AUTH_MODE=token`` and the token. The head here is started with
``RAY_AUTH_MODE=disabled`` so the test neither depends on nor reads a token that is not its own;
it exercises the join by address, not Ray's authentication.

Loopback only: ``--node-ip-address=127.0.0.1`` alone does not keep Ray on loopback — ``ray start``
replaces a loopback node address with the machine's external one (``resolve_ip_for_localhost``), and
the GCS, the raylet, every worker and the driver then listen on all interfaces, the client server
and the runtime-env agent on the external address. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is Ray's
single-machine mode (its default on macOS and Windows): the node address stays 127.0.0.1 and so does
every listener. It is set for the head and for the driver (both read it), and the test reads the
listening sockets of both while the build runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import pytest

from vprkit import pipeline
from vprkit.maps import MAP_FILE, MapStore, read_json
from vprkit.presets import resolve

from helpers import Listener, assert_loopback_only, listening_sockets

IMAGES = 8
SMALL_SIZE = (120, 160)  # (height, width): a small image size keeps the two builds short
POSES = np.stack([np.arange(IMAGES, dtype=np.float64), np.ones(IMAGES)], 1)
# Logical CPUs of the head: one for the replica, one left for Ray Data's image readers (with one, a
# one-CPU replica leaves the readers no slot: on a cluster, which may grow, the build logs it and waits).
HEAD_CPUS = 2
HEAD_START_TIMEOUT_S = 60
STOP_GRACE_S = 5
CLI_TIMEOUT_S = 300  # a hung build fails the test instead of the CI job
RAY_BIN = Path(sys.executable).with_name("ray")
VPRKIT_BIN = Path(sys.executable).with_name("vprkit")
# ``ray start`` opens these besides the GCS port; each gets a free port so the head cannot collide
# with another Ray instance on the machine (a local one of another test run, say).
EXTRA_PORTS = (
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)
STARTED = "Ray runtime started"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": node address and listeners on loopback
LISTEN_POLL_S = 0.5  # how often the listening sockets of the head and the driver are read during the build


class Head(NamedTuple):
    """The head started by :func:`ray_head`: its GCS address and the session its processes run in."""

    address: str
    session: int


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_processes(leader: int) -> list[psutil.Process]:
    """Every live process of the session ``leader`` heads: the head's ``ray start`` and what it spawned."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == leader:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _stop_session(leader: int) -> None:
    """SIGTERM to the head's processes (only those), SIGKILL to what is still alive after the grace period."""
    procs = _session_processes(leader)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=STOP_GRACE_S)


@pytest.fixture
def ray_head(monkeypatch):
    """A Ray head on 127.0.0.1 started by ``ray start --head --block``; yields its address, stops it after."""
    monkeypatch.setenv(AUTH_MODE_ENV, "disabled")  # the head's and the CLI driver's: see the module docstring
    monkeypatch.setenv(SINGLE_MACHINE_ENV, "0")  # loopback only, head and driver: see the module docstring

    if not RAY_BIN.exists():
        pytest.fail(f"{RAY_BIN} is missing: install Ray Data into the venv (pip install vprkit[scale])")
    port, *extra = _free_ports(1 + len(EXTRA_PORTS))
    temp = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))  # short: Ray's socket paths must stay under 108 bytes
    log_path = temp / "ray-start.log"
    cmd = [
        str(RAY_BIN),
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={HEAD_CPUS}",
        "--include-dashboard=false",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
        "--block",
        *(f"--{name}={p}" for name, p in zip(EXTRA_PORTS, extra)),
    ]
    with open(log_path, "wb") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while STARTED not in log_path.read_text(errors="replace"):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"the Ray head did not start (exit {head.poll()}):\n{log_path.read_text(errors='replace')[-3000:]}"
                )
            time.sleep(0.5)
        yield Head(f"127.0.0.1:{port}", head.pid)
    finally:
        _stop_session(head.pid)
        head.wait(timeout=STOP_GRACE_S)
        left = _session_processes(head.pid)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the Ray head outlived the test: {left}"


def _run_watching_listeners(
    cmd: list[str], head: Head, timeout: float
) -> tuple[subprocess.CompletedProcess, set[Listener]]:
    """Run ``cmd`` to its end, reading the listening sockets of the head's processes and of the command's own
    process tree as it runs (Ray starts workers, each with servers of its own, while the build goes on)."""
    seen: dict[tuple[int, str, int], Listener] = {}  # a worker's name changes with its task: one entry per socket
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                assert time.monotonic() < deadline, f"{cmd[:3]} did not finish in {timeout} s"
                for s in listening_sockets(*_session_processes(head.session), proc.pid):
                    seen.setdefault((s.pid, s.ip, s.port), s)
                time.sleep(LISTEN_POLL_S)
        finally:
            proc.kill()
            proc.wait()
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(), err.read().decode())
    return done, set(seen.values())


def test_the_cli_builds_on_a_ray_cluster_by_address_as_the_single_process_build(ray_head, shared_datasets, tmp_path):
    """``vprkit map build --ray 127.0.0.1:PORT`` in a process of its own (a fresh driver, as a user runs it); the
    head, its workers and the driver listen on loopback only while it runs."""
    root = shared_datasets / "corridor" / "ref"
    keys = sorted(p.name for p in root.glob("*.jpg"))[:IMAGES]
    images = tmp_path / "images"
    images.mkdir()
    for key in keys:  # links, not copies, of the shared images
        (images / key).symlink_to(root / key)
    poses = tmp_path / "poses.csv"
    poses.write_text("image,easting,northing\n" + "".join(f"{k},{e},{n}\n" for k, (e, n) in zip(keys, POSES)))
    single, cluster = tmp_path / "single" / "map", tmp_path / "cluster" / "map"  # one name: the vocabulary records it
    pipeline.build_map(images, single, resolve(None, image_size=SMALL_SIZE), poses=poses, progress=False)
    done, listeners = _run_watching_listeners(
        [
            str(VPRKIT_BIN),
            "map",
            "build",
            str(images),
            "--out",
            str(cluster),
            "--poses",
            str(poses),
            "--image-size",
            f"{SMALL_SIZE[1]}x{SMALL_SIZE[0]}",
            "--ray",
            ray_head.address,
            "--replicas",
            "1",
            "--quiet",
        ],
        ray_head,
        CLI_TIMEOUT_S,
    )
    assert done.returncode == 0 and f"{IMAGES} images ({IMAGES} new" in done.stdout, done.stdout + done.stderr[-3000:]
    assert_loopback_only(listeners)
    gcs_port = int(ray_head.address.rsplit(":", 1)[1])
    assert gcs_port in {s.port for s in listeners}, listeners  # the watch saw the head's servers

    distributed = read_json(cluster / MAP_FILE)["last_build"]["distributed"]
    assert distributed == {
        **distributed,
        "engine": "ray",
        "address": ray_head.address,
        "images": IMAGES,
        "resumed_from_shards": 0,
    }
    sa, sb = MapStore(single), MapStore(cluster)
    assert sb.keys() == sa.keys() == keys
    np.testing.assert_allclose(sb.read_global(), sa.read_global(), atol=1e-5)
    np.testing.assert_array_equal(sb.read_poses(), sa.read_poses())
    assert read_json(cluster / MAP_FILE)["vocabulary"] == read_json(single / MAP_FILE)["vocabulary"]
    found = pipeline.localize(cluster, [images / keys[3]], top_k=1)[0].matches[0]  # the map serves as built
    assert found.key == keys[3] and found.score == pytest.approx(1.0, abs=1e-4)


def test_a_cluster_that_cannot_be_joined_is_one_error_naming_the_address_and_authentication(monkeypatch, tmp_path):
    """Ray's join error says only "failed to connect" (after retrying for a while, so it is simulated here)."""
    import ray

    from vprkit.errors import ConfigError
    from vprkit.pipeline.distributed import build_map_ray

    def refuse(*args, **kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:1")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"")  # never read: the join fails first
    with pytest.raises(
        ConfigError,
        match=r"cannot join the Ray cluster at 127\.0\.0\.1:1: Failed to connect.*"
        r"RAY_AUTH_MODE=token.*RAY_AUTH_TOKEN",
    ):
        build_map_ray(images, tmp_path / "map", address="127.0.0.1:1", progress=False)
    assert not (tmp_path / "map").exists()
