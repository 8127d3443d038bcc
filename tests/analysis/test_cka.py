"""CKA kernels against explicit-centring-matrix references (float64, small n)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vitcnn_store.analysis.cka import (
    CONSTANT_RTOL,
    ConstantRepresentationWarning,
    MinibatchCKA,
    MinibatchCKAMatrix,
    cka,
    cka_matrix_from_grams,
    hsic,
    linear_cka,
    sample_batches,
    unbiased_linear_cka,
)
from vitcnn_store.analysis.gram import (
    center_gram,
    gram_linear,
    gram_rbf,
    kernel_gram,
    u_center_gram,
)

FAST = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------- references
def ref_gram(X):
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    return X @ X.T


def ref_biased_hsic(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def ref_hsic1(K, L):
    """Song et al. (2012) unbiased HSIC, written out term by term."""
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    one = np.ones(n)
    term1 = np.trace(Kt @ Lt)
    term2 = (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ Kt @ Lt @ one)
    return (term1 + term2 - term3) / (n * (n - 3))


def ref_cka(X, Y, hsic_fn):
    K, L = ref_gram(X), ref_gram(Y)
    return hsic_fn(K, L) / np.sqrt(hsic_fn(K, K) * hsic_fn(L, L))


def cka_matrix(reps_a, reps_b=None, *, kernel="linear", unbiased=False):
    """All-pairs CKA of representations through the Gram-level kernel."""

    def grams(reps):
        return [kernel_gram(x, kernel) for x in reps]

    b = None if reps_b is None else grams(reps_b)
    return cka_matrix_from_grams(grams(reps_a), b, unbiased=unbiased)


def random_reps(seed, n=12, p1=5, p2=7):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p1)) * rng.uniform(0.5, 3.0, size=p1)
    Y = X @ rng.normal(size=(p1, p2)) + rng.normal(size=(n, p2))
    return X, Y


def random_orthogonal(seed, p):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(p, p)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------- vs reference
@pytest.mark.parametrize("seed", range(5))
def test_estimators_match_references(seed):
    X, Y = random_reps(seed)
    assert linear_cka(X, Y) == pytest.approx(ref_cka(X, Y, ref_biased_hsic), rel=1e-10)
    assert unbiased_linear_cka(X, Y) == pytest.approx(ref_cka(X, Y, ref_hsic1), rel=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_hsic_and_centring_match_references(seed):
    X, Y = random_reps(seed, n=9)
    K, L = ref_gram(X), ref_gram(Y)
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    np.testing.assert_allclose(center_gram(K), H @ K @ H, atol=1e-10)
    np.testing.assert_allclose(gram_linear(X), K, atol=1e-12 * np.abs(K).max())
    assert hsic(K, L) == pytest.approx(ref_biased_hsic(K, L), rel=1e-10)
    assert hsic(K, L, unbiased=True) == pytest.approx(ref_hsic1(K, L), rel=1e-10)
    ku, lu = u_center_gram(K), u_center_gram(L)
    assert np.all(np.diag(ku) == 0)
    assert np.vdot(ku, lu) / (n * (n - 3)) == pytest.approx(ref_hsic1(K, L), rel=1e-10)


def test_biased_equals_direct_trace_and_feature_space_formula():
    X, Y = random_reps(7, n=15, p1=4, p2=3)
    n = len(X)
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    direct = np.trace(K @ H @ L @ H) / np.sqrt(np.trace(K @ H @ K @ H) * np.trace(L @ H @ L @ H))
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    feature = np.linalg.norm(Yc.T @ Xc) ** 2 / (
        np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc)
    )
    assert linear_cka(X, Y) == pytest.approx(direct, rel=1e-10)
    assert linear_cka(X, Y) == pytest.approx(feature, rel=1e-10)


def test_gram_rbf_matches_loop_reference():
    X = np.random.default_rng(3).normal(size=(8, 3))
    d2 = np.array([[np.sum((a - b) ** 2) for b in X] for a in X])
    ref = np.exp(-d2 / (2 * 0.5**2 * np.median(d2)))
    np.testing.assert_allclose(gram_rbf(X, threshold=0.5), ref, atol=1e-12)
    K, L = gram_rbf(X), gram_rbf(np.tanh(X))
    expect = ref_biased_hsic(K, L) / np.sqrt(ref_biased_hsic(K, K) * ref_biased_hsic(L, L))
    assert cka(X, np.tanh(X), kernel="rbf") == pytest.approx(expect, rel=1e-10)
    with pytest.raises(ValueError, match="kernel"):
        cka(X, X, kernel="poly")  # type: ignore[arg-type]


def test_flattens_non_first_dims_and_accepts_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 3, 4))
    Y = rng.normal(size=(10, 2, 2, 2))
    expect = ref_cka(X, Y, ref_hsic1)
    assert unbiased_linear_cka(X, Y) == pytest.approx(expect, rel=1e-10)
    tx, ty = torch.from_numpy(X).requires_grad_(), torch.from_numpy(Y)
    assert unbiased_linear_cka(tx, ty) == pytest.approx(expect, rel=1e-10)
    assert linear_cka(tx.to(torch.bfloat16), ty) == pytest.approx(
        linear_cka(tx.to(torch.bfloat16).float().detach().numpy(), Y), rel=1e-12
    )


def test_float16_input_gives_float64_result_of_cast_input():
    rng = np.random.default_rng(1)
    # Large values: a float16 Gram would overflow (> 65504).
    X = (rng.normal(size=(20, 300)) * 30).astype(np.float16)
    Y = (rng.normal(size=(20, 50)) * 30).astype(np.float16)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    assert np.isfinite(linear_cka(X, Y))
    assert linear_cka(X, Y) == pytest.approx(ref_cka(X64, Y64, ref_biased_hsic), rel=1e-10)
    assert unbiased_linear_cka(X, Y) == pytest.approx(unbiased_linear_cka(X64, Y64), rel=1e-12)
    m16 = cka_matrix([X, Y], unbiased=True)
    np.testing.assert_allclose(m16, cka_matrix([X64, Y64], unbiased=True), rtol=1e-12, atol=1e-12)


def test_constant_representation_gives_nan_and_small_n_raises():
    X = np.random.default_rng(0).normal(size=(6, 2))
    with pytest.warns(ConstantRepresentationWarning, match="constant"):
        assert np.isnan(linear_cka(X, np.ones((6, 3))))
    with pytest.warns(ConstantRepresentationWarning):
        assert np.isnan(unbiased_linear_cka(X, np.ones((6, 3))))
    with pytest.raises(ValueError, match="n >= 4"):
        unbiased_linear_cka(X[:3], X[:3])
    with pytest.raises(ValueError, match="different numbers of images"):
        linear_cka(X, X[:5])


# ---------------------------------------------------------------- properties
shapes = st.tuples(st.integers(6, 14), st.integers(1, 6), st.integers(1, 6))


@FAST
@given(
    shape=shapes,
    seed=st.integers(0, 2**31),
    unbiased=st.booleans(),
    kernel=st.sampled_from(["linear", "rbf"]),
)
def test_self_similarity_is_one(shape, seed, unbiased, kernel):
    n, p1, _ = shape
    X = np.random.default_rng(seed).normal(size=(n, p1))
    assert cka(X, X, kernel=kernel, unbiased=unbiased) == pytest.approx(1.0, abs=1e-9)


@FAST
@given(
    shape=shapes,
    seed=st.integers(0, 2**31),
    unbiased=st.booleans(),
    kernel=st.sampled_from(["linear", "rbf"]),
    scale=st.floats(1e-3, 1e3),
    scale_y=st.floats(1e-3, 1e3),
)
def test_invariances_and_symmetry(shape, seed, unbiased, kernel, scale, scale_y):
    n, p1, p2 = shape
    X, Y = random_reps(seed, n, p1, p2)
    base = cka(X, Y, kernel=kernel, unbiased=unbiased)
    Q = random_orthogonal(seed + 1, p1)
    assert cka(X @ Q, Y, kernel=kernel, unbiased=unbiased) == pytest.approx(base, abs=1e-8)
    assert cka(scale * X, scale_y * Y, kernel=kernel, unbiased=unbiased) == pytest.approx(
        base, abs=1e-8
    )
    assert cka(Y, X, kernel=kernel, unbiased=unbiased) == pytest.approx(base, abs=1e-12)
    if not unbiased:  # the biased linear CKA is a normalized inner product: in [0, 1]
        assert -1e-12 <= base <= 1 + 1e-12


# ---------------------------------------------------------------- minibatch
@FAST
@given(n=st.integers(4, 12), seed=st.integers(0, 2**31))
def test_minibatch_one_batch_equals_unbiased(n, seed):
    X, Y = random_reps(seed, n)
    acc = MinibatchCKA()
    acc.update(X, Y)
    assert acc.result() == pytest.approx(unbiased_linear_cka(X, Y), rel=1e-10)
    assert acc.n_batches == 1 and acc.batch_size == n


def test_minibatch_several_batches_is_ratio_of_summed_reference_hsic1():
    rng = np.random.default_rng(5)
    acc, other = MinibatchCKA(), MinibatchCKA()
    sums = np.zeros(3)
    per_batch = []
    for b in range(4):
        X = rng.normal(size=(10, 6))
        Y = np.tanh(X @ rng.normal(size=(6, 4))) + 0.3 * rng.normal(size=(10, 4))
        (acc if b < 2 else other).update(X, Y.astype(np.float32))
        K, L = ref_gram(X), ref_gram(Y.astype(np.float32))
        sums += [ref_hsic1(K, L), ref_hsic1(K, K), ref_hsic1(L, L)]
        per_batch.append(unbiased_linear_cka(X, Y.astype(np.float32)))
    expect = sums[0] / np.sqrt(sums[1] * sums[2])
    merged = acc.merge(other)
    assert merged.n_batches == 4
    assert merged.result() == pytest.approx(expect, rel=1e-10)
    assert merged.result() != pytest.approx(np.mean(per_batch), rel=1e-6)  # not a mean of CKAs


def test_minibatch_errors_and_precomputed_grams():
    rng = np.random.default_rng(0)
    acc = MinibatchCKA()
    with pytest.raises(ValueError, match="before any update"):
        acc.result()
    X = rng.normal(size=(8, 3))
    acc.update_gram(X @ X.T, np.tanh(X) @ np.tanh(X).T)
    with pytest.raises(ValueError, match="equal batch sizes"):
        acc.update(X[:6], X[:6])
    with pytest.raises(ValueError, match="n >= 4"):
        MinibatchCKA().update(X[:3], X[:3])
    assert acc.result() == pytest.approx(unbiased_linear_cka(X, np.tanh(X)), rel=1e-10)


# ---------------------------------------------------------------- all pairs
def _layers(rng, n, count):
    base = rng.normal(size=(n, 4))
    return [
        np.tanh(base @ rng.normal(size=(4, 3 + i))) + 0.2 * rng.normal(size=(n, 3 + i))
        for i in range(count)
    ]


def test_all_pairs_matrix_equals_per_pair_minibatch():
    rng = np.random.default_rng(11)
    batches = [(_layers(rng, 9, 3), _layers(rng, 9, 2)) for _ in range(3)]
    cross, within = MinibatchCKAMatrix(), MinibatchCKAMatrix()
    pair = {(i, j): MinibatchCKA() for i in range(3) for j in range(2)}
    for a, b in batches:
        cross.update(a, b)
        within.update(a)
        for (i, j), acc in pair.items():
            acc.update(a[i], b[j])
    expect = np.array([[pair[i, j].result() for j in range(2)] for i in range(3)])
    np.testing.assert_allclose(cross.result(), expect, rtol=1e-10, atol=1e-10)
    w = within.result()
    assert w.shape == (3, 3)
    np.testing.assert_allclose(w, w.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.diag(w), 1.0, rtol=1e-12, atol=1e-12)
    one = MinibatchCKA()
    for a, _ in batches:
        one.update(a[0], a[2])
    assert w[0, 2] == pytest.approx(one.result(), rel=1e-10)


def test_all_pairs_merge_and_grams_and_errors():
    rng = np.random.default_rng(2)
    batches = [_layers(rng, 8, 2) for _ in range(4)]
    full, left, right = MinibatchCKAMatrix(), MinibatchCKAMatrix(), MinibatchCKAMatrix()
    for k, a in enumerate(batches):
        full.update(a)
        (left if k < 2 else right).update_grams([x @ x.T for x in a])
    np.testing.assert_allclose(left.merge(right).result(), full.result(), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="equal batch sizes"):
        full.update([b[:6] for b in batches[0]])
    with pytest.raises(ValueError, match="layer counts"):
        full.update(batches[0][:1])


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_one_shot_cka_matrix_equals_per_pair(unbiased, kernel):
    rng = np.random.default_rng(4)
    a, b = _layers(rng, 11, 3), _layers(rng, 11, 2)
    m = cka_matrix(a, b, kernel=kernel, unbiased=unbiased)
    expect = [[cka(x, y, kernel=kernel, unbiased=unbiased) for y in b] for x in a]
    np.testing.assert_allclose(m, expect, rtol=1e-10, atol=1e-10)
    if not unbiased and kernel == "linear":
        ref = [[ref_cka(x, y, ref_biased_hsic) for y in a] for x in a]
        np.testing.assert_allclose(cka_matrix(a), ref, rtol=1e-10, atol=1e-10)


def test_matrix_from_grams_against_explicit_references():
    rng = np.random.default_rng(9)
    a, b = _layers(rng, 10, 3), _layers(rng, 10, 4)
    ka, kb = [ref_gram(x) for x in a], [ref_gram(y) for y in b]
    for unbiased, ref in ((False, ref_biased_hsic), (True, ref_hsic1)):
        expect = [[ref(K, L) / np.sqrt(ref(K, K) * ref(L, L)) for L in kb] for K in ka]
        np.testing.assert_allclose(
            cka_matrix_from_grams(ka, kb, unbiased=unbiased), expect, rtol=1e-10, atol=1e-10
        )
        within = cka_matrix_from_grams(ka, unbiased=unbiased)
        np.testing.assert_allclose(
            within, cka_matrix_from_grams(ka, ka, unbiased=unbiased), rtol=1e-12, atol=1e-12
        )
    with pytest.raises(ValueError, match="different numbers of images"):
        cka_matrix_from_grams(ka, [g[:9, :9] for g in kb])
    with pytest.raises(ValueError, match="n >= 4"):
        cka_matrix_from_grams([g[:3, :3] for g in ka], unbiased=True)


def test_second_side_taken_in_pieces_equals_one_stack(monkeypatch):
    import importlib

    # The package exports the function `cka`, which shadows the module's attribute name.
    cka_module = importlib.import_module("vitcnn_store.analysis.cka")
    rng = np.random.default_rng(3)
    a, b = _layers(rng, 12, 2), _layers(rng, 12, 5)
    ka, kb = [ref_gram(x) for x in a], [ref_gram(y) for y in b]
    whole = cka_matrix_from_grams(ka, kb, unbiased=True)
    monkeypatch.setattr(cka_module, "_STACK_BYTES", 1)  # one Gram of the second side at a time
    np.testing.assert_allclose(
        cka_matrix_from_grams(ka, kb, unbiased=True), whole, rtol=1e-12, atol=1e-12
    )


@FAST
@given(
    n=st.integers(1, 40),
    batch=st.integers(1, 12),
    repeats=st.integers(1, 3),
    seed=st.integers(0, 2**31),
    cap=st.one_of(st.none(), st.integers(1, 5)),
)
def test_sample_batches_are_equal_disjoint_and_sorted(n, batch, repeats, seed, cap):
    reps = sample_batches(n, batch, repeats, seed, cap)
    assert len(reps) == repeats
    for rep in reps:
        assert len(rep) == min(n // batch, cap if cap is not None else n)
        seen = np.concatenate(rep) if rep else np.array([], int)
        assert len(set(seen.tolist())) == seen.size and (seen < n).all()
        assert all(b.size == batch and (np.diff(b) > 0).all() for b in rep)
    assert [[b.tolist() for b in r] for r in sample_batches(n, batch, repeats, seed, cap)] == [
        [b.tolist() for b in r] for r in reps
    ]


# ---------------------------------------------------------------- constant representations
@pytest.mark.parametrize("value", [1.0, 1000.5, 3e4, -7.25])
def test_constant_within_rounding_is_nan_not_one(value):
    # A large constant leaves ~1e-16 of its Gram after centring: never ±1, always NaN.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 5))
    C = np.full((16, 300), value, dtype=np.float16)
    for fn in (linear_cka, unbiased_linear_cka):
        with pytest.warns(ConstantRepresentationWarning):
            assert np.isnan(fn(C, X)) and np.isnan(fn(X, C)) and np.isnan(fn(C, C))
    acc = MinibatchCKAMatrix()
    with np.errstate(all="ignore"):
        for b in range(2):
            acc.update([X[8 * b : 8 * b + 8], C[8 * b : 8 * b + 8], X[8 * b : 8 * b + 8] ** 2])
    with pytest.warns(ConstantRepresentationWarning, match="1 on the first side, 1 on the"):
        m = acc.result()
    assert np.isnan(m[1]).all() and np.isnan(m[:, 1]).all()
    assert np.isfinite(m[np.ix_([0, 2], [0, 2])]).all()


def test_smallest_float16_variation_is_not_constant():
    # One float16 ulp (0.5 at 1000) on some images of a 2000-feature layer: tiny, but real.
    import warnings

    C = np.full((12, 2000), 1000.0, dtype=np.float16)
    C[[3, 5, 8]] = np.nextafter(np.float16(1000.0), np.float16(2000.0))
    X = np.zeros((12, 1))
    X[[3, 5, 8]] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantRepresentationWarning)
        assert linear_cka(C, X) == pytest.approx(1.0, abs=1e-9)
        assert unbiased_linear_cka(C, X) == pytest.approx(1.0, abs=1e-9)
    # A spread of 1e-7 of the norm (float64 data) is constant within the tolerance.
    Y = 1.0 + 1e-7 * np.random.default_rng(0).normal(size=(12, 50))
    with pytest.warns(ConstantRepresentationWarning):
        assert np.isnan(linear_cka(Y, X))
    assert CONSTANT_RTOL == 1e-10
