"""Centered kernel alignment (CKA) between representations.

CKA compares two representations ``X`` (n, p1) and ``Y`` (n, p2) of the same n
images through their Gram matrices K, L (:mod:`vitcnn_store.analysis.gram`):

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L))

Two HSIC estimators are offered:

* biased: ``tr(K H L H) / (n-1)^2`` with ``H = I - 11ᵀ/n`` (Kornblith et al. 2019);
* unbiased HSIC₁ of Song et al. (2012), computed as ``<Kᵤ, Lᵤ>_F / (n(n-3))`` from
  U-centred Grams. Being unbiased, it can be summed over minibatches
  (Nguyen, Raghu & Kornblith 2020): :class:`MinibatchCKAMatrix` for every
  layer pair at once, :class:`MinibatchCKA` for one pair.

Every estimate here goes through one routine: centre each Gram once, keep its
upper triangle as a vector, and take all the inner products a batch needs as
one matrix product (``V_a V_bᵀ``); :func:`cka_matrix_from_grams` is the
one-shot form, the accumulators sum the same products over batches.

Representations may be numpy arrays or torch tensors of shape (n, ...); every
non-first dim is flattened and values are cast to float64 before any product
(float16 products overflow and lose precision).

A representation that is constant over the images has no CKA: its centred Gram
is zero, and what rounding leaves of it (~1e-16 of the Gram) would otherwise
give ±1. Every estimate here is NaN, with a :class:`ConstantRepresentationWarning`,
when ``<K_c, K_c> <= CONSTANT_RTOL² · tr(K)²`` (both with the estimator's
normalisation, summed over batches): the centred Gram is below ``CONSTANT_RTOL``
(1e-10) of the representation's own scale, i.e. the rows spread by less than
about 1e-5 of their norm (:func:`cka_from_sums`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from vitcnn_store.analysis._arrays import FloatArray, as_square
from vitcnn_store.analysis.gram import (
    Kernel,
    center_gram,
    centred_triangle,
    gram_linear,
    gram_rbf,
    kernel_gram,
    u_center_gram,
)
from vitcnn_store.defaults import MIN_HSIC_SAMPLES

__all__ = [
    "CONSTANT_RTOL",
    "MIN_SAMPLES",
    "ConstantRepresentationWarning",
    "MinibatchCKA",
    "MinibatchCKAMatrix",
    "center_gram",
    "check_hsic_n",
    "cka",
    "cka_from_sums",
    "cka_matrix_from_grams",
    "constant_mask",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "hsic_scale",
    "linear_cka",
    "sample_batches",
    "u_center_gram",
    "unbiased_linear_cka",
]

_STACK_BYTES = 8 * 2**20  # centred-Gram vectors of the second side stacked at once
# ‖centred Gram‖_F / tr(Gram) below this is a constant representation. The ratio is about
# s² for a spread s of the rows relative to their norm (float16's one ulp: s ≈ 5e-4 → 2e-7);
# rounding leaves ~1e-16 · √p (~1e-13 for 10⁶ features).
CONSTANT_RTOL = 1e-10


#: Fewest images per (batch) Gram of each HSIC estimator, by ``unbiased``.
MIN_SAMPLES = MIN_HSIC_SAMPLES


def check_hsic_n(n: int, *, unbiased: bool) -> None:
    """Refuse a Gram of ``n`` images too small for the estimator (:data:`MIN_SAMPLES`)."""
    if n < MIN_SAMPLES[unbiased]:
        what = "unbiased" if unbiased else "biased"
        raise ValueError(
            f"the {what} HSIC estimator needs n >= {MIN_SAMPLES[unbiased]} samples, got {n}"
        )


def hsic_scale(n: int, *, unbiased: bool) -> float:
    """The normalisation of ``<centred K, centred L>_F``: 1/(n(n-3)) or 1/(n-1)².

    Examples
    --------
    >>> hsic_scale(5, unbiased=True), hsic_scale(5, unbiased=False)
    (0.1, 0.0625)
    """
    check_hsic_n(n, unbiased=unbiased)
    return 1.0 / (n * (n - 3)) if unbiased else 1.0 / (n - 1) ** 2


class ConstantRepresentationWarning(RuntimeWarning):
    """A representation is constant over the images (within ``CONSTANT_RTOL``): CKA is NaN."""


def constant_mask(self_terms: Any, scales: Any, rtol: float = CONSTANT_RTOL) -> np.ndarray:
    """Where ``<K_c, K_c> <= rtol² · tr(K)²``: a representation constant over the images.

    ``self_terms`` and ``scales`` carry the same normalisation (and the same
    sums over batches). NaN self terms count as constant.

    Examples
    --------
    >>> constant_mask([1e-30, 0.5], [1.0, 1.0]).tolist()
    [True, False]
    """
    terms = np.asarray(self_terms, dtype=np.float64)
    return ~(terms > rtol**2 * np.asarray(scales, dtype=np.float64))


def cka_from_sums(
    xy: Any, xx: Any, yy: Any, scale_x: Any, scale_y: Any, *, warn: bool = True
) -> np.ndarray:
    """CKA matrix ``xy / sqrt(xx · yy)`` from HSIC sums, NaN for constant representations.

    ``xy`` (L_a, L_b) are the cross terms, ``xx`` (L_a,) and ``yy`` (L_b,) the
    self terms, ``scale_x``/``scale_y`` the squared traces of the raw Grams, all
    with the same normalisation (any common factor cancels). A row or column
    whose representation is constant (:func:`constant_mask`) is NaN, and a
    :class:`ConstantRepresentationWarning` says how many there are.

    Examples
    --------
    >>> cka_from_sums([[2.0, 0.0]], [4.0], [1.0, 0.0], [1.0], [1.0, 1.0], warn=False).tolist()
    [[1.0, nan]]
    """
    const_x = constant_mask(xx, scale_x)
    const_y = constant_mask(yy, scale_y)
    x = np.where(const_x, 1.0, np.asarray(xx, dtype=np.float64))
    y = np.where(const_y, 1.0, np.asarray(yy, dtype=np.float64))
    out = np.asarray(xy, dtype=np.float64) / np.sqrt(x[:, None] * y[None, :])
    out[const_x, :] = np.nan
    out[:, const_y] = np.nan
    if warn and (const_x.any() or const_y.any()):
        warnings.warn(
            f"constant representation(s) over the images ({int(const_x.sum())} on the first "
            f"side, {int(const_y.sum())} on the second; centred Gram below {CONSTANT_RTOL:g} "
            "of its trace): their CKA is NaN",
            ConstantRepresentationWarning,
            stacklevel=3,
        )
    return out


def _centred_vectors(
    grams: Sequence[Any], n: int, *, unbiased: bool, start: int = 0, stop: int | None = None
) -> tuple[FloatArray, FloatArray]:
    """``grams[start:stop]`` as rows of :func:`~vitcnn_store.analysis.gram.centred_triangle`
    vectors, so that ``2 · V[i] · V[j] = <G_i, G_j>_F`` of the centred Grams, and the
    traces of the raw Grams.

    Each Gram is taken from ``grams`` just before it is centred, so a sequence
    that computes Grams on access keeps one in cache.
    """
    stop = len(grams) if stop is None else stop
    V = np.empty((stop - start, n * (n - 1) // 2 + (0 if unbiased else n)), dtype=np.float64)
    traces = np.empty(stop - start)
    for i, j in enumerate(range(start, stop)):
        a = as_square(grams[j])
        if a.shape[0] != n:
            raise ValueError(
                f"the Gram matrices have different numbers of images: {a.shape[0]} vs {n}"
            )
        centred_triangle(a, unbiased=unbiased, out=V[i])
        traces[i] = np.trace(a)
    return V, traces


class _Products:
    """Inner products of centred Grams of one batch, and the raw Grams' squared traces."""

    def __init__(
        self, ab: FloatArray, aa: FloatArray, bb: FloatArray, ta: FloatArray, tb: FloatArray, n: int
    ) -> None:
        self.ab, self.aa, self.bb, self.n = ab, aa, bb, n
        self.scale_a, self.scale_b = ta**2, tb**2


