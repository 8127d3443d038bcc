"""Gram-level kernels against plain float64 references (the ones a Gram cache builds on)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vitcnn_store.analysis.gram import (
    GramAccumulator,
    center_gram,
    centred_triangle,
    gram_linear,
    gram_rbf,
    kernel_gram,
    rbf_from_linear_gram,
    u_center_gram,
)

FAST = settings(max_examples=25, deadline=None)


def ref_gram(x, y=None):
    """Python-level reference: each entry a float64 sum over features."""
    a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    b = a if y is None else np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    return np.array([[float(np.sum(u * v)) for v in b] for u in a])


def assert_gram_equal(got, ref):
    """Equal to float64 rounding. An off-diagonal entry can sum to nearly 0 while its terms
    are large, so the error is relative to the Gram's scale, not to the entry."""
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())


@FAST
@given(
    n=st.integers(1, 9),
    m=st.integers(1, 7),
    p=st.integers(0, 40),
    block_cols=st.integers(1, 50),
    seed=st.integers(0, 2**31),
)
def test_blocked_products_equal_reference(n, m, p, block_cols, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, p)) * 40).astype(np.float16)
    y = (rng.normal(size=(m, p)) * 40).astype(np.float16)
    block = 8 * max(n, m) * block_cols  # block_cols float64 columns per copy
    assert_gram_equal(gram_linear(x, block_bytes=block), ref_gram(x))
    assert_gram_equal(gram_linear(x, y, block_bytes=block), ref_gram(x, y))


def test_float16_input_never_overflows_and_keeps_digits():
    # Entries of X Xᵀ far beyond float16's 65504, computed from float16 features.
    x = np.full((3, 4000), 200.0, dtype=np.float16)
    x[1] = 1.0
    g = gram_linear(x, block_bytes=8 * 3 * 64)
    assert g.dtype == np.float64 and g[0, 0] == 4000 * 200.0**2 and g[1, 1] == 4000.0


def test_accumulating_feature_pieces_equals_whole():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3, 17)).astype(np.float16)  # e.g. (image, token, channel)
    acc = GramAccumulator(block_bytes=8 * 6 * 5)
    for t in range(3):  # one token's channels at a time
        acc.update(x[:, t])
    assert acc.n_features == 51
    assert_gram_equal(acc.result(), ref_gram(x))
    with pytest.raises(ValueError, match="image counts changed"):
        acc.update(x[:4, 0])
    with pytest.raises(ValueError, match="feature counts"):
        GramAccumulator().update(x[:, 0], x[:, 0, :5])
    with pytest.raises(ValueError, match="before any update"):
        GramAccumulator().result()


def test_tiles_over_image_blocks_assemble_the_full_gram():
    # The off-diagonal tiles X_i X_jᵀ of two image blocks make up the whole Gram matrix.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 13)).astype(np.float16)
    blocks = [slice(0, 4), slice(4, 7), slice(7, 10)]
    full = np.zeros((10, 10))
    for i, bi in enumerate(blocks):
        for bj in blocks[i:]:
            tile = gram_linear(x[bi]) if bi == bj else gram_linear(x[bi], x[bj])
            full[bi, bj] = tile
            full[bj, bi] = tile.T
    assert_gram_equal(full, ref_gram(x))


def test_torch_input_is_accepted():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(4, 6))
    assert_gram_equal(gram_linear(torch.from_numpy(x).requires_grad_()), x @ x.T)


def test_rbf_from_linear_matches_distance_loop():
    x = np.random.default_rng(3).normal(size=(7, 4))
    d2 = np.array([[np.sum((a - b) ** 2) for b in x] for a in x])
    for threshold in (0.5, 1.0, 2.0):
        ref = np.exp(-d2 / (2 * threshold**2 * np.median(d2)))
        np.testing.assert_allclose(rbf_from_linear_gram(x @ x.T, threshold), ref, atol=1e-12)
        np.testing.assert_allclose(gram_rbf(x, threshold), ref, atol=1e-12)
    with pytest.raises(ValueError, match="bandwidth"):
        rbf_from_linear_gram(np.ones((3, 3)))
    with pytest.raises(ValueError, match="kernel"):
        kernel_gram(x, "poly")


