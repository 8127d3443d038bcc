"""Attention statistics on hand-built attention patterns."""

from __future__ import annotations

import numpy as np
import pytest

from vitcnn_store.analysis.attention import (
    AttentionAccumulator,
    attention_entropy,
    cls_attention_map,
    mean_attention_distance,
    patch_distance_matrix,
)

GRID, PATCH = 14, 16


def vit_token_yx(grid=GRID, patch=PATCH, n_prefix=1):
    """CLS (NaN) then patch centres, row-major, like a ViT-B/16 at 224 px."""
    c = patch / 2 + patch * np.arange(grid)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    yx = np.stack([yy.ravel(), xx.ravel()], axis=1)
    return np.concatenate([np.full((n_prefix, 2), np.nan), yx])


def reference_uniform_distance(grid=GRID, patch=PATCH):
    """Mean over (query, key) pairs of the Euclidean distance, by explicit loops."""
    pts = [(patch / 2 + patch * i, patch / 2 + patch * j) for i in range(grid) for j in range(grid)]
    total = 0.0
    for qy, qx in pts:
        for ky, kx in pts:
            total += np.hypot(qy - ky, qx - kx)
    return total / len(pts) ** 2


REF = reference_uniform_distance()
YX = vit_token_yx()
T = YX.shape[0]  # 197
# Absolute tolerance of distances in pixels: 1e-12 of the ~200-px scale of a 224-px input
# (a distance can be 0, where a relative tolerance alone allows no rounding at all).
PX = 1e-10


def test_reference_value_is_about_116_5():
    assert abs(REF - 116.5) < 0.5


def test_uniform_over_patches_gives_reference_distance():
    attn = np.zeros((2, 1, T, T))
    attn[..., 1:] = 1.0 / (T - 1)  # no mass on CLS
    mad = mean_attention_distance(attn, YX)
    assert mad.shape == (1,)
    assert abs(mad[0] - 116.5) < 0.5
    assert mad[0] == pytest.approx(REF, rel=1e-12)
    # float16 storage is read in float64: only the input rounding differs
    assert mean_attention_distance(attn.astype(np.float16), YX)[0] == pytest.approx(REF, rel=1e-3)


def test_cls_mass_is_dropped_unless_renormalized():
    attn = np.full((1, 2, T, T), 1.0 / T)  # rows sum to 1 over CLS + 196 patches
    plain = mean_attention_distance(attn, YX)
    renorm = mean_attention_distance(attn, YX, renormalize=True)
    np.testing.assert_allclose(plain, REF * (T - 1) / T, rtol=1e-12, atol=PX)
    np.testing.assert_allclose(renorm, REF, rtol=1e-12, atol=PX)


def test_self_attention_gives_zero_and_heads_are_separate():
    attn = np.zeros((3, 2, T, T))
    attn[:, 0] = np.eye(T)
    attn[:, 1, :, 1:] = 1.0 / (T - 1)
    np.testing.assert_allclose(mean_attention_distance(attn, YX), [0.0, REF], atol=1e-12)


def test_half_self_half_neighbour_is_half_a_patch():
    attn = np.zeros((1, 1, T, T))
    attn[0, 0, 0, 0] = 1.0  # CLS row is dropped anyway
    for q in range(1, T):
        col = (q - 1) % GRID
        nb = q + 1 if col < GRID - 1 else q - 1  # right neighbour, left in the last column
        attn[0, 0, q, q] = 0.5
        attn[0, 0, q, nb] = 0.5
    assert mean_attention_distance(attn, YX)[0] == pytest.approx(0.5 * PATCH, rel=1e-12)


