"""Attention statistics per head: mean attention distance, entropy, CLS maps.

Inputs are softmax probabilities ``attn`` of shape (n, head, query, key) over
*all* tokens (prefix tokens such as CLS and registers included, as stored) and
``token_yx`` (token, 2): pixel centres (y, x) of each token in the model input,
with NaN rows for prefix tokens. Prefix tokens are dropped from both the query
and the key axes. By default rows are **not** renormalized after dropping
(the convention of the reference code; see docs/science.md): attention mass on prefix
tokens simply vanishes. ``renormalize=True`` rescales each row to sum to 1 over
patch keys; record the choice with the result.

CLS-key mass
------------
Without renormalization a head that puts most of a patch query's attention on
the CLS key reads as *local*: the mass on CLS has no distance and simply drops
out of the sum. :func:`cls_key_mass` reports, per head, the mean over images
and patch queries of the attention on the CLS key (``A_q,cls``, from the rows as
stored, before any renormalization), so a small distance can be told apart
from attention that went to CLS; :meth:`AttentionAccumulator.prefix_key_mass`
the same for every prefix key (CLS and registers).

Baseline
--------
:func:`uniform_attention_baseline` gives what the same statistics read for
attention spread evenly over every token (a softmax of constant logits): the
distance and entropy a head has when it has learnt nothing about position.
It depends on the grid (resolution and patch size) and on the convention, so
it is computed for each run rather than quoted.

Accumulating form
-----------------
Every statistic is a sum over images divided by a count, so a job can stream
image chunks: create one :class:`AttentionAccumulator` per layer (or one per
task and :meth:`AttentionAccumulator.merge` them), call ``update(chunk)`` for
each (n_chunk, head, query, key) block, then read ``mean_distance()``,
``entropy()`` and ``cls_map()``. Within ``update`` images are processed in
sub-blocks so float64 temporaries stay small.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from vitcnn_store.analysis._arrays import to_numpy

__all__ = [
    "AttentionAccumulator",
    "attention_entropy",
    "cls_attention_map",
    "cls_key_mass",
    "mean_attention_distance",
    "patch_distance_matrix",
    "uniform_attention_baseline",
]

FloatArray = npt.NDArray[np.float64]
_EPS = 1e-12
_BLOCK_ELEMENTS = 1 << 22  # ~32 MB of float64 per image sub-block


def _patch_positions(token_yx: Any) -> tuple[npt.NDArray[np.intp], FloatArray, int]:
    """Indices and (y, x) centres of patch tokens, plus the total token count."""
    yx = np.asarray(to_numpy(token_yx), dtype=np.float64)
    if yx.ndim != 2 or yx.shape[1] != 2:
        raise ValueError(f"token_yx must have shape (token, 2), got {yx.shape}")
    is_patch = ~np.isnan(yx).any(axis=1)
    if not is_patch.any():
        raise ValueError("token_yx has no patch tokens (every row is NaN)")
    idx = np.flatnonzero(is_patch)
    return idx, yx[idx], yx.shape[0]


def patch_distance_matrix(token_yx: Any) -> FloatArray:
    """Euclidean pixel distances between patch tokens, (n_patch, n_patch).

    Prefix tokens (NaN rows of ``token_yx``) are dropped.

    Examples
    --------
    >>> patch_distance_matrix([[np.nan, np.nan], [8, 8], [8, 24]]).tolist()
    [[0.0, 16.0], [16.0, 0.0]]
    """
    _, pos, _ = _patch_positions(token_yx)
    diff = pos[:, None, :] - pos[None, :, :]
    return np.sqrt((diff**2).sum(axis=-1))


class AttentionAccumulator:
    """Sums of attention statistics over image chunks (see the module docstring).

    Parameters
    ----------
    token_yx : array (token, 2) or None
        Pixel centres, NaN for prefix tokens. ``None`` treats every token as a
        query/key (entropy only; distances and CLS maps need positions).
    renormalize : bool
        Rescale rows to sum to 1 over patch keys after dropping prefix keys.
    distance, entropy : bool
        Which statistics to accumulate.
    cls_index : int or None
        The CLS token: its query's attention to patch keys is accumulated as a
        map, and the patch queries' attention on it as the CLS-key mass.

    Examples
    --------
    >>> yx = np.array([[np.nan, np.nan], [8, 8], [8, 24]])
    >>> attn = np.full((2, 1, 3, 3), 1 / 3)
    >>> acc = AttentionAccumulator(yx, cls_index=0)
    >>> acc.update(attn[:1]); acc.update(attn[1:])
    >>> acc.mean_distance().round(4).tolist(), acc.cls_map().round(4).tolist()
    ([5.3333], [[[0.3333, 0.3333]]])
    >>> acc.cls_key_mass().round(4).tolist()
    [0.3333]
    """

    def __init__(
        self,
        token_yx: Any = None,
        *,
        renormalize: bool = False,
        distance: bool = True,
        entropy: bool = True,
        cls_index: int | None = None,
    ) -> None:
        self.renormalize = renormalize
        self.cls_index = cls_index
        self._idx: npt.NDArray[np.intp] | None = None
        self._pos: FloatArray | None = None
        self._n_tokens: int | None = None
        if token_yx is None:
            if distance or cls_index is not None:
                raise ValueError("distances and CLS maps need token_yx")
        else:
            self._idx, self._pos, self._n_tokens = _patch_positions(token_yx)
        self._dist = patch_distance_matrix(token_yx) if distance else None
        self._entropy = entropy
        self.n_images = 0
        self.n_queries = 0  # queries per image (patch tokens, or all tokens)
        self.distance_sum: FloatArray | None = None  # (head,) Σ over images, queries
        self.entropy_sum: FloatArray | None = None  # (head,) Σ over images, queries
        self.cls_sum: FloatArray | None = None  # (head, n_patch) Σ over images
        self.cls_key_sum: FloatArray | None = None  # (head,) Σ over images, patch queries
        self.prefix_key_sum: FloatArray | None = None  # (head,) Σ over images, patch queries

    def update(self, attn: Any) -> None:
        """Add a chunk of attention probabilities (n_chunk, head, query, key)."""
        a = to_numpy(attn)
        if a.ndim != 4 or a.shape[2] != a.shape[3]:
            raise ValueError(f"attn must have shape (n, head, token, token), got {a.shape}")
        if self._n_tokens is not None and a.shape[3] != self._n_tokens:
            raise ValueError(f"attn has {a.shape[3]} tokens but token_yx has {self._n_tokens}")
        n, heads, tokens = a.shape[0], a.shape[1], a.shape[3]
        idx = self._idx if self._idx is not None else np.arange(tokens)
        zeros = np.zeros(heads)
        dist_sum, ent_sum = zeros.copy(), zeros.copy()
        cls_key_sum, prefix_key_sum = zeros.copy(), zeros.copy()
        cls_sum = np.zeros((heads, idx.size))
        step = max(1, _BLOCK_ELEMENTS // max(1, heads * idx.size * idx.size))
        for s in range(0, n, step):
            # Drop prefix queries and keys; float64 before any arithmetic (float16 input).
            blk = a[s : s + step][:, :, idx[:, None], idx[None, :]].astype(np.float64)
            # Mass on prefix keys, from the rows as stored: what dropping them discards.
            row_sums = a[s : s + step][:, :, idx, :].astype(np.float64).sum(axis=-1)
            prefix_key_sum += (row_sums - blk.sum(axis=-1)).sum(axis=(0, 2))
            if self.cls_index is not None:
                cls_key_sum += (
                    a[s : s + step, :, idx, self.cls_index].astype(np.float64).sum(axis=(0, 2))
                )
            if self.renormalize:
                blk /= np.maximum(blk.sum(axis=-1, keepdims=True), _EPS)
            if self._dist is not None:
                dist_sum += np.einsum("nhqk,qk->h", blk, self._dist)
            if self._entropy:
                # 0·log 0 = 0: take log of 1 where p == 0.
                ent_sum -= (blk * np.log(np.where(blk > 0, blk, 1.0))).sum(axis=(0, 2, 3))
            if self.cls_index is not None:
                row = a[s : s + step, :, self.cls_index, idx].astype(np.float64)
                if self.renormalize:
                    row /= np.maximum(row.sum(axis=-1, keepdims=True), _EPS)
                cls_sum += row.sum(axis=0)
        self._add(n, idx.size, dist_sum, ent_sum, cls_sum, cls_key_sum, prefix_key_sum)

    def _add(
        self,
        n: int,
        queries: int,
        dist: FloatArray,
        ent: FloatArray,
        cls: FloatArray,
        cls_key: FloatArray,
        prefix_key: FloatArray,
    ) -> None:
        if (
            self.distance_sum is None
            or self.entropy_sum is None
            or self.cls_sum is None
            or self.cls_key_sum is None
            or self.prefix_key_sum is None
        ):
            self.distance_sum, self.entropy_sum, self.cls_sum = dist.copy(), ent.copy(), cls.copy()
            self.cls_key_sum, self.prefix_key_sum = cls_key.copy(), prefix_key.copy()
        else:
            if dist.shape != self.distance_sum.shape or cls.shape != self.cls_sum.shape:
                raise ValueError("chunks disagree on the number of heads or tokens")
            self.distance_sum += dist
            self.entropy_sum += ent
            self.cls_sum += cls
            self.cls_key_sum += cls_key
            self.prefix_key_sum += prefix_key
        self.n_images += n
        self.n_queries = queries

    def merge(self, other: AttentionAccumulator) -> AttentionAccumulator:
        """Add another accumulator's sums (same settings) into this one; returns self."""
        if other.distance_sum is not None and other.entropy_sum is not None:
            assert other.cls_sum is not None
            assert other.cls_key_sum is not None and other.prefix_key_sum is not None
            self._add(
                other.n_images,
                other.n_queries,
                other.distance_sum,
                other.entropy_sum,
                other.cls_sum,
                other.cls_key_sum,
                other.prefix_key_sum,
            )
        return self

    def _mean(self, total: FloatArray | None, what: str) -> FloatArray:
        if total is None or not self.n_images:
            raise ValueError(f"no {what} accumulated: call update() with a non-empty chunk")
        return total / (self.n_images * self.n_queries)

    def mean_distance(self) -> FloatArray:
        """Mean attention distance per head, in input pixels, (head,)."""
        if self._dist is None:
            raise ValueError("constructed with distance=False")
        return self._mean(self.distance_sum, "attention")

    def entropy(self) -> FloatArray:
        """Mean row entropy per head in nats, (head,)."""
        if not self._entropy:
            raise ValueError("constructed with entropy=False")
        return self._mean(self.entropy_sum, "attention")

    def cls_key_mass(self) -> FloatArray:
        """Mean over images and patch queries of the attention on the CLS key, (head,).

        Taken from the rows as stored (before any renormalization): the share of
        each patch query's attention that the default convention discards.
        """
        if self.cls_index is None:
            raise ValueError("constructed without cls_index")
        return self._mean(self.cls_key_sum, "attention")

    def prefix_key_mass(self) -> FloatArray:
        """Mean over images and patch queries of the attention on all prefix keys
        (CLS and registers), (head,); equals :meth:`cls_key_mass` without registers."""
        if self._idx is None:
            raise ValueError("prefix keys need token_yx")
        return self._mean(self.prefix_key_sum, "attention")

    def cls_map(self) -> FloatArray:
        """Mean attention of the ``cls_index`` query to each patch, (head, gy, gx).

        The grid is built from the sorted unique token_y / token_x values; grid
        cells without a patch token are NaN.
        """
        if self.cls_index is None or self._pos is None:
            raise ValueError("constructed without cls_index")
        if self.cls_sum is None or not self.n_images:
            raise ValueError("no attention accumulated: call update() with a non-empty chunk")
        ys, iy = np.unique(self._pos[:, 0], return_inverse=True)
        xs, ix = np.unique(self._pos[:, 1], return_inverse=True)
        out = np.full((self.cls_sum.shape[0], ys.size, xs.size), np.nan)
        out[:, iy, ix] = self.cls_sum / self.n_images
        return out


