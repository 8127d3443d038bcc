"""Benchmark: the paper's CKA protocol, today's minibatch path against the Gram-first path.

The paper (Nguyen, Raghu & Kornblith 2020; Raghu et al. 2021) averages minibatch
CKA over 20 repeats of 10 batches of 1024 images. Scaled to one machine, by
default: n = 4096 images, batches of 512, 8 per repeat, 20 repeats, 12 layers
of ViT-S-sized tokens (197 × 384) stored as float16. Both paths run in this
process on the same store, with the same batches, one after the other:

* **today** — the minibatch job as it was before the Gram cache (git f71937a,
  ``jobs/analyze/cka.py``), reproduced here on the same executor: per batch,
  one dask task per layer reads that batch's rows from every chunk holding
  them and computes the batch's Gram; every batch is its own dask graph (its
  default ``--batches-per-round 1``);
* **Gram-first** — ``run_cka`` as it is now: each layer's Gram is computed in
  one pass over the store and written to the Gram cache, then one pass over
  the Gram tiles gives every batch of every repeat (and the permutation null).

Today's path costs the same for every repeat (each batch is its own graph),
so ``--today-repeats K`` times it on the first K repeats only and scales its
time and bytes by repeats / K, said so in the table; its matrices are compared
on those K repeats.

Bytes read are measured two ways: the process's I/O counter ``rchar`` from
``/proc/self/io`` (bytes passed through ``read()``, so page-cache hits count
too: the store usually sits in the page cache, which hides reads from
``read_bytes``), and the bytes of every chunk object zarr fetches, counted at
zarr's ``LocalStore.get``. The table prints both against the stored bytes of
the layers, the wall times and their ratio, and the largest difference of the
per-repeat CKA matrices.

Usage::

    python benchmarks/cka_protocol.py                        # the full protocol (long)
    python benchmarks/cka_protocol.py --tokens 65 --repeats 5  # quicker
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from jobs.analyze.cka import CKAConfig, run_cka
from jobs.analyze.executor import Executor, LazyTasks
from jobs.analyze.tasks import row_pieces, take_rows
from vitcnn_store import open_store
from vitcnn_store.analysis.cka import MinibatchCKAMatrix, sample_batches
from vitcnn_store.analysis.gram import gram_linear
from vitcnn_store.store import ArraySpec, RunWriter, create_run


def write_store(url: str, n: int, layers: int, tokens: int, channels: int, chunk: int) -> None:
    """Random float16 token layers, neighbours related as along a residual stream."""
    coords = {
        "token_kind": (("token",), np.array(["cls"] + ["patch"] * (tokens - 1), dtype=object)),
        "token_y": (("token",), np.r_[np.nan, np.arange(tokens - 1)].astype(np.float32)),
        "token_x": (("token",), np.r_[np.nan, np.arange(tokens - 1)].astype(np.float32)),
    }
    specs = [
        ArraySpec(
            f"blocks.{i}",
            "activation",
            ("token", "channel"),
            (tokens, channels),
            coords,
            {
                "kind": "token",
                "depth_index": i,
                "depth_fraction": i / max(layers - 1, 1),
                "module_type": "Block",
                "role": "stream",
                "block": f"blocks.{i}",
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
    create_run(
        url,
        "vit",
        image_ids=[f"img{i:07d}" for i in range(n)],
        labels=[-1] * n,
        chunk=chunk,
        dtype="float16",
        arrays=specs,
        attrs=attrs,
    )
    writer = RunWriter(url, "vit")
    rng = np.random.default_rng(0)
    mix = rng.standard_normal(channels, dtype=np.float32)  # a shared mean direction
    for u, (start, stop) in enumerate(writer.units):
        m = stop - start
        x = rng.standard_normal((m, tokens, channels), dtype=np.float32) + mix
        values = {}
        for s in specs:
            x += 0.5 * rng.standard_normal(x.shape, dtype=np.float32)
            values[s.key] = x.astype(np.float16)
        writer.write_unit(u, values, np.zeros(m, bool), [""] * m)
        print(f"\rwriting unit {u + 1}/{len(writer.units)}", end="", file=sys.stderr)
    print(file=sys.stderr)


def matches(url: str, args: argparse.Namespace) -> bool:
    from vitcnn_store import VitcnnError

    try:
        run = open_store(url)["vit"]
        shape = run[run.layers[0]].shape
    except (VitcnnError, IndexError, KeyError):
        return False
    want = (args.n, args.layers, (args.tokens, args.channels), args.chunk, True)
    return (run.n_images, len(run.layers), shape[1:], run.chunk_size, run.complete) == want


# -- today's path: the minibatch job before the Gram cache (git f71937a) ------------------


def _layer_gram(x: Any) -> np.ndarray:
    return gram_linear(take_rows(*x) if isinstance(x, tuple) else x)


def _unbiased_batch(grams: list[np.ndarray]) -> MinibatchCKAMatrix:
    acc = MinibatchCKAMatrix()
    acc.update_grams(grams)
    return acc


def today(url: str, batches: list[list[np.ndarray]], threads: int | None) -> list[np.ndarray]:
    """Per batch one graph: a task per layer reads the batch's rows and makes its Gram."""
    from dask import delayed

    run = open_store(url)["vit"]
    usable = np.flatnonzero(run.valid)
    data = [run[name].data for name in run.layers]
    flat = [(r, b) for r, rep in enumerate(batches) for b in rep]

    def task(i: int) -> Any:
        rows = usable[flat[i][1]]
        grams = [delayed(_layer_gram, pure=True)(row_pieces(x, rows)) for x in data]
        return delayed(_unbiased_batch, pure=True)(grams)

    accs = [MinibatchCKAMatrix() for _ in batches]
    with Executor(None, threads, progress=True) as executor:
        for i, part in executor.imap(LazyTasks(len(flat), task), desc="today", window=1):
            accs[flat[i][0]].merge(part)
    return [acc.result() for acc in accs]


