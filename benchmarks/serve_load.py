"""Load on ``vitcnn serve``: chunk reads through ``/zarr`` against the same reads in-process,
and API slice requests, at 1, 16 and 64 concurrent clients; the server's memory.

A store is extracted first (a 2-block ViT-Ti/16 at 224 px over built-in faces:
(image, 197 tokens, 192 channels) float16, 16 images per chunk, about 1 MiB
per chunk) unless ``--store`` names one. The server is ``vitcnn serve`` in its
own process on a free loopback port; clients are aiohttp coroutines in this
process. Each phase runs for ``--seconds`` (or until every chunk was read
``--rounds`` times), so the run is bounded and stops by itself. For every
concurrency it prints requests/s, MiB/s and p50/p99 latency of

- **in-process file read**: threads reading the chunk files (open, read: the page cache),
- **GET /zarr/<key>**: the same chunks' bytes over HTTP (aiohttp),
- **in-process zarr read**: threads reading whole chunks with zarr (decompress, checksum),
- **zarr over /zarr**: the same with zarr reading ``http://.../zarr/...`` (fsspec HTTP),
- **GET /api slice**: ``/api/runs/vit/layers/<layer>?images=i:i+4&tokens=0:50&format=npy``,

the ratios HTTP ÷ in-process (raw bytes, and decoded chunks), the errors, and the
server's RSS before and after.

    python benchmarks/serve_load.py                  # about a minute on 2 cores
    python benchmarks/serve_load.py --seconds 2 --images 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vitcnn_store.interface.describe import table

CONCURRENCY = (1, 16, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_store(folder: Path, images: int) -> str:
    from jobs.extract import ExtractConfig, extract
    from vitcnn_store.models import ModelSpec

    store = str(folder / "load.zarr")
    model = ModelSpec("vit_tiny_patch16_224", model_args={"depth": 2})
    extract(
        ExtractConfig(
            model=model,
            images="builtin:faces",
            store=store,
            run="vit",
            layers="blocks.*",
            limit=images,
            chunk_size=16,
            progress=False,
        )
    )
    return store


def chunk_keys(store: str) -> list[str]:
    root = Path(store)
    return sorted(
        str(p.relative_to(root)) for p in root.glob("vit/blocks.*/activation/c/**/*") if p.is_file()
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def summary(latencies: list[float], nbytes: int, seconds: float, errors: int) -> dict[str, float]:
    lat = np.array(latencies) * 1000
    return {
        "rps": len(latencies) / seconds,
        "mibps": nbytes / seconds / 2**20,
        "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "errors": errors,
    }


def in_process(store: str, keys: list[str], clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads reading chunk files in turn for ``seconds``."""
    stop = time.perf_counter() + seconds
    root = Path(store)

    def worker(offset: int) -> tuple[list[float], int]:
        lat, nbytes, i = [], 0, offset
        while time.perf_counter() < stop:
            t = time.perf_counter()
            with open(root / keys[i % len(keys)], "rb") as f:
                nbytes += len(f.read())
            lat.append(time.perf_counter() - t)
            i += clients
        return lat, nbytes

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(worker, range(clients)))
    elapsed = time.perf_counter() - start
    return summary([x for r in results for x in r[0]], sum(r[1] for r in results), elapsed, 0)