def mean_attention_distance(attn: Any, token_yx: Any, *, renormalize: bool = False) -> FloatArray:
    """Mean attention distance per head in pixels, (head,).

    ``MAD_h = mean over images and patch queries q of Σ_k A_hqk ‖pos_q − pos_k‖``
    with prefix tokens dropped from queries and keys and, by default, no
    renormalization (see the module docstring).

    Examples
    --------
    >>> yx = np.array([[np.nan, np.nan], [8, 8], [8, 24]])
    >>> attn = np.zeros((1, 2, 3, 3)); attn[0, 0] = np.eye(3); attn[0, 1, :, 1:] = 0.5
    >>> mean_attention_distance(attn, yx).tolist()
    [0.0, 8.0]
    """
    acc = AttentionAccumulator(token_yx, renormalize=renormalize, entropy=False)
    acc.update(attn)
    return acc.mean_distance()


def attention_entropy(attn: Any, token_yx: Any = None, *, renormalize: bool = False) -> FloatArray:
    """Mean over images and query rows of ``-Σ_k p log p`` per head, in nats, (head,).

    With ``token_yx`` only patch queries/keys count (prefix tokens dropped, rows
    not renormalized unless asked); without it every token counts.

    Examples
    --------
    >>> attn = np.full((1, 1, 4, 4), 0.25)
    >>> bool(np.isclose(attention_entropy(attn)[0], np.log(4)))
    True
    """
    acc = AttentionAccumulator(token_yx, renormalize=renormalize, distance=False)
    acc.update(attn)
    return acc.entropy()


