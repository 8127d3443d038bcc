"""Gram matrices of representations, and the two centrings CKA needs.

A representation is an array (n, ...) of n images; every non-first dim is a
feature. Its linear Gram matrix ``K = X Xᵀ`` (n, n) is the only thing CKA ever
looks at, so it is worth computing well:

* **float64 accumulation, bounded memory.** Stored activations are float16; a
  float16 product overflows (> 65504) and loses digits. :class:`GramAccumulator`
  casts at most ``block_bytes`` of feature columns to float64 at a time and
  adds their product, so a 151 296-feature ViT-B layer never needs a float64
  copy of itself. :func:`gram_linear` is the one-shot form.
* **Blocks of features or of images.** ``update`` may be called once per
  block of feature columns (a wide layer read in pieces), and ``X Yᵀ`` of two
  different image sets gives the off-diagonal tiles of a larger Gram matrix.
* **Shifted features.** ``shift=μ`` gives ``(X − μ)(X − μ)ᵀ`` (cast, then
  subtract, block by block): ``X Xᵀ`` less ``a_i + a_j`` with
  ``a_i = x_i·μ − ‖μ‖²/2`` (:func:`row_dots`), which no CKA estimator sees, and
  far better conditioned when the features have a large mean.
* **RBF from linear.** The RBF Gram follows from the linear one
  (``‖xᵢ − xⱼ‖² = Kᵢᵢ + Kⱼⱼ − 2Kᵢⱼ``), so the expensive product is shared:
  :func:`rbf_from_linear_gram`.

Centrings: :func:`center_gram` (``H K H``, the biased HSIC) and
:func:`u_center_gram` (Song et al. 2012, the unbiased HSIC₁), and
:func:`centred_triangle`, either centring as the half-size vector whose inner
products CKA takes. Gram matrices are symmetric; the centrings rely on it.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from vitcnn_store.analysis._arrays import FloatArray, as_features, as_square

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "GramAccumulator",
    "Kernel",
    "center_gram",
    "centred_triangle",
    "gram_linear",
    "gram_rbf",
    "kernel_gram",
    "rbf_from_linear_gram",
    "row_dots",
    "u_center_gram",
]

Kernel = Literal["linear", "rbf"]
DEFAULT_BLOCK_BYTES = 16 * 2**20  # float64 feature block per product: cache-friendly, small
_ROW_BLOCK_BYTES = 2**18  # rows of a Gram centred at once into its triangle vector (measured)


class GramAccumulator:
    """``X Yᵀ`` (or ``X Xᵀ``) in float64, summed over blocks of feature columns.

    Parameters
    ----------
    block_bytes : int
        Largest float64 copy of feature columns made at once (per side).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(5, 30)).astype(np.float16)
    >>> acc = GramAccumulator(block_bytes=5 * 8 * 7)  # 7 columns at a time
    >>> acc.update(x[:, :12]); acc.update(x[:, 12:])
    >>> bool(np.allclose(acc.result(), x.astype(np.float64) @ x.T.astype(np.float64)))
    True
    """

    def __init__(self, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        if block_bytes < 8:
            raise ValueError(f"block_bytes must hold at least one float64, got {block_bytes}")
        self.block_bytes = block_bytes
        self.n_features = 0
        self._gram: FloatArray | None = None

    def update(self, x: Any, y: Any = None, *, shift: Any = None) -> None:
        """Add the product of one block of feature columns, ``x (n_a, ...)`` [, ``y (n_b, ...)``].

        ``y=None`` adds ``x xᵀ`` (a symmetric rank-k update); otherwise ``x`` and
        ``y`` must have the same number of features. ``shift`` (one float64 value
        per feature of this block) is subtracted from both sides after the cast:
        the product of ``x − shift`` and ``y − shift``, without a copy of either.
        """
        xm = as_features(x)
        ym = None if y is None else as_features(y)
        if ym is not None and ym.shape[1] != xm.shape[1]:
            raise ValueError(
                f"x and y have different feature counts: {xm.shape[1]} vs {ym.shape[1]}"
            )
        off = None if shift is None else np.asarray(shift, dtype=np.float64).reshape(-1)
        if off is not None and off.size != xm.shape[1]:
            raise ValueError(f"shift has {off.size} values for {xm.shape[1]} features")
        shape = (xm.shape[0], xm.shape[0] if ym is None else ym.shape[0])
        if self._gram is not None and self._gram.shape != shape:
            raise ValueError(f"image counts changed: {shape} vs {self._gram.shape}")
        p = xm.shape[1]
        if p == 0 and self._gram is None:
            self._gram = np.zeros(shape)
        step = max(1, min(p, self.block_bytes // (8 * max(*shape, 1))))
        starts = list(range(0, p, step))
        threads = min(_blas_threads(), len(starts))
        if threads <= 1:
            products = [_block_products(xm, ym, off, starts, step, p)]
        else:
            # BLAS's own threads would sit spinning while this thread casts the next
            # block (about as long as the product): instead each of our threads casts
            # and multiplies its share of the blocks on one BLAS thread.
            shares = [starts[i::threads] for i in range(threads)]
            with _single_blas(), ThreadPoolExecutor(threads) as pool:
                products = list(
                    pool.map(lambda share: _block_products(xm, ym, off, share, step, p), shares)
                )
        for product in products:
            if product is None:
                continue
            if self._gram is None:
                self._gram = product
            else:
                self._gram += product
        self.n_features += p

    def result(self) -> FloatArray:
        """The accumulated (n_a, n_b) product."""
        if self._gram is None:
            raise ValueError("GramAccumulator.result() called before any update()")
        return self._gram


def _block_products(
    xm: np.ndarray,
    ym: np.ndarray | None,
    off: np.ndarray | None,
    starts: list[int],
    step: int,
    p: int,
) -> FloatArray | None:
    """Sum of the float64 products of the feature blocks starting at ``starts``."""
    n_x = xm.shape[0]
    n_y = n_x if ym is None else ym.shape[0]
    # One float64 buffer per side reused for every full block: a cache-sized
    # cast-then-multiply keeps the cast's memory traffic off the critical path.
    buf_x = np.empty((n_x, step))
    buf_y = None if ym is None else np.empty((n_y, step))
    total: FloatArray | None = None
    for s in starts:
        width = min(step, p - s)
        bx = buf_x if width == step else np.empty((n_x, width))
        np.copyto(bx, xm[:, s : s + width], casting="unsafe")
        if off is not None:
            bx -= off[s : s + width]
        if ym is None:
            product = bx @ bx.T  # numpy uses a symmetric rank-k update for A @ A.T
        else:
            by = buf_y if width == step and buf_y is not None else np.empty((n_y, width))
            np.copyto(by, ym[:, s : s + width], casting="unsafe")
            if off is not None:
                by -= off[s : s + width]
            product = bx @ by.T
        if total is None:
            total = product
        else:
            total += product
    return total


@functools.cache
def _blas() -> Any:
    """numpy's BLAS, as threadpoolctl sees it (found once: scanning libraries costs)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def _blas_threads() -> int:
    """Threads numpy's BLAS would use now (1 inside a caller's ``threadpool_limits(1)``,
    as the analysis jobs' dask threads are)."""
    return max([int(lib.num_threads) for lib in _blas().lib_controllers] or [1])


