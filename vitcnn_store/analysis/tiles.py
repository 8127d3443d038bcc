"""CKA from tiles of full Gram matrices: every minibatch in one pass over the tiles.

A Gram cache holds each layer's full n × n linear Gram ``K = X Xᵀ``, and each
minibatch's Gram is its sub-matrix ``K[b, b]``. Cutting those sub-matrices out
batch by batch would read the cache once per batch. Here the cache is read
once, one tile ``K[P, Q]`` (rows P, columns Q, tiles on and above the
diagonal) at a time, and each tile adds its share to every batch at once
(:func:`tile_part`, merged by :class:`TiledHSIC`):

* the inner products ``⟨K_b, L_b⟩`` of every layer pair (one matrix product per
  batch and tile), and
* each batch's row sums ``K_b 1``; the diagonal of ``K`` gives the scales.

HSIC then follows per batch of size m from those sums, with ``K̃`` the batch
Gram with its diagonal set to zero:

* unbiased HSIC₁ (Song et al. 2012)
  ``[⟨K̃, L̃⟩ + (1ᵀK̃1)(1ᵀL̃1)/((m−1)(m−2)) − 2/(m−2)·(K̃1)·(L̃1)] / (m(m−3))``;
* biased ``[⟨K, L⟩ − (2/m)(K1)·(L1) + (1ᵀK1)(1ᵀL1)/m²] / (m−1)²``.

Numerics. Both formulas subtract large terms when a representation has a
large mean (K is then far bigger than its centred part). Both estimators are
unchanged when K is replaced by ``K − a1ᵀ − 1aᵀ`` for any vector a (U-centring
and H·H remove such terms exactly), so every tile is shifted first by
``a = row means − grand mean / 2`` of the full Gram (:func:`centring_shift`):
that centres the whole Gram, what is left in a batch is sampling noise, and
the sums lose no more digits than centring each batch Gram directly does.

Estimators that need every entry of a batch Gram at once (the RBF kernel's
median bandwidth, the permutation null) take whole batch Grams cut out in the
same pass: :func:`gather_part` and :class:`GatheredGrams`.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(size=(8, 3)); K = X @ X.T
>>> layout = BatchLayout.from_batches(8, [[np.arange(8)]])
>>> acc = TiledHSIC(layout, 1, unbiased=True)
>>> shift = centring_shift(K.mean(axis=1)[None])
>>> acc.add(tile_part(layout, np.arange(4), None, K[None, :4, :4], shift, unbiased=True))
>>> acc.add(tile_part(layout, np.arange(4, 8), None, K[None, 4:, 4:], shift, unbiased=True))
>>> acc.add(tile_part(layout, np.arange(4), np.arange(4, 8), K[None, :4, 4:], shift,
...                   unbiased=True))
>>> round(float(acc.result()[0, 0, 0]), 6)
1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitcnn_store.analysis._arrays import FloatArray
from vitcnn_store.analysis.cka import cka_from_sums, hsic_scale

__all__ = [
    "BatchLayout",
    "GatheredGrams",
    "TilePart",
    "TiledHSIC",
    "centring_shift",
    "gather_part",
    "tile_part",
]


@dataclass(frozen=True)
class BatchLayout:
    """Batches of positions ``0..n-1``: ``batches (R, B, m)``, and per repeat and position
    the batch it belongs to (``batch_of``, -1 for none) and its slot in that batch.

    Examples
    --------
    >>> layout = BatchLayout.from_batches(5, [[np.array([0, 3]), np.array([1, 4])]])
    >>> layout.batch_of.tolist(), layout.slot_of.tolist()
    ([[0, 1, -1, 0, 1]], [[0, 0, -1, 1, 1]])
    """

    n: int
    batches: np.ndarray
    batch_of: np.ndarray
    slot_of: np.ndarray

    @classmethod
    def from_batches(cls, n: int, batches: Sequence[Sequence[np.ndarray]]) -> BatchLayout:
        """Layout of ``batches[r][j]`` (position arrays of equal size, disjoint per repeat)."""
        arr = np.asarray([[np.asarray(b, dtype=np.int64) for b in rep] for rep in batches])
        if arr.ndim != 3 or not arr.size:
            raise ValueError("batches must be R repeats × B batches of equal size m > 0")
        if arr.min() < 0 or arr.max() >= n:
            raise ValueError(f"batch members must be positions in 0..{n - 1}")
        batch_of = np.full((arr.shape[0], n), -1, dtype=np.int64)
        slot_of = np.full((arr.shape[0], n), -1, dtype=np.int64)
        for r, rep in enumerate(arr):
            if np.unique(rep).size != rep.size:
                raise ValueError(f"batches of repeat {r} overlap")
            batch_of[r, rep] = np.arange(rep.shape[0])[:, None]
            slot_of[r, rep] = np.arange(rep.shape[1])[None, :]
        return cls(n, arr, batch_of, slot_of)

    @property
    def repeats(self) -> int:
        return int(self.batches.shape[0])

    @property
    def per_repeat(self) -> int:
        return int(self.batches.shape[1])

    @property
    def size(self) -> int:
        """Images per batch, m."""
        return int(self.batches.shape[2])


def centring_shift(row_means: Any) -> FloatArray:
    """Per layer, ``a = row means − grand mean / 2``: ``K − a1ᵀ − 1aᵀ`` is the centred Gram.

    ``row_means`` is (L, n): each layer's Gram row means over the images. Any
    shift leaves every estimator unchanged; this one makes the shifted Gram
    small, which is what the one-pass sums need (see the module docstring).

    Examples
    --------
    >>> K = np.array([[2.0, 1.0], [1.0, 2.0]])
    >>> a = centring_shift(K.mean(axis=1)[None])
    >>> (K - a[0][:, None] - a[0][None, :]).tolist()
    [[0.5, -0.5], [-0.5, 0.5]]
    """
    m = np.atleast_2d(np.asarray(row_means, dtype=np.float64))
    return m - m.mean(axis=1, keepdims=True) / 2.0


@dataclass(kw_only=True)  # eleven fields, several of one type: named at every call
class TilePart:
    """What one tile adds to :class:`TiledHSIC`: per repeat and batch the inner products of
    every layer pair and the self products; per repeat the row sums of the tile's rows
    (and, off the diagonal, of its columns); on a diagonal tile the raw diagonal."""

    rows: np.ndarray
    cols: np.ndarray | None  # None: a diagonal tile (columns = rows)
    products: FloatArray  # (R, B, L_a, L_b)
    self_a: FloatArray  # (R, B, L_a)
    self_b: FloatArray | None  # (R, B, L_b); None when both sides are the same Grams
    rowsum_a: FloatArray  # (R, L_a, len(rows))
    colsum_a: FloatArray | None  # (R, L_a, len(cols))
    rowsum_b: FloatArray | None
    colsum_b: FloatArray | None
    diag_a: FloatArray | None  # (L_a, len(rows)) raw K_kk on a diagonal tile
    diag_b: FloatArray | None


def _shifted(raw: Any, shift: FloatArray, rows: np.ndarray, cols: np.ndarray) -> FloatArray:
    out = np.array(raw, dtype=np.float64)  # a copy, shifted in place
    if out.shape != (shift.shape[0], rows.size, cols.size):
        raise ValueError(
            f"tile of shape {out.shape} does not match {shift.shape[0]} layers × "
            f"{rows.size} rows × {cols.size} columns"
        )
    out -= shift[:, rows, None]
    out -= shift[:, None, cols]
    return out


def tile_part(
    layout: BatchLayout,
    rows: np.ndarray,
    cols: np.ndarray | None,
    raw_a: Any,
    shift_a: FloatArray,
    raw_b: Any = None,
    shift_b: FloatArray | None = None,
    *,
    unbiased: bool,
) -> TilePart:
    """One tile's share of every batch's HSIC sums.

    Parameters
    ----------
    layout : BatchLayout
        The batches, over positions ``0..n-1``.
    rows, cols : int arrays
        Positions of the tile's rows and columns; ``cols=None`` for a tile on the
        diagonal (columns = rows). Tiles off the diagonal stand for their mirror
        image too.
    raw_a : array (L_a, len(rows), len(cols))
        The tile of each layer's raw Gram.
    shift_a : array (L_a, n)
        :func:`centring_shift` of each layer.
    raw_b, shift_b
        The other side (a second run, or other layers) at the same positions;
        ``None`` compares side a with itself.
    unbiased : bool
        HSIC₁ (diagonal left out) or biased HSIC (diagonal in).
    """
    rows = np.asarray(rows, dtype=np.int64)
    diagonal = cols is None
    cols_ = rows if cols is None else np.asarray(cols, dtype=np.int64)
    a = _shifted(raw_a, shift_a, rows, cols_)
    same = raw_b is None
    b = a if same else _shifted(raw_b, shift_b if shift_b is not None else shift_a, rows, cols_)
    R, B = layout.repeats, layout.per_repeat
    La, Lb = a.shape[0], b.shape[0]
    weight = 1.0 if diagonal else 2.0  # an off-diagonal tile also stands for its mirror
    products = np.zeros((R, B, La, Lb))
    self_a = np.zeros((R, B, La))
    self_b = None if same else np.zeros((R, B, Lb))
    rowsum_a = np.zeros((R, La, rows.size))
    rowsum_b = None if same else np.zeros((R, Lb, rows.size))
    colsum_a = None if diagonal else np.zeros((R, La, cols_.size))
    colsum_b = None if diagonal or same else np.zeros((R, Lb, cols_.size))
    for r in range(R):
        in_rows = layout.batch_of[r, rows]
        in_cols = in_rows if diagonal else layout.batch_of[r, cols_]
        for j in np.intersect1d(in_rows[in_rows >= 0], in_cols[in_cols >= 0]):
            ri = np.flatnonzero(in_rows == j)
            ci = ri if diagonal else np.flatnonzero(in_cols == j)
            blocks = []
            for side in (a,) if same else (a, b):
                s = side[:, ri[:, None], ci[None, :]]  # a copy
                if diagonal and unbiased:
                    k = np.arange(ri.size)
                    s[:, k, k] = 0.0  # HSIC₁ leaves the diagonal out
                blocks.append(s)
            va = blocks[0].reshape(La, -1)
            vb = va if same else blocks[1].reshape(Lb, -1)
            products[r, j] += weight * (va @ vb.T)
            self_a[r, j] += weight * np.einsum("ij,ij->i", va, va)
            rowsum_a[r][:, ri] = blocks[0].sum(axis=2)
            if colsum_a is not None:
                colsum_a[r][:, ci] = blocks[0].sum(axis=1)
            if not same:
                assert self_b is not None and rowsum_b is not None
                self_b[r, j] += weight * np.einsum("ij,ij->i", vb, vb)
                rowsum_b[r][:, ri] = blocks[1].sum(axis=2)
                if colsum_b is not None:
                    colsum_b[r][:, ci] = blocks[1].sum(axis=1)

    def diag(raw: Any) -> FloatArray | None:
        if not diagonal:
            return None
        return np.asarray(np.diagonal(np.asarray(raw), axis1=1, axis2=2), dtype=np.float64)

    return TilePart(
        rows=rows,
        cols=cols if cols is None else cols_,
        products=products,
        self_a=self_a,
        self_b=self_b,
        rowsum_a=rowsum_a,
        colsum_a=colsum_a,
        rowsum_b=rowsum_b,
        colsum_b=colsum_b,
        diag_a=diag(raw_a),
        diag_b=None if same else diag(raw_b),
    )


class TiledHSIC:
    """Per-batch HSIC sums of every layer pair, added up from :class:`TilePart` s.

    Every tile on and above the diagonal of the position grid must be added once
    (in any order, e.g. as parallel tasks finish); :meth:`result` then gives the
    CKA matrix of each repeat (sums over its batches, one ratio at the end).

    Parameters
    ----------
    layout : BatchLayout
    n_a, n_b : int
        Layers per side; ``n_b=None`` compares side a with itself.
    unbiased : bool
        HSIC₁ (minibatch and full-sample unbiased CKA) or biased HSIC.
    """

    def __init__(
        self, layout: BatchLayout, n_a: int, n_b: int | None = None, *, unbiased: bool
    ) -> None:
        R, B, n = layout.repeats, layout.per_repeat, layout.n
        self.layout = layout
        self.unbiased = unbiased
        self.same = n_b is None
        nb = n_a if n_b is None else n_b
        self.products = np.zeros((R, B, n_a, nb))
        self.self_a = np.zeros((R, B, n_a))
        self.self_b = self.self_a if self.same else np.zeros((R, B, nb))
        self.rowsum_a = np.zeros((R, n_a, n))
        self.rowsum_b = self.rowsum_a if self.same else np.zeros((R, nb, n))
        self.diag_a = np.full((n_a, n), np.nan)
        self.diag_b = self.diag_a if self.same else np.full((nb, n), np.nan)

    def add(self, part: TilePart) -> None:
        """Add one tile's share."""
        if part.products.shape != self.products.shape:
            raise ValueError(
                f"tile part of shape {part.products.shape}, expected {self.products.shape}"
            )
        if (part.self_b is None) != self.same:
            raise ValueError("tile part and accumulator disagree on the second side")
        self.products += part.products
        self.self_a += part.self_a
        self.rowsum_a[:, :, part.rows] += part.rowsum_a
        if part.colsum_a is not None and part.cols is not None:
            self.rowsum_a[:, :, part.cols] += part.colsum_a
        if part.diag_a is not None:
            self.diag_a[:, part.rows] = part.diag_a
        if not self.same:
            assert part.self_b is not None and part.rowsum_b is not None
            self.self_b += part.self_b
            self.rowsum_b[:, :, part.rows] += part.rowsum_b
            if part.colsum_b is not None and part.cols is not None:
                self.rowsum_b[:, :, part.cols] += part.colsum_b
            if part.diag_b is not None:
                self.diag_b[:, part.rows] = part.diag_b

    def unshift(self, offset_a: Any, offset_b: Any = None) -> None:
        """The tiles were of ``K − a1ᵀ − 1aᵀ`` (a stored, shifted Gram): put ``2a`` back on the
        diagonal, so the scales (traces) are the raw Grams'. ``offset`` is (L, n)."""
        self.diag_a += 2.0 * np.asarray(offset_a, dtype=np.float64)
        if not self.same:
            self.diag_b += 2.0 * np.asarray(offset_b, dtype=np.float64)

    def hsic(self) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
        """Per repeat, sums over its batches of HSIC (L_a, L_b), self HSIC of each side and the
        squared traces of the raw batch Grams, all with the estimator's normalisation."""
        lay = self.layout
        m = lay.size
        norm = hsic_scale(m, unbiased=self.unbiased)  # refuses too small batches
        members = lay.batches.reshape(-1)
        if np.isnan(self.diag_a[:, members]).any() or np.isnan(self.diag_b[:, members]).any():
            raise ValueError("a diagonal tile is missing: add every tile on and above the diagonal")
        R, B = lay.repeats, lay.per_repeat
        ab = np.zeros((R, *self.products.shape[2:]))
        aa = np.zeros((R, self.self_a.shape[2]))
        bb = np.zeros((R, self.self_b.shape[2]))
        sa, sb = np.zeros_like(aa), np.zeros_like(bb)
        # The centring terms of the sum forms in the module docstring.
        if self.unbiased:
            c_tot, c_row = 1.0 / ((m - 1) * (m - 2)), 2.0 / (m - 2)
        else:
            c_tot, c_row = 1.0 / m**2, 2.0 / m
        for r in range(R):
            for j in range(B):
                idx = lay.batches[r, j]
                ra, rb = self.rowsum_a[r][:, idx], self.rowsum_b[r][:, idx]
                ta, tb = ra.sum(axis=1), rb.sum(axis=1)
                ab[r] += self.products[r, j] + c_tot * np.outer(ta, tb) - c_row * (ra @ rb.T)
                aa[r] += self.self_a[r, j] + c_tot * ta**2 - c_row * np.einsum("ij,ij->i", ra, ra)
                bb[r] += self.self_b[r, j] + c_tot * tb**2 - c_row * np.einsum("ij,ij->i", rb, rb)
                sa[r] += self.diag_a[:, idx].sum(axis=1) ** 2
                sb[r] += self.diag_b[:, idx].sum(axis=1) ** 2
        return ab * norm, aa * norm, bb * norm, sa * norm, sb * norm

    def result(self, *, warn: bool = True) -> FloatArray:
        """(R, L_a, L_b): the CKA matrix of each repeat (NaN for constant representations)."""
        ab, aa, bb, sa, sb = self.hsic()
        return np.stack(
            [cka_from_sums(ab[r], aa[r], bb[r], sa[r], sb[r], warn=warn) for r in range(len(ab))]
        )