def test_centrings_match_explicit_formulas():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 3))
    k = x @ x.T
    n = 8
    h = np.eye(n) - np.ones((n, n)) / n
    np.testing.assert_allclose(center_gram(k), h @ k @ h, atol=1e-12)
    # U-centring, entry by entry (Song et al. 2012, with the diagonal zeroed).
    kt = k.copy()
    np.fill_diagonal(kt, 0.0)
    ref = np.zeros_like(k)
    for i in range(n):
        for j in range(n):
            if i != j:
                ref[i, j] = (
                    kt[i, j]
                    - kt[i].sum() / (n - 2)
                    - kt[:, j].sum() / (n - 2)
                    + kt.sum() / ((n - 1) * (n - 2))
                )
    np.testing.assert_allclose(u_center_gram(k), ref, atol=1e-12)
    with pytest.raises(ValueError, match="square"):
        center_gram(np.ones((2, 3)))


@pytest.mark.parametrize("row_bytes", [8, 8 * 3 * 9, 2**18])
@pytest.mark.parametrize("n", [3, 4, 9])
def test_centred_triangle_is_the_centring_halved(monkeypatch, row_bytes, n):
    """Vector layout: the strict upper triangle row by row (+ diagonal/√2 when biased),
    whatever the row blocks; twice its inner products are the centred Grams' ones."""
    import importlib

    monkeypatch.setattr(
        importlib.import_module("vitcnn_store.analysis.gram"), "_ROW_BLOCK_BYTES", row_bytes
    )
    rng = np.random.default_rng(n)
    x, y = rng.normal(size=(n, 4)), rng.normal(size=(n, 2))
    k, ll = x @ x.T, np.tanh(y) @ np.tanh(y).T
    h = np.eye(n) - np.ones((n, n)) / n
    iu = np.triu_indices(n, 1)
    for unbiased in (True, False):
        kc = u_center_gram(k) if unbiased else h @ k @ h
        lc = u_center_gram(ll) if unbiased else h @ ll @ h
        vk = centred_triangle(k, unbiased=unbiased)
        vl = centred_triangle(ll, unbiased=unbiased)
        expect = kc[iu] if unbiased else np.r_[kc[iu], np.diag(kc) / np.sqrt(2)]
        np.testing.assert_allclose(vk, expect, atol=1e-12)
        assert 2 * vk @ vl == pytest.approx(np.vdot(kc, lc), rel=1e-10, abs=1e-12)
    out = np.empty(n * (n - 1) // 2)
    assert centred_triangle(k, unbiased=True, out=out) is out
    with pytest.raises(ValueError, match="out must have shape"):
        centred_triangle(k, unbiased=False, out=out)


@FAST
@given(
    n=st.integers(1, 8),
    m=st.integers(1, 6),
    p=st.integers(1, 30),
    block_cols=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_shifted_products_equal_reference(n, m, p, block_cols, seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, p)) * 40 + 500).astype(np.float16)
    y = (rng.normal(size=(m, p)) * 40 + 500).astype(np.float16)
    mu = rng.normal(size=p) * 30 + 500
    block = 8 * max(n, m) * block_cols
    xs, ys = x.astype(np.float64) - mu, y.astype(np.float64) - mu
    np.testing.assert_allclose(
        gram_linear(x, shift=mu, block_bytes=block), ref_gram(xs), rtol=1e-9, atol=1e-6
    )
    np.testing.assert_allclose(
        gram_linear(x, y, shift=mu, block_bytes=block), ref_gram(xs, ys), rtol=1e-9, atol=1e-6
    )
    with pytest.raises(ValueError, match="shift has"):
        gram_linear(x, shift=mu[:-1] if p > 1 else np.zeros(2))
