"""Percentile bootstrap intervals over images, and percentiles against a null.

Every analysis whose value is a mean over images (attention distance per
head, skip ratios per block, probe accuracy over test images) gets its
interval the same way: draw ``n_boot`` resamples of the n images with
replacement, take the statistic of each, and report the ``(1 ± level)/2``
percentiles of those replicates (the percentile bootstrap, Efron &
Tibshirani 1993, ch. 13). Resamples are drawn as counts (how often each
image is drawn) so that the means of all replicates are one matrix product.

An estimate that is a ratio of sums over groups of images (the minibatch CKA
of localization maps: HSIC sums over disjoint batches) is resampled by group
with :func:`bootstrap_counts` over the groups and :func:`percentile_interval`.

Examples
--------
>>> values = np.arange(10.0)[:, None]
>>> lo, hi = bootstrap_mean_interval(values, n_boot=200, level=0.9, seed=0)
>>> bool(lo[0] < 4.5 < hi[0])
True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vitcnn_store.analysis._arrays import FloatArray
from vitcnn_store.defaults import DEFAULT_BOOTSTRAP, DEFAULT_LEVEL

__all__ = [
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_LEVEL",
    "bootstrap_counts",
    "bootstrap_mean_interval",
    "bootstrap_means",
    "null_percentile",
    "percentile_interval",
]

_COUNT_BYTES = 32 * 2**20  # counts held at once (n_boot rows × n images, float64)


def bootstrap_counts(n: int, n_boot: int, seed: Any) -> FloatArray:
    """(n_boot, n): how often each of n items is drawn in each resample of size n.

    Row b is ``bincount(rng.integers(0, n, n))`` for the b-th draw of
    ``np.random.default_rng(seed)``, so the same seed gives the same resamples.

    Examples
    --------
    >>> c = bootstrap_counts(5, 3, seed=0)
    >>> c.shape, c.sum(axis=1).tolist()
    ((3, 5), [5.0, 5.0, 5.0])
    """
    if n < 1 or n_boot < 1:
        raise ValueError(f"need n >= 1 items and n_boot >= 1 resamples, got {n} and {n_boot}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    out = np.zeros((n_boot, n))
    np.add.at(out, (np.arange(n_boot)[:, None], draws), 1.0)
    return out


def bootstrap_means(values: Any, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: Any = 0) -> FloatArray:
    """(n_boot, ...) means over axis 0 of ``values`` (n, ...) for each resample of its rows.

    A NaN in some row makes every replicate that draws that row NaN for that
    entry (as the plain mean would be).
    """
    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    flat = v.reshape(n, -1)
    counts = bootstrap_counts(n, n_boot, seed)
    out = np.empty((n_boot, flat.shape[1]))
    step = max(1, _COUNT_BYTES // max(1, 8 * n))
    finite = np.isfinite(flat)
    clean = np.where(finite, flat, 0.0)
    for s in range(0, n_boot, step):
        c = counts[s : s + step]
        out[s : s + step] = c @ clean / n
        # Any drawn NaN poisons its entry, as in the mean of the resampled rows.
        bad = c @ (~finite).astype(np.float64) > 0
        out[s : s + step][bad] = np.nan
    return out.reshape(n_boot, *v.shape[1:])


def percentile_interval(replicates: Any, level: float = DEFAULT_LEVEL) -> tuple[Any, Any]:
    """``((1 - level)/2, (1 + level)/2)`` percentiles of bootstrap replicates along axis 0.

    Entries with a NaN replicate get a NaN interval.

    Examples
    --------
    >>> lo, hi = percentile_interval(np.arange(101.0), 0.9)
    >>> round(float(lo), 9), round(float(hi), 9)
    (5.0, 95.0)
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    r = np.asarray(replicates, dtype=np.float64)
    q = 100.0 * np.array([(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    lo, hi = np.percentile(r, q, axis=0)
    return lo, hi


def bootstrap_mean_interval(
    values: Any, *, n_boot: int = DEFAULT_BOOTSTRAP, level: float = DEFAULT_LEVEL, seed: Any = 0
) -> tuple[Any, Any]:
    """Percentile bootstrap interval of the mean over axis 0 of ``values`` (n, ...)."""
    return percentile_interval(bootstrap_means(values, n_boot=n_boot, seed=seed), level)


def null_percentile(values: Any, null: Any) -> FloatArray:
    """Percentile (0..100) of each value within its null distribution along axis 0.

    ``null`` is (K, ...) draws, ``values`` (...) the observed statistics. Ties
    count half (scipy's ``percentileofscore(kind="mean")``); NaN where the value
    or every draw is NaN. 100 means above every permutation; a p-value
    against "no relation" is ``(1 + #draws >= value) / (K + 1)``.

    Examples
    --------
    >>> null_percentile(np.array([0.5, 2.0]), np.array([[0.0, 0.0], [1.0, 2.0]])).tolist()
    [50.0, 75.0]
    """
    v = np.asarray(values, dtype=np.float64)
    d = np.asarray(null, dtype=np.float64)
    valid = np.isfinite(d)
    k = valid.sum(axis=0)
    below = (valid & (d < v)).sum(axis=0)
    equal = (valid & (d == v)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 100.0 * (below + 0.5 * equal) / k
    return np.where(np.isfinite(v) & (k > 0), out, np.nan)