def cls_attention_map(
    attn: Any, token_yx: Any, cls_index: int = 0, *, renormalize: bool = False
) -> FloatArray:
    """Mean over images of the CLS query's attention to each patch, (head, gy, gx).

    Examples
    --------
    >>> yx = np.array([[np.nan, np.nan], [8, 8], [8, 24]])
    >>> attn = np.zeros((1, 1, 3, 3)); attn[0, 0, 0] = [0.5, 0.2, 0.3]
    >>> cls_attention_map(attn, yx).tolist()
    [[[0.2, 0.3]]]
    """
    acc = AttentionAccumulator(
        token_yx, renormalize=renormalize, distance=False, entropy=False, cls_index=cls_index
    )
    acc.update(attn)
    return acc.cls_map()


def cls_key_mass(attn: Any, token_yx: Any, cls_index: int = 0) -> FloatArray:
    """Mean over images and patch queries of the attention on the CLS key, (head,).

    The rows are taken as stored (before any renormalization over patch keys).

    Examples
    --------
    >>> yx = np.array([[np.nan, np.nan], [8, 8], [8, 24]])
    >>> attn = np.zeros((1, 2, 3, 3)); attn[0, 0, :, 0] = 1.0; attn[0, 1, :, 1:] = 0.5
    >>> cls_key_mass(attn, yx).tolist()
    [1.0, 0.0]
    """
    acc = AttentionAccumulator(token_yx, distance=False, entropy=False, cls_index=cls_index)
    acc.update(attn)
    return acc.cls_key_mass()


