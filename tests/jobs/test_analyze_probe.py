"""The probe job equals ridge probes fit directly on the loaded features; layers, features
and penalties are chosen explicitly and recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.analyze.probe import ProbeConfig, run_probe
from tests.jobs.test_analyze_common import cli, copy_store, ids, make_run
from vitcnn_store import open_store
from vitcnn_store.analysis.probes import DEFAULT_L2_GRID, probe_splits, ridge_probe


def _features(run, layer: str, rows: np.ndarray, how: str) -> np.ndarray:
    x = run[layer].values[rows].astype(np.float64)
    if how == "cls":
        return x[:, 0]
    return x[:, 1:].mean(1) if x.ndim == 3 else x.reshape(len(x), -1, x.shape[-1]).mean(1)


@pytest.mark.parametrize(("shots", "features", "l2"), [(0, "cls", None), (4, "gap", 0.3)])
def test_probe_matches_kernel(synth: str, shots: int, features: str, l2: float | None) -> None:
    cfg = ProbeConfig(
        store=synth,
        run="vit",
        shots=shots,
        features=features,
        l2=l2,
        repeats=2,
        seed=5,
        progress=False,
        name=f"p{shots}",
    )
    ds = run_probe(cfg).dataset
    run = open_store(synth)["vit"]
    rows = np.flatnonzero(run.valid & (run.labels >= 0))
    y = run.labels[rows]
    splits = probe_splits(y, shots, 5, 2, 0.25)
    stream = ["norm_pre", "blocks.0", "blocks.1"]  # the residual stream, by default
    assert ds["layer"].values.tolist() == stream
    for i, layer in enumerate(stream):
        x = _features(run, layer, rows, features)
        ref = [
            ridge_probe(x[tr], y[tr], x[te], y[te], n_classes=3, l2=l2, seed=5 + r)
            for r, (tr, te) in enumerate(splits)
        ]
        np.testing.assert_allclose(
            ds["accuracy_repeats"].values[:, i], [f.accuracy for f in ref], atol=1e-12
        )
        np.testing.assert_allclose(ds["l2"].values[:, i], [f.l2 for f in ref], atol=0)  # >= 1e-3
        if l2 is None:
            cv = np.mean([f.cv_accuracy for f in ref], axis=0)
            np.testing.assert_allclose(ds["cv_accuracy"].values[i], cv, atol=1e-12)
    assert ds["accuracy"].dims == ("layer",) and ds.attrs["n_classes"] == 3
    assert ds["feature"].values.tolist() == [features] * 3
    assert ds["depth_fraction"].values.tolist() == [0.0, 0.5, 1.0]
    test_shares = [np.bincount(y[te]).max() / len(te) for _, te in splits]
    assert float(ds["chance_accuracy"]) == pytest.approx(np.mean(test_shares))
    if l2 is None:
        assert ds["l2_grid"].values.tolist() == list(DEFAULT_L2_GRID)
        assert "cross-validation" in ds.attrs["l2_selection"]
    else:
        assert "cv_accuracy" not in ds and ds.attrs["l2_selection"] == "fixed at 0.3"
    if shots:
        assert ds.attrs["n_train"] == 12 and "4-shot" in ds.attrs["protocol"]


def test_branches_on_request_and_patterns(synth: str) -> None:
    ds = run_probe(
        ProbeConfig(store=synth, run="vit", roles="branches", l2=1.0, progress=False, name="br")
    ).dataset
    assert ds["layer"].values.tolist() == [
        "norm_pre",
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.0",
        "blocks.1.attn",
        "blocks.1.mlp",
        "blocks.1",
    ]
    np.testing.assert_allclose(
        ds["depth_fraction"].values, [0, 1 / 6, 2 / 6, 0.5, 4 / 6, 5 / 6, 1], atol=1e-12
    )
    assert ds["role"].values.tolist()[:2] == ["stream", "branch"]
    assert "branch outputs" in ds.attrs["layer_selection"]
    only = run_probe(
        ProbeConfig(
            store=synth, run="vit", layers="blocks.*.mlp", l2=1.0, progress=False, name="pat"
        )
    ).dataset
    assert only["layer"].values.tolist() == ["blocks.0.mlp", "blocks.1.mlp"]


def test_auto_features_say_why_and_cls_refuses_cnn_layers(
    synth: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ds = run_probe(ProbeConfig(store=synth, run="resnet", l2=1.0, progress=False)).dataset
    assert set(ds["feature"].values.tolist()) == {"gap"}
    assert all("no CLS token" in r for r in ds["feature_reason"].values.tolist())
    assert np.isfinite(ds["accuracy"].values).all()
    url = copy_store(synth, tmp_path / "s.zarr")
    assert cli(["analyze", "probe", url, "resnet", "--features", "cls", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "without a CLS token" in err and "maxpool" in err and len(err.splitlines()) == 1


def test_real_vit_constant_input_cls_is_named(tiny_store: str, tmp_path: Path) -> None:
    """A real ViT's input CLS token is the same learned vector for every image: auto
    probes the patch mean there and says so; later blocks use their CLS token."""
    url = copy_store(tiny_store, tmp_path / "t.zarr")
    ds = run_probe(ProbeConfig(store=url, run="vit", shots=5, progress=False)).dataset
    feats = dict(zip(ds["layer"].values.tolist(), ds["feature"].values.tolist(), strict=True))
    reasons = dict(
        zip(ds["layer"].values.tolist(), ds["feature_reason"].values.tolist(), strict=True)
    )
    assert feats == {"norm_pre": "gap", "blocks.0": "cls", "blocks.1": "cls"}
    assert "identical on every image" in reasons["norm_pre"]
    run = open_store(url)["vit"]
    cls = run["norm_pre"].values[:, 0].astype(np.float64)
    assert np.ptp(cls, axis=0).max() == 0.0  # the premise, read with the store's reader
    assert ds.attrs["label_names"] == ["non-face", "face"]
    assert float(ds["chance_accuracy"]) == pytest.approx(0.5)
    assert "5-fold" in ds.attrs["l2_selection"]


def test_bad_probe_options_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(tmp_path / "u.zarr")
    make_run(url, "v", ids(16), labels=[-1] * 16, attention=False, inputs=False)
    assert cli(["analyze", "probe", url, "v", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no labels" in err and len(err.splitlines()) == 1
    make_run(url, "w", ids(16), attention=False, inputs=False)
    assert cli(["analyze", "probe", url, "w", "--shots", "9", "--no-progress"]) == 2
    assert cli(["analyze", "probe", url, "w", "--shots", "lots", "--no-progress"]) == 2
    assert cli(["analyze", "probe", url, "w", "--shots", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--l2 VALUE" in err
    assert cli(["analyze", "probe", url, "w", "--l2", "-1", "--no-progress"]) == 2
    assert cli(["analyze", "probe", url, "w", "--l2-grid", "1,0", "--no-progress"]) == 2
    assert cli(["analyze", "probe", url, "w", "--cv-folds", "1", "--no-progress"]) == 2
    # 1-shot with a fixed penalty is allowed.
    assert (
        cli(
            [
                "analyze",
                "probe",
                url,
                "w",
                "--shots",
                "1",
                "--l2",
                "1",
                "--no-progress",
                "--no-figure",
            ]
        )
        == 0
    )


def test_splits_folds_intervals_and_raw_input_are_recorded(synth: str) -> None:
    """The recorded splits are the ones the reference draws; the interval is the bootstrap of
    each repeat's per-image correctness (a loop on the kernel's streams), averaged over
    repeats; the raw-pixel probe is a ridge probe on the flattened stored input."""
    cfg = ProbeConfig(
        store=synth,
        run="vit",
        features="cls",
        repeats=2,
        seed=3,
        bootstrap=120,
        ci_level=0.9,
        progress=False,
        name="p-ci",
    )
    ds = run_probe(cfg).dataset
    run = open_store(synth)["vit"]
    rows = np.flatnonzero(run.valid & (run.labels >= 0))
    y = run.labels[rows]
    splits = probe_splits(y, 0, 3, 2, 0.25)
    for r, (tr, te) in enumerate(splits):
        assert ds["train_image"].values[r][: tr.size].tolist() == rows[tr].tolist()
        assert ds["test_image"].values[r][: te.size].tolist() == rows[te].tolist()
    assert ds["cv_fold"].dims == ("repeat", "train_member") and ds["cv_fold"].values.max() >= 1
    reps = []
    for r, (tr, te) in enumerate(splits):
        correct = []
        for layer in ds["layer"].values.tolist():
            x = _features(run, layer, rows, "cls")
            fit = ridge_probe(x[tr], y[tr], x[te], y[te], n_classes=3, seed=3 + r)
            from vitcnn_store.analysis.probes import fit_ridge, predict

            w = fit_ridge(x[tr], y[tr], 3, l2=fit.l2)
            correct.append(predict(w, x[te]) == y[te])
        c = np.stack(correct, axis=1).astype(float)  # (test image, layer)
        draws = np.random.default_rng((3, r)).integers(0, c.shape[0], size=(120, c.shape[0]))
        reps.append(np.stack([c[d].mean(axis=0) for d in draws]))
    rep = np.mean(reps, axis=0)
    np.testing.assert_allclose(ds["accuracy_lo"].values, np.percentile(rep, 5, axis=0), atol=1e-12)
    np.testing.assert_allclose(ds["accuracy_hi"].values, np.percentile(rep, 95, axis=0), atol=1e-12)
    pixels = run.inputs.values[rows].reshape(rows.size, -1).astype(np.float64)
    raw = [
        ridge_probe(pixels[tr], y[tr], pixels[te], y[te], n_classes=3, seed=3 + r).accuracy
        for r, (tr, te) in enumerate(splits)
    ]
    assert float(ds["input_accuracy"]) == pytest.approx(np.mean(raw), abs=1e-12)
    assert (
        float(ds["input_accuracy_lo"])
        <= float(ds["input_accuracy"])
        <= float(ds["input_accuracy_hi"])
    )
    assert ds.attrs["ci_level"] == 0.9 and ds.attrs["groups"].startswith("none")


def test_photo_crops_never_straddle_a_split(tmp_path: Path) -> None:
    """builtin:photos ids: each photograph's crops land on one side of every split and fold;
    when the label is the photograph itself the probe is refused, not leaked."""
    url = str(tmp_path / "ph.zarr")
    photos = ["cat", "dog", "owl", "fox", "bee", "ant"]
    names = [f"photos/{p}/{k:02d}" for k in range(6) for p in photos]
    labels = [photos.index(p) % 2 for k in range(6) for p in photos]  # two classes, 3 photos each
    make_run(url, "v", names, labels=labels, depth=1, attention=False)
    ds = run_probe(ProbeConfig(store=url, run="v", repeats=2, bootstrap=0, progress=False)).dataset
    group = {i: n.split("/")[1] for i, n in enumerate(names)}
    for r in range(2):
        train = {group[i] for i in ds["train_image"].values[r] if i >= 0}
        test = {group[i] for i in ds["test_image"].values[r] if i >= 0}
        assert train and test and not train & test
        folds = ds["cv_fold"].values[r]
        members = [i for i in ds["train_image"].values[r] if i >= 0]
        for g in train:  # one fold per photograph
            assert len({folds[k] for k, i in enumerate(members) if group[i] == g}) == 1
    assert ds.attrs["groups"].startswith("source photograph")
    assert "accuracy_lo" not in ds
    make_run(
        url,
        "w",
        names,
        labels=[photos.index(n.split("/")[1]) for n in names],
        depth=1,
        attention=False,
    )
    assert cli(["analyze", "probe", url, "w", "--no-progress"]) == 2
    assert (
        cli(["analyze", "probe", url, "w", "--no-progress", "--groups", "none", "--bootstrap", "0"])
        == 0
    )