# -- measuring ---------------------------------------------------------------------------


def rchar() -> int:
    """Bytes this process passed through read()/pread() (page-cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


class ZarrReads:
    """Bytes of every object zarr's LocalStore hands back, by array (instrumentation only)."""

    def __init__(self) -> None:
        self.by_array: dict[str, int] = defaultdict(int)

    def __enter__(self) -> ZarrReads:
        from zarr.storage import LocalStore

        self._original = original = LocalStore.get
        counts = self.by_array

        async def get(store: Any, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
            buf = await original(store, key, prototype, byte_range)
            if buf is not None:
                counts[key.split("/c/")[0] if "/c/" in key else "(metadata)"] += len(buf)
            return buf

        LocalStore.get = get  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from zarr.storage import LocalStore

        LocalStore.get = self._original  # type: ignore[method-assign]

    def total(self, prefix: str = "") -> int:
        return sum(v for k, v in self.by_array.items() if k.startswith(prefix))


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="/tmp/vitcnn_bench_protocol.zarr")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--batches", type=int, default=8, help="batches per repeat")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--threads", type=int, help="local threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-today", action="store_true", help="Gram-first only")
    p.add_argument(
        "--today-repeats",
        type=int,
        help="time today's path on this many repeats and scale to --repeats (default: all)",
    )
    p.add_argument(
        "--float32",
        action="store_true",
        help="also run Gram-first with the cache stored in float32 and print the difference",
    )
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    args = p.parse_args()

    url = args.store
    if args.rebuild or not matches(url, args):
        shutil.rmtree(url, ignore_errors=True)
        t0 = time.perf_counter()
        write_store(url, args.n, args.layers, args.tokens, args.channels, args.chunk)
        print(f"wrote {url} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    shutil.rmtree(Path(url) / "vit" / "_grams", ignore_errors=True)  # Gram-first starts cold
    shutil.rmtree(Path(url) / "vit" / "_analyses", ignore_errors=True)
    run = open_store(url)["vit"]
    layer_bytes = sum(du(Path(url) / "vit" / name / "activation") for name in run.layers)
    batches = sample_batches(args.n, args.batch, args.repeats, args.seed, args.batches)

    rows: dict[str, dict[str, float]] = {}
    ref = None
    today_name = "today (minibatch, f71937a)"
    if not args.skip_today:
        k = min(args.today_repeats or args.repeats, args.repeats)
        scale = args.repeats / k
        if k < args.repeats:
            today_name = f"today (×{scale:g}: {k} of {args.repeats} rep.)"
        with ZarrReads() as reads:
            r0, t0 = rchar(), time.perf_counter()
            ref = today(url, batches[:k], args.threads)
            seconds = time.perf_counter() - t0
            rows[today_name] = {
                "s": seconds * scale,
                "rchar": (rchar() - r0) * scale,
                "zarr": reads.total("vit/blocks.") * scale,
            }
    cfg = CKAConfig(
        store=url,
        run="vit",
        batch_size=args.batch,
        max_batches=args.batches,
        repeats=args.repeats,
        seed=args.seed,
        threads=args.threads,
        recompute=True,
    )
    with ZarrReads() as reads:
        r0, t0 = rchar(), time.perf_counter()
        ds = run_cka(cfg).dataset
        seconds = time.perf_counter() - t0
        rows["Gram-first (this branch)"] = {
            "s": seconds,
            "rchar": rchar() - r0,
            "zarr": reads.total("vit/blocks."),
            "grams": reads.total("vit/_grams/"),
        }
    assert (ds["batch_image"].values == np.asarray(batches)).all(), "batches differ"
    gram_bytes = du(Path(url) / "vit" / "_grams")
    new = ds["cka_repeats"].values if "cka_repeats" in ds else ds["cka"].values[None]

    print(
        f"CKA protocol: n={args.n}, batch {args.batch} × {args.batches} per repeat, "
        f"{args.repeats} repeats, {args.layers} layers of {args.tokens}×{args.channels} "
        f"float16 ({layer_bytes / 2**30:.2f} GiB stored; Gram cache {gram_bytes / 2**20:.0f} "
        "MiB)"
    )
    print(f"{'path':<34} {'wall s':>8} {'rchar/stored':>13} {'zarr/stored':>12}")
    for name, r in rows.items():
        zarr_all = r["zarr"] + r.get("grams", 0)
        print(
            f"{name:<34} {r['s']:8.1f} {r['rchar'] / layer_bytes:13.3f} "
            f"{zarr_all / layer_bytes:12.3f}"
        )
    gram = rows["Gram-first (this branch)"]
    print(
        f"Gram-first reads: activations {gram['zarr'] / layer_bytes:.3f}× + Gram tiles "
        f"{gram['grams'] / layer_bytes:.3f}× of the stored layers (target ≤ 1.2×)"
    )
    if ref is not None:
        old = rows[today_name]
        diff = float(np.max(np.abs(np.stack(ref) - new[: len(ref)])))
        print(
            f"speed-up: {old['s'] / gram['s']:.1f}× (target ≥ 5×); reads today "
            f"{old['zarr'] / layer_bytes:.1f}× the store"
        )
        print(
            f"max |today − Gram-first| over {len(ref)} repeat matrices: {diff:.2e} (target ≤ 1e-10)"
        )
    if args.float32:
        t0 = time.perf_counter()
        f32 = run_cka(replace(cfg, gram_dtype="float32", name="cka_f32")).dataset
        low = f32["cka_repeats"].values if "cka_repeats" in f32 else f32["cka"].values[None]
        print(
            f"Gram cache stored in float32 ({time.perf_counter() - t0:.0f} s): max |Δ| vs "
            f"float64 {np.max(np.abs(low - new)):.2e} over the repeat matrices"
        )
    null, cka = ds["cka_null"].values, ds["cka"].values
    print(
        f"null (images permuted): mean {np.nanmean(null):.4f}, max |·| "
        f"{np.nanmax(np.abs(null)):.4f}; CKA mean {np.nanmean(cka):.3f}"
    )
    if not args.keep:
        shutil.rmtree(url, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