def uniform_attention_baseline(token_yx: Any, *, renormalize: bool = False) -> tuple[float, float]:
    """Mean distance (px) and entropy (nats) of uniform attention over all tokens.

    Uniform attention gives every key 1/T, T the number of tokens (prefix tokens
    included). Under the default convention (prefix tokens dropped, rows not
    renormalized) a patch query keeps weight 1/T on each of the P patch keys:
    distance (P/T)·D̄ and entropy (P/T)·log T, D̄ the mean distance between two
    patch centres (the pair drawn with replacement). With ``renormalize`` the
    rows sum to 1 over patch keys again: D̄ and log P.

    Examples
    --------
    >>> c = (np.arange(14) + 0.5) * 16
    >>> yx = np.stack(np.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)
    >>> round(uniform_attention_baseline(yx)[0], 2)  # ViT-B/16 at 224 px, no CLS
    116.49
    >>> with_cls = np.vstack([[np.nan, np.nan], yx])
    >>> round(uniform_attention_baseline(with_cls)[0], 2)
    115.9
    """
    _, _, n_tokens = _patch_positions(token_yx)
    dist = patch_distance_matrix(token_yx)
    n_patch = dist.shape[0]
    weight = 1.0 / (n_patch if renormalize else n_tokens)
    mean_distance = weight * float(dist.sum(axis=1).mean())
    entropy = -n_patch * weight * float(np.log(weight))
    return mean_distance, entropy
