"""Benchmark: what storing the Gram cache in float32 costs in CKA, against float64.

Layers of ``--features`` features whose mean is ``ratio`` times their spread
(a residual stream's outlier channels make real activations mean-dominated),
stored as float32 in a synthetic run. For each ratio, side by side:

* **float64 cache** — ``run_cka`` as by default;
* **float32 cache** — ``run_cka --gram-dtype float32``: float64 accumulation, each
  stored entry rounded to float32; the cache stores ``(X − μ)(X − μ)ᵀ`` (μ the
  first tile's mean features), so rounding is relative to the spread;
* **float32 of X Xᵀ** — what rounding the *unshifted* Gram to float32 would give,
  computed in memory with the same batches (the kernels on rounded Grams).

Prints the largest difference of any CKA value (over every repeat matrix) from
the float64 cache.

Usage::

    python benchmarks/cka_gram_precision.py
"""

from __future__ import annotations

import argparse
import shutil
import sys

import numpy as np

from jobs.analyze.cka import CKAConfig, run_cka
from vitcnn_store.analysis.cka import MinibatchCKAMatrix
from vitcnn_store.store import ArraySpec, RunWriter, create_run


def write(url: str, n: int, p: int, layers: int, ratio: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    specs = [
        ArraySpec(
            f"blocks.{i}",
            "activation",
            ("channel",),
            (p,),
            {},
            {"kind": "pooled", "depth_index": i, "depth_fraction": i / max(layers - 1, 1)},
        )
        for i in range(layers)
    ]
    create_run(
        url,
        "r",
        image_ids=[f"i{k}" for k in range(n)],
        labels=[-1] * n,
        chunk=64,
        dtype="float32",
        arrays=specs,
        attrs={"chunk_size": 64},
    )
    base = rng.normal(size=(n, 50))
    feats = []
    for _ in range(layers):
        f = np.tanh(base @ rng.normal(size=(50, p)) / 7)
        feats.append((f / f.std() + ratio * rng.normal(size=p)).astype(np.float32))
    writer = RunWriter(url, "r")
    for u, (s, e) in enumerate(writer.units):
        values = {spec.key: f[s:e] for spec, f in zip(specs, feats, strict=True)}
        writer.write_unit(u, values, np.zeros(e - s, bool), [""] * (e - s))
    return feats


def rounded_unshifted(feats: list[np.ndarray], batches: np.ndarray) -> np.ndarray:
    grams = [(f.astype(np.float64) @ f.astype(np.float64).T).astype(np.float32) for f in feats]
    out = []
    for rep in batches:
        acc = MinibatchCKAMatrix()
        for b in rep:
            acc.update_grams([g[np.ix_(b, b)].astype(np.float64) for g in grams])
        out.append(acc.result(warn=False))
    return np.stack(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="/tmp/vitcnn_bench_precision.zarr")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--features", type=int, default=2000)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ratios", default="1,10,100,1000", help="mean / spread of the features")
    args = p.parse_args()

    print(
        f"n={args.n}, {args.layers} layers × {args.features} features, batch {args.batch}, "
        f"{args.repeats} repeats: max |CKA − CKA(float64 cache)|"
    )
    print(f"{'mean/spread':>11}  {'float32 cache':>13}  {'float32 of X Xᵀ':>15}")
    for ratio in (float(r) for r in args.ratios.split(",")):
        shutil.rmtree(args.store, ignore_errors=True)
        feats = write(args.store, args.n, args.features, args.layers, ratio, seed=0)
        common = {
            "store": args.store,
            "run": "r",
            "batch_size": args.batch,
            "roles": "all",
            "repeats": args.repeats,
            "null_batches": 0,
            "progress": False,
        }
        ds64 = run_cka(CKAConfig(**common)).dataset
        ds32 = run_cka(CKAConfig(**common, gram_dtype="float32", name="f32")).dataset
        ref = ds64["cka_repeats"].values
        low = ds32["cka_repeats"].values
        naive = rounded_unshifted(feats, ds64["batch_image"].values)
        print(f"{ratio:11g}  {np.abs(low - ref).max():13.1e}  {np.abs(naive - ref).max():15.1e}")
    shutil.rmtree(args.store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
