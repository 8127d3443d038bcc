"""Ridge linear probes and few-shot splits."""

from __future__ import annotations

import numpy as np
import pytest

from vitcnn_store.analysis.probes import (
    few_shot_split,
    fit_ridge,
    linear_probe_accuracy,
    predict,
    probe_splits,
    stratified_split,
)


def blobs(n_per_class, n_classes, dim, seed, sep=4.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * sep
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + rng.normal(size=(y.size, dim))
    perm = rng.permutation(y.size)
    return X[perm], y[perm]


def reference_ridge(X, y, n_classes, l2):
    """Primal ridge with an explicit unpenalized bias column on standardized features."""
    mean, std = X.mean(0), X.std(0)
    Z = np.hstack([(X - mean) / std, np.ones((len(X), 1))])
    T = -np.ones((len(X), n_classes))
    T[np.arange(len(X)), y] = 1
    P = l2 * np.eye(Z.shape[1])
    P[-1, -1] = 0.0
    W = np.linalg.solve(Z.T @ Z + P, Z.T @ T)
    return lambda Xq: ((Xq - mean) / std) @ W[:-1] + W[-1]


@pytest.mark.parametrize(("n_per_class", "dim"), [(30, 5), (4, 40)])  # primal, dual
def test_fit_matches_reference(n_per_class, dim):
    X, y = blobs(n_per_class, 3, dim, seed=0)
    l2 = 0.7
    W = fit_ridge(X, y, 3, l2=l2)
    assert W.shape == (dim + 1, 3)
    Xq = np.random.default_rng(1).normal(size=(10, dim)) * 3
    np.testing.assert_allclose(Xq @ W[:-1] + W[-1], reference_ridge(X, y, 3, l2)(Xq), atol=1e-9)


def test_separable_beats_chance_few_shot_and_full():
    X, y = blobs(300, 5, 32, seed=2)
    tr, te = few_shot_split(y, shots=5, seed=0)
    acc_few = linear_probe_accuracy(X[tr], y[tr], X[te], y[te])
    acc_full = linear_probe_accuracy(X[:1000], y[:1000], X[1000:], y[1000:])
    assert acc_few > 0.9 and acc_full > 0.95


def test_shuffled_labels_sit_at_chance():
    X, y = blobs(800, 4, 16, seed=3)
    y_shuffled = np.random.default_rng(4).permutation(y)
    n_train = 1200
    acc = linear_probe_accuracy(
        X[:n_train], y_shuffled[:n_train], X[n_train:], y_shuffled[n_train:]
    )
    n_test = len(y) - n_train
    sd = np.sqrt(0.25 * 0.75 / n_test)  # binomial sd of accuracy at chance 1/4
    assert abs(acc - 0.25) < 5 * sd


def test_constant_features_and_torch_inputs():
    torch = pytest.importorskip("torch")
    X, y = blobs(20, 2, 3, seed=5)
    X = np.hstack([X, np.full((len(X), 1), 7.0)])  # constant feature must not blow up
    W = fit_ridge(torch.from_numpy(X), torch.from_numpy(y), 2)
    assert np.all(np.isfinite(W))
    assert np.mean(predict(W, X) == y) > 0.9


def test_few_shot_split_is_deterministic_and_balanced():
    y = np.array([0] * 10 + [1] * 6 + [2] * 4 + [-1] * 3)
    tr, te = few_shot_split(y, shots=3, seed=7)
    tr2, te2 = few_shot_split(y, shots=3, seed=7)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(te, te2)
    assert np.bincount(y[tr]).tolist() == [3, 3, 3]
    assert set(tr).isdisjoint(te) and set(tr) | set(te) == set(range(20))
    other = [tuple(few_shot_split(y, shots=3, seed=s)[0]) for s in range(5)]
    assert len(set(other)) > 1
    with pytest.raises(ValueError, match="class 2 has 4 examples"):
        few_shot_split(y, shots=4, seed=0)


def test_label_validation():
    X = np.zeros((3, 2))
    with pytest.raises(ValueError, match=">= 0"):
        linear_probe_accuracy(X, [0, 1, -1], X, [0, 1, 1])
    with pytest.raises(ValueError, match="labels for"):
        fit_ridge(X, [0, 1], 2)


def test_stratified_split_holds_out_each_class():
    y = np.array([0] * 8 + [1] * 4 + [2] * 2 + [-1] * 2)
    tr, te = stratified_split(y, 0.25, seed=3)
    assert np.bincount(y[te]).tolist() == [2, 1, 1]  # round(0.25 n), at least one, not all
    assert set(tr).isdisjoint(te) and set(tr) | set(te) == set(range(14))
    np.testing.assert_array_equal(stratified_split(y, 0.25, seed=3)[1], te)
    with pytest.raises(ValueError, match="class 1 has 1 labelled image"):
        stratified_split([0, 0, 1], 0.5, seed=0)
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(y, 1.0, seed=0)


def test_probe_splits_use_consecutive_seeds():
    y = np.repeat(np.arange(3), 6)
    full = probe_splits(y, shots=0, seed=5, repeats=3)
    assert [te.tolist() for _, te in full] == [
        stratified_split(y, 0.25, seed=s)[1].tolist() for s in (5, 6, 7)
    ]
    few = probe_splits(y, shots=2, seed=5, repeats=2)
    assert [tr.tolist() for tr, _ in few] == [
        few_shot_split(y, 2, seed=s)[0].tolist() for s in (5, 6)
    ]


# --- penalty chosen by cross-validation, against scikit-learn -------------------------

from vitcnn_store.analysis.probes import (  # noqa: E402
    DEFAULT_L2_GRID,
    chance_accuracy,
    cross_validate_l2,
    ridge_probe,
    stratified_folds,
)


def _sklearn_reference(Xtr, ytr, Xte, folds, grid):
    """scikit-learn's RidgeClassifierCV on standardized features, the same folds; ties
    broken towards the larger penalty (GridSearchCV keeps the first best, so the grid
    goes in descending order)."""
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(Xtr)
    alphas = sorted(grid, reverse=True)
    clf = RidgeClassifierCV(alphas=alphas, cv=folds, fit_intercept=True)
    clf.fit(scaler.transform(Xtr), ytr)
    return clf.alpha_, clf.best_score_, clf.predict(scaler.transform(Xte))


@pytest.mark.parametrize(
    ("n_per_class", "n_classes", "dim", "sep"),
    [(40, 2, 8, 0.6), (12, 3, 60, 0.8), (30, 4, 25, 0.5)],  # primal, dual, multi-class
)
def test_cv_choice_and_predictions_match_ridge_classifier_cv(n_per_class, n_classes, dim, sep):
    pytest.importorskip("sklearn")
    X, y = blobs(2 * n_per_class, n_classes, dim, seed=n_classes, sep=sep)
    X[:, 0] *= 50.0  # unequal scales: standardization matters
    n_train = n_per_class * n_classes
    Xtr, ytr, Xte, yte = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
    folds = stratified_folds(ytr, 5, seed=1)
    l2, scores = cross_validate_l2(Xtr, ytr, n_classes, folds, DEFAULT_L2_GRID)
    ref_l2, ref_best, ref_pred = _sklearn_reference(Xtr, ytr, Xte, folds, DEFAULT_L2_GRID)
    assert l2 == pytest.approx(ref_l2)
    assert scores.max() == pytest.approx(ref_best, abs=1e-12)
    assert len(set(np.round(scores, 9))) > 1  # the grid matters on this data
    fit = ridge_probe(Xtr, ytr, Xte, yte, n_classes=n_classes, seed=1)
    assert fit.l2 == pytest.approx(ref_l2) and fit.cv_folds == 5
    W = fit_ridge(Xtr, ytr, n_classes, l2=fit.l2)
    np.testing.assert_array_equal(predict(W, Xte), ref_pred)
    assert fit.accuracy == pytest.approx(np.mean(ref_pred == yte))


def test_cv_scores_match_grid_search_per_penalty():
    """Every grid value's mean validation accuracy, not only the winner."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import GridSearchCV
    from sklearn.preprocessing import StandardScaler

    X, y = blobs(25, 3, 12, seed=9, sep=0.7)
    folds = stratified_folds(y, 4, seed=0)
    grid = [1e-2, 1.0, 1e2, 1e4]
    _, scores = cross_validate_l2(X, y, 3, folds, grid)
    search = GridSearchCV(RidgeClassifier(), {"alpha": grid}, cv=folds)
    search.fit(StandardScaler().fit_transform(X), y)
    np.testing.assert_allclose(scores, search.cv_results_["mean_test_score"], atol=1e-12)


def test_stratified_folds_partition_each_class():
    y = np.array([0] * 7 + [1] * 5 + [2] * 3)
    folds = stratified_folds(y, 5, seed=2)
    assert len(folds) == 3  # capped at the smallest class
    vals = np.concatenate([v for _, v in folds])
    assert sorted(vals.tolist()) == list(range(y.size))
    for train, val in folds:
        assert set(train).isdisjoint(val)
        assert set(y[val]) == {0, 1, 2}
    assert max(len(v) for _, v in folds) - min(len(v) for _, v in folds) <= 1
    with pytest.raises(ValueError, match="at least 2 training images"):
        stratified_folds([0, 0, 1], 5, seed=0)


def test_fixed_penalty_skips_cross_validation_and_chance():
    X, y = blobs(10, 2, 3, seed=4)
    fit = ridge_probe(X[:10], y[:10], X[10:], y[10:], n_classes=2, l2=0.5)
    assert fit.l2 == 0.5 and fit.cv_accuracy is None and fit.cv_folds == 0
    assert fit.accuracy == linear_probe_accuracy(X[:10], y[:10], X[10:], y[10:], l2=0.5)
    assert chance_accuracy([1, 1, 1, 0]) == 0.75
    with pytest.raises(ValueError, match="positive"):
        cross_validate_l2(X, y, 2, stratified_folds(y, 2, 0), [0.0, 1.0])
