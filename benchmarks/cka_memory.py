"""Benchmark: the CKA job on a store several times larger than a dask worker's memory.

The Gram-first job holds neither a layer nor its Gram in one worker: Gram tiles
go from the worker that computes them into the store, and the estimates are
sums over tiles; with ``--n`` large enough a layer's Gram is larger than a
worker's memory limit too.

Writes (or reuses) a synthetic store with the project's own writer — random
float16 token layers, ``--n`` images × ``--layers`` layers of
``--tokens`` × ``--channels`` features — at least ``--ratio`` times the worker
memory limit, starts a ``distributed.LocalCluster`` whose workers have that
limit, runs the all-pairs CKA job on it and prints peak memory: each worker's
peak RSS (``getrusage``, so it includes the worker's own imports) and the
driver's RSS growth during the job. The job must complete without a worker
being paused or killed.

Usage::

    python benchmarks/cka_memory.py                       # ~2.4 GB store, 512 MiB workers
    python benchmarks/cka_memory.py --n 2048 --layers 6   # quicker
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

from jobs.analyze import CKAConfig, run_cka
from vitcnn_store.store import ArraySpec, RunWriter, create_run


def parse_size(text: str) -> int:
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower()
    for suffix, factor in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * factor)
    return int(t)


def write_store(url: str, n: int, layers: int, tokens: int, channels: int, chunk: int) -> None:
    """A run of random float16 token layers, written unit by unit like the extraction job."""
    specs = [
        ArraySpec(
            f"blocks.{i}",
            "activation",
            ("token", "channel"),
            (tokens, channels),
            {
                "token_kind": (
                    ("token",),
                    np.array(["cls"] + ["patch"] * (tokens - 1), dtype=object),
                ),
                "token_y": (("token",), np.r_[np.nan, np.arange(tokens - 1)].astype(np.float32)),
                "token_x": (("token",), np.r_[np.nan, np.arange(tokens - 1)].astype(np.float32)),
            },
            {
                "kind": "token",
                "depth_index": i,
                "depth_fraction": i / max(layers - 1, 1),
                "module_type": "Block",
            },
        )
        for i in range(layers)
    ]
    attrs = {
        "model": "synthetic",
        "weights_sha256": "synthetic",
        "image_set_sha256": f"n{n}",
        "chunk_size": chunk,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    ids = [f"img{i:07d}" for i in range(n)]
    create_run(
        url,
        "big",
        image_ids=ids,
        labels=[-1] * n,
        chunk=chunk,
        dtype="float16",
        arrays=specs,
        attrs=attrs,
    )
    writer = RunWriter(url, "big")
    rng = np.random.default_rng(0)
    for u, (start, stop) in enumerate(writer.units):
        m = stop - start
        # A shared component makes neighbouring layers similar, as in a residual stream.
        base = rng.standard_normal((m, tokens, channels), dtype=np.float32)
        values = {}
        for s in specs:
            base += 0.5 * rng.standard_normal(base.shape, dtype=np.float32)
            values[s.key] = base.astype(np.float16)
        writer.write_unit(u, values, np.zeros(m, bool), [""] * m)


def matches(url: str, args: argparse.Namespace) -> bool:
    """Whether ``url`` already holds the store these arguments describe."""
    from vitcnn_store import VitcnnError, open_store

    try:
        run = open_store(url)["big"]
        shape = run[run.layers[0]].shape
    except (VitcnnError, IndexError):
        return False
    return (run.n_images, len(run.layers), shape[1:], run.complete) == (
        args.n,
        args.layers,
        (args.tokens, args.channels),
        True,
    )


def du(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class RssSampler:
    """Peak RSS of this process while running (sampled every 50 ms)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _maxrss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="/tmp/vitcnn_bench_memory.zarr")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--tokens", type=int, default=65)
    p.add_argument("--channels", type=int, default=192)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--memory-limit", default="512MiB", help="per dask worker")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--batches", type=int, help="batches per repeat (default: all)")
    p.add_argument("--gram-tile", type=int, default=512, help="images per Gram tile")
    p.add_argument("--ratio", type=float, default=4.0, help="store size / memory limit, at least")
    p.add_argument("--rebuild", action="store_true", help="rewrite the store even if present")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = p.parse_args()

    limit = parse_size(args.memory_limit)
    raw = args.n * args.layers * args.tokens * args.channels * 2
    if raw < args.ratio * limit:
        p.error(f"store would be {raw / 2**30:.2f} GiB, under {args.ratio}× the limit: raise --n")
    if args.rebuild or not matches(args.store, args):
        shutil.rmtree(args.store, ignore_errors=True)
        t0 = time.perf_counter()
        write_store(args.store, args.n, args.layers, args.tokens, args.channels, args.chunk)
        print(f"wrote {args.store} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    size = du(args.store)

    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=limit,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        base = client.run(_rss)
        # Libraries the job imports lazily, loaded first so the driver's RSS growth
        # below is the job's data, not module code.
        import dask.array  # noqa: F401
        import xarray  # noqa: F401

        cfg = CKAConfig(
            store=args.store,
            run="big",
            batch_size=args.batch_size,
            max_batches=args.batches,
            dask_address=cluster.scheduler_address,
            gram_tile=args.gram_tile,
            recompute=True,
        )
        t0 = time.perf_counter()
        with RssSampler() as driver:
            result = run_cka(cfg)
        seconds = time.perf_counter() - t0
        peaks = client.run(_maxrss)
    ds = result.dataset
    ok = bool(np.isfinite(ds["cka"].values).all())
    worker_peak = max(peaks.values())
    rows = [
        ("store on disk", f"{size / 2**30:.2f} GiB"),
        ("worker memory limit", f"{limit / 2**20:.0f} MiB × {args.workers} workers (1 thread)"),
        ("store / limit", f"{size / limit:.1f}×"),
        ("images × layers", f"{args.n} × {args.layers} (features {args.tokens}×{args.channels})"),
        (
            "batches",
            f"{ds.attrs['n_batches']} × {ds.attrs['batch_size']} images; Gram tiles of "
            f"{args.gram_tile}, one layer's Gram {8 * args.n**2 / 2**20:.0f} MiB",
        ),
        ("job time", f"{seconds:.1f} s"),
        ("worker RSS at start", f"{max(base.values()) / 2**20:.0f} MiB"),
        ("worker peak RSS", f"{worker_peak / 2**20:.0f} MiB ({worker_peak / limit:.0%} of limit)"),
        ("driver RSS growth", f"{(driver.peak - driver.start) / 2**20:.0f} MiB"),
        ("result", f"{ds['cka'].shape} finite={ok}; diag={np.diag(ds['cka'].values).min():.6f}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if not args.keep:
        shutil.rmtree(args.store, ignore_errors=True)
    return 0 if ok and worker_peak < limit else 1


if __name__ == "__main__":
    sys.exit(main())
