"""One-pass tile sums against whole batch Grams: every estimator, any tiling, any batches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vitcnn_store.analysis.cka import sample_batches
from vitcnn_store.analysis.tiles import (
    BatchLayout,
    GatheredGrams,
    TiledHSIC,
    centring_shift,
    gather_part,
    tile_part,
)

FAST = settings(max_examples=30, deadline=None)


# ---------------------------------------------------------------- references
def ref_hsic1(K, L):
    """Song et al. (2012), term by term, in extended precision (its sums cancel digits)."""
    n = K.shape[0]
    Kt, Lt = K.astype(np.longdouble), L.astype(np.longdouble)
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    one = np.ones(n)
    return (
        np.trace(Kt @ Lt)
        + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)
    ) / (n * (n - 3))


def ref_hsic0(K, L):
    n = K.shape[0]
    H = np.eye(n, dtype=np.longdouble) - np.ones((n, n), dtype=np.longdouble) / n
    return np.trace(K.astype(np.longdouble) @ H @ L @ H) / (n - 1) ** 2


def ref_minibatch(Ks, Ls, batches, hsic):
    """Per repeat: Σ_b HSIC(K_b, L_b) / sqrt(Σ HSIC(K_b, K_b) · Σ HSIC(L_b, L_b))."""
    out = []
    for rep in batches:
        m = np.zeros((len(Ks), len(Ls)))
        for i, K in enumerate(Ks):
            for j, L in enumerate(Ls):
                sub = [(K[np.ix_(b, b)], L[np.ix_(b, b)]) for b in rep]
                xy = sum(hsic(k, ll) for k, ll in sub)
                xx = sum(hsic(k, k) for k, _ in sub)
                yy = sum(hsic(ll, ll) for _, ll in sub)
                m[i, j] = float(xy / np.sqrt(xx * yy))
        out.append(m)
    return np.stack(out)


def grams(rng, n, layers, mean=5.0):
    """Gram matrices of related float16 layers with a large mean (a hard case for sums)."""
    base = rng.normal(size=(n, 6))
    out = []
    for i in range(layers):
        x = np.tanh(base @ rng.normal(size=(6, 9 + i))) + mean * rng.normal(size=9 + i)
        x = x.astype(np.float16).astype(np.float64)
        out.append(x @ x.T)
    return np.stack(out)


def tiled(layout, Ka, Kb, tile, *, unbiased):
    """Feed every tile on and above the diagonal, in shuffled order, to a TiledHSIC."""
    n = Ka.shape[1]
    acc = TiledHSIC(layout, len(Ka), None if Kb is None else len(Kb), unbiased=unbiased)
    sa = centring_shift(Ka.mean(axis=2))
    sb = None if Kb is None else centring_shift(Kb.mean(axis=2))
    starts = list(range(0, n, tile))
    pairs = [(p, q) for p in starts for q in starts if q >= p]
    for k in np.random.default_rng(0).permutation(len(pairs)):
        p, q = pairs[k]
        rows = np.arange(p, min(p + tile, n))
        cols = np.arange(q, min(q + tile, n))
        rb = None if Kb is None else Kb[:, rows][:, :, cols]
        part = tile_part(
            layout,
            rows,
            None if p == q else cols,
            Ka[:, rows][:, :, cols],
            sa,
            rb,
            sb,
            unbiased=unbiased,
        )
        acc.add(part)
    return acc


# ---------------------------------------------------------------- estimators
@FAST
@given(
    n=st.integers(8, 40),
    tile=st.integers(1, 45),
    m=st.integers(4, 8),
    repeats=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    cross=st.booleans(),
)
def test_minibatch_sums_equal_whole_batch_reference(n, tile, m, repeats, seed, cross):
    rng = np.random.default_rng(seed)
    Ka = grams(rng, n, 3)
    Kb = grams(rng, n, 2) if cross else None
    batches = sample_batches(n, m, repeats, seed)
    layout = BatchLayout.from_batches(n, batches)
    got = tiled(layout, Ka, Kb, tile, unbiased=True).result()
    ref = ref_minibatch(Ka, Ka if Kb is None else Kb, batches, ref_hsic1)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("unbiased", "hsic"), [(True, ref_hsic1), (False, ref_hsic0)])
@pytest.mark.parametrize("tile", [1, 5, 16, 64])
def test_full_sample_estimators(unbiased, hsic, tile):
    rng = np.random.default_rng(3)
    Ka, Kb = grams(rng, 23, 3), grams(rng, 23, 2)
    layout = BatchLayout.from_batches(23, [[np.arange(23)]])
    got = tiled(layout, Ka, Kb, tile, unbiased=unbiased).result()[0]
    ref = ref_minibatch(Ka, Kb, [[np.arange(23)]], hsic)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_shift_keeps_digits_that_raw_sums_lose():
    # Mean 1e4 over unit noise: raw HSIC expansions cancel ~16 digits; shifted ones do not.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 5)) + 1e4 * rng.normal(size=5)
    K = (x @ x.T)[None]
    layout = BatchLayout.from_batches(24, [[np.arange(24)]])
    acc = tiled(layout, K, None, 7, unbiased=True)
    assert acc.result()[0, 0, 0] == pytest.approx(1.0, abs=1e-12)
    raw = TiledHSIC(layout, 1, unbiased=True)
    for p in range(0, 24, 7):
        for q in range(p, 24, 7):
            r, c = np.arange(p, min(p + 7, 24)), np.arange(q, min(q + 7, 24))
            raw.add(
                tile_part(
                    layout,
                    r,
                    None if p == q else c,
                    K[:, r][:, :, c],
                    np.zeros((1, 24)),
                    unbiased=True,
                )
            )
    assert abs(raw.result(warn=False)[0, 0, 0] - 1.0) > 1e-6 or np.isnan(raw.result(warn=False))


def test_constant_layer_is_nan_with_a_warning():
    rng = np.random.default_rng(1)
    K = grams(rng, 12, 2)
    c = np.full((12, 7), 3.0)
    K = np.concatenate([K, (c @ c.T)[None]])
    layout = BatchLayout.from_batches(12, sample_batches(12, 6, 1, 0))
    acc = tiled(layout, K, None, 5, unbiased=True)
    with pytest.warns(RuntimeWarning, match="constant"):
        out = acc.result()[0]
    assert np.isnan(out[2]).all() and np.isnan(out[:, 2]).all() and np.isfinite(out[:2, :2]).all()


def test_missing_tile_and_bad_shapes_raise():
    K = grams(np.random.default_rng(0), 8, 1)
    layout = BatchLayout.from_batches(8, [[np.arange(8)]])
    acc = TiledHSIC(layout, 1, unbiased=True)
    acc.add(
        tile_part(
            layout, np.arange(4), None, K[:, :4, :4], centring_shift(K.mean(2)), unbiased=True
        )
    )
    with pytest.raises(ValueError, match="diagonal tile is missing"):
        acc.result()
    with pytest.raises(ValueError, match="does not match"):
        tile_part(
            layout, np.arange(4), None, K[:, :4, :3], centring_shift(K.mean(2)), unbiased=True
        )
    with pytest.raises(ValueError, match="overlap"):
        BatchLayout.from_batches(8, [[np.arange(4), np.arange(3, 7)]])


# ---------------------------------------------------------------- gathered batch Grams
@FAST
@given(n=st.integers(4, 30), tile=st.integers(1, 31), seed=st.integers(0, 2**31))
def test_gathered_batches_equal_fancy_indexing(n, tile, seed):
    rng = np.random.default_rng(seed)
    K = grams(rng, n, 2)
    requests = [rng.permutation(n)[: rng.integers(1, n + 1)] for _ in range(3)]
    acc = GatheredGrams(requests, 2)
    for p in range(0, n, tile):
        for q in range(p, n, tile):
            rows, cols = np.arange(p, min(p + tile, n)), np.arange(q, min(q + tile, n))
            diagonal = p == q
            acc.add(
                gather_part(requests, rows, None if diagonal else cols, K[:, rows][:, :, cols]),
                diagonal=diagonal,
            )
    for g, members in enumerate(requests):
        np.testing.assert_array_equal(acc.grams(g), K[:, members][:, :, members])
    with pytest.raises(ValueError, match="incomplete"):
        GatheredGrams(requests, 2).grams(0)
