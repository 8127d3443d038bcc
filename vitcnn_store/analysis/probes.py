"""Linear probes: closed-form ridge regression onto {-1, 1} one-hot targets.

Following Raghu et al. (2021, App. A), a probe regresses ``T`` (n, C) with
``T[i, c] = 1`` if ``y_i == c`` else ``-1`` on standardized features (train
mean/std) and predicts the arg-max class. The objective is
``‖Z W + 1bᵀ − T‖² + l2·‖W‖²`` with the bias ``b`` unpenalized, solved in
closed form: primal ``(ZᵀZ + l2 I)⁻¹ ZᵀT`` when D <= n, dual
``Zᵀ(ZZᵀ + l2 I)⁻¹ T`` when D > n (an n×n solve instead of D×D). Features
(n, ...) are flattened and cast to float64; labels are ints in [0, C).

The penalty ``l2`` matters as much as the layer (on small training sets the
accuracy can swing from chance to perfect across 1e-3…1e4), so
:func:`ridge_probe` chooses it by stratified k-fold cross-validation on the
training split over a grid (:data:`DEFAULT_L2_GRID`): features are
standardized once with the training split's statistics, every fold fits a
centred ridge for every grid value from one eigendecomposition
(:func:`cross_validate_l2`), the mean validation accuracy over folds decides,
ties go to the larger penalty, and the probe is refit on the whole training
split. This is what scikit-learn's ``RidgeClassifierCV(alphas, cv=folds)``
computes on standardized features (the tests check it).

:func:`few_shot_split` draws a deterministic k-per-class train split,
:func:`stratified_split` a deterministic per-class train/test split, and
:func:`probe_splits` one of either per repeat (seeds ``seed, seed + 1, ...``);
:func:`stratified_folds` cuts a training split into cross-validation folds, and
:func:`chance_accuracy` is the baseline a constant prediction reaches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from vitcnn_store.analysis._arrays import as_matrix, to_numpy
from vitcnn_store.defaults import DEFAULT_L2_GRID

__all__ = [
    "DEFAULT_L2_GRID",
    "ProbeFit",
    "chance_accuracy",
    "cross_validate_l2",
    "few_shot_split",
    "fit_ridge",
    "group_split",
    "linear_probe_accuracy",
    "predict",
    "probe_splits",
    "ridge_probe",
    "stratified_folds",
    "stratified_split",
]

#: Ridge penalties tried by cross-validation: 1e-3 … 1e5 in half decades (features
#: are standardized, so the penalty compares with n times a feature's variance).

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
    labels: Any,
    shots: int,
    seed: int,
    repeats: int = 1,
    test_fraction: float = 0.25,
    groups: Any = None,
) -> list[tuple[IntArray, IntArray]]:
    """(train, test) index pairs into ``labels``, one per repeat with seed ``seed + r``.

    ``shots > 0``: :func:`few_shot_split` (k per class train); ``shots == 0``:
    :func:`stratified_split` holding out ``test_fraction``; with ``groups``,
    :func:`group_split` (no group on both sides).

    Examples
    --------
    >>> [len(tr) for tr, _ in probe_splits([0, 0, 0, 1, 1, 1], shots=1, seed=0, repeats=2)]
    [2, 2]
    """
    if groups is not None:
        return [group_split(labels, groups, shots, test_fraction, seed + r) for r in range(repeats)]
    if shots:
        return [few_shot_split(labels, shots, seed + r) for r in range(repeats)]
    return [stratified_split(labels, test_fraction, seed + r) for r in range(repeats)]


def chance_accuracy(y_test: Any) -> float:
    """Accuracy of the best constant prediction on ``y_test``: its largest class share.

    This is the baseline a probe must beat (1/C on a balanced test set).

    Examples
    --------
    >>> chance_accuracy([0, 0, 1, 2])
    0.5
    """
    lab = _labels(y_test, len(np.asarray(to_numpy(y_test)).ravel()))
    if not lab.size:
        raise ValueError("empty test set")
    return float(np.bincount(lab).max() / lab.size)


def stratified_folds(
    labels: Any, k: int, seed: int, *, groups: Any = None
) -> list[tuple[IntArray, IntArray]]:
    """Deterministic stratified k-fold split of ``labels``: (train, validation) index pairs.

    Each class's images are permuted and dealt round-robin over the folds (the
    deal continues across classes, so fold sizes differ by at most one). ``k``
    is capped at the smallest class count: a class must appear in every
    fold's validation part. Fewer than 2 images of some class is an error.

    Examples
    --------
    >>> folds = stratified_folds([0, 0, 0, 1, 1, 1], k=5, seed=0)
    >>> len(folds), [len(v) for _, v in folds]
    (3, [2, 2, 2])
    """
    lab = _labels(labels, len(np.asarray(to_numpy(labels)).ravel()))
    if k < 2:
        raise ValueError(f"cross-validation needs k >= 2 folds, got {k}")
    if groups is not None:
        return _group_folds(lab, np.asarray(groups), k, seed)
    classes, counts = np.unique(lab, return_counts=True)
    if not classes.size or counts.min() < 2:
        c = classes[np.argmin(counts)] if classes.size else "-"
        raise ValueError(
            f"cross-validation needs at least 2 training images of every class; "
            f"class {c} has {counts.min() if classes.size else 0}"
        )
    k = int(min(k, counts.min()))
    rng = np.random.default_rng(seed)
    fold_of = np.empty(lab.size, dtype=np.int64)
    dealt = 0
    for c in classes:  # sorted classes: the same folds for the same seed
        idx = rng.permutation(np.flatnonzero(lab == c))
        fold_of[idx] = (np.arange(idx.size) + dealt) % k
        dealt += idx.size
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def _standardize(X: FloatArray) -> FloatArray:
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std[std < 1e-12] = 1.0  # as in fit_ridge: constant features are only centred
    return (X - mean) / std


def _targets(lab: IntArray, n_classes: int) -> FloatArray:
    T = -np.ones((lab.size, n_classes))
    T[np.arange(lab.size), lab] = 1.0
    return T


def _path_predictions(
    Z: FloatArray, T: FloatArray, Zv: FloatArray, grid: FloatArray
) -> list[FloatArray]:
    """Validation scores of a centred ridge (unpenalized bias) for every penalty in ``grid``.

    One symmetric eigendecomposition serves the whole grid: primal
    ZᵀZ = V S Vᵀ gives W(λ) = V (S + λ)⁻¹ Vᵀ ZᵀT; dual ZZᵀ = U S Uᵀ gives
    W(λ) = Zᵀ U (S + λ)⁻¹ Uᵀ T.
    """
    mean, t_mean = Z.mean(axis=0), T.mean(axis=0)
    Zc, Tc, Zvc = Z - mean, T - t_mean, Zv - mean
    n, d = Zc.shape
    if d <= n:
        s, V = np.linalg.eigh(Zc.T @ Zc)
        B = V.T @ (Zc.T @ Tc)
        M = Zvc @ V
    else:
        s, U = np.linalg.eigh(Zc @ Zc.T)
        B = U.T @ Tc
        M = (Zvc @ Zc.T) @ U
    s = np.clip(s, 0.0, None)  # roundoff can leave tiny negative eigenvalues
    return [M @ (B / (s + lam)[:, None]) + t_mean for lam in grid]


def cross_validate_l2(
    X: Any,
    y: Any,
    n_classes: int,
    folds: list[tuple[IntArray, IntArray]],
    grid: Any = DEFAULT_L2_GRID,
) -> tuple[float, FloatArray]:
    """The ridge penalty with the best mean validation accuracy over ``folds``.

    ``X`` is standardized once with its own mean and standard deviation (the
    whole training split's; no labels are used), then each fold fits a ridge
    with an unpenalized bias on its training part for every value of ``grid``
    and scores accuracy on its validation part. Returns the chosen penalty
    (the largest among ties: the most regularized of the best) and the mean
    validation accuracy per grid value (unweighted over folds, as
    scikit-learn's ``GridSearchCV`` averages).

    Examples
    --------
    >>> X = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    >>> l2, scores = cross_validate_l2(X, [0, 0, 0, 1, 1, 1], 2,
    ...                                stratified_folds([0, 0, 0, 1, 1, 1], 3, 0), [0.1, 1e6])
    >>> l2, scores.tolist()
    (1000000.0, [1.0, 1.0])
    """
    g = np.asarray(grid, dtype=np.float64).ravel()
    if not g.size or not np.all(np.isfinite(g)) or g.min() <= 0:
        raise ValueError(f"the l2 grid must hold positive finite values, got {g.tolist()}")
    Z = _standardize(as_matrix(X))
    lab = _labels(y, Z.shape[0], n_classes)
    if not folds:
        raise ValueError("no cross-validation folds")
    scores = np.zeros((len(folds), g.size))
    for f, (train, val) in enumerate(folds):
        preds = _path_predictions(Z[train], _targets(lab[train], n_classes), Z[val], g)
        scores[f] = [np.mean(np.argmax(p, axis=1) == lab[val]) for p in preds]
    mean = scores.mean(axis=0)
    best = np.flatnonzero(mean >= mean.max() - 1e-12)
    return float(g[best].max()), mean


def _group_folds(
    lab: IntArray, groups: np.ndarray, k: int, seed: int
) -> list[tuple[IntArray, IntArray]]:
    """Folds that keep each group whole: a class's groups are dealt round-robin."""
    rng = np.random.default_rng(seed)
    classes = np.unique(lab)
    counts = [np.unique(groups[lab == c]).size for c in classes]
    if min(counts) < 2:
        c = classes[int(np.argmin(counts))]
        raise ValueError(
            f"cross-validation by group needs 2 groups of every class; class {c} has one"
        )
    k = int(min(k, min(counts)))
    fold_of = np.empty(lab.size, dtype=np.int64)
    dealt = 0
    for c in classes:
        members = groups[lab == c]
        uniq = rng.permutation(np.unique(members))
        for i, g in enumerate(uniq):
            fold_of[(lab == c) & (groups == g)] = (i + dealt) % k
        dealt += uniq.size
    return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)) for f in range(k)]