def decoded(arrays: list[tuple[object, int]], clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads reading whole chunks through zarr (decode and checksum included)."""
    stop = time.perf_counter() + seconds

    def worker(offset: int) -> tuple[list[float], int]:
        lat, nbytes, i = [], 0, offset
        while time.perf_counter() < stop:
            array, start = arrays[i % len(arrays)]
            t = time.perf_counter()
            nbytes += array[start : start + 16].nbytes  # type: ignore[index]
            lat.append(time.perf_counter() - t)
            i += clients
        return lat, nbytes

    begin = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(worker, range(clients)))
    elapsed = time.perf_counter() - begin
    return summary([x for r in results for x in r[0]], sum(r[1] for r in results), elapsed, 0)


def zarr_chunks(url: str, layers: list[str], n_images: int) -> list[tuple[object, int]]:
    import zarr

    out = []
    for layer in layers:
        array = zarr.open_array(f"{url}/vit/{layer}/activation", mode="r")
        out += [(array, start) for start in range(0, n_images - 15, 16)]
    return out


async def over_http(paths: list[str], base: str, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` concurrent aiohttp clients GETting ``paths`` in turn for ``seconds``."""
    import aiohttp

    lat: list[float] = []
    nbytes = errors = 0
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, connector=connector) as session:

        async def client(offset: int) -> None:
            nonlocal nbytes, errors
            i = offset
            while time.perf_counter() < stop:
                t = time.perf_counter()
                async with session.get(paths[i % len(paths)]) as r:
                    body = await r.read()
                    if r.status != 200:
                        errors += 1
                lat.append(time.perf_counter() - t)
                nbytes += len(body)
                i += clients

        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    return summary(lat, nbytes, elapsed, errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="a store with a run 'vit' (default: extract one)")
    parser.add_argument("--images", type=int, default=64, help="images to extract (default 64)")
    parser.add_argument("--seconds", type=float, default=4.0, help="per phase (default 4)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or make_store(Path(tmp), args.images)
        keys = chunk_keys(store)
        sizes = [os.path.getsize(Path(store) / k) for k in keys]
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "vitcnn_store.cli", "serve", store, "--port", str(port)],
            stderr=subprocess.PIPE,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.2)
            from vitcnn_store import open_store

            run = open_store(store)["vit"]
            layer = run.layers[-1]
            slices = [
                f"/api/runs/vit/layers/{layer}?images={i}:{i + 4}&tokens=0:50&format=npy"
                for i in range(0, run.n_images - 4, 4)
            ]
            local_arrays = zarr_chunks(store, run.layers, run.n_images)
            http_arrays = zarr_chunks(f"{base}/zarr", run.layers, run.n_images)
            asyncio.run(over_http(slices, base, 1, 0.5))  # warm up: the first slice imports
            rss_before = rss_mib(server.pid)
            rows, ratios, rss = [], [], []
            for clients in CONCURRENCY:
                phases = {
                    "in-process file read": in_process(store, keys, clients, args.seconds),
                    "GET /zarr/<key>": asyncio.run(
                        over_http([f"/zarr/{k}" for k in keys], base, clients, args.seconds)
                    ),
                    "in-process zarr read": decoded(local_arrays, clients, args.seconds),
                    "zarr over /zarr": decoded(http_arrays, clients, args.seconds),
                    "GET /api slice": asyncio.run(over_http(slices, base, clients, args.seconds)),
                }
                for name, r in phases.items():
                    rows.append(
                        [
                            str(clients),
                            name,
                            f"{r['rps']:.0f}",
                            f"{r['mibps']:.1f}",
                            f"{r['p50']:.2f}",
                            f"{r['p99']:.2f}",
                            str(r["errors"]),
                        ]
                    )
                p = list(phases.values())
                ratios.append(
                    (
                        clients,
                        p[1]["mibps"] / p[0]["mibps"],
                        p[3]["mibps"] / p[2]["mibps"],
                        p[1]["errors"] + p[4]["errors"],
                    )
                )
                rss.append(rss_mib(server.pid))
            rss_after = rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(
            f"store: {len(keys)} chunks, {np.mean(sizes) / 2**20:.2f} MiB each on disk; "
            f"slices of {layer}: 4 images x 50 tokens x {run[layer].shape[-1]} channels npy; "
            f"{os.cpu_count()} CPU(s), {args.seconds:g} s per phase"
        )
        print(table(rows, ["clients", "path", "req/s", "MiB/s", "p50 ms", "p99 ms", "errors"]))
        for clients, raw, dec, errors in ratios:
            print(
                f"{clients:>3} clients: chunk throughput through /zarr = {raw:.0%} of in-process "
                f"file reads (raw bytes), {dec:.0%} of in-process zarr reads (decoded); "
                f"{errors} HTTP errors"
            )
        steps = ", ".join(f"{r:.0f}" for r in rss)
        print(
            f"server RSS: {rss_before:.0f} MiB before, {steps} MiB after each concurrency, "
            f"{rss_after:.0f} MiB at the end"
        )


if __name__ == "__main__":
    main()
