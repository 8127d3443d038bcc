"""Centered kernel alignment (CKA) between representations.

CKA compares two representations ``X`` (n, p1) and ``Y`` (n, p2) of the same n
images through their Gram matrices K, L (DESIGN §4):

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L))

Two HSIC estimators are offered:

* biased: ``tr(K H L H) / (n-1)^2`` with ``H = I - 11ᵀ/n`` (Kornblith et al. 2019);
* unbiased HSIC₁ of Song et al. (2012), computed as ``<Kᵤ, Lᵤ>_F / (n(n-3))`` from
  U-centred Grams. Being unbiased, it can be summed over minibatches
  (Nguyen, Raghu & Kornblith 2020): :class:`MinibatchCKA` for one pair and
  :class:`MinibatchCKAMatrix` for all layer pairs at once.

Representations may be numpy arrays or torch tensors of shape (n, ...); every
non-first dim is flattened and values are cast to float64 before any product
(float16 products overflow and lose precision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "MinibatchCKA",
    "MinibatchCKAMatrix",
    "center_gram",
    "cka",
    "cka_matrix",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "linear_cka",
    "u_center_gram",
    "unbiased_linear_cka",
]

FloatArray = npt.NDArray[np.float64]
Kernel = Literal["linear", "rbf"]


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a numpy array; torch tensors are detached and moved to CPU.

    torch is never imported: a tensor is recognised by its ``detach``/``cpu`` methods.
    """
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 is exact
            t = t.float()
        return np.asarray(t.numpy())
    return np.asarray(x)


def _as_matrix(x: Any) -> FloatArray:
    """(n, ...) -> contiguous float64 (n, prod(...)); a 1-d input is one feature."""
    a = _to_numpy(x)
    if a.ndim == 0:
        raise ValueError("a representation needs a leading image axis, got a scalar")
    return np.ascontiguousarray(a.reshape(a.shape[0], -1), dtype=np.float64)


def _as_gram(g: Any) -> FloatArray:
    a = np.asarray(_to_numpy(g), dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a Gram matrix must be square (n, n), got shape {a.shape}")
    return a


def gram_linear(X: Any) -> FloatArray:
    """Linear-kernel Gram matrix ``X Xᵀ`` in float64.

    Examples
    --------
    >>> gram_linear(np.array([[1.0, 0.0], [1.0, 1.0]])).tolist()
    [[1.0, 1.0], [1.0, 2.0]]
    """
    m = _as_matrix(X)
    return m @ m.T


def gram_rbf(X: Any, threshold: float = 1.0) -> FloatArray:
    """RBF-kernel Gram matrix with a data-dependent bandwidth.

    Follows Kornblith et al. (2019): ``exp(-d²_ij / (2 · threshold² · median(d²)))``,
    i.e. bandwidth = ``threshold`` × the (root) median pairwise distance, where the
    median runs over all n² entries, zeros of the diagonal included.

    Examples
    --------
    >>> g = gram_rbf(np.array([[0.0], [1.0], [3.0]]))
    >>> bool(np.allclose(np.diag(g), 1.0))
    True
    """
    m = _as_matrix(X)
    dot = m @ m.T
    sq = np.diag(dot)
    # Rounding can make tiny negative squared distances; clamp them.
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * dot, 0.0)
    med = float(np.median(d2))
    if not med > 0.0:
        raise ValueError("median squared distance is zero: the RBF bandwidth is undefined")
    return np.exp(-d2 / (2.0 * threshold**2 * med))


def _gram(X: Any, kernel: str, threshold: float) -> FloatArray:
    if kernel == "linear":
        return gram_linear(X)
    if kernel == "rbf":
        return gram_rbf(X, threshold)
    raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")


def center_gram(G: Any) -> FloatArray:
    """Biased centring ``H G H`` with ``H = I - 11ᵀ/n`` (returns a new float64 array).

    Examples
    --------
    >>> c = center_gram(np.ones((3, 3)))
    >>> bool(np.allclose(c, 0.0))
    True
    """
    g = _as_gram(G)
    # H G H without forming H: subtract column and row means, add back the grand mean.
    col = g.mean(axis=0)
    row = g.mean(axis=1)
    return g - col[None, :] - row[:, None] + col.mean()


