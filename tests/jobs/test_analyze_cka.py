"""The CKA job equals the in-memory kernels on the same data, locally and on a dask cluster."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from jobs.analyze.cka import CKAConfig, run_cka
from jobs.analyze.options import AnalysisWarning
from tests.jobs.test_analyze_common import cli, ids, make_run, synth  # noqa: F401
from vitcnn_store import open_store
from vitcnn_store.analysis.cka import MinibatchCKAMatrix, cka_matrix_from_grams
from vitcnn_store.analysis.cka import sample_batches as cka_batches
from vitcnn_store.analysis.gram import gram_linear, gram_rbf
from vitcnn_store.errors import UsageError


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[str]:
    """One single-worker, single-thread distributed cluster (worker in its own process)."""
    from distributed import LocalCluster

    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


def _loaded(url: str, run: str) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    r = open_store(url)[run]
    return r.layers, [r[name].values for name in r.layers], r.valid


def _reference(reps_a, reps_b, batches, kernel="linear"):  # type: ignore[no-untyped-def]
    out = []
    for rep in batches:
        acc = MinibatchCKAMatrix(kernel=kernel)
        for rows_a, rows_b in rep:
            acc.update(
                [x[rows_a] for x in reps_a], None if reps_b is None else [y[rows_b] for y in reps_b]
            )
        out.append(acc.result())
    return np.stack(out)


@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_within_run_matches_kernel(synth: str, where: str, request: pytest.FixtureRequest) -> None:  # noqa: F811
    address = request.getfixturevalue("dask_cluster") if where == "cluster" else None
    cfg = CKAConfig(
        store=synth,
        run="vit",
        batch_size=12,
        repeats=3,
        seed=7,
        progress=False,
        dask_address=address,
        name=f"cka-{where}",
    )
    ds = run_cka(cfg).dataset
    layers, reps, valid = _loaded(synth, "vit")
    usable = np.flatnonzero(valid)  # image 5 failed: dropped
    assert usable.size == 47 and ds.attrs["n"] == 47 and ds.attrs["n_batches"] == 3
    batches = [[(usable[p], None) for p in rep] for rep in cka_batches(47, 12, 3, 7)]
    ref = _reference(reps, None, batches)
    np.testing.assert_allclose(ds["cka"].values, ref.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ds["cka_std"].values, ref.std(0, ddof=1), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(ds["cka_repeats"].values, ref, rtol=1e-9, atol=1e-12)
    assert ds["layer_a"].values.tolist() == layers == ds["layer_b"].values.tolist()
    assert ds["depth_fraction_a"].values[0] == 0.0 and ds["depth_fraction_a"].values[-1] == 1.0
    assert ds.attrs["estimator"] == "unbiased-minibatch" and ds.attrs["repeats"] == 3
    assert ds.attrs["batch_size"] == 12 and ds.attrs["seed"] == 7
    assert ds.attrs["weights_sha256"] == ["sha-0"] and ds.attrs["source_runs"] == ["vit"]


def test_cross_run_aligned_by_image_id(tmp_path: Path) -> None:
    url = str(tmp_path / "x.zarr")
    make_run(url, "a", ids(40), depth=1, attention=False, inputs=False, failed=[3])
    rng = np.random.default_rng(0)
    # b: part of a's images in another order, plus images a does not have.
    b_ids = list(rng.permutation(ids(40)[10:])) + ids(6, "new")
    make_run(url, "b", b_ids, family="resnet", chunk=5, inputs=False, seed=3)
    ds = run_cka(
        CKAConfig(
            store=url,
            run="a",
            run2="b",
            batch_size=8,
            repeats=2,
            seed=1,
            progress=False,
        )
    ).dataset
    _, reps_a, _ = _loaded(url, "a")
    layers_b, reps_b, _ = _loaded(url, "b")
    pos_b = {v: i for i, v in enumerate(b_ids)}
    common_a = np.arange(10, 40)  # in a's order; all usable (a's failed image 3 is not shared)
    common_b = np.array([pos_b[f"img{i:03d}"] for i in common_a])
    batches = [[(common_a[p], common_b[p]) for p in rep] for rep in cka_batches(30, 8, 2, 1)]
    ref = _reference(reps_a, reps_b, batches)
    np.testing.assert_allclose(ds["cka"].values, ref.mean(0), rtol=1e-9, atol=1e-12)
    assert ds["layer_b"].values.tolist() == layers_b and ds.attrs["n"] == 30
    assert ds.attrs["source_runs"] == ["a", "b"]
    again = run_cka(
        CKAConfig(store=url, run="a", run2="b", batch_size=8, repeats=2, seed=1, progress=False)
    )
    assert again.reused and again.group == "a/_analyses/cka__b"
    make_run(url, "c", ids(8, "other"), depth=1, attention=False, inputs=False)
    assert cli(["analyze", "cka", url, "a", "c", "--no-progress", "--no-figure"]) == 2


def test_reductions_estimators_and_rbf(synth: str) -> None:  # noqa: F811
    layers, reps, valid = _loaded(synth, "vit")
    usable = np.flatnonzero(valid)
    common = {"store": synth, "run": "vit", "progress": False}
    # Biased on all usable images, gap = mean over patch tokens (CLS excluded).
    ds = run_cka(CKAConfig(**common, estimator="biased", reduce="gap", name="b")).dataset
    gap = [x[usable][:, 1:].astype(np.float64).mean(1) for x in reps]
    ref = cka_matrix_from_grams([gram_linear(x) for x in gap])
    np.testing.assert_allclose(ds["cka"].values, ref, rtol=1e-9, atol=1e-12)
    assert ds.attrs["batch_size"] == 47 and ds.attrs["repeats"] == 1
    # CLS token, one side restricted with --layers2.
    ds = run_cka(
        CKAConfig(**common, reduce="cls", batch_size=47, layers2="blocks.*", name="c")
    ).dataset
    sub = [layers.index("blocks.0"), layers.index("blocks.1")]
    ref = _reference([x[:, 0] for x in reps], [reps[i][:, 0] for i in sub], [[(usable, usable)]])[0]
    np.testing.assert_allclose(ds["cka"].values, ref, rtol=1e-9, atol=1e-12)
    assert ds["layer_b"].values.tolist() == ["blocks.0", "blocks.1"]
    # RBF kernel.
    ds = run_cka(CKAConfig(**common, kernel="rbf", batch_size=16, seed=2, name="r")).dataset
    batches = [[(usable[p], None) for p in rep] for rep in cka_batches(47, 16, 1, 2)]
    ref = _reference(reps, None, batches, kernel="rbf")[0]
    np.testing.assert_allclose(ds["cka"].values, ref, rtol=1e-8, atol=1e-10)


def test_layer_gram_kernels_and_refusals() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 5)).astype(np.float16)
    np.testing.assert_allclose(layer_gram(x), gram_linear(x), rtol=1e-12)
    np.testing.assert_allclose(layer_gram(x, "rbf", 0.5), gram_rbf(x, 0.5), rtol=1e-9)
    x[2, 0, 0] = np.nan
    with pytest.raises(UsageError, match=r"'blocks\.0' has NaN"):
        layer_gram(x, layer="blocks.0")
    with pytest.raises(UsageError, match="constant over a batch"):
        layer_gram(np.ones((5, 2)), "rbf", layer="blocks.0")


def test_capped_batch_warns_and_bad_options_exit_2(synth: str) -> None:  # noqa: F811
    with pytest.warns(AnalysisWarning, match="using 48"):
        ds = run_cka(
            CKAConfig(store=synth, run="resnet", progress=False, name="cap", reduce="gap")
        ).dataset
    assert ds.attrs["batch_size"] == 48 and ds.attrs["batch_size_requested"] == 1024
    base = ["analyze", "cka", synth, "--no-progress", "--no-figure"]
    assert cli([*base[:3], "resnet", "--reduce", "cls", *base[3:]]) == 2  # spatial layers
    assert cli([*base[:3], "vit", "--batch-size", "3", *base[3:]]) == 2
    assert cli([*base[:3], "vit", "--layers", "nope.*", *base[3:]]) == 2
    assert cli([*base[:3], "vit", "--name", "_bad", *base[3:]]) == 2
    assert cli([*base[:3], "ghost", *base[3:]]) == 2


def test_incomplete_run_refused_then_masked(synth: str, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    args = ["analyze", "cka", synth, "partial", "--no-progress", "--no-figure", "--batch-size", "8"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert (
        "incomplete" in err and "--allow-incomplete" in err and len(err.strip().splitlines()) == 1
    )
    assert cli([*args, "--allow-incomplete"]) == 0
    import xarray as xr

    ds = xr.open_zarr(synth, group="partial/_analyses/cka", consolidated=False)
    assert ds.attrs["incomplete_runs"] is True and ds.attrs["n"] == 16
    assert ds.attrs["sources"][0]["units_done"] == 2
    _, reps, valid = _loaded(synth, "partial")
    usable = np.flatnonzero(valid)
    batches = [[(usable[p], None) for p in rep] for rep in cka_batches(16, 8, 1, 0)]
    np.testing.assert_allclose(ds["cka"].values, _reference(reps, None, batches)[0], rtol=1e-9)


def test_chunk_jobs_on_cluster_equal_threads(synth: str, dask_cluster: str) -> None:  # noqa: F811
    from jobs.analyze import (
        AttentionConfig,
        LocalizationConfig,
        ProbeConfig,
        SkipConfig,
        run_attention,
        run_localization,
        run_probe,
        run_skip,
    )

    jobs = [
        (AttentionConfig, run_attention, {}),
        (SkipConfig, run_skip, {}),
        (ProbeConfig, run_probe, {"shots": 3}),
        (LocalizationConfig, run_localization, {"batch_size": 16}),
    ]
    for config, job, extra in jobs:
        common = {"store": synth, "run": "vit", "progress": False, **extra}
        local = job(config(**common, name="local")).dataset
        remote = job(config(**common, name="remote", dask_address=dask_cluster)).dataset
        for var in local.data_vars:
            np.testing.assert_allclose(remote[var].values, local[var].values, rtol=1e-12)