def group_split(
    labels: Any, groups: Any, shots: int, test_fraction: float, seed: int
) -> tuple[IntArray, IntArray]:
    """A split that keeps every group (e.g. the crops of one photograph) on one side.

    Per class the groups are permuted; ``shots > 0`` takes training images from
    the first groups until it has ``shots`` (the rest of those groups is left
    out) and tests the other groups; ``shots == 0`` holds out whole groups until
    ``test_fraction`` of the class's images is reached. Every class needs two
    groups. Negative labels are left out.

    Examples
    --------
    >>> tr, te = group_split([0, 0, 0, 0, 1, 1, 1, 1], list("aabbccdd"), 0, 0.5, seed=0)
    >>> sorted(tr.tolist() + te.tolist()), len(tr), len(te)
    ([0, 1, 2, 3, 4, 5, 6, 7], 4, 4)
    """
    lab = np.asarray(to_numpy(labels)).ravel().astype(np.int64)
    grp = np.asarray(groups).ravel()
    if grp.size != lab.size:
        raise ValueError(f"{grp.size} groups for {lab.size} labels")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(lab[lab >= 0]):
        members = np.flatnonzero(lab == c)
        order = rng.permutation(np.unique(grp[members]))
        if order.size < 2:
            raise ValueError(
                f"class {c} has all its images in one group ({order[0]}): a split that keeps "
                "groups apart cannot both train and test it"
            )
        by_group = [members[grp[members] == g] for g in order]
        if shots:
            taken: list[IntArray] = []
            k = 0
            while k < order.size - 1 and sum(t.size for t in taken) < shots:
                taken.append(by_group[k])
                k += 1
            pool = np.concatenate(taken)
            if pool.size < shots:
                raise ValueError(f"class {c}: {shots}-shot by group leaves no group to test")
            train.append(np.sort(pool)[:shots])
            test.append(np.concatenate(by_group[k:]))
        else:
            want = max(1, round(test_fraction * members.size))
            held: list[IntArray] = []
            k = 0
            while k < order.size - 1 and sum(h.size for h in held) < want:
                held.append(by_group[k])
                k += 1
            test.append(np.concatenate(held))
            train.append(np.concatenate(by_group[k:]))
    if not train:
        raise ValueError("no labelled examples")
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@dataclass(frozen=True)
class ProbeFit:
    """One probe: test ``accuracy`` at penalty ``l2``; with cross-validation,
    the mean validation accuracy per grid value (``cv_accuracy``) and the
    number of folds, else ``None`` and 0."""

    accuracy: float
    l2: float
    cv_accuracy: FloatArray | None
    cv_folds: int
    correct: npt.NDArray[np.bool_] | None = None  # per test image (for the bootstrap)
    folds: IntArray | None = None  # per training image, its validation fold (with CV)


