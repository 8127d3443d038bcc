"""The bootstrap kernel against a plain loop over resampled rows, scipy's percentile
bootstrap, and scipy's percentileofscore."""

from __future__ import annotations

import numpy as np
import pytest

from vitcnn_store.analysis.bootstrap import (
    bootstrap_counts,
    bootstrap_mean_interval,
    bootstrap_means,
    null_percentile,
    percentile_interval,
)


def _loop_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """The textbook bootstrap: draw n row indices with replacement, take the rows' mean."""
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    return np.stack([values[rng.integers(0, n, size=n)].mean(axis=0) for _ in range(n_boot)])


def test_means_equal_the_loop_over_resampled_rows() -> None:
    # The kernel draws all resamples at once from the same stream; row b of the draws
    # (n_boot, n) is the b-th resample of the loop only if both read the stream alike.
    values = np.random.default_rng(1).normal(size=(37, 3, 2))
    got = bootstrap_means(values, n_boot=50, seed=7)
    rng = np.random.default_rng(7)
    draws = rng.integers(0, 37, size=(50, 37))
    want = np.stack([values[d].mean(axis=0) for d in draws])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got.shape == (50, 3, 2)


def test_counts_are_resamples_of_size_n() -> None:
    c = bootstrap_counts(9, 40, seed=3)
    assert (c.sum(axis=1) == 9).all() and (c >= 0).all()


def test_interval_agrees_with_scipy_percentile_bootstrap() -> None:
    from scipy.stats import bootstrap

    x = np.random.default_rng(2).exponential(size=200)
    lo, hi = bootstrap_mean_interval(x[:, None], n_boot=4000, level=0.9, seed=0)
    ref = bootstrap(
        (x,),
        np.mean,
        n_resamples=4000,
        confidence_level=0.9,
        method="percentile",
        rng=np.random.default_rng(5),
    )
    ref = ref.confidence_interval
    # Two independent Monte Carlo draws of the same interval: agree to the MC error.
    se = x.std() / np.sqrt(x.size)
    assert abs(lo[0] - ref.low) < 0.1 * se
    assert abs(hi[0] - ref.high) < 0.1 * se


def test_interval_is_the_percentiles_of_the_loop() -> None:
    x = np.random.default_rng(4).normal(size=(25, 2))
    lo, hi = bootstrap_mean_interval(x, n_boot=300, level=0.8, seed=11)
    reps = _loop_means(x, 300, 11)
    np.testing.assert_allclose(lo, np.percentile(reps, 10, axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(hi, np.percentile(reps, 90, axis=0), rtol=0, atol=1e-12)


def test_nan_rows_poison_only_the_replicates_that_draw_them() -> None:
    x = np.arange(6.0)[:, None].repeat(2, axis=1)
    x[0, 1] = np.nan
    reps = bootstrap_means(x, n_boot=200, seed=0)
    ref = _loop_means(x, 200, 0)
    np.testing.assert_array_equal(np.isnan(reps), np.isnan(ref))
    assert np.isfinite(reps[:, 0]).all()


def test_percentile_interval_refuses_a_bad_level() -> None:
    with pytest.raises(ValueError, match="level"):
        percentile_interval(np.zeros(3), 1.0)


def test_null_percentile_matches_scipy() -> None:
    from scipy.stats import percentileofscore

    rng = np.random.default_rng(0)
    null = rng.integers(0, 5, size=(30, 4)).astype(float)  # ties on purpose
    values = np.array([0.0, 2.0, 4.5, -1.0])
    got = null_percentile(values, null)
    want = [percentileofscore(null[:, j], values[j], kind="mean") for j in range(4)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.isnan(null_percentile(np.array([np.nan]), np.zeros((3, 1))))[0]
