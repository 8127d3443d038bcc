"""Spatial localization maps (Raghu et al. 2021, §7).

For one token t of a layer (a ViT token, or a ResNet spatial position) the
heatmap is ``heatmap_t[p] = CKA(X_t, Y_p)``: linear CKA between that token's
representation over n images, ``X_t`` (n, D), and the raw pixels of input patch p,
``Y_p`` (n, P·P·3). A token that "sees" mostly its own patch peaks there.

The estimate is the minibatch CKA of :class:`~vitcnn_store.analysis.cka.MinibatchCKAMatrix`
with tokens on one side and patches on the other: sums of unbiased HSIC₁ over
equal-size image batches, one ratio at the end. Each token Gram and each patch
Gram is centred once per batch; patch Grams are computed as the accumulator
asks for them, so a batch holds a few n × n matrices, not one per patch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import numpy as np

from vitcnn_store.analysis._arrays import FloatArray, to_numpy
from vitcnn_store.analysis.bootstrap import bootstrap_counts, percentile_interval
from vitcnn_store.analysis.cka import MinibatchCKAMatrix, cka_from_sums
from vitcnn_store.analysis.gram import gram_linear

__all__ = ["MinibatchLocalization", "batch_bootstrap_interval", "image_to_patches"]


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
    a = to_numpy(images)
    if a.ndim != 4:
        raise ValueError(f"images must have shape (n, H, W, C), got {a.shape}")
    n, h, w, c = a.shape
    if patch <= 0 or h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    gy, gx = h // patch, w // patch
    out = a.reshape(n, gy, patch, gx, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(n, gy * gx, patch * patch * c)


def _patch_array(patches: Any) -> np.ndarray:
    p = to_numpy(patches)
    if p.ndim < 2:
        raise ValueError(f"patches must have shape (n, n_patches, ...), got {p.shape}")
    return p.reshape(p.shape[0], p.shape[1], -1)


class _PatchGrams(Sequence[FloatArray]):
    """The linear Gram of each patch, computed when asked for (one n × n at a time)."""

    def __init__(self, patches: np.ndarray) -> None:
        self.patches = patches

    def __len__(self) -> int:
        return int(self.patches.shape[1])

    @overload
    def __getitem__(self, j: int) -> FloatArray: ...
    @overload
    def __getitem__(self, j: slice) -> list[FloatArray]: ...
    def __getitem__(self, j: int | slice) -> Any:
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        return gram_linear(self.patches[:, j])


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
        self.pairs = MinibatchCKAMatrix()
        self._single: bool | None = None

    @property
    def batch_size(self) -> int | None:
        return self.pairs.batch_size

    @property
    def n_batches(self) -> int:
        return self.pairs.n_batches

    def update(self, token_reprs: Any, patches: Any) -> None:
        """Add one batch of token representation(s) and input patches."""
        single = not isinstance(token_reprs, Sequence)
        reps = [token_reprs] if single else list(token_reprs)
        if self._single is not None and single != self._single:
            raise ValueError("mix of single-token and token-list updates")
        self.pairs.update_grams([gram_linear(r) for r in reps], _PatchGrams(_patch_array(patches)))
        self._single = single

    def merge(self, other: MinibatchLocalization) -> MinibatchLocalization:
        """Add ``other``'s sums into this accumulator; returns self."""
        if other.n_batches:
            if self._single is not None and other._single != self._single:
                raise ValueError("mix of single-token and token-list updates")
            self.pairs.merge(other.pairs)
            self._single = other._single
        return self

    def result(self) -> FloatArray:
        """Localization map(s): (n_patches,) or (n_tokens, n_patches)."""
        if not self.n_batches:
            raise ValueError("MinibatchLocalization.result() called before any update()")
        out = self.pairs.result()
        return out[0] if self._single else out


def batch_bootstrap_interval(
    parts: Sequence[MinibatchLocalization], *, n_boot: int, level: float, seed: Any = 0
) -> tuple[FloatArray, FloatArray]:
    """Percentile bootstrap interval of the maps over batches (disjoint random image sets).

    ``parts`` holds one accumulator per batch. A replicate draws as many batches
    with replacement and forms the estimate as :meth:`MinibatchLocalization.result`
    does: HSIC sums over the drawn batches, one ratio at the end. Resampling
    whole batches keeps every HSIC₁ term a sum over distinct images (resampling
    images would pair an image with its own copy). Fewer than two batches give
    NaN: one batch has no spread to resample.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> parts = []
    >>> for _ in range(4):
    ...     p = rng.normal(size=(16, 3, 6)); acc = MinibatchLocalization()
    ...     acc.update([p[:, 1] + 0.5 * rng.normal(size=(16, 6))], p); parts.append(acc)
    >>> lo, hi = batch_bootstrap_interval(parts, n_boot=200, level=0.9)
    >>> bool(lo[0, 1] <= hi[0, 1]), lo.shape
    (True, (1, 3))
    """
    sums = [p.pairs for p in parts]
    first = sums[0].hsic_ab if sums else None
    if first is None or any(s.hsic_ab is None for s in sums):
        raise ValueError("every batch's accumulator needs an update() first")
    shape = first.shape
    if len(sums) < 2:
        nan = np.full(shape, np.nan)
        return nan, nan.copy()
    ab = np.stack([np.asarray(s.hsic_ab) for s in sums])  # (B, L_a, L_b)
    aa = np.stack([np.asarray(s.hsic_aa) for s in sums])
    bb = np.stack([np.asarray(s.hsic_bb) for s in sums])
    sa = np.stack([s.scale_aa for s in sums])
    sb = np.stack([s.scale_bb for s in sums])
    counts = bootstrap_counts(len(sums), n_boot, seed)
    reps = np.stack(
        [
            cka_from_sums(np.tensordot(c, ab, 1), c @ aa, c @ bb, c @ sa, c @ sb, warn=False)
            for c in counts
        ]
    )
    return percentile_interval(reps, level)