def u_center_gram(G: Any) -> FloatArray:
    """U-centring of a Gram matrix (Song et al. 2012), exactly DESIGN §4's steps.

    Zero the diagonal; ``m = colsum/(n-2)``; ``m -= sum(m)/(2(n-1))``;
    ``G -= m[:, None] + m[None, :]``; zero the diagonal again. Then
    ``HSIC₁(K, L) = <Kᵤ, Lᵤ>_F / (n(n-3))``.

    Examples
    --------
    >>> u = u_center_gram(np.arange(16.0).reshape(4, 4))
    >>> bool(np.allclose(np.diag(u), 0.0))
    True
    """
    g = np.array(_as_gram(G), dtype=np.float64, copy=True)
    n = g.shape[0]
    if n < 3:
        raise ValueError(f"U-centring needs n >= 3 samples, got {n}")
    np.fill_diagonal(g, 0.0)
    means = g.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    g -= means[:, None]
    g -= means[None, :]
    np.fill_diagonal(g, 0.0)
    return g


def hsic(K: Any, L: Any, *, unbiased: bool = False) -> float:
    """HSIC of two Gram matrices: biased ``tr(KHLH)/(n-1)²`` or unbiased HSIC₁.

    Examples
    --------
    >>> K = gram_linear(np.arange(5.0))
    >>> round(hsic(K, K), 6)
    6.25
    """
    k, ll = _as_gram(K), _as_gram(L)
    n = k.shape[0]
    if ll.shape[0] != n:
        raise ValueError(f"Gram sizes differ: {n} vs {ll.shape[0]}")
    if unbiased:
        _check_unbiased_n(n)
        return float(np.vdot(u_center_gram(k), u_center_gram(ll))) / (n * (n - 3))
    # tr(KHLH) = <HKH, L>_F because H is symmetric and idempotent.
    return float(np.vdot(center_gram(k), ll)) / (n - 1) ** 2


def _check_unbiased_n(n: int) -> None:
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs n >= 4 samples, got {n}")