def _inner_products(
    grams_a: Sequence[Any], grams_b: Sequence[Any] | None, *, unbiased: bool
) -> _Products:
    """``<Gᵃᵢ, Gᵇⱼ>``, ``<Gᵃᵢ, Gᵃᵢ>``, ``<Gᵇⱼ, Gᵇⱼ>`` of centred Grams, traces and n.

    Each Gram is centred once. The second side is taken a few Grams at a time,
    so a long (possibly lazily computed) sequence of them never sits in memory
    stacked.
    """
    if not len(grams_a) or (grams_b is not None and not len(grams_b)):
        raise ValueError("need at least one representation per side")
    n = as_square(grams_a[0]).shape[0]
    if unbiased:  # a biased Gram of one image is constant: NaN, as it always was
        check_hsic_n(n, unbiased=True)
    va, ta = _centred_vectors(grams_a, n, unbiased=unbiased)
    aa = 2.0 * np.einsum("ij,ij->i", va, va)
    if grams_b is None:
        return _Products(2.0 * (va @ va.T), aa, aa, ta, ta, n)
    step = max(1, _STACK_BYTES // max(8 * va.shape[1], 1))
    ab = np.empty((len(va), len(grams_b)))
    bb = np.empty(len(grams_b))
    tb = np.empty(len(grams_b))
    for s in range(0, len(grams_b), step):
        e = min(s + step, len(grams_b))
        vb, tb[s:e] = _centred_vectors(grams_b, n, unbiased=unbiased, start=s, stop=e)
        ab[:, s:e] = 2.0 * (va @ vb.T)
        bb[s:e] = 2.0 * np.einsum("ij,ij->i", vb, vb)
    return _Products(ab, aa, bb, ta, tb, n)


def hsic(K: Any, L: Any, *, unbiased: bool = False) -> float:
    """HSIC of two Gram matrices: biased ``tr(KHLH)/(n-1)²`` or unbiased HSIC₁.

    Examples
    --------
    >>> K = gram_linear(np.arange(5.0))
    >>> round(hsic(K, K), 6)
    6.25
    """
    p = _inner_products([K], [L], unbiased=unbiased)
    # tr(KHLH) = <HKH, HLH>_F because H is symmetric and idempotent.
    return float(p.ab[0, 0]) * hsic_scale(p.n, unbiased=unbiased)


def cka_matrix_from_grams(
    grams_a: Sequence[Any], grams_b: Sequence[Any] | None = None, *, unbiased: bool = False
) -> FloatArray:
    """(L_a, L_b) CKA between every pair of Gram matrices of the same n images.

    Each Gram is centred once (biased ``H G H``, or U-centred for HSIC₁) and
    every pair is then one dot product. ``grams_b=None`` compares ``grams_a``
    with itself. NaN marks a constant representation (see :func:`cka_from_sums`).

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(10, 4))
    >>> grams = [gram_linear(x), gram_linear(2 * x), gram_linear(x**2)]
    >>> m = cka_matrix_from_grams(grams)
    >>> np.round(m[:2, :2], 6).tolist(), bool(m[0, 2] < 1)
    ([[1.0, 1.0], [1.0, 1.0]], True)
    """
    p = _inner_products(grams_a, grams_b, unbiased=unbiased)
    # The 1/(n-1)² or 1/(n(n-3)) normalisations cancel in the ratio.
    return cka_from_sums(p.ab, p.aa, p.bb, p.scale_a, p.scale_b)


def cka(
    X: Any, Y: Any, *, kernel: Kernel = "linear", unbiased: bool = False, threshold: float = 1.0
) -> float:
    """CKA between two representations of the same n images.

    Parameters
    ----------
    X, Y : array (n, ...)
        numpy arrays or torch tensors; non-first dims are flattened.
    kernel : {"linear", "rbf"}
        Gram kernel; ``threshold`` sets the RBF bandwidth
        (see :func:`~vitcnn_store.analysis.gram.rbf_from_linear_gram`).
    unbiased : bool
        Use HSIC₁ (needs n >= 4) instead of the biased estimator.

    Returns
    -------
    float
        NaN (with a :class:`ConstantRepresentationWarning`) when either
        representation is constant across images.

    Examples
    --------
    >>> X = np.random.default_rng(0).normal(size=(20, 5))
    >>> round(cka(X, 3 * X, kernel="rbf", unbiased=True), 6)
    1.0
    """
    k, ll = kernel_gram(X, kernel, threshold), kernel_gram(Y, kernel, threshold)
    if k.shape != ll.shape:
        raise ValueError(f"X and Y have different numbers of images: {k.shape[0]} vs {ll.shape[0]}")
    return float(cka_matrix_from_grams([k], [ll], unbiased=unbiased)[0, 0])


def linear_cka(X: Any, Y: Any) -> float:
    """Linear CKA with the biased HSIC ``tr(KHLH)/(n-1)²``.

    Examples
    --------
    >>> X = np.random.default_rng(0).normal(size=(10, 3))
    >>> round(linear_cka(X, X), 6)
    1.0
    """
    return cka(X, Y, kernel="linear", unbiased=False)


def unbiased_linear_cka(X: Any, Y: Any) -> float:
    """Linear CKA with the unbiased HSIC₁ of Song et al. (2012); n >= 4.

    Examples
    --------
    >>> X = np.random.default_rng(0).normal(size=(10, 3))
    >>> round(unbiased_linear_cka(X, -2 * X), 6)
    1.0
    """
    return cka(X, Y, kernel="linear", unbiased=True)


def _check_batch(expected: int | None, n: int) -> int:
    check_hsic_n(n, unbiased=True)
    if expected is not None and n != expected:
        raise ValueError(
            f"minibatch CKA needs equal batch sizes (drop the remainder): got {n}, expected "
            f"{expected}"
        )
    return n


class MinibatchCKAMatrix:
    """All-pairs minibatch CKA (unbiased HSIC₁ sums over batches, one ratio at the end).

    ``result()[i, j] = Σ_b HSIC₁(Kᵢ_b, Lⱼ_b) / sqrt(Σ_b HSIC₁(Kᵢ_b, Kᵢ_b) · Σ_b HSIC₁(Lⱼ_b, Lⱼ_b))``
    — not the mean of per-batch CKAs. Per batch each layer's U-centred Gram is
    computed once and every pair is one entry of a matrix product. Pass only
    the first side for CKA within a run (nothing is recomputed). All batches
    must have the same size n >= 4 (callers drop the remainder).
    :meth:`update_grams` takes precomputed Gram matrices, :meth:`merge` adds
    partial accumulators (e.g. of parallel tasks).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> acc = MinibatchCKAMatrix()
    >>> for _ in range(2):
    ...     x = rng.normal(size=(12, 3, 2))
    ...     acc.update([x, x ** 2, -x])
    >>> np.round(acc.result()[0], 6).tolist()[::2]
    [1.0, 1.0]
    """

    def __init__(self, *, kernel: Kernel = "linear", threshold: float = 1.0) -> None:
        self.kernel = kernel
        self.threshold = threshold
        self.batch_size: int | None = None
        self.n_batches = 0
        self.hsic_ab: FloatArray | None = None  # (L_a, L_b) sums of HSIC₁
        self.hsic_aa: FloatArray | None = None  # (L_a,)
        self.hsic_bb: FloatArray | None = None  # (L_b,)
        self.scale_aa = np.zeros(0)  # (L_a,) sums of tr(K)², normalised as HSIC₁
        self.scale_bb = np.zeros(0)

    def update(self, reps_a: Sequence[Any], reps_b: Sequence[Any] | None = None) -> None:
        """Add one batch: lists of layer representations (n, ...) of the same n images."""

        def grams(reps: Sequence[Any]) -> list[FloatArray]:
            return [kernel_gram(x, self.kernel, self.threshold) for x in reps]

        self.update_grams(grams(reps_a), None if reps_b is None else grams(reps_b))

    def update_grams(self, grams_a: Sequence[Any], grams_b: Sequence[Any] | None = None) -> None:
        """Add one batch given per-layer Gram matrices (n, n).

        ``grams_b`` may be any sequence, also one that computes its Grams on access.
        """
        p = _inner_products(grams_a, grams_b, unbiased=True)
        self.batch_size = _check_batch(self.batch_size, p.n)
        s = hsic_scale(p.n, unbiased=True)
        self._add(p.ab * s, p.aa * s, p.bb * s, p.scale_a * s, p.scale_b * s, 1)

    def _add(
        self,
        ab: FloatArray,
        aa: FloatArray,
        bb: FloatArray,
        scale_aa: FloatArray,
        scale_bb: FloatArray,
        batches: int,
    ) -> None:
        if self.hsic_ab is None or self.hsic_aa is None or self.hsic_bb is None:
            self.hsic_ab, self.hsic_aa, self.hsic_bb = ab.copy(), aa.copy(), bb.copy()
            self.scale_aa, self.scale_bb = scale_aa.copy(), scale_bb.copy()
        else:
            if ab.shape != self.hsic_ab.shape:
                raise ValueError(f"layer counts changed: {ab.shape} vs {self.hsic_ab.shape}")
            self.hsic_ab += ab
            self.hsic_aa += aa
            self.hsic_bb += bb
            self.scale_aa += scale_aa
            self.scale_bb += scale_bb
        self.n_batches += batches

    def merge(self, other: MinibatchCKAMatrix) -> MinibatchCKAMatrix:
        """Add ``other``'s sums into this accumulator; returns self."""
        if other.hsic_ab is not None and other.hsic_aa is not None and other.hsic_bb is not None:
            self.batch_size = _check_batch(self.batch_size, other.batch_size or 0)
            self._add(
                other.hsic_ab,
                other.hsic_aa,
                other.hsic_bb,
                other.scale_aa,
                other.scale_bb,
                other.n_batches,
            )
        return self

    def result(self, *, warn: bool = True) -> FloatArray:
        """(L_a, L_b) matrix of minibatch CKA values (NaN for constant representations)."""
        if self.hsic_ab is None or self.hsic_aa is None or self.hsic_bb is None:
            raise ValueError(f"{type(self).__name__}.result() called before any update()")
        return cka_from_sums(
            self.hsic_ab, self.hsic_aa, self.hsic_bb, self.scale_aa, self.scale_bb, warn=warn
        )


class MinibatchCKA:
    """Minibatch CKA for one pair: a 1 × 1 :class:`MinibatchCKAMatrix`.

    ``result() = Σ HSIC₁(K_b, L_b) / sqrt(Σ HSIC₁(K_b, K_b) · Σ HSIC₁(L_b, L_b))``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> acc = MinibatchCKA()
    >>> for _ in range(3):
    ...     X = rng.normal(size=(16, 4))
    ...     acc.update(X, X @ rng.normal(size=(4, 4)))
    >>> 0.0 < acc.result() <= 1.0
    True
    """

    def __init__(self, *, kernel: Kernel = "linear", threshold: float = 1.0) -> None:
        self.pairs = MinibatchCKAMatrix(kernel=kernel, threshold=threshold)

    @property
    def batch_size(self) -> int | None:
        return self.pairs.batch_size

    @property
    def n_batches(self) -> int:
        return self.pairs.n_batches

    def update(self, X_batch: Any, Y_batch: Any) -> None:
        """Add one batch of representations (n, ...) of the same images."""
        self.pairs.update([X_batch], [Y_batch])

    def update_gram(self, K: Any, L: Any) -> None:
        """Add one batch given its Gram matrices."""
        self.pairs.update_grams([K], [L])

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Add ``other``'s sums into this accumulator (batch sizes must match); returns self."""
        self.pairs.merge(other.pairs)
        return self

    def result(self) -> float:
        """The minibatch CKA (NaN if a representation was constant in every batch)."""
        if not self.pairs.n_batches:
            raise ValueError("MinibatchCKA.result() called before any update()")
        return float(self.pairs.result()[0, 0])


def sample_batches(
    n: int, batch_size: int, repeats: int, seed: int, max_batches: int | None = None
) -> list[list[np.ndarray]]:
    """Minibatches of positions ``0..n-1``, sampled without replacement.

    Per repeat, a fresh permutation cut into equal batches: the remainder is
    dropped (HSIC₁ sums need equal sizes), at most ``max_batches`` are kept, and
    each batch is sorted (reads of stored chunks go in order).

    Examples
    --------
    >>> [[b.tolist() for b in rep] for rep in sample_batches(5, 2, 1, seed=0)]
    [[[2, 4], [0, 3]]]
    """
    rng = np.random.default_rng(seed)
    per_repeat = n // batch_size
    if max_batches is not None:
        per_repeat = min(per_repeat, max_batches)
    out = []
    for _ in range(repeats):
        perm = rng.permutation(n)
        out.append(
            [np.sort(perm[i * batch_size : (i + 1) * batch_size]) for i in range(per_repeat)]
        )
    return out
