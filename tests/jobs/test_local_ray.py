"""The Ray the tool starts for itself listens on loopback only.

Lists the listening sockets of every process the tool started (psutil) — the
GCS, the raylet, the dashboard and runtime-env agents, every worker and the
driver — for the test session's cluster (started the way the tool starts its
own) and for a real ``vitcnn extract`` that starts its own Ray.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import ray

from jobs.ray_cluster import LOOPBACK_ENV
from jobs.ray_pool import release_idle_actors


def listening(root: psutil.Process) -> dict[str, set[str]]:
    """``{process: {ip:port}}`` of listening TCP sockets of ``root`` and its descendants."""
    out: dict[str, set[str]] = {}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            cmd = p.cmdline()
            name = f"{p.pid} {os.path.basename(cmd[0]) if cmd else ''} {p.name()}"
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                out.setdefault(name, set()).add(f"{c.laddr.ip}:{c.laddr.port}")
    return out


def exposed(sockets: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, addrs in sockets.items():
        for addr in addrs:
            ip = ipaddress.ip_address(addr.rsplit(":", 1)[0])
            mapped = getattr(ip, "ipv4_mapped", None)
            if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
                bad.append(f"{name} listens on {addr}")
    return bad


@pytest.mark.usefixtures("ray_cluster")
def test_session_cluster_listens_on_loopback_only() -> None:
    @ray.remote
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    release_idle_actors()  # an earlier module's parked actors may hold both CPUs
    probe = Probe.remote()  # type: ignore[attr-defined]
    worker = ray.get(probe.pid.remote())
    sockets = listening(psutil.Process())
    names = " ".join(sockets)
    assert "raylet" in names and "gcs_server" in names, sockets
    assert f"{worker} " in names  # the worker listens too (its core worker's gRPC port)
    assert not exposed(sockets), exposed(sockets)
    ray.kill(probe)


def test_extract_starts_a_loopback_only_ray(tmp_path: Path) -> None:
    """...and a new one, even where a `ray start` left the address of a cluster (gone
    here) in <RAY_TMPDIR>/ray/ray_current_cluster, which a bare ray.init() would join."""
    env = {k: v for k, v in os.environ.items() if k not in LOOPBACK_ENV and k != "RAY_ADDRESS"}
    ray_tmp = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))  # short: Ray's socket paths
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")
    env["RAY_TMPDIR"] = str(ray_tmp)
    argv = [
        sys.executable,
        "-m",
        "vitcnn_store.cli",
        "extract",
        "vit_tiny_patch16_224",
        "--img-size",
        "32",
        "--model-arg",
        "depth=1",
        "--images",
        "builtin:faces",
        "--limit",
        "48",
        "--chunk-size",
        "4",
        "--workers",
        "1",  # one actor shows what an actor listens on; a second costs seconds
        "--store",
        str(tmp_path / "s.zarr"),
        "--run",
        "r",
        "--no-progress",
    ]
    job = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: dict[str, set[str]] = {}
    try:
        root = psutil.Process(job.pid)
        deadline = time.monotonic() + 300
        while job.poll() is None and time.monotonic() < deadline:
            for name, addrs in listening(root).items():
                seen.setdefault(name, set()).update(addrs)
            time.sleep(0.2)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert job.returncode == 0, err.decode()[-2000:]
    names = " ".join(seen)
    assert "raylet" in names and "gcs_server" in names and "ExtractionActor" in names, seen
    assert not exposed(seen), exposed(seen)