def ridge_probe(
    X_train: Any,
    y_train: Any,
    X_test: Any,
    y_test: Any,
    *,
    n_classes: int,
    l2: float | None = None,
    l2_grid: Any = DEFAULT_L2_GRID,
    cv_folds: int = 5,
    seed: int = 0,
    groups: Any = None,
) -> ProbeFit:
    """Fit a ridge probe on the training split and score it on the test split.

    With ``l2=None`` the penalty is chosen by :func:`cross_validate_l2` over
    ``l2_grid`` on :func:`stratified_folds` of the training split (``cv_folds``
    capped at the smallest class count; ``seed`` draws the folds; ``groups``
    of the training images keep each group in one fold); a number fixes it. The
    test split is never seen before the final score.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([0, 1], 20)
    >>> X = rng.normal(size=(40, 3)) + 3.0 * y[:, None]
    >>> fit = ridge_probe(X[::2], y[::2], X[1::2], y[1::2], n_classes=2)
    >>> fit.accuracy, fit.cv_folds, fit.cv_accuracy.shape
    (1.0, 5, (17,))
    """
    Xtr, Xte = as_matrix(X_train), as_matrix(X_test)
    ytr, yte = _labels(y_train, Xtr.shape[0], n_classes), _labels(y_test, Xte.shape[0], n_classes)
    if not yte.size:
        raise ValueError("empty test set")
    cv_scores: FloatArray | None = None
    fold_of: IntArray | None = None
    k = 0
    if l2 is None:
        folds = stratified_folds(ytr, cv_folds, seed, groups=groups)
        k = len(folds)
        fold_of = np.empty(ytr.size, dtype=np.int64)
        for f, (_, val) in enumerate(folds):
            fold_of[val] = f
        l2, cv_scores = cross_validate_l2(Xtr, ytr, n_classes, folds, l2_grid)
    W = fit_ridge(Xtr, ytr, n_classes, l2=l2)
    correct = predict(W, Xte) == yte
    return ProbeFit(float(np.mean(correct)), float(l2), cv_scores, k, correct, fold_of)
