"""A local multi-node Ray cluster in one foreground process; Ctrl-C stops all of it.

A head (job server on 127.0.0.1) plus N worker "nodes" on this machine, made with
Ray's ``ray.cluster_utils.Cluster``: each node its own raylet and object store,
sharing this machine's file system. Nothing outlives this process and it never
touches another Ray cluster (no ``ray stop``, which would kill every Ray process of
the user), so it suits any machine and scripts that want a cluster for a while::

    python cluster/local_cluster.py --nodes 2
    # in another shell, with the exports it prints:
    vitcnn submit extract ... --address http://127.0.0.1:8265 --wait

Ray keeps its session, logs and address file under ``--temp-dir`` (default: a
fresh short folder in /tmp, removed on exit), so ``ray.init()`` elsewhere on the
machine does not find this cluster by accident. Token auth is on
(``RAY_AUTH_MODE=token``, token in ``~/.ray/auth_token``, made if missing), unless
``RAY_AUTH_MODE=disabled`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="local_cluster.py",
        description=__doc__.splitlines()[0],
        epilog="Stop it with Ctrl-C (or SIGTERM): every node and job goes with it.",
    )
    p.add_argument("--nodes", type=int, default=2, metavar="N", help="worker nodes (default 2)")
    p.add_argument("--head-cpus", type=float, default=1, help="CPUs of the head (default 1)")
    p.add_argument(
        "--head-gpus", type=float, help="GPUs of the head (default: detected); worker nodes get 0"
    )
    p.add_argument("--worker-cpus", type=float, default=1, help="CPUs per worker node")
    p.add_argument("--port", type=int, default=6379, help="GCS port (default 6379; 0: any)")
    p.add_argument(
        "--dashboard-port", type=int, default=8265, help="job server port (default 8265; 0: any)"
    )
    p.add_argument("--object-store-mb", type=int, default=512, help="object store per node, MiB")
    p.add_argument("--temp-dir", help="Ray's folder (default: a new one in /tmp, removed on exit)")
    p.add_argument("--ready-file", help="write the addresses here as JSON once all nodes are up")
    return p


def _ensure_token(mode: str) -> None:
    """Token mode needs a token; make the default one (~/.ray/auth_token) if there is none."""
    has_env = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if mode != "token" or has_env or (Path.home() / ".ray" / "auth_token").is_file():
        return
    ray_cli = Path(sys.executable).with_name("ray")
    subprocess.run(
        [str(ray_cli) if ray_cli.exists() else "ray", "get-auth-token", "--generate"],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nodes < 0:
        print("local_cluster.py: --nodes must be >= 0", file=sys.stderr)
        return 2
    own_dir = args.temp_dir is None
    temp_dir = args.temp_dir or tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short socket paths
    # Before Ray loads: its address file goes to $RAY_TMPDIR/ray, away from /tmp/ray.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    bin_dir = str(Path(sys.executable).parent)  # job entrypoints find this python and vitcnn
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    _ensure_token(os.environ["RAY_AUTH_MODE"])

    from ray.cluster_utils import Cluster

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray_dir = str(Path(temp_dir) / "ray")
    store = args.object_store_mb * 1024**2
    dashboard_port = args.dashboard_port or _free_port()
    cluster: Any = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": args.head_cpus,
                # None: Ray detects this machine's GPUs, counted once (on the head).
                "num_gpus": args.head_gpus,
                "object_store_memory": store,
                "gcs_server_port": args.port or _free_port(),
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard_port,
                "dashboard_agent_listen_port": _free_port(),
                "temp_dir": ray_dir,
            },
        )
        for _ in range(args.nodes):
            cluster.add_node(
                num_cpus=args.worker_cpus, num_gpus=0, object_store_memory=store, temp_dir=ray_dir
            )
        cluster.wait_for_nodes()
        info = {
            "gcs_address": cluster.address,
            "dashboard_url": f"http://127.0.0.1:{dashboard_port}",
            "nodes": args.nodes + 1,
            "temp_dir": temp_dir,
            "pid": os.getpid(),
        }
        print(
            f"Ray cluster up: {args.nodes + 1} node(s), GCS {cluster.address}, "
            f"logs in {ray_dir}/session_latest/logs\n\n"
            f"export RAY_ADDRESS={info['dashboard_url']}\n"
            f"export RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}\n\n"
            f"Submit: vitcnn submit extract ... --address {info['dashboard_url']} --wait\n"
            "Watch: ray list nodes | ray job list | ray job logs -f ID\n"
            "Stop: Ctrl-C",
            flush=True,
        )
        if args.ready_file:
            Path(args.ready_file).write_text(json.dumps(info))
        while not stop.wait(1.0):
            pass
        print("stopping the cluster", flush=True)
        return 0
    finally:
        if cluster is not None:
            cluster.shutdown()
        if own_dir:
            time.sleep(0.5)  # let the last processes release their files
            shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
