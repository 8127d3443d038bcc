"""Array conversions every kernel shares: torch or numpy in, numpy out.

torch is never imported: a tensor is recognised by its ``detach``/``cpu`` methods.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["FloatArray", "as_features", "as_matrix", "as_square", "to_numpy"]

FloatArray = npt.NDArray[np.float64]


def to_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array, dtype kept; torch tensors are detached and moved to CPU.

    Examples
    --------
    >>> to_numpy([1, 2]).tolist()
    [1, 2]
    """
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 is exact
            t = t.float()
        return np.asarray(t.numpy())
    return np.asarray(x)


def as_features(x: Any) -> np.ndarray:
    """(n, ...) -> (n, prod(...)) in the input's dtype; a 1-d input is one feature.

    Examples
    --------
    >>> as_features(np.zeros((2, 3, 4), np.float16)).shape
    (2, 12)
    """
    a = to_numpy(x)
    if a.ndim == 0:
        raise ValueError("a representation needs a leading image axis, got a scalar")
    return a.reshape(a.shape[0], -1)


def as_matrix(x: Any) -> FloatArray:
    """(n, ...) -> contiguous float64 (n, prod(...)).

    Examples
    --------
    >>> as_matrix(np.ones(3, np.float16)).dtype, as_matrix(np.ones(3)).shape
    (dtype('float64'), (3, 1))
    """
    return np.ascontiguousarray(as_features(x), dtype=np.float64)


def as_square(g: Any, what: str = "a Gram matrix") -> FloatArray:
    """A float64 (n, n) array, or ``ValueError`` naming ``what`` was expected.

    Examples
    --------
    >>> as_square(np.eye(2)).shape
    (2, 2)
    """
    a = np.asarray(to_numpy(g), dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{what} must be square (n, n), got shape {a.shape}")
    return a
