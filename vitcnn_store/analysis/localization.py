"""Spatial localization maps (Raghu et al. 2021, §7).

For one token t of a layer (a ViT token, or a ResNet spatial position) the
heatmap is ``heatmap_t[p] = CKA(X_t, Y_p)``: linear CKA between that token's
representation over n images, ``X_t`` (n, D), and the raw pixels of input patch p,
``Y_p`` (n, P·P·3). A token that "sees" mostly its own patch peaks there.

The token Gram is centred once and each patch Gram once; CKA against every
patch is then a dot product. For more images than fit in memory, feed equal
size image batches to :class:`MinibatchLocalization` (sums of unbiased HSIC₁,
one ratio at the end, exactly like :class:`~vitcnn_store.analysis.cka.MinibatchCKA`);
:meth:`MinibatchLocalization.merge` combines partial accumulators.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from vitcnn_store.analysis.cka import (
    _as_matrix,
    _check_batch,
    _ratio,
    _to_numpy,
    center_gram,
    gram_linear,
    u_center_gram,
)

__all__ = ["MinibatchLocalization", "image_to_patches", "localization_map"]

FloatArray = npt.NDArray[np.float64]


def image_to_patches(images: Any, patch: int) -> np.ndarray:
    """Cut images (n, H, W, C) into non-overlapping patches, (n, gy·gx, patch·patch·C).

    Patches are ordered row-major over the grid (y, then x), the order of ViT
    patch tokens; each patch is flattened in (y, x, channel) order. The input
    dtype is kept.

    Examples
    --------
    >>> imgs = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    >>> p = image_to_patches(imgs, 2)
    >>> p.shape, bool((p[0, 1] == imgs[0, :2, 2:].ravel()).all())
    ((2, 4, 12), True)
    """
    a = _to_numpy(images)
    if a.ndim != 4:
        raise ValueError(f"images must have shape (n, H, W, C), got {a.shape}")
    n, h, w, c = a.shape
    if patch <= 0 or h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    gy, gx = h // patch, w // patch
    out = a.reshape(n, gy, patch, gx, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(n, gy * gx, patch * patch * c)


def _patch_array(patches: Any) -> np.ndarray:
    p = _to_numpy(patches)
    if p.ndim < 2:
        raise ValueError(f"patches must have shape (n, n_patches, ...), got {p.shape}")
    return p.reshape(p.shape[0], p.shape[1], -1)


class MinibatchLocalization:
    """Unbiased minibatch localization maps for one or several tokens.

    ``update(token_reprs, patches)`` takes one token's representation (n, ...)
    or a list of them, and the batch's patches (n, n_patches, ...). ``result()``
    returns (n_patches,) for a single token, (n_tokens, n_patches) for a list.
    Batches must have equal size n >= 4.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> acc = MinibatchLocalization()
    >>> for _ in range(2):
    ...     patches = rng.normal(size=(16, 4, 12))
    ...     acc.update(patches[:, 2] @ rng.normal(size=(12, 8)), patches)
    >>> int(np.argmax(acc.result()))
    2
    """

    def __init__(self) -> None:
        self.batch_size: int | None = None
        self.n_batches = 0
        self._single: bool | None = None
        self.hsic_tp: FloatArray | None = None  # (n_tokens, n_patches)
        self.hsic_tt: FloatArray | None = None  # (n_tokens,)
        self.hsic_pp: FloatArray | None = None  # (n_patches,)

    def update(self, token_reprs: Any, patches: Any) -> None:
        """Add one batch of token representation(s) and input patches."""
        single = not isinstance(token_reprs, Sequence)
        reps = [token_reprs] if single else list(token_reprs)
        if self._single is not None and single != self._single:
            raise ValueError("mix of single-token and token-list updates")
        p = _patch_array(patches)
        n = p.shape[0]
        self.batch_size = _check_batch(self.batch_size, n)
        # Token Grams U-centred once each; (n_tokens, n*n).
        tu = np.stack([u_center_gram(gram_linear(_as_matrix(r))).ravel() for r in reps])
        if tu.shape[1] != n * n:
            raise ValueError("token representations and patches have different image counts")
        scale = 1.0 / (n * (n - 3))
        tp = np.empty((len(reps), p.shape[1]))
        pp = np.empty(p.shape[1])
        for j in range(p.shape[1]):  # each patch Gram once; loop keeps memory at O(n²)
            pu = u_center_gram(gram_linear(p[:, j])).ravel()
            tp[:, j] = tu @ pu
            pp[j] = pu @ pu
        tt = np.einsum("ij,ij->i", tu, tu)
        if self.hsic_tp is None or self.hsic_tt is None or self.hsic_pp is None:
            self.hsic_tp, self.hsic_tt, self.hsic_pp = tp * scale, tt * scale, pp * scale
        else:
            if tp.shape != self.hsic_tp.shape:
                raise ValueError(f"token/patch counts changed: {tp.shape} vs {self.hsic_tp.shape}")
            self.hsic_tp += tp * scale
            self.hsic_tt += tt * scale
            self.hsic_pp += pp * scale
        self._single = single
        self.n_batches += 1

    def merge(self, other: MinibatchLocalization) -> MinibatchLocalization:
        """Add ``other``'s sums into this accumulator; returns self."""
        if other.hsic_tp is None or other.hsic_tt is None or other.hsic_pp is None:
            return self
        self.batch_size = _check_batch(self.batch_size, other.batch_size or 0)
        if self.hsic_tp is None or self.hsic_tt is None or self.hsic_pp is None:
            self.hsic_tp = other.hsic_tp.copy()
            self.hsic_tt = other.hsic_tt.copy()
            self.hsic_pp = other.hsic_pp.copy()
        else:
            self.hsic_tp += other.hsic_tp
            self.hsic_tt += other.hsic_tt
            self.hsic_pp += other.hsic_pp
        self._single = other._single
        self.n_batches += other.n_batches
        return self

    def result(self) -> FloatArray:
        """Localization map(s): (n_patches,) or (n_tokens, n_patches)."""
        if self.hsic_tp is None or self.hsic_tt is None or self.hsic_pp is None:
            raise ValueError("MinibatchLocalization.result() called before any update()")
        out = np.asarray(_ratio(self.hsic_tp, self.hsic_tt[:, None], self.hsic_pp[None, :]))
        return out[0] if self._single else out


