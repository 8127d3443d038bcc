"""Localization maps: CKA between one token and every input patch."""

from __future__ import annotations

import numpy as np
import pytest

from vitcnn_store.analysis.cka import unbiased_linear_cka
from vitcnn_store.analysis.localization import MinibatchLocalization, image_to_patches

GRID, PATCH = 4, 4


def synthetic(n=64, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, size=(n, GRID * PATCH, GRID * PATCH, 3)).astype(np.float32)
    patches = image_to_patches(images, PATCH)
    return rng, images, patches


def test_image_to_patches_matches_loop():
    _, images, patches = synthetic(n=3)
    assert patches.shape == (3, GRID * GRID, PATCH * PATCH * 3)
    assert patches.dtype == np.float32
    for i in range(3):
        for gy in range(GRID):
            for gx in range(GRID):
                block = images[i, gy * PATCH : (gy + 1) * PATCH, gx * PATCH : (gx + 1) * PATCH]
                np.testing.assert_array_equal(patches[i, gy * GRID + gx], block.reshape(-1))
    with pytest.raises(ValueError, match="multiple"):
        image_to_patches(images[:, :15], PATCH)


def localization_map(token, patches):
    acc = MinibatchLocalization()
    acc.update(token, patches)
    return acc.result()


def test_token_copying_patch_i_peaks_at_patch_i():
    rng, _, patches = synthetic()
    for i in (0, 5, 15):
        token = patches[:, i] @ rng.normal(size=(patches.shape[2], 32))
        token += 0.5 * rng.normal(size=token.shape)
        heat = localization_map(token, patches)
        assert heat.shape == (GRID * GRID,)
        assert int(np.argmax(heat)) == i
        assert heat[i] > 0.5 > np.max(np.delete(heat, i))


def test_map_equals_per_patch_cka():
    rng, _, patches = synthetic(n=20, seed=3)
    token = np.tanh(patches[:, :3].reshape(20, -1) @ rng.normal(size=(3 * 48, 10)))
    expect = [unbiased_linear_cka(token, patches[:, p]) for p in range(patches.shape[1])]
    np.testing.assert_allclose(localization_map(token, patches), expect, rtol=1e-10, atol=1e-10)


def test_minibatch_several_tokens_and_merge():
    rng, _, patches = synthetic(n=48, seed=1)
    tokens = [patches[:, i] + 0.3 * rng.normal(size=patches[:, i].shape) for i in (2, 9)]
    whole, a, b = MinibatchLocalization(), MinibatchLocalization(), MinibatchLocalization()
    for k, s in enumerate(range(0, 48, 16)):
        batch = [t[s : s + 16] for t in tokens]
        whole.update(batch, patches[s : s + 16])
        (a if k == 0 else b).update(batch, patches[s : s + 16])
    res = whole.result()
    assert res.shape == (2, GRID * GRID)
    assert list(np.argmax(res, axis=1)) == [2, 9]
    np.testing.assert_allclose(a.merge(b).result(), res, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="equal batch sizes"):
        whole.update([t[:8] for t in tokens], patches[:8])
    with pytest.raises(ValueError, match="mix"):
        whole.update(tokens[0][:16], patches[:16])
