"""Benchmark: all-pairs CKA of L layers, three ways, on synthetic float16 representations.

* ours — what the CKA job runs per batch: each layer's Gram once
  (``vitcnn_store.analysis.gram.gram_linear``: blocked float16→float64 cast + ``X Xᵀ``), then
  ``MinibatchCKAMatrix.update_grams`` (U-centring and one matrix product for
  every pair);
* per-pair — as torch_cka / PyTorch-Model-Compare do it: for every (i, j) of the
  L × L pairs, recompute both Grams and the three HSICs
  (``MinibatchCKA().update(X_i, X_j)``);
* floor — the float64 Gram products ``X Xᵀ`` alone, one per layer and batch
  (inputs cast beforehand, untimed).

Defaults are ViT-B sized: L = 12 layers of 197 × 768 = 151 296 features,
n = 2048 images in batches of 512. Batches are generated on the fly (so only
one batch of all layers is in memory, ~1.9 GB) and every method times the same
arrays. Per-pair on all 144 pairs would take ~24× as long as ours, so by
default it is timed on ``--pairs`` pairs of every batch and extrapolated to
L × L (said so in the table); ``--pairs 0`` times all of them.

Usage::

    python benchmarks/cka_speed.py                          # full size (a few minutes)
    python benchmarks/cka_speed.py --n 512 --features 20000 # quick
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from vitcnn_store.analysis.cka import MinibatchCKA, MinibatchCKAMatrix
from vitcnn_store.analysis.gram import gram_linear


def make_batch(
    rng: np.random.Generator, layers: int, batch: int, features: int
) -> list[np.ndarray]:
    """One batch of every layer: a residual-stream-like random walk, stored as float16."""
    x = rng.standard_normal((batch, features), dtype=np.float32)
    out = []
    for _ in range(layers):
        x += 0.5 * rng.standard_normal((batch, features), dtype=np.float32)
        out.append(x.astype(np.float16))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048, help="images")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--features", type=int, default=197 * 768, help="features per image")
    p.add_argument(
        "--pairs",
        type=int,
        default=6,
        help="per-pair: time this many pairs per batch and extrapolate (0: all)",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=1,
        help="time ours and the floor this many times per layer, keep the best",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    L = args.layers
    n_batches = args.n // args.batch
    all_pairs = [(i, j) for i in range(L) for j in range(L)]
    if args.pairs and args.pairs < len(all_pairs):
        pick = np.linspace(0, len(all_pairs) - 1, args.pairs).round().astype(int)
        pairs = [all_pairs[k] for k in pick]
    else:
        pairs = all_pairs
    rng = np.random.default_rng(args.seed)
    t_ours = t_floor = t_pair = 0.0
    ours = MinibatchCKAMatrix()
    per_pair = {pq: MinibatchCKA() for pq in pairs}
    for b in range(n_batches):
        reps = make_batch(rng, L, args.batch, args.features)
        grams = []
        # Ours and the floor alternate layer by layer (best of --trials each), so a
        # change in machine load hits both alike.
        for x in reps:
            x64 = x.astype(np.float64)
            best_ours = best_floor = float("inf")
            for _ in range(args.trials):
                t0 = time.perf_counter()
                g = gram_linear(x)
                best_ours = min(best_ours, time.perf_counter() - t0)
                t0 = time.perf_counter()
                _ = x64 @ x64.T
                best_floor = min(best_floor, time.perf_counter() - t0)
            del x64
            grams.append(g)
            t_ours += best_ours
            t_floor += best_floor
        t0 = time.perf_counter()
        ours.update_grams(grams)  # U-centring and every pair: one product
        t_ours += time.perf_counter() - t0
        for i, j in pairs:
            t0 = time.perf_counter()
            per_pair[(i, j)].update(reps[i], reps[j])
            t_pair += time.perf_counter() - t0
        print(f"batch {b + 1}/{n_batches} done", file=sys.stderr)
    scale = len(all_pairs) / len(pairs)
    t_pair_all = t_pair * scale
    matrix = ours.result()
    err = max(abs(matrix[i, j] - acc.result()) for (i, j), acc in per_pair.items())

    print(
        f"all-pairs CKA: L={L} layers × {args.features} features, n={args.n} "
        f"({n_batches} batches of {args.batch}), float16 in, float64 math"
    )
    rows = [
        ("ours (Gram once per layer)", t_ours),
        ("floor (X Xᵀ only, float64)", t_floor),
        (
            f"per-pair ({len(all_pairs)} pairs)"
            + ("" if scale == 1 else f", extrapolated from {len(pairs)}"),
            t_pair_all,
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'method':<{width}}  {'seconds':>9}  {'× floor':>8}  {'× ours':>7}")
    for name, t in rows:
        print(f"{name:<{width}}  {t:9.2f}  {t / t_floor:8.2f}  {t / t_ours:7.2f}")
    print(
        f"per-pair / ours = {t_pair_all / t_ours:.1f}× (target ≥ 20×); "
        f"ours / floor = {t_ours / t_floor:.2f}× (target ≤ 1.3×)"
    )
    print(f"max |ours − per-pair| over the timed pairs: {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