def localization_map(token_repr: Any, patches: Any, *, unbiased: bool = True) -> FloatArray:
    """Linear CKA between one token's representation and every input patch.

    Parameters
    ----------
    token_repr : array (n, D)
        The token's representation over n images (extra dims are flattened).
    patches : array (n, n_patches, P·P·3)
        Raw input pixels per patch (see :func:`image_to_patches`).
    unbiased : bool
        Unbiased HSIC₁ (default; needs n >= 4) or the biased estimator.

    Returns
    -------
    ndarray (n_patches,)
        Reshape to the patch grid (gy, gx) for display.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> patches = rng.normal(size=(32, 9, 12))
    >>> token = patches[:, 4] + 0.1 * rng.normal(size=(32, 12))
    >>> int(np.argmax(localization_map(token, patches)))
    4
    """
    if unbiased:
        acc = MinibatchLocalization()
        acc.update(token_repr, patches)
        return acc.result()
    p = _patch_array(patches)
    tc = center_gram(gram_linear(token_repr))
    if tc.shape[0] != p.shape[0]:
        raise ValueError("token representation and patches have different image counts")
    tt = np.vdot(tc, tc)
    tp = np.empty(p.shape[1])
    pp = np.empty(p.shape[1])
    for j in range(p.shape[1]):
        pc = center_gram(gram_linear(p[:, j]))
        tp[j] = np.vdot(tc, pc)
        pp[j] = np.vdot(pc, pc)
    return np.asarray(_ratio(tp, tt, pp))