def _single_blas() -> Any:
    return _blas().limit(limits=1)


def gram_linear(
    X: Any, Y: Any = None, *, block_bytes: int = DEFAULT_BLOCK_BYTES, shift: Any = None
) -> FloatArray:
    """Linear-kernel Gram matrix ``X Xᵀ`` (or ``X Yᵀ``) in float64, features cast in blocks.

    ``shift`` (one value per feature) gives ``(X − shift)(Y − shift)ᵀ`` instead.

    Examples
    --------
    >>> gram_linear(np.array([[1.0, 0.0], [1.0, 1.0]])).tolist()
    [[1.0, 1.0], [1.0, 2.0]]
    >>> gram_linear(np.array([[1.0, 2.0]]), np.array([[3.0, 1.0], [0.0, 1.0]])).tolist()
    [[5.0, 2.0]]
    """
    acc = GramAccumulator(block_bytes=block_bytes)
    acc.update(X, Y, shift=shift)
    return acc.result()


def row_dots(X: Any, v: Any, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> FloatArray:
    """``X v`` in float64 (one value per row), features cast a block of columns at a time.

    Examples
    --------
    >>> row_dots(np.array([[1, 2], [3, 4]], dtype=np.float16), np.array([0.5, 1.0])).tolist()
    [2.5, 5.5]
    """
    xm = as_features(X)
    vec = np.asarray(v, dtype=np.float64).reshape(-1)
    if vec.size != xm.shape[1]:
        raise ValueError(f"v has {vec.size} values for {xm.shape[1]} features")
    out = np.zeros(xm.shape[0])
    step = max(1, block_bytes // (8 * max(xm.shape[0], 1)))
    for s in range(0, xm.shape[1], step):
        out += np.asarray(xm[:, s : s + step], dtype=np.float64) @ vec[s : s + step]
    return out


def rbf_from_linear_gram(G: Any, threshold: float = 1.0) -> FloatArray:
    """RBF Gram matrix from a linear one, bandwidth from the data (Kornblith et al. 2019).

    ``exp(-d²ᵢⱼ / (2 · threshold² · median(d²)))`` with
    ``d²ᵢⱼ = Gᵢᵢ + Gⱼⱼ − 2Gᵢⱼ`` (clamped at 0 against rounding), i.e. the bandwidth
    is ``threshold`` × the root median squared distance, the median taken over
    all n² entries, zeros of the diagonal included. Raises ``ValueError`` when
    that median is zero (a constant representation).

    Examples
    --------
    >>> g = rbf_from_linear_gram(gram_linear(np.array([[0.0], [1.0], [3.0]])))
    >>> bool(np.allclose(np.diag(g), 1.0)), round(float(g[0, 1]), 4)
    (True, 0.6065)
    """
    g = as_square(G)
    sq = np.diag(g)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    med = float(np.median(d2))
    if not med > 0.0:
        raise ValueError("median squared distance is zero: the RBF bandwidth is undefined")
    return np.exp(-d2 / (2.0 * threshold**2 * med))


def gram_rbf(X: Any, threshold: float = 1.0) -> FloatArray:
    """RBF-kernel Gram matrix of ``X`` (see :func:`rbf_from_linear_gram`).

    Examples
    --------
    >>> g = gram_rbf(np.array([[0.0], [1.0], [3.0]]))
    >>> bool(np.allclose(np.diag(g), 1.0))
    True
    """
    return rbf_from_linear_gram(gram_linear(X), threshold)


def kernel_gram(X: Any, kernel: str = "linear", threshold: float = 1.0) -> FloatArray:
    """Gram matrix of ``X`` under ``kernel`` (``"linear"`` or ``"rbf"``).

    Examples
    --------
    >>> kernel_gram(np.eye(2), "linear").tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    if kernel == "linear":
        return gram_linear(X)
    if kernel == "rbf":
        return gram_rbf(X, threshold)
    raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")


def _centring_terms(g: FloatArray, unbiased: bool) -> tuple[FloatArray, float]:
    """Offsets ``m`` and constant ``c0`` of the centring of a symmetric Gram ``g``.

    Entry (i, j), i ≠ j, of the centred Gram is ``g_ij − m_i − m_j + c0``. Biased
    (``H g H``): ``m`` = column means, ``c0`` = grand mean, and the diagonal follows
    the same rule. U-centring (Song et al. 2012): ``m`` = off-diagonal column sums
    / (n − 2), less ``Σm / (2(n − 1))``; ``c0 = 0``; the diagonal is zero.
    """
    n = g.shape[0]
    if unbiased:
        if n < 3:
            raise ValueError(f"U-centring needs n >= 3 samples, got {n}")
        m = (g.sum(axis=0) - np.diag(g)) / (n - 2)
        m -= m.sum() / (2 * (n - 1))
        return m, 0.0
    m = g.mean(axis=0)
    return m, float(m.mean())


def center_gram(G: Any) -> FloatArray:
    """Biased centring ``H G H`` with ``H = I - 11ᵀ/n`` of a symmetric Gram (a new array).

    Examples
    --------
    >>> c = center_gram(np.ones((3, 3)))
    >>> bool(np.allclose(c, 0.0))
    True
    """
    g = as_square(G)
    m, c0 = _centring_terms(g, unbiased=False)
    # H G H without forming H: subtract row and column means, add back the grand mean.
    return g - m[:, None] - m[None, :] + c0


def u_center_gram(G: Any) -> FloatArray:
    """U-centring of a symmetric Gram matrix (Song et al. 2012); returns a new array.

    Zero the diagonal; ``m = colsum/(n-2)``; ``m -= sum(m)/(2(n-1))``;
    ``G -= m[:, None] + m[None, :]``; zero the diagonal again. Then
    ``HSIC₁(K, L) = <Kᵤ, Lᵤ>_F / (n(n-3))``.

    Examples
    --------
    >>> u = u_center_gram(np.arange(16.0).reshape(4, 4) + np.arange(16.0).reshape(4, 4).T)
    >>> bool(np.allclose(np.diag(u), 0.0)), bool(np.allclose(u.sum(axis=0), 0.0))
    (True, True)
    """
    g = as_square(G)
    m, _ = _centring_terms(g, unbiased=True)
    out = g - m[:, None]
    out -= m[None, :]
    np.fill_diagonal(out, 0.0)
    return out


@functools.lru_cache(maxsize=256)
def _upper_part(rows: int, width: int) -> tuple[np.ndarray, int]:
    """Flat mask of entries (a, b) with b >= a of a rows × width block, and their count."""
    keep = (np.arange(width)[None, :] >= np.arange(rows)[:, None]).ravel()
    keep.flags.writeable = False
    return keep, int(keep.sum())


def centred_triangle(G: Any, *, unbiased: bool, out: FloatArray | None = None) -> FloatArray:
    """A symmetric Gram's centring as a vector ``v`` with ``2 v_K · v_L = <K_c, L_c>_F``.

    ``v`` holds the strict upper triangle of the centred Gram, row by row, and
    for the biased centring (whose diagonal is not zero) the diagonal divided
    by √2: half the numbers of the whole matrix, the same inner products. It is
    computed a few rows at a time, without an n × n temporary. ``out`` (length
    ``n(n-1)/2``, plus n when biased) receives it when given.

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(6, 3)); k = x @ x.T
    >>> v = centred_triangle(k, unbiased=True)
    >>> u = u_center_gram(k)
    >>> v.shape, bool(np.isclose(2 * v @ v, np.vdot(u, u)))
    ((15,), True)
    """
    g = as_square(G)
    n = g.shape[0]
    m, c0 = _centring_terms(g, unbiased)
    k = n * (n - 1) // 2
    size = k + (0 if unbiased else n)
    if out is None:
        out = np.empty(size)
    elif out.shape != (size,):
        raise ValueError(f"out must have shape ({size},), got {out.shape}")
    rows = max(1, _ROW_BLOCK_BYTES // (8 * max(n, 1)))
    pos = 0
    for r0 in range(0, n - 1, rows):
        r1 = min(r0 + rows, n - 1)
        # Rows r0..r1-1, columns right of the diagonal block: local column b >= local row a.
        block = g[r0:r1, r0 + 1 :] - m[r0:r1, None]
        block -= m[None, r0 + 1 :]
        if c0:
            block += c0
        keep, count = _upper_part(r1 - r0, n - r0 - 1)
        np.compress(keep, block.ravel(), out=out[pos : pos + count])
        pos += count
    if not unbiased:
        out[k:] = (np.diag(g) - 2.0 * m + c0) / np.sqrt(2.0)
    return out
