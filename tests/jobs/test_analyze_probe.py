"""The probe job equals ridge probes fit directly on the loaded features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.analyze.probe import ProbeConfig, run_probe
from tests.jobs.test_analyze_common import cli, ids, make_run, synth  # noqa: F401
from vitcnn_store import open_store
from vitcnn_store.analysis.probes import fit_ridge, predict, probe_splits


def _accuracy(x: np.ndarray, y: np.ndarray, split: tuple[np.ndarray, np.ndarray]) -> float:
    train, test = split
    w = fit_ridge(x[train], y[train], 3)
    return float(np.mean(predict(w, x[test]) == y[test]))


@pytest.mark.parametrize(("shots", "features"), [(0, "cls"), (4, "gap")])
def test_probe_matches_kernel(synth: str, shots: int, features: str) -> None:  # noqa: F811
    cfg = ProbeConfig(
        store=synth,
        run="vit",
        shots=shots,
        features=features,
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
    for i, layer in enumerate(run.layers):
        x = run[layer].values[rows].astype(np.float64)
        x = x[:, 0] if features == "cls" else x[:, 1:].mean(1)
        ref = [_accuracy(x, y, s) for s in splits]
        np.testing.assert_allclose(ds["accuracy_repeats"].values[:, i], ref)
    assert ds["accuracy"].dims == ("layer",) and ds.attrs["n_classes"] == 3
    assert ds["feature"].values.tolist() == [features] * len(run.layers)
    if shots:
        assert ds.attrs["n_train"] == 12


def test_cls_falls_back_to_gap_for_cnns(synth: str) -> None:  # noqa: F811
    ds = run_probe(ProbeConfig(store=synth, run="resnet", progress=False)).dataset
    assert set(ds["feature"].values.tolist()) == {"gap"}
    assert np.isfinite(ds["accuracy"].values).all()


def test_no_labels_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(tmp_path / "u.zarr")
    make_run(url, "v", ids(16), labels=[-1] * 16, attention=False, inputs=False)
    assert cli(["analyze", "probe", url, "v", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no labels" in err and len(err.splitlines()) == 1
    make_run(url, "w", ids(16), attention=False, inputs=False)
    assert cli(["analyze", "probe", url, "w", "--shots", "9", "--no-progress"]) == 2
    assert cli(["analyze", "probe", url, "w", "--shots", "lots", "--no-progress"]) == 2
