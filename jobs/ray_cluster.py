"""Ray for the jobs: start a loopback-only local cluster, or reach a given one in bounded time.

The Ray the tool starts for itself exposes nothing to the network. Ray
resolves ``127.0.0.1`` to the machine's address unless told it runs a
single-machine cluster (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by
``ray._private.services.get_node_ip_address``); with it, the GCS, the raylet,
the agents and every worker bind to loopback, because Ray's gRPC servers listen
on loopback exactly when the node address is ``127.0.0.1``. Token auth (on by
default in Ray 2.60) stays on. The test suite starts its cluster with
:func:`start_local_ray` too.

A given address (``--address`` or ``RAY_ADDRESS``) is probed with a plain TCP
connection first: ``ray.init`` itself retries an unreachable address for
minutes.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from vitcnn_store.errors import ClusterError, UsageError, VitcnnError

__all__ = [
    "CONNECT_TIMEOUT",
    "LOOPBACK_ENV",
    "check_resources",
    "connect",
    "disconnect",
    "on_disconnect",
    "passthrough_env",
    "probe_address",
    "start_local_ray",
    "unwrap",
]

#: Seconds to wait for a given Ray address to accept a connection.
CONNECT_TIMEOUT = 15.0
#: Environment that makes Ray treat this machine as a one-node cluster on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
_saved_env: dict[str, str | None] | None = None
#: Called before :func:`disconnect` shuts Ray down (the extraction actors parked for
#: the next job are killed there: :mod:`jobs.ray_pool`).
_before_disconnect: list[Callable[[], object]] = []


def _debug() -> bool:
    # Workers' own logs reach the terminal only with --debug: errors arrive as exceptions.
    return bool(os.environ.get("VITCNN_DEBUG"))


def _loopback_only() -> None:
    """Bind every Ray component started from now on to loopback (undone by :func:`disconnect`)."""
    global _saved_env
    if _saved_env is None:
        _saved_env = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    os.environ.update(LOOPBACK_ENV)
    # Read once when ray is imported: set it too in case ray was imported already.
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _restore_env() -> None:
    global _saved_env
    if _saved_env is None:
        return
    for k, v in _saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = os.environ.get(
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1"
    ).lower() not in ("0", "false")
    _saved_env = None


def start_local_ray(
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    **options: Any,
) -> None:
    """Start a Ray cluster on this machine that listens on loopback only.

    Examples
    --------
    >>> start_local_ray(num_cpus=2)  # doctest: +SKIP
    >>> disconnect(started=True)  # doctest: +SKIP
    """
    import ray

    _loopback_only()
    kwargs: dict[str, Any] = {
        # A new cluster even when a `ray start` on this machine left its address in
        # /tmp/ray/ray_current_cluster: without "local", ray.init() would join that one.
        "address": "local",
        "include_dashboard": False,
        "_node_ip_address": "127.0.0.1",
        "logging_level": logging.WARNING,
        "log_to_driver": _debug(),
        **options,
    }
    for key, value in (
        ("num_cpus", num_cpus),
        ("num_gpus", num_gpus),
        ("object_store_memory", object_store_memory),
    ):
        if value is not None:
            kwargs[key] = value
    # Ray announces that it turned token auth on (we keep it on); errors stay one line.
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    if not _debug():
        notice.setLevel(logging.ERROR)
    try:
        ray.init(**kwargs)
    finally:
        notice.setLevel(level)


def _host_port(address: str) -> tuple[str, int] | None:
    """Host and port to probe for a Ray address (``None``: nothing to probe)."""
    if address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    default = {"ray": 10001, "http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port or default
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise UsageError(f"--address {address!r}: expected HOST:PORT (or ray://HOST:PORT)")
    return parts.hostname, port


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def probe_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Wait at most ``timeout`` seconds for ``address`` to accept a TCP connection."""
    target = _host_port(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout
    reason = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection(target, timeout=max(0.1, min(5.0, left))):
                return
        except socket.gaierror as e:
            reason = f"unknown host: {e.strerror}"
            break
        except OSError as e:
            reason = e.strerror or type(e).__name__
        if deadline - time.monotonic() <= 0:
            break
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    raise ClusterError(
        f"cannot reach the Ray cluster at {address} ({reason}, waited {timeout:.0f} s): "
        "check --address or RAY_ADDRESS, or leave both unset for a local Ray"
    )


def connect(address: str | None) -> bool:
    """Connect to Ray: ``address``, else ``RAY_ADDRESS``, else a new local cluster.

    Returns True when this call started or connected Ray (so the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        if address:  # already connected in-process: still refuse an unreachable address
            probe_address(address)
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
        start_local_ray()
        return True
    probe_address(address)
    target = _host_port(address)
    if target is not None and _is_loopback(target[0]):
        _loopback_only()  # our node registered as 127.0.0.1: the driver must agree
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=_debug())
    except (ConnectionError, RuntimeError, ValueError) as e:
        _restore_env()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"cannot connect to Ray at {address}: {first}") from e
    return True


def on_disconnect(callback: Callable[[], object]) -> None:
    """Have :func:`disconnect` call ``callback`` before it shuts Ray down."""
    if callback not in _before_disconnect:
        _before_disconnect.append(callback)


def disconnect(started: bool) -> None:
    """Shut down what :func:`connect` or :func:`start_local_ray` started."""
    if not started:
        return
    import ray

    for callback in _before_disconnect:
        callback()

    ray.shutdown()
    _restore_env()


def check_resources(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Refuse a pool the connected cluster cannot hold (bad input: exit 2)."""
    import ray

    total = ray.cluster_resources()
    need_cpu = workers * cpus_per_worker
    need_gpu = workers * gpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise UsageError(
            f"{workers} worker(s) × {cpus_per_worker:g} CPU need {need_cpu:g} CPUs; "
            f"the Ray cluster has {total.get('CPU', 0):g}: lower --workers or --cpus-per-worker"
        )
    if need_gpu > total.get("GPU", 0):
        raise UsageError(
            f"{workers} worker(s) × {gpus_per_worker:g} GPU need {need_gpu:g} GPUs; "
            f"the Ray cluster has {total.get('GPU', 0):g}: lower --gpus-per-worker or add GPUs"
        )


def passthrough_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Credentials and endpoints for object stores, forwarded to the actors."""
    prefixes = ("AWS_", "FSSPEC_", "GOOGLE_", "GCSFS_", "AZURE_", "S3_")
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if k.startswith(prefixes)}


def unwrap(error: BaseException, url: str = "the store") -> BaseException:
    """The user-facing cause inside a Ray task or actor error, when there is one."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None)
        if isinstance(inner, BaseException) and inner is not cause:
            # A Ray task error (which may also subclass the cause): its text is a
            # remote traceback; what it wraps is the error to report.
            cause = inner
            continue
        if isinstance(cause, VitcnnError):
            return cause
        if isinstance(cause, OSError):
            from vitcnn_store.store.layout import environment_error

            mapped = environment_error(url, cause)
            if mapped is not None:
                return mapped
        cause = cause.__cause__ or cause.__context__
    return error
