"""A local dask cluster for ``vitcnn analyze ... --dask-address``; Ctrl-C stops it.

Worker processes (not threads: the kernels hold the GIL in places) with a memory
limit each, so a large CKA job spills or pauses instead of exhausting the machine.
The scheduler listens on 127.0.0.1 only::

    python cluster/dask/local_cluster.py --workers 2 --memory-limit 4GiB
    # prints tcp://127.0.0.1:8786; in another shell:
    vitcnn analyze cka acts.zarr vitb16 --dask-address tcp://127.0.0.1:8786

The client (``vitcnn analyze``) and the workers must run the same versions of
dask, distributed and vitcnn_store; here they share this Python environment.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="local_cluster.py",
        description=__doc__.splitlines()[0],
        epilog="Stop it with Ctrl-C (or SIGTERM).",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--threads", type=int, default=1, help="threads per worker (default 1)")
    p.add_argument(
        "--memory-limit",
        default="2GiB",
        help="per worker, e.g. 4GiB; 'auto' shares the machine's memory (default 2GiB)",
    )
    p.add_argument("--port", type=int, default=8786, help="scheduler port (default 8786; 0: any)")
    p.add_argument(
        "--dashboard-port",
        type=int,
        default=-1,
        help="serve the dashboard (needs bokeh) on this port; -1: none (default)",
    )
    p.add_argument("--address-file", help="write the scheduler address here once it is up")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        print("local_cluster.py: --workers and --threads must be >= 1", file=sys.stderr)
        return 2

    from distributed import LocalCluster

    stop = threading.Event()
    # Worker processes inherit an ignored SIGINT: Ctrl-C reaches the whole process
    # group, and only this process should act on it (closing the workers in order).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    dashboard = None if args.dashboard_port < 0 else f"127.0.0.1:{args.dashboard_port}"
    with LocalCluster(
        n_workers=args.workers,
        threads_per_worker=args.threads,
        processes=True,
        memory_limit=args.memory_limit,
        host="127.0.0.1",
        scheduler_port=args.port,
        dashboard_address=dashboard,
    ) as cluster:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        address = cluster.scheduler_address
        print(
            f"dask cluster up: {args.workers} worker(s) x {args.threads} thread(s), "
            f"memory limit {args.memory_limit} each\n"
            f"scheduler: {address}\n"
            + (f"dashboard: {cluster.dashboard_link}\n" if dashboard else "")
            + f"use: vitcnn analyze cka STORE RUN --dask-address {address}\n"
            "stop: Ctrl-C",
            flush=True,
        )
        if args.address_file:
            Path(args.address_file).write_text(address + "\n")
        while not stop.wait(1.0):
            pass
        print("stopping the dask cluster", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