# -- whole batch Grams cut out of tiles ---------------------------------------------------


def _slots(members: np.ndarray, sorter: np.ndarray, positions: np.ndarray) -> tuple[Any, Any]:
    """(slots in ``members``, indices into ``positions``) of the positions that are members."""
    ranked = members[sorter]
    at = np.searchsorted(ranked, positions)
    at = np.minimum(at, ranked.size - 1)
    hit = ranked[at] == positions
    return sorter[at[hit]], np.flatnonzero(hit)


def gather_part(
    requests: Sequence[np.ndarray], rows: np.ndarray, cols: np.ndarray | None, raw: Any
) -> list[tuple[int, np.ndarray, np.ndarray, FloatArray]]:
    """The entries of one tile that fall in each requested batch Gram.

    ``requests[g]`` lists the positions of batch g in their batch order (any
    order: a permuted batch for a null); ``raw`` is the tile (L, len(rows),
    len(cols)), ``cols=None`` on the diagonal. Returns ``(g, slots of the rows,
    slots of the columns, block)`` for :meth:`GatheredGrams.add`.

    Examples
    --------
    >>> K = np.arange(16.0).reshape(1, 4, 4)
    >>> [(g, u.tolist(), v.tolist()) for g, u, v, _ in gather_part([np.array([3, 1])],
    ...                                                           np.arange(2), None, K[:, :2, :2])]
    [(0, [1], [1])]
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols_ = rows if cols is None else np.asarray(cols, dtype=np.int64)
    tile = np.asarray(raw)
    out = []
    for g, members in enumerate(requests):
        members = np.asarray(members, dtype=np.int64)
        sorter = np.argsort(members, kind="stable")
        u, i = _slots(members, sorter, rows)
        v, k = (u, i) if cols is None else _slots(members, sorter, cols_)
        if u.size and v.size:
            out.append((g, u, v, np.array(tile[:, i[:, None], k[None, :]], dtype=np.float64)))
    return out


class GatheredGrams:
    """Whole batch Grams (L, m, m) for each request, filled in from :func:`gather_part`.

    Examples
    --------
    >>> K = np.arange(16.0).reshape(1, 4, 4); K = K + K.transpose(0, 2, 1)
    >>> req = [np.array([2, 0, 3])]
    >>> acc = GatheredGrams(req, 1)
    >>> acc.add(gather_part(req, np.arange(2), None, K[:, :2, :2]), diagonal=True)
    >>> acc.add(gather_part(req, np.arange(2, 4), None, K[:, 2:, 2:]), diagonal=True)
    >>> acc.add(gather_part(req, np.arange(2), np.arange(2, 4), K[:, :2, 2:]), diagonal=False)
    >>> bool((acc.grams(0)[0] == K[0][np.ix_(req[0], req[0])]).all())
    True
    """

    def __init__(self, requests: Sequence[np.ndarray], n_layers: int) -> None:
        self.requests = [np.asarray(r, dtype=np.int64) for r in requests]
        self._grams = [np.full((n_layers, r.size, r.size), np.nan) for r in self.requests]

    def add(
        self, pieces: Sequence[tuple[int, np.ndarray, np.ndarray, FloatArray]], *, diagonal: bool
    ) -> None:
        """Place one tile's pieces (and, off the diagonal, their mirror images)."""
        for g, u, v, block in pieces:
            self._grams[g][:, u[:, None], v[None, :]] = block
            if not diagonal:
                self._grams[g][:, v[:, None], u[None, :]] = block.transpose(0, 2, 1)

    def unshift(self, offsets: Any) -> None:
        """The tiles were of ``K − a1ᵀ − 1aᵀ``: add ``a_i + a_j`` back (``offsets`` (L, n))."""
        off = np.asarray(offsets, dtype=np.float64)
        for req, gram in zip(self.requests, self._grams, strict=True):
            a = off[:, req]
            gram += a[:, :, None] + a[:, None, :]

    def grams(self, g: int) -> FloatArray:
        """(L, m, m) batch Grams of request g; raises when an entry was never filled."""
        out = self._grams[g]
        if np.isnan(out).any():
            raise ValueError(f"batch Gram {g} is incomplete: a tile was not added (or holds NaN)")
        return out