def _ratio(xy: Any, xx: Any, yy: Any) -> Any:
    """xy / sqrt(xx·yy), NaN where a representation has zero (centred) variance."""
    denom = np.sqrt(np.asarray(xx, dtype=np.float64) * np.asarray(yy, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(denom > 0, np.asarray(xy, dtype=np.float64) / denom, np.nan)
    return out


def cka(
    X: Any, Y: Any, *, kernel: Kernel = "linear", unbiased: bool = False, threshold: float = 1.0
) -> float:
    """CKA between two representations of the same n images.

    Parameters
    ----------
    X, Y : array (n, ...)
        numpy arrays or torch tensors; non-first dims are flattened.
    kernel : {"linear", "rbf"}
        Gram kernel; ``threshold`` sets the RBF bandwidth (see :func:`gram_rbf`).
    unbiased : bool
        Use HSIC₁ (needs n >= 4) instead of the biased estimator.

    Returns
    -------
    float
        NaN when either representation is constant across images.

    Examples
    --------
    >>> X = np.random.default_rng(0).normal(size=(20, 5))
    >>> round(cka(X, 3 * X, kernel="rbf", unbiased=True), 6)
    1.0
    """
    k, ll = _gram(X, kernel, threshold), _gram(Y, kernel, threshold)
    if k.shape != ll.shape:
        raise ValueError(f"X and Y have different numbers of images: {k.shape[0]} vs {ll.shape[0]}")
    if unbiased:
        _check_unbiased_n(k.shape[0])
        kc, lc = u_center_gram(k), u_center_gram(ll)
    else:
        kc, lc = center_gram(k), center_gram(ll)
    # The 1/(n-1)² or 1/(n(n-3)) normalisations cancel in the ratio.
    return float(_ratio(np.vdot(kc, lc), np.vdot(kc, kc), np.vdot(lc, lc)))


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


class MinibatchCKA:
    """Minibatch CKA for one pair: sums of HSIC₁ over batches, one ratio at the end.

    ``result() = Σ HSIC₁(K_b, L_b) / sqrt(Σ HSIC₁(K_b, K_b) · Σ HSIC₁(L_b, L_b))``
    (not the mean of per-batch CKAs). All batches must have the same size n >= 4;
    callers drop the remainder. Sums are float64; :meth:`merge` adds two
    accumulators (e.g. partial results of parallel tasks).

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
        self.kernel = kernel
        self.threshold = threshold
        self.batch_size: int | None = None
        self.n_batches = 0
        self.hsic_xy = 0.0
        self.hsic_xx = 0.0
        self.hsic_yy = 0.0

    def update(self, X_batch: Any, Y_batch: Any) -> None:
        """Add one batch of representations (n, ...) of the same images."""
        self.update_gram(
            _gram(X_batch, self.kernel, self.threshold), _gram(Y_batch, self.kernel, self.threshold)
        )

    def update_gram(self, K: Any, L: Any) -> None:
        """Add one batch given its Gram matrices (e.g. computed lazily by dask)."""
        k, ll = _as_gram(K), _as_gram(L)
        n = k.shape[0]
        if ll.shape[0] != n:
            raise ValueError(f"X and Y batches have different sizes: {n} vs {ll.shape[0]}")
        self.batch_size = _check_batch(self.batch_size, n)
        ku, lu = u_center_gram(k), u_center_gram(ll)
        scale = 1.0 / (n * (n - 3))
        self.hsic_xy += float(np.vdot(ku, lu)) * scale
        self.hsic_xx += float(np.vdot(ku, ku)) * scale
        self.hsic_yy += float(np.vdot(lu, lu)) * scale
        self.n_batches += 1

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Add ``other``'s sums into this accumulator (batch sizes must match); returns self."""
        if other.n_batches:
            self.batch_size = _check_batch(self.batch_size, other.batch_size or 0)
            self.hsic_xy += other.hsic_xy
            self.hsic_xx += other.hsic_xx
            self.hsic_yy += other.hsic_yy
            self.n_batches += other.n_batches
        return self

    def result(self) -> float:
        """The minibatch CKA (NaN if a representation was constant in every batch)."""
        if not self.n_batches:
            raise ValueError("MinibatchCKA.result() called before any update()")
        return float(_ratio(self.hsic_xy, self.hsic_xx, self.hsic_yy))


def _check_batch(expected: int | None, n: int) -> int:
    _check_unbiased_n(n)
    if expected is not None and n != expected:
        raise ValueError(
            f"minibatch CKA needs equal batch sizes (drop the remainder): got {n}, expected "
            f"{expected}"
        )
    return n


def _gram_vectors(grams: Sequence[Any], *, unbiased: bool) -> tuple[FloatArray, int]:
    """Stack centred Grams as rows of V so that ``V[i] · V[j] = <G_i, G_j>_F``.

    Centred Grams are symmetric, so only the strict upper triangle (scaled by √2)
    and, for biased centring, the diagonal are kept: half the memory and matmul
    work of flattening all n² entries, same inner products.
    """
    if not len(grams):
        raise ValueError("need at least one representation per side")
    n = _as_gram(grams[0]).shape[0]
    iu = np.triu_indices(n, 1)
    m = iu[0].size + (0 if unbiased else n)
    V = np.empty((len(grams), m), dtype=np.float64)
    for i, g in enumerate(grams):
        a = _as_gram(g)
        if a.shape[0] != n:
            raise ValueError(
                f"representations have different numbers of images: {a.shape[0]} vs {n}"
            )
        a = 0.5 * (a + a.T)  # exact symmetry makes the triangle trick exact
        c = u_center_gram(a) if unbiased else center_gram(a)
        V[i, : iu[0].size] = c[iu]
        if not unbiased:
            V[i, iu[0].size :] = np.diag(c) / math.sqrt(2.0)
    V *= math.sqrt(2.0)
    return V, n


class MinibatchCKAMatrix:
    """All-pairs minibatch CKA between layers (unbiased HSIC₁ sums).

    Per batch, each layer's U-centred Gram is computed once and stacked into
    ``V_a`` (L_a, m), ``V_b`` (L_b, m); the batch adds ``V_a V_bᵀ`` and the self
    terms ``diag(V_a V_aᵀ)``, ``diag(V_b V_bᵀ)`` (all float64). Pass only
    ``reps_a`` for within-run CKA (then ``V_b = V_a``, nothing recomputed).
    :meth:`update_grams` takes precomputed Gram matrices instead, and
    :meth:`merge` combines partial accumulators.

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

    def update(self, reps_a: Sequence[Any], reps_b: Sequence[Any] | None = None) -> None:
        """Add one batch: lists of layer representations (n, ...) of the same n images."""
        grams_a = [_gram(x, self.kernel, self.threshold) for x in reps_a]
        grams_b = (
            None if reps_b is None else [_gram(y, self.kernel, self.threshold) for y in reps_b]
        )
        self.update_grams(grams_a, grams_b)

    def update_grams(self, grams_a: Sequence[Any], grams_b: Sequence[Any] | None = None) -> None:
        """Add one batch given per-layer Gram matrices (n, n)."""
        va, n = _gram_vectors(grams_a, unbiased=True)
        if grams_b is None:
            vb, nb = va, n
        else:
            vb, nb = _gram_vectors(grams_b, unbiased=True)
        if nb != n:
            raise ValueError(f"the two runs' batches have different sizes: {n} vs {nb}")
        self.batch_size = _check_batch(self.batch_size, n)
        scale = 1.0 / (n * (n - 3))
        ab = (va @ vb.T) * scale
        aa = np.einsum("ij,ij->i", va, va) * scale
        bb = aa if vb is va else np.einsum("ij,ij->i", vb, vb) * scale
        self._add(ab, aa, bb, 1)

    def _add(self, ab: FloatArray, aa: FloatArray, bb: FloatArray, batches: int) -> None:
        if self.hsic_ab is None or self.hsic_aa is None or self.hsic_bb is None:
            self.hsic_ab, self.hsic_aa, self.hsic_bb = ab.copy(), aa.copy(), bb.copy()
        else:
            if ab.shape != self.hsic_ab.shape:
                raise ValueError(f"layer counts changed: {ab.shape} vs {self.hsic_ab.shape}")
            self.hsic_ab += ab
            self.hsic_aa += aa
            self.hsic_bb += bb
        self.n_batches += batches

    def merge(self, other: MinibatchCKAMatrix) -> MinibatchCKAMatrix:
        """Add ``other``'s sums into this accumulator; returns self."""
        if other.hsic_ab is not None and other.hsic_aa is not None and other.hsic_bb is not None:
            self.batch_size = _check_batch(self.batch_size, other.batch_size or 0)
            self._add(other.hsic_ab, other.hsic_aa, other.hsic_bb, other.n_batches)
        return self

    def result(self) -> FloatArray:
        """(L_a, L_b) matrix of minibatch CKA values."""
        if self.hsic_ab is None or self.hsic_aa is None or self.hsic_bb is None:
            raise ValueError("MinibatchCKAMatrix.result() called before any update()")
        return np.asarray(_ratio(self.hsic_ab, self.hsic_aa[:, None], self.hsic_bb[None, :]))


def cka_matrix(
    reps_a: Sequence[Any],
    reps_b: Sequence[Any] | None = None,
    *,
    kernel: Kernel = "linear",
    unbiased: bool = False,
    threshold: float = 1.0,
) -> FloatArray:
    """All-pairs CKA over one batch holding all the data; (L_a, L_b).

    Each layer's (biased or U-) centred Gram is computed once; every pair is then a
    dot product. ``reps_b=None`` compares ``reps_a`` with itself.

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(10, 4))
    >>> np.round(cka_matrix([x, 2 * x]), 6).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    if unbiased:
        acc = MinibatchCKAMatrix(kernel=kernel, threshold=threshold)
        acc.update(reps_a, reps_b)
        return acc.result()
    va, n = _gram_vectors([_gram(x, kernel, threshold) for x in reps_a], unbiased=False)
    if reps_b is None:
        vb, nb = va, n
    else:
        vb, nb = _gram_vectors([_gram(y, kernel, threshold) for y in reps_b], unbiased=False)
    if nb != n:
        raise ValueError(f"the two runs have different numbers of images: {n} vs {nb}")
    aa = np.einsum("ij,ij->i", va, va)
    bb = aa if vb is va else np.einsum("ij,ij->i", vb, vb)
    return np.asarray(_ratio(va @ vb.T, aa[:, None], bb[None, :]))
