"""Shared fixtures: one local Ray cluster per test session, and small stores made
by the real extraction job with tiny timm models; and the ``slow``/``ray`` marks.

``scripts/test.sh -m "not slow"`` is the quick loop a developer runs often; CI runs
everything. Most marks are given here by what a test uses, so a new test that starts
Ray or spawns an interpreter is left out of the quick loop without anyone remembering.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

# Ray prints a token-auth notice and usage-stats prompts; neither helps in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

#: Fixtures that start or reach a Ray cluster: their tests are ``ray`` and ``slow``.
RAY_FIXTURES = frozenset({"ray_cluster", "ray_head"})
#: Fixtures that cost seconds each (a dask LocalCluster, a moto server, the whole demo,
#: every analysis on a real extraction): their tests are ``slow``.
SLOW_FIXTURES = frozenset({"demo", "dask_cluster", "s3_bucket", "explorer_store"})
#: Names whose use starts new Python processes (seconds for their imports): a spawn of
#: ``sys.executable``, a process watched with ``Popen``, a dask ``LocalCluster``.
SPAWNS = frozenset({"executable", "Popen", "LocalCluster"})
#: Names whose use in a test or its fixture runs the extraction job (a model forward over
#: images, seconds each).
EXTRACTS = frozenset({"extract", "extract_tiny"})
#: The extracting fixtures the quick loop keeps: small, built once per session, read by many.
QUICK_FIXTURES = frozenset({"tiny_store", "serve_store"})


def _names_in(function: object, module: object) -> set[str]:
    """Global and attribute names a test function's code refers to: its nested code, and
    the module-level functions of its own module it calls (so a spawning helper counts)."""
    names: set[str] = set()
    seen: set[object] = set()
    stack = [getattr(function, "__code__", None)]
    while stack:
        code = stack.pop()
        if code is None or code in seen:
            continue
        seen.add(code)
        names.update(code.co_names)
        stack.extend(k for k in code.co_consts if hasattr(k, "co_names"))
        for name in code.co_names:
            helper = getattr(module, name, None)
            if getattr(helper, "__module__", None) == getattr(module, "__name__", ""):
                stack.append(getattr(helper, "__code__", None))
    return names


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.slow)
            continue
        names = _names_in(getattr(item, "function", None), getattr(item, "module", None))
        if used & SLOW_FIXTURES or names & (SPAWNS | EXTRACTS) or _extracting_fixtures(item):
            item.add_marker(pytest.mark.slow)
    _slow_modules_first(items)


def _slow_modules_first(items: list[pytest.Item]) -> None:
    """Modules with a slow test first, each module's tests kept together and in order.

    scripts/test.sh hands modules to its two workers in this order (``--dist loadscope
    --no-loadscope-reorder``): the long ones start early and the many quick modules fill
    the end, so neither worker is left running one long module while the other idles
    (pytest-xdist's own order, by test count, started a 40 s one-test module last)."""
    modules = [item.nodeid.split("::", 1)[0] for item in items]
    first: dict[str, int] = {}
    for i, module in enumerate(modules):
        first.setdefault(module, i)
    slow = {m for m, item in zip(modules, items, strict=True) if item.get_closest_marker("slow")}
    order = sorted(range(len(items)), key=lambda i: (modules[i] not in slow, first[modules[i]], i))
    items[:] = [items[i] for i in order]


def _extracting_fixtures(item: pytest.Item) -> bool:
    """Whether one of the item's fixtures (but those of :data:`QUICK_FIXTURES`) extracts."""
    info = getattr(item, "_fixtureinfo", None)
    for name, defs in getattr(info, "name2fixturedefs", {}).items():
        if name in QUICK_FIXTURES:
            continue
        for fixturedef in defs:
            func = fixturedef.func
            if _names_in(func, sys.modules.get(func.__module__)) & EXTRACTS:
                return True
    return False


#: Seconds an actor parked on the session's cluster waits for this driver's next job
#: (``jobs.ray_pool.IDLE_SECONDS`` is 15 s): as long as a session, so the actors one module's
#: job parks serve the next module's job created alike (a new actor is a process importing
#: torch: seconds). A test that needs the cluster's CPUs free calls ``release_idle_actors()``.
SESSION_IDLE_SECONDS = 1800.0


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster shared by every test that needs one (one per pytest-xdist worker
    that runs Ray modules), started as the tool starts its own (loopback only); its parked
    actors wait :data:`SESSION_IDLE_SECONDS` for the next job."""
    import ray

    from jobs import ray_pool
    from jobs.ray_cluster import disconnect, passthrough_env, start_local_ray

    started = not ray.is_initialized()
    if started:
        # Its workers never inherit the object-store variables of the test that happens
        # to start it (a moto server's, tests.helpers.moto_s3): a job hands its actors
        # its own (jobs.ray_cluster.passthrough_env), and a test that gives them none
        # (test_ray_actors_write_with_the_jobs_storage_options) must see them get none.
        hidden = {k: os.environ.pop(k) for k in passthrough_env()}
        try:
            start_local_ray(num_cpus=2, object_store_memory=256 * 1024**2)
        finally:
            os.environ.update(hidden)
    idle, ray_pool.IDLE_SECONDS = ray_pool.IDLE_SECONDS, SESSION_IDLE_SECONDS
    try:
        yield
    finally:
        ray_pool.IDLE_SECONDS = idle
        disconnect(started)  # kills the parked actors (ray_pool.release_idle_actors)


TINY_VIT = {"name": "vit_tiny_patch16_224", "img_size": 32, "model_args": {"depth": 2}}
TINY_RESNET = {"name": "resnet18", "img_size": 32}


def extract_tiny(store: str | Path, run: str, family: str = "vit", **options: object) -> object:
    """Run the real extraction job with a tiny model; returns its summary."""
    from jobs.extract import ExtractConfig, extract
    from vitcnn_store.models import ModelSpec

    spec = dict(TINY_VIT if family == "vit" else TINY_RESNET)
    model = ModelSpec(
        spec["name"], img_size=spec["img_size"], model_args=spec.get("model_args", {})
    )  # type: ignore[arg-type]
    defaults: dict[str, object] = {
        "images": "builtin:faces",
        "limit": 40,
        "chunk_size": 16,
        "progress": False,
    }
    defaults.update(options)
    return extract(ExtractConfig(model=model, store=str(store), run=run, **defaults))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store with runs ``vit`` (preset:paper, attention, inputs) and ``resnet``
    (preset:paper, inputs) over 40 labelled built-in face images, extracted in this
    process (no Ray), once for every pytest-xdist worker (:func:`built_once`). Treat as
    read-only."""
    return str(built_once(tmp_path_factory, "tiny.zarr", _build_tiny_store))


def _build_tiny_store(store: Path) -> None:
    extract_tiny(store, "vit", "vit", layers="preset:paper", attention=True, inputs=True)
    extract_tiny(store, "resnet", "resnet", layers="preset:paper", inputs=True)


#: Seconds a worker waits for another one's build of a shared fixture (:func:`built_once`).
SHARED_BUILD_TIMEOUT = 600.0


def built_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]
) -> Path:
    """``build(path)`` once per test run, by whichever pytest-xdist worker asks first; the
    others wait for it and get the same ``path``. Only for fixtures no test writes to
    (a test would change another worker's data), and that take seconds to build."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's temp folder, above each worker's own
    path, done = root / name, root / f"{name}.done"
    deadline = time.monotonic() + SHARED_BUILD_TIMEOUT
    with open(root / f"{name}.lock", "w") as lock:  # the lock goes with the file's closing
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another worker is still building {path}") from None
                time.sleep(0.2)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # what a failed build left
            build(path)
            done.touch()
    return path


BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_cluster(proc: subprocess.Popen[bytes], temp_dir: str) -> None:
    """Stop only this cluster: its process group, then anything still using its temp dir."""
    # SIGKILL at once: `ray start --block` outlives a SIGTERM by more than 30 s, and a
    # test's head is thrown away (a grace period of 5 s always ran out, at every session's
    # end); the temp-dir sweep below finds what left the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in (p.info["cmdline"] or [])):
            p.kill()


@pytest.fixture(scope="session")
def ray_head() -> Iterator[str]:
    """A Ray head with the job server on loopback (``ray start --head``), shared by the
    submit and the served-extraction tests; yields its http address."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths are long
    dashboard = free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    argv = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--include-dashboard=true",
        "--num-cpus=1",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--disable-usage-stats",
    ]
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # the server answers (token auth says 401): it is up
            except Exception as e:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((Path(temp_dir) / "head.log").read_text()[-2000:]) from e
                time.sleep(0.2)
        yield address
    finally:
        stop_cluster(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
