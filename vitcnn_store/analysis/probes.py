"""Linear probes: closed-form ridge regression onto {-1, 1} one-hot targets.

Following Raghu et al. (2021, App. A), a probe regresses ``T`` (n, C) with
``T[i, c] = 1`` if ``y_i == c`` else ``-1`` on standardized features (train
mean/std) and predicts the arg-max class. The objective is
``‖Z W + 1bᵀ − T‖² + l2·‖W‖²`` with the bias ``b`` unpenalized, solved in
closed form: primal ``(ZᵀZ + l2 I)⁻¹ ZᵀT`` when D <= n, dual
``Zᵀ(ZZᵀ + l2 I)⁻¹ T`` when D > n (an n×n solve instead of D×D). Features
(n, ...) are flattened and cast to float64; labels are ints in [0, C).

:func:`few_shot_split` draws a deterministic k-per-class train split,
:func:`stratified_split` a deterministic per-class train/test split, and
:func:`probe_splits` one of either per repeat (seeds ``seed, seed + 1, ...``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from vitcnn_store.analysis._arrays import as_matrix, to_numpy

__all__ = [
    "few_shot_split",
    "fit_ridge",
    "linear_probe_accuracy",
    "predict",
    "probe_splits",
    "stratified_split",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _labels(y: Any, n: int, n_classes: int | None = None) -> IntArray:
    lab = np.asarray(to_numpy(y)).ravel()
    if lab.shape[0] != n:
        raise ValueError(f"{lab.shape[0]} labels for {n} feature rows")
    if not np.issubdtype(lab.dtype, np.integer) and not np.all(lab == np.round(lab)):
        raise ValueError("labels must be integers")
    lab = lab.astype(np.int64)
    if lab.size and lab.min() < 0:
        raise ValueError("labels must be >= 0 (unknown labels, -1, cannot be probed)")
    if n_classes is not None and lab.size and lab.max() >= n_classes:
        raise ValueError(f"label {lab.max()} out of range for n_classes={n_classes}")
    return lab


def fit_ridge(X: Any, y: Any, n_classes: int, l2: float = 1e-3) -> FloatArray:
    """Fit a ridge probe; returns weights (D + 1, n_classes), the last row the bias.

    Standardization (train mean/std; constant features are only centred) is
    folded into the returned weights, so :func:`predict` takes raw features.

    Examples
    --------
    >>> X = np.array([[0.0], [1.0], [10.0], [11.0]])
    >>> W = fit_ridge(X, [0, 0, 1, 1], n_classes=2)
    >>> W.shape, predict(W, np.array([[0.5], [12.0]])).tolist()
    ((2, 2), [0, 1])
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    Xm = as_matrix(X)
    n, d = Xm.shape
    lab = _labels(y, n, n_classes)
    if n == 0:
        raise ValueError("no training examples")
    mean = Xm.mean(axis=0)
    std = Xm.std(axis=0)
    std[std < 1e-12] = 1.0  # constant features: centred to 0, never divided by ~0
    Z = (Xm - mean) / std
    T = -np.ones((n, n_classes))
    T[np.arange(n), lab] = 1.0
    # Centred Z makes the optimal unpenalized bias the target mean.
    t_mean = T.mean(axis=0)
    Tc = T - t_mean
    if d > n:
        A = Z @ Z.T
        A[np.diag_indices(n)] += l2
        W = Z.T @ _solve(A, Tc)
    else:
        A = Z.T @ Z
        A[np.diag_indices(d)] += l2
        W = _solve(A, Z.T @ Tc)
    # Z W + b = X (W / std) + (b − (mean / std) W)
    W_raw = W / std[:, None]
    bias = t_mean - (mean / std) @ W
    return np.vstack([W_raw, bias[None, :]])


def _solve(A: FloatArray, B: FloatArray) -> FloatArray:
    try:
        out = np.linalg.solve(A, B)
    except np.linalg.LinAlgError:  # singular only when l2 == 0: minimum-norm solution
        out = np.linalg.lstsq(A, B, rcond=None)[0]
    return np.asarray(out, dtype=np.float64)


def predict(weights: Any, X: Any) -> IntArray:
    """Predicted class per row of ``X`` for weights from :func:`fit_ridge`.

    Examples
    --------
    >>> predict(np.array([[1.0, -1.0], [0.0, 0.0]]), np.array([[2.0], [-2.0]])).tolist()
    [0, 1]
    """
    W = np.asarray(to_numpy(weights), dtype=np.float64)
    Xm = as_matrix(X)
    if Xm.shape[1] != W.shape[0] - 1:
        raise ValueError(f"X has {Xm.shape[1]} features, weights expect {W.shape[0] - 1}")
    return np.argmax(Xm @ W[:-1] + W[-1], axis=1).astype(np.int64)


