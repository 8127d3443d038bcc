"""Skip-connection norm ratios (Raghu et al. 2021, §6).

For a residual block ``z + f(z)``, the ratio ``‖z‖ / ‖f(z)‖`` per token (L2 norm
over channels) says how much the skip path dominates the branch. It is computed
per image and token, then averaged over images; CLS is reported separately
from spatial tokens (:func:`cls_and_spatial_ratio`).

Shapes: token layers (n, token, channel); spatial CNN layers (n, y, x, channel),
whose positions are flattened row-major into tokens; pooled layers (n, channel)
count as a single token. Norms are taken in float64.

Division by zero: ``‖f(z)‖`` is clamped below by ``eps`` (default 1e-12), so a
dead branch gives a very large but finite ratio instead of inf/NaN; ``eps`` is
far below any float16/float32 activation norm and does not change normal values.

Dead branches: a branch whose output is exactly zero has no ratio to speak of
(timm, for one, initialises the last BatchNorm of every ResNet residual branch
to zero, so a random-init ResNet's branches all output 0). :func:`zero_norm_count`
counts the tokens where ``‖f(z)‖ < eps`` so a job can say so instead of
reporting 1e12.

Accumulating form: :func:`skip_norm_ratio_sum` returns (sum over images, count)
so a job can add chunks and divide once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from vitcnn_store.analysis._arrays import to_numpy

__all__ = [
    "cls_and_spatial_ratio",
    "skip_norm_ratio",
    "skip_norm_ratio_per_image",
    "skip_norm_ratio_sum",
    "zero_norm_count",
]

FloatArray = npt.NDArray[np.float64]


def _tokens(a: Any, name: str) -> FloatArray:
    """(n, ...spatial, channel) -> float64 (n, token, channel)."""
    x = to_numpy(a)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (n, [token | y, x], channel), got {x.shape}")
    return np.asarray(x.reshape(x.shape[0], -1, x.shape[-1]), dtype=np.float64)


def skip_norm_ratio_per_image(z: Any, fz: Any, *, eps: float = 1e-12) -> FloatArray:
    """(n, token) ``‖z‖/max(‖f(z)‖, eps)`` per image and token (norms over channels).

    Examples
    --------
    >>> skip_norm_ratio_per_image(np.ones((2, 1, 4)), np.full((2, 1, 4), 0.5)).tolist()
    [[2.0], [2.0]]
    """
    zt, ft = _tokens(z, "z"), _tokens(fz, "fz")
    if zt.shape != ft.shape:
        raise ValueError(f"z and f(z) shapes differ: {zt.shape} vs {ft.shape}")
    return np.linalg.norm(zt, axis=-1) / np.maximum(np.linalg.norm(ft, axis=-1), eps)


def skip_norm_ratio_sum(z: Any, fz: Any, *, eps: float = 1e-12) -> tuple[FloatArray, int]:
    """Per-token sum over images of ``‖z‖/max(‖f(z)‖, eps)``, and the image count.

    Examples
    --------
    >>> s, n = skip_norm_ratio_sum(np.ones((2, 3, 4)), np.full((2, 3, 4), 0.5))
    >>> s.tolist(), n
    ([4.0, 4.0, 4.0], 2)
    """
    ratio = skip_norm_ratio_per_image(z, fz, eps=eps)
    return ratio.sum(axis=0), ratio.shape[0]


def zero_norm_count(fz: Any, *, eps: float = 1e-12) -> npt.NDArray[np.int64]:
    """Per token, the number of images whose branch output has ``‖f(z)‖ < eps``.

    Examples
    --------
    >>> fz = np.zeros((3, 2, 4)); fz[0, 1] = 1.0
    >>> zero_norm_count(fz).tolist()
    [3, 2]
    """
    norms = np.linalg.norm(_tokens(fz, "fz"), axis=-1)
    return np.asarray((norms < eps).sum(axis=0), dtype=np.int64)


def skip_norm_ratio(z: Any, fz: Any, *, eps: float = 1e-12) -> FloatArray:
    """Mean over images of the per-token ratio ``‖z‖ / ‖f(z)‖``, shape (token,).

    Parameters
    ----------
    z : array (n, token, channel) or (n, y, x, channel) or (n, channel)
        Representation on the skip path (the block input).
    fz : array, same shape as ``z``
        Branch output (attention/MLP branch, or ResNet residual branch).
    eps : float
        Lower bound on ``‖f(z)‖`` guarding against division by zero.

    Examples
    --------
    >>> z = np.array([[[3.0, 4.0], [1.0, 0.0]]])
    >>> fz = np.array([[[1.0, 0.0], [0.0, 2.0]]])
    >>> skip_norm_ratio(z, fz).tolist()
    [5.0, 0.5]
    """
    total, n = skip_norm_ratio_sum(z, fz, eps=eps)
    if n == 0:
        raise ValueError("no images")
    return total / n


def cls_and_spatial_ratio(
    ratio: Any, n_prefix: int = 1, *, cls_index: int = 0
) -> tuple[float, float]:
    """Split per-token ratios into (CLS ratio, mean over spatial tokens).

    The first ``n_prefix`` tokens are prefix tokens (CLS and any registers);
    the CLS ratio is ``ratio[cls_index]`` (NaN when ``n_prefix == 0``, e.g. CNNs)
    and registers are excluded from the spatial mean.

    Examples
    --------
    >>> cls_and_spatial_ratio(np.array([10.0, 1.0, 3.0]))
    (10.0, 2.0)
    """
    r = np.asarray(to_numpy(ratio), dtype=np.float64).ravel()
    if not 0 <= n_prefix < r.size:
        raise ValueError(f"n_prefix must be in [0, {r.size}), got {n_prefix}")
    if n_prefix and not 0 <= cls_index < n_prefix:
        raise ValueError(f"cls_index {cls_index} is not a prefix token (n_prefix={n_prefix})")
    cls = float(r[cls_index]) if n_prefix else float("nan")
    return cls, float(r[n_prefix:].mean())