def test_random_attention_against_loop_reference_and_chunking():
    rng = np.random.default_rng(0)
    yx = vit_token_yx(grid=3, patch=8, n_prefix=2)
    t = yx.shape[0]
    attn = rng.dirichlet(np.ones(t), size=(5, 3, t))  # (n, head, q, k), rows sum to 1
    dist = patch_distance_matrix(yx)
    expect = np.zeros(3)
    for img in range(5):
        for h in range(3):
            for qi, q in enumerate(range(2, t)):
                row = attn[img, h, q, 2:]
                expect[h] += sum(row[ki] * dist[qi, ki] for ki in range(t - 2))
    expect /= 5 * (t - 2)
    np.testing.assert_allclose(mean_attention_distance(attn, yx), expect, rtol=1e-12, atol=PX)
    # Chunked accumulation (and merging partial accumulators) equals the one-shot value.
    a, b = AttentionAccumulator(yx, cls_index=0), AttentionAccumulator(yx, cls_index=0)
    a.update(attn[:2])
    b.update(attn[2:4])
    b.update(attn[4:])
    a.merge(b)
    assert a.n_images == 5
    np.testing.assert_allclose(a.mean_distance(), expect, rtol=1e-12, atol=PX)
    np.testing.assert_allclose(a.entropy(), attention_entropy(attn, yx), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.cls_map(), cls_attention_map(attn, yx), rtol=1e-12, atol=1e-12)


def test_patch_distance_matrix():
    d = patch_distance_matrix(vit_token_yx(grid=2, patch=16))
    s = 16 * np.sqrt(2)
    np.testing.assert_allclose(
        d, [[0, 16, 16, s], [16, 0, s, 16], [16, s, 0, 16], [s, 16, 16, 0]], atol=PX
    )


def test_entropy():
    uniform_patches = np.zeros((2, 1, T, T))
    uniform_patches[..., 1:] = 1.0 / (T - 1)
    assert attention_entropy(uniform_patches, YX)[0] == pytest.approx(np.log(T - 1))
    uniform_all = np.full((1, 1, T, T), 1.0 / T)
    assert attention_entropy(uniform_all)[0] == pytest.approx(np.log(T))
    # Without renormalization the CLS term is simply dropped from the sum.
    assert attention_entropy(uniform_all, YX)[0] == pytest.approx((T - 1) / T * np.log(T))
    assert attention_entropy(uniform_all, YX, renormalize=True)[0] == pytest.approx(np.log(T - 1))
    assert attention_entropy(np.eye(T)[None, None], YX)[0] == 0.0


def test_cls_attention_map_layout():
    attn = np.zeros((2, 2, T, T))
    w = np.arange(1, T, dtype=float)
    attn[0, :, 0, 1:] = w / w.sum()
    attn[1, :, 0, 1:] = 3 * w / w.sum()
    m = cls_attention_map(attn, YX)
    assert m.shape == (2, GRID, GRID)
    np.testing.assert_allclose(m[0], (2 * w / w.sum()).reshape(GRID, GRID), atol=1e-12)
    assert m[0, 0, 1] > m[0, 0, 0] and m[0, 1, 0] > m[0, 0, GRID - 1]  # row-major layout
    attn[:, :, 0, 0] = 0.5  # CLS self-mass: renormalize rescales the patch part to sum 1
    r = cls_attention_map(attn, YX, renormalize=True)
    np.testing.assert_allclose(r.sum(axis=(1, 2)), [1.0, 1.0], atol=1e-12)


def test_torch_input_and_validation():
    torch = pytest.importorskip("torch")
    attn = np.zeros((1, 1, T, T))
    attn[..., 1:] = 1.0 / (T - 1)
    assert mean_attention_distance(torch.from_numpy(attn), YX)[0] == pytest.approx(REF)
    with pytest.raises(ValueError, match="tokens"):
        mean_attention_distance(attn[..., 1:, 1:], YX)
    with pytest.raises(ValueError, match="token_yx"):
        AttentionAccumulator(None)
    with pytest.raises(ValueError, match="no attention"):
        AttentionAccumulator(YX).mean_distance()


# --- the uniform-attention baseline ---------------------------------------------------

from vitcnn_store.analysis.attention import uniform_attention_baseline  # noqa: E402