def linear_probe_accuracy(
    X_train: Any,
    y_train: Any,
    X_test: Any,
    y_test: Any,
    *,
    l2: float = 1e-3,
    n_classes: int | None = None,
) -> float:
    """Test accuracy of a ridge probe fit on the training set.

    ``n_classes`` defaults to ``max(label) + 1`` over train and test labels.

    Examples
    --------
    >>> X = np.array([[0.0], [1.0], [10.0], [11.0]])
    >>> linear_probe_accuracy(X, [0, 0, 1, 1], X[::-1], [1, 1, 0, 0])
    1.0
    """
    Xtr, Xte = as_matrix(X_train), as_matrix(X_test)
    ytr, yte = _labels(y_train, Xtr.shape[0]), _labels(y_test, Xte.shape[0])
    if not yte.size:
        raise ValueError("empty test set")
    if n_classes is None:
        n_classes = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    W = fit_ridge(Xtr, ytr, n_classes, l2=l2)
    return float(np.mean(predict(W, Xte) == yte))


def few_shot_split(labels: Any, shots: int, seed: int) -> tuple[IntArray, IntArray]:
    """Deterministic few-shot split: ``shots`` examples per class train, the rest test.

    Negative labels (unknown, -1) are left out of both sets. Every class needs
    at least ``shots + 1`` examples so that it also appears in the test set.
    Returns sorted index arrays; the same ``seed`` gives the same split.

    Examples
    --------
    >>> tr, te = few_shot_split([0, 0, 0, 1, 1, 1, -1], shots=2, seed=0)
    >>> len(tr), len(te), sorted(set(tr) | set(te)) == list(range(6))
    (4, 2, True)
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    lab = np.asarray(to_numpy(labels)).ravel().astype(np.int64)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(lab[lab >= 0]):  # sorted classes: same draws for the same seed
        idx = np.flatnonzero(lab == c)
        if idx.size < shots + 1:
            raise ValueError(
                f"class {c} has {idx.size} examples; {shots}-shot needs at least {shots + 1}"
            )
        perm = rng.permutation(idx)
        train.append(perm[:shots])
        test.append(perm[shots:])
    if not train:
        raise ValueError("no labelled examples")
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def stratified_split(labels: Any, test_fraction: float, seed: int) -> tuple[IntArray, IntArray]:
    """Deterministic stratified split: each class holds out ``test_fraction`` of its images.

    Every class keeps at least one image on each side (so each needs 2);
    negative labels are left out. Returns sorted index arrays.

    Examples
    --------
    >>> tr, te = stratified_split([0, 0, 0, 0, 1, 1, 1, 1], 0.25, seed=0)
    >>> len(tr), len(te), sorted(set(tr) | set(te)) == list(range(8))
    (6, 2, True)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    lab = np.asarray(to_numpy(labels)).ravel().astype(np.int64)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(lab[lab >= 0]):  # sorted classes: same draws for the same seed
        idx = rng.permutation(np.flatnonzero(lab == c))
        if idx.size < 2:
            raise ValueError(f"class {c} has {idx.size} labelled image(s); a split needs 2")
        k = min(idx.size - 1, max(1, round(test_fraction * idx.size)))
        test.append(idx[:k])
        train.append(idx[k:])
    if not train:
        raise ValueError("no labelled examples")
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def probe_splits(
    labels: Any, shots: int, seed: int, repeats: int = 1, test_fraction: float = 0.25
) -> list[tuple[IntArray, IntArray]]:
    """(train, test) index pairs into ``labels``, one per repeat with seed ``seed + r``.

    ``shots > 0``: :func:`few_shot_split` (k per class train); ``shots == 0``:
    :func:`stratified_split` holding out ``test_fraction``.

    Examples
    --------
    >>> [len(tr) for tr, _ in probe_splits([0, 0, 0, 1, 1, 1], shots=1, seed=0, repeats=2)]
    [2, 2]
    """
    if shots:
        return [few_shot_split(labels, shots, seed + r) for r in range(repeats)]
    return [stratified_split(labels, test_fraction, seed + r) for r in range(repeats)]
