"""Joining Ray for a distributed build: a local instance on loopback only, or a running cluster, and its resources.

Ray is an optional extra (``pip install vprkit[scale]``): it is imported only when a build asks for it.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from ..errors import ConfigError

INSTALL_HINT = "pip install vprkit[scale]"
LOCAL = "local"  # the CLI's word for "start a local Ray instance" (address None)
# Reading images is light next to the backbone, but it needs a CPU of its own: a pool of replicas
# taking every CPU would leave Ray Data no slot to decode in, and the build would wait forever.
CPUS_LEFT_FOR_READING = 1
# Ray's token authentication settings (its environment variables), named in the error of a failed join
AUTH_MODE_ENV, AUTH_TOKEN_ENV, AUTH_TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
# Ray's cluster-mode switch (in ray_constants; environment variable RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER): off, a
# node's address stays loopback. See start_local_ray.
RAY_CLUSTER_MODE_FLAG = "ENABLE_RAY_CLUSTER"


def ray_module():
    """The ``ray`` module with Ray Data, or one error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the [data] extra of ray
    except ImportError:
        raise ConfigError(f"distributed map building needs Ray Data: {INSTALL_HINT}") from None
    return ray


def start_local_ray(num_cpus: int | None = None) -> None:
    """``ray.init`` of a local instance that listens on loopback only (its GCS, raylet, workers and this driver).

    A local instance serves this machine alone, yet Ray replaces a loopback node address with the machine's
    external one and its servers then listen on every interface. Its single-machine mode (the default on macOS
    and Windows; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) keeps the node address 127.0.0.1. Ray reads that
    mode once, when it is imported, so it is switched on here for the start alone: the node keeps the address
    it started with. A Ray without the switch starts as it would otherwise.
    """
    ray = ray_module()
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    cluster_mode = getattr(constants, RAY_CLUSTER_MODE_FLAG, None)
    if cluster_mode is not None:
        setattr(constants, RAY_CLUSTER_MODE_FLAG, False)
    try:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    finally:
        if cluster_mode is not None:
            setattr(constants, RAY_CLUSTER_MODE_FLAG, cluster_mode)


class RaySession:
    """``ray.init`` for a local instance (address None) or a cluster, undone on exit if this started it."""

    def __init__(self, address: str | None, log: Callable[[str], None]):
        self.address = None if address in (None, "", LOCAL) else address
        self.log = log
        self.started = False

    def __enter__(self):
        ray = ray_module()
        if ray.is_initialized():  # a caller (or a test) already connected: use that instance as it is
            return ray
        if self.address is None:
            start_local_ray(os.cpu_count())
            self.log(f"started a local Ray instance ({os.cpu_count()} CPUs)")
        else:
            try:
                ray.init(address=self.address, logging_level=logging.WARNING)
            except ConnectionError as exc:  # Ray's own message names neither cause: say both
                raise ConfigError(
                    f"cannot join the Ray cluster at {self.address}: {exc}. Is its head running and reachable from "
                    f"here? A cluster with token authentication (Ray turns it on for `ray start` when it finds a "
                    f"token) also needs {AUTH_MODE_ENV}=token and the cluster's token in {AUTH_TOKEN_ENV} or "
                    f"{AUTH_TOKEN_PATH_ENV} in this process's environment"
                ) from None
            self.log(f"connected to the Ray cluster at {self.address}")
        self.started = True
        return ray

    def __exit__(self, *exc) -> None:
        if self.started:
            ray_module().shutdown()


def check_resources(
    ray, replicas: int, cpus_per_replica: float, gpus_per_replica: float, fixed: bool, log: Callable[[str], None]
) -> None:
    """Refuse a pool that would leave no CPU for reading images (Ray Data would wait for one forever).

    ``fixed``: the instance cannot grow (a local one). A cluster may autoscale, so there a pool
    larger than what it has now is only reported.
    """
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    problems = []
    if replicas * cpus_per_replica > cpus - CPUS_LEFT_FOR_READING:
        most = int((cpus - CPUS_LEFT_FOR_READING) // cpus_per_replica) if cpus_per_replica else 0
        problems.append(
            f"{replicas} replica(s) × {cpus_per_replica:g} CPU leave no CPU for reading images on a "
            f"Ray cluster of {cpus:g} CPUs; use --replicas {max(1, most)} or fewer"
        )
    if replicas * gpus_per_replica > gpus:
        problems.append(f"{replicas} replica(s) × {gpus_per_replica:g} GPU need more than the cluster's {gpus:g} GPUs")
    if problems and fixed:
        raise ConfigError("; ".join(problems))
    for problem in problems:
        log(f"{problem} (waiting for the cluster to grow)")