def _grid(side: int, patch: int, prefix: int) -> np.ndarray:
    c = (np.arange(side) + 0.5) * patch
    yx = np.stack(np.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    return np.vstack([np.full((prefix, 2), np.nan), yx])


@pytest.mark.parametrize(
    ("side", "patch", "prefix", "renormalize", "expected"),
    [
        (14, 16, 1, True, 116.49),  # ViT-B/16 at 224 px (docs/science.md)
        (14, 16, 1, False, 115.90),  # the same, CLS mass not renormalized away
        (8, 16, 1, False, 65.17),  # the demo's ViT-S/16 at 128 px
        (16, 14, 0, False, None),  # ViT-H/14 at 224 px, no prefix token
        (5, 16, 5, False, None),  # CLS plus four registers
    ],
)
def test_uniform_baseline_matches_brute_force(side, patch, prefix, renormalize, expected):
    from scipy.spatial.distance import pdist

    yx = _grid(side, patch, prefix)
    dist, ent = uniform_attention_baseline(yx, renormalize=renormalize)
    pos = yx[prefix:]
    p, t = len(pos), len(yx)
    mean_pair = 2 * pdist(pos).sum() / p**2  # scipy, a different code path
    assert dist == pytest.approx(mean_pair * (1 if renormalize else p / t), rel=1e-12)
    assert ent == pytest.approx(np.log(p) if renormalize else p / t * np.log(t), rel=1e-12)
    if expected is not None:
        assert dist == pytest.approx(expected, abs=0.005)
    # The accumulator reads exactly the baseline on uniform attention.
    acc = AttentionAccumulator(yx, renormalize=renormalize)
    acc.update(np.full((2, 1, t, t), 1.0 / t))
    assert acc.mean_distance()[0] == pytest.approx(dist, rel=1e-10)
    assert acc.entropy()[0] == pytest.approx(ent, rel=1e-10)


def _reference_key_masses(attn, yx, cls_index):
    """CLS-key and prefix-key mass per head, and the two MADs, by explicit loops over
    images, heads and patch queries (numpy only; independent of the accumulator)."""
    n, heads, tokens, _ = attn.shape
    patches = [t for t in range(tokens) if not np.isnan(yx[t]).any()]
    cls = np.zeros(heads)
    prefix = np.zeros(heads)
    plain = np.zeros(heads)
    renorm = np.zeros(heads)
    for i in range(n):
        for h in range(heads):
            for q in patches:
                row = attn[i, h, q].astype(np.float64)
                cls[h] += row[cls_index]
                prefix[h] += sum(row[k] for k in range(tokens) if k not in patches)
                on_patches = sum(row[k] for k in patches)
                d = sum(row[k] * np.hypot(*(yx[q] - yx[k])) for k in patches)
                plain[h] += d
                renorm[h] += d / on_patches
    count = n * len(patches)
    return cls / count, prefix / count, plain / count, renorm / count


@pytest.mark.parametrize("n_prefix", [1, 3])  # CLS only; CLS and two registers
def test_cls_key_mass_against_loops(n_prefix):
    from vitcnn_store.analysis.attention import cls_key_mass

    rng = np.random.default_rng(7)
    yx = vit_token_yx(grid=4, patch=8, n_prefix=n_prefix)
    t = yx.shape[0]
    logits = rng.normal(size=(3, 4, t, t))
    logits[:, 0, :, 0] += 4.0  # head 0 sends most of its attention to CLS
    attn = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    cls, prefix, plain, renorm = _reference_key_masses(attn, yx, 0)
    np.testing.assert_allclose(cls_key_mass(attn, yx), cls, rtol=1e-12, atol=1e-12)
    acc = AttentionAccumulator(yx, cls_index=0)
    acc.update(attn[:2])
    other = AttentionAccumulator(yx, cls_index=0)
    other.update(attn[2:])
    acc.merge(other)
    np.testing.assert_allclose(acc.cls_key_mass(), cls, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.prefix_key_mass(), prefix, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.mean_distance(), plain, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        mean_attention_distance(attn, yx, renormalize=True), renorm, rtol=1e-12, atol=1e-12
    )
    # The head on CLS reads as far more local than the others without renormalization,
    # and like them with it (its patch attention is as random as theirs).
    assert cls[0] > 0.5 and plain[0] < 0.5 * plain[1:].min()
    assert abs(renorm[0] - renorm[1:].mean()) < 0.1 * renorm[1:].mean()
    # Renormalizing does not change what was on CLS: the mass is of the stored rows.
    renormed = AttentionAccumulator(yx, cls_index=0, renormalize=True)
    renormed.update(attn)
    np.testing.assert_allclose(renormed.cls_key_mass(), cls, rtol=1e-12, atol=1e-12)
