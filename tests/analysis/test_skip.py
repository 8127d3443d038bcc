"""Skip-connection norm ratios against a direct loop."""

from __future__ import annotations

import numpy as np
import pytest

from vitcnn_store.analysis.skip import cls_and_spatial_ratio, skip_norm_ratio, skip_norm_ratio_sum


def loop_reference(z, fz, eps=1e-12):
    n, t = z.shape[0], z.shape[1]
    out = np.zeros(t)
    for i in range(n):
        for j in range(t):
            a = np.sqrt(sum(float(v) ** 2 for v in z[i, j]))
            b = np.sqrt(sum(float(v) ** 2 for v in fz[i, j]))
            out[j] += a / max(b, eps)
    return out / n


def test_token_layer_matches_loop():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 5, 8)) * rng.uniform(0.5, 4, size=(1, 5, 1))
    fz = rng.normal(size=(4, 5, 8))
    np.testing.assert_allclose(
        skip_norm_ratio(z, fz), loop_reference(z, fz), rtol=1e-12, atol=1e-12
    )


def test_spatial_layer_is_flattened_row_major_and_float16_ok():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 2, 3, 6)).astype(np.float16)
    fz = rng.normal(size=(3, 2, 3, 6)).astype(np.float16)
    r = skip_norm_ratio(z, fz)
    assert r.shape == (6,) and r.dtype == np.float64
    ref = loop_reference(z.reshape(3, 6, 6), fz.reshape(3, 6, 6))
    np.testing.assert_allclose(r, ref, rtol=1e-12, atol=1e-12)
    assert skip_norm_ratio(z[:, 0, 0], fz[:, 0, 0]).shape == (1,)  # pooled (n, channel)


def test_zero_branch_is_finite_and_sums_accumulate():
    z = np.ones((2, 3, 4))
    fz = np.ones((2, 3, 4))
    fz[:, 1] = 0.0
    r = skip_norm_ratio(z, fz)
    assert np.all(np.isfinite(r)) and r[1] == pytest.approx(2.0 / 1e-12)
    rng = np.random.default_rng(2)
    z, fz = rng.normal(size=(6, 4, 3)), rng.normal(size=(6, 4, 3))
    (s1, n1), (s2, n2) = skip_norm_ratio_sum(z[:2], fz[:2]), skip_norm_ratio_sum(z[2:], fz[2:])
    np.testing.assert_allclose(
        (s1 + s2) / (n1 + n2), skip_norm_ratio(z, fz), rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="differ"):
        skip_norm_ratio(z, fz[:, :3])


def test_cls_and_spatial_split():
    r = np.array([9.0, 7.0, 1.0, 2.0, 3.0])
    assert cls_and_spatial_ratio(r) == (9.0, 3.25)
    assert cls_and_spatial_ratio(r, n_prefix=2) == (9.0, 2.0)  # register excluded
    cls, spatial = cls_and_spatial_ratio(r, n_prefix=0)
    assert np.isnan(cls) and spatial == pytest.approx(r.mean())
    with pytest.raises(ValueError):
        cls_and_spatial_ratio(r, n_prefix=5)
