"""The Gram-first CKA job against references computed from the activations with the batches
the result records; the Gram cache's reuse and invalidation; a memory-limited dask cluster."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from jobs.analyze.cka import CKAConfig, run_cka
from jobs.analyze.options import AnalysisWarning
from tests.jobs.reads import chunk_reads, counted_reads, stored_bytes
from tests.jobs.test_analyze_common import cli, copy_store, ids, make_run
from vitcnn_store import open_store
from vitcnn_store.store import RunWriter, create_run

# The CKA job end to end is half a minute of CPU: the quick loop keeps the kernels' tests
# (tests/analysis/test_cka.py, test_tiles.py) and leaves the job's to the full suite.
pytestmark = pytest.mark.slow


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


# ---------------------------------------------------------------- independent references
def ref_gram(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return x @ x.T


def ref_hsic1(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012) term by term, in extended precision."""
    n = K.shape[0]
    Kt, Lt = K.astype(np.longdouble), L.astype(np.longdouble)
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    # tr(K̃L̃) = Σ K̃∘L̃ and 1ᵀK̃L̃1 = (K̃1)·(L̃1): the same terms without slow extended matmuls.
    rk, rl = Kt.sum(axis=1), Lt.sum(axis=1)
    return float(
        (
            np.sum(Kt * Lt)
            + rk.sum() * rl.sum() / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * np.dot(rk, rl)
        )
        / (n * (n - 3))
    )


def ref_hsic0(K: np.ndarray, L: np.ndarray) -> float:
    n = K.shape[0]
    H = np.eye(n, dtype=np.longdouble) - np.ones((n, n), dtype=np.longdouble) / n
    return float(np.trace(K.astype(np.longdouble) @ H @ L @ H) / (n - 1) ** 2)


def rbf(K: np.ndarray) -> np.ndarray:
    d2 = np.maximum(np.diag(K)[:, None] + np.diag(K)[None, :] - 2 * K, 0)
    return np.exp(-d2 / (2 * np.median(d2)))


def ref_cka(reps_a, reps_b, batches_a, batches_b, hsic=ref_hsic1, kernel=None):  # type: ignore[no-untyped-def]
    """Per repeat: Σ_b HSIC / sqrt(Σ_b HSIC_aa · Σ_b HSIC_bb), batches as image indices."""
    out = []
    for rep_a, rep_b in zip(batches_a, batches_b, strict=True):
        rep_a, rep_b = np.asarray(rep_a), np.asarray(rep_b)
        ka = [[ref_gram(x[b]) for b in rep_a] for x in reps_a]
        kb = [[ref_gram(y[b]) for b in rep_b] for y in reps_b]
        if kernel is not None:
            ka = [[kernel(k) for k in ks] for ks in ka]
            kb = [[kernel(k) for k in ks] for ks in kb]
        m = np.zeros((len(ka), len(kb)))
        for i, ki in enumerate(ka):
            for j, kj in enumerate(kb):
                xy = sum(hsic(k, ll) for k, ll in zip(ki, kj, strict=True))
                xx = sum(hsic(k, k) for k in ki)
                yy = sum(hsic(ll, ll) for ll in kj)
                m[i, j] = xy / np.sqrt(xx * yy)
        out.append(m)
    return np.stack(out)


def activations(url: str, run: str, layers) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    r = open_store(url)[run]
    return [r[name].values for name in layers]


# ---------------------------------------------------------------- estimators
@pytest.mark.parametrize(
    ("estimator", "where"),
    [
        ("unbiased-minibatch", "threads"),
        pytest.param("unbiased-minibatch", "cluster", marks=pytest.mark.slow),  # a LocalCluster
        ("unbiased", "threads"),
        ("biased", "threads"),
    ],
)
def test_estimators_equal_reference_on_recorded_batches(
    synth: str,
    estimator: str,
    where: str,
    request: pytest.FixtureRequest,
) -> None:
    address = request.getfixturevalue("dask_cluster") if where == "cluster" else None
    cfg = CKAConfig(
        store=synth,
        run="vit",
        estimator=estimator,
        batch_size=12,
        repeats=3,
        seed=7,
        gram_tile=16,
        progress=False,
        dask_address=address,
        name=f"cka-{estimator}-{where}",
    )
    ds = run_cka(cfg).dataset
    layers = ["norm_pre", "blocks.0", "blocks.1"]  # the residual stream, by default
    assert ds["layer_a"].values.tolist() == layers == ds["layer_b"].values.tolist()
    np.testing.assert_allclose(ds["depth_a"].values, [0.0, 0.5, 1.0], atol=1e-12)
    assert ds["role_a"].values.tolist() == ["stream"] * 3
    reps = activations(synth, "vit", layers)
    batches = ds["batch_image"].values  # (repeat, batch, member) image indices
    run = open_store(synth)["vit"]
    assert (ds["batch_image_id"].values == run.image_ids[batches]).all()
    assert 5 not in batches  # the failed image
    hsic = ref_hsic0 if estimator == "biased" else ref_hsic1
    ref = ref_cka(reps, reps, batches, batches, hsic)
    if estimator == "unbiased-minibatch":
        assert batches.shape == (3, 3, 12) and ds.attrs["n_batches"] == 3
        assert all(np.unique(rep).size == rep.size for rep in batches)  # without replacement
        np.testing.assert_allclose(ds["cka_repeats"].values, ref, rtol=0, atol=1e-10)
        np.testing.assert_allclose(ds["cka_std"].values, ref.std(0, ddof=1), atol=1e-10)
    else:
        assert batches.shape == (1, 1, 47) and ds.attrs["repeats"] == 1
    np.testing.assert_allclose(ds["cka"].values, ref.mean(0), rtol=0, atol=1e-10)
    # The null: the recorded pairing of permuted images, through the same reference.
    null_a, null_b = ds["null_image_a"].values, ds["null_image_b"].values
    assert (null_a != null_b).any() and 5 not in null_b
    ref_null = ref_cka(reps, reps, [null_a], [null_b], hsic)[0]
    np.testing.assert_allclose(ds["cka_null"].values, ref_null, rtol=0, atol=1e-10)
    assert ds.attrs["estimator"] == estimator and ds.attrs["n"] == 47
    assert ds.attrs["null_batches"] == len(null_a)


@pytest.mark.parametrize(
    ("estimator", "kernel"), [("unbiased-minibatch", "linear"), ("biased", "rbf")]
)
def test_null_permutations_equal_reference(synth: str, estimator: str, kernel: str) -> None:
    """Each stored permutation's pairing, through the independent reference; the percentile
    against scipy's percentileofscore; a cross-run null permutes the second run's images."""
    from scipy.stats import percentileofscore

    cfg = CKAConfig(
        store=synth,
        run="vit",
        run2="resnet",
        estimator=estimator,
        kernel=kernel,
        batch_size=12,
        seed=3,
        null_permutations=5,
        progress=False,
        name=f"perm-{estimator}",
    )
    ds = run_cka(cfg).dataset
    assert ds.sizes["permutation"] == 5 and ds.attrs["null_permutations"] == 5
    la, lb = ds["layer_a"].values.tolist(), ds["layer_b"].values.tolist()
    reps_a, reps_b = activations(synth, "vit", la), activations(synth, "resnet", lb)
    hsic = ref_hsic0 if estimator == "biased" else ref_hsic1
    null_a = ds["null_image_a"].values
    pairings = ds["null_permutation_image_b"].values  # (permutation, null_batch, member)
    assert (pairings[0] == ds["null_image_b"].values).all()
    assert len({p.tobytes() for p in pairings}) == 5  # five different pairings
    for k in range(5):
        # Same images on side b in every permutation, paired differently.
        assert (np.sort(pairings[k], axis=1) == np.sort(pairings[0], axis=1)).all()
        ref = ref_cka(
            reps_a, reps_b, [null_a], [pairings[k]], hsic, kernel=rbf if kernel == "rbf" else None
        )[0]
        np.testing.assert_allclose(ds["cka_null_permutations"].values[k], ref, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(ds["cka_null"].values, ds["cka_null_permutations"].values[0])
    dist, cka = ds["cka_null_permutations"].values, ds["cka"].values
    want = [
        [percentileofscore(dist[:, i, j], cka[i, j], kind="mean") for j in range(len(lb))]
        for i in range(len(la))
    ]
    np.testing.assert_allclose(ds["cka_percentile"].values, want, rtol=0, atol=1e-12)


def test_null_permutations_refused_without_a_null(synth: str) -> None:
    assert (
        cli(["analyze", "cka", synth, "vit", "--null-batches", "0", "--null-permutations", "3"])
        == 2
    )
    assert cli(["analyze", "cka", synth, "vit", "--null-permutations", "0"]) == 2


def test_rbf_and_reductions_equal_reference(synth: str) -> None:
    common = {"store": synth, "run": "vit", "progress": False, "gram_tile": 16}
    ds = run_cka(
        CKAConfig(
            **common,
            kernel="rbf",
            batch_size=16,
            seed=2,
            repeats=2,
            gather_bytes=3 * 6 * 16 * 16 * 8,
            name="r",
        )
    ).dataset
    layers = ds["layer_a"].values.tolist()
    reps = activations(synth, "vit", layers)
    b = ds["batch_image"].values
    ref = ref_cka(reps, reps, b, b, kernel=rbf)
    np.testing.assert_allclose(ds["cka_repeats"].values, ref, rtol=0, atol=1e-10)
    null_ref = ref_cka(
        reps, reps, [ds["null_image_a"].values], [ds["null_image_b"].values], kernel=rbf
    )[0]
    np.testing.assert_allclose(ds["cka_null"].values, null_ref, rtol=0, atol=1e-10)
    # gap over patch tokens (CLS excluded) and the CLS token, every role.
    for reduce, pick in (
        ("gap", lambda x: x[:, 1:].astype(np.float64).mean(1)),
        ("cls", lambda x: x[:, 0]),
    ):
        ds = run_cka(
            CKAConfig(
                **common, reduce=reduce, roles="all", estimator="biased", name=f"red-{reduce}"
            )
        ).dataset
        layers = ds["layer_a"].values.tolist()
        assert len(layers) == 7
        reps = [pick(x) for x in activations(synth, "vit", layers)]
        b = ds["batch_image"].values
        np.testing.assert_allclose(
            ds["cka"].values, ref_cka(reps, reps, b, b, ref_hsic0)[0], rtol=0, atol=1e-10
        )


def test_reduce_mean_is_stored_as_gap(tmp_path: Path) -> None:
    """``--reduce mean`` (extraction's word for the token/spatial mean) is ``gap``: the same
    parameters, result key, result bytes and Gram cache whichever spelling was typed."""
    from vitcnn_store.store.analyses import list_results, result_digest

    fresh = str(tmp_path / "fresh.zarr")  # no other test's Grams; one run, copied twice
    make_run(fresh, "vit", ids(32))
    stored = {}
    for spelling in ("mean", "gap"):
        url = copy_store(fresh, tmp_path / f"{spelling}.zarr")
        argv = ["analyze", "cka", url, "vit", "--reduce", spelling, "--name", "spelled"]
        assert cli([*argv, "--batch-size", "16", "--no-progress", "--no-figure"]) == 0
        [result] = list_results(open_store(url), "vit", "spelled")
        grams = sorted(p.name for p in (Path(url) / "vit" / "_grams").glob("*/gram*"))
        digest = result_digest(zarr.open_group(url, mode="r")[result.group])
        stored[spelling] = (result.key, result.parameters, digest, grams)
        assert result.parameters["reduce"] == "gap" and set(grams) == {"gram_gap"}
    assert stored["mean"] == stored["gap"]


def test_roles_and_layer_patterns(synth: str) -> None:
    common = {"store": synth, "run": "vit", "progress": False, "batch_size": 16}
    ds = run_cka(CKAConfig(**common, roles="branches", name="br")).dataset
    assert ds["layer_a"].values.tolist() == [
        "norm_pre",
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.0",
        "blocks.1.attn",
        "blocks.1.mlp",
        "blocks.1",
    ]
    assert ds["role_a"].values.tolist()[:3] == ["stream", "branch", "branch"]
    depth = ds["depth_a"].values
    assert depth[0] == 0 and depth[-1] == 1 and (np.diff(depth) > 0).all()
    ds = run_cka(CKAConfig(**common, layers="blocks.*.mlp", layers2="blocks.1", name="pat")).dataset
    assert ds["layer_a"].values.tolist() == ["blocks.0.mlp", "blocks.1.mlp"]
    assert ds["layer_b"].values.tolist() == ["blocks.1"]


def test_cross_run_aligned_by_image_id(tmp_path: Path) -> None:
    url = str(tmp_path / "x.zarr")
    make_run(url, "a", ids(40), depth=1, attention=False, inputs=False, failed=[3])
    rng = np.random.default_rng(0)
    # b: part of a's images in another order, plus images a does not have.
    b_ids = list(rng.permutation(ids(40)[10:])) + ids(6, "new")
    make_run(url, "b", b_ids, family="resnet", chunk=5, inputs=False, seed=3)
    cfg = CKAConfig(
        store=url, run="a", run2="b", batch_size=8, repeats=2, seed=1, gram_tile=8, progress=False
    )
    ds = run_cka(cfg).dataset
    assert ds["layer_b"].values.tolist() == ["maxpool", "layer1.0", "layer2.0"]
    ia, ib = ds["batch_image"].values, ds["batch_image_b"].values
    ra, rb = open_store(url)["a"], open_store(url)["b"]
    assert (ra.image_ids[ia] == rb.image_ids[ib]).all() and ds.attrs["n"] == 30
    reps_a = activations(url, "a", ds["layer_a"].values.tolist())
    reps_b = activations(url, "b", ds["layer_b"].values.tolist())
    np.testing.assert_allclose(
        ds["cka_repeats"].values, ref_cka(reps_a, reps_b, ia, ib), rtol=0, atol=1e-10
    )
    na, nb = ds["null_image_a"].values, ds["null_image_b"].values
    assert not (ra.image_ids[na] == rb.image_ids[nb]).all()
    np.testing.assert_allclose(
        ds["cka_null"].values, ref_cka(reps_a, reps_b, [na], [nb])[0], rtol=0, atol=1e-10
    )
    assert ds["depth_b"].values.tolist() == [0.0, 0.5, 1.0]
    assert ds.attrs["source_runs"] == ["a", "b"]
    again = run_cka(cfg)
    assert again.reused and again.group == f"a/_analyses/cka__b/{again.key}"
    make_run(url, "c", ids(8, "other"), depth=1, attention=False, inputs=False)
    assert cli(["analyze", "cka", url, "a", "c", "--no-progress", "--no-figure"]) == 2


# ---------------------------------------------------------------- the Gram cache
def _write_unit(url: str, run: str, unit: int, rng: np.random.Generator) -> None:
    """Rewrite one unit of every array of a run with new random values (a re-extraction)."""
    writer = RunWriter(url, run)
    start, stop = writer.units[unit]
    group = zarr.open_group(url, path=run, mode="r")
    values = {}
    for key, arr in writer._arrays.items():
        if key in ("image", "image_id", "label", "failed", "failure"):
            continue
        shape = (stop - start, *arr.shape[1:])
        if key.endswith("attention") or key == "input":
            values[key] = np.asarray(group[key][start:stop])
        else:
            values[key] = rng.normal(size=shape).astype(np.float16)
    writer.write_unit(unit, values, np.zeros(stop - start, bool), [""] * (stop - start))


def test_gram_cache_reused_then_recomputed_when_units_change(tmp_path: Path) -> None:
    url = str(tmp_path / "g.zarr")
    make_run(url, "p", ids(40), depth=1, attention=False, inputs=False, units=[0, 2, 3])
    common = {"store": url, "run": "p", "progress": False, "batch_size": 8, "gram_tile": 16}
    first = run_cka(CKAConfig(**common, allow_incomplete=True)).dataset
    layers = first["layer_a"].values.tolist()
    assert first.attrs["grams_computed"] == [f"p/{n}" for n in layers] and first.attrs["n"] == 24
    g = zarr.open_array(url, path="p/_grams/blocks.0/gram", mode="r")
    assert g.attrs["complete"] and g.attrs["source"]["units_done"] == 3
    # Other batches, same images: the Grams are reused, the result is new and still exact.
    other = run_cka(CKAConfig(**common, allow_incomplete=True, seed=5, name="o")).dataset
    assert other.attrs["grams_computed"] == []
    reps = activations(url, "p", layers)
    b = other["batch_image"].values
    np.testing.assert_allclose(other["cka"].values, ref_cka(reps, reps, b, b)[0], atol=1e-10)
    # Resume: the missing units are written, the Grams cover them.
    rng = np.random.default_rng(9)
    for unit in (1, 4):
        _write_unit(url, "p", unit, rng)
    resumed = run_cka(CKAConfig(**common)).dataset
    assert resumed.attrs["grams_computed"] == [f"p/{n}" for n in layers]
    assert (
        resumed.attrs["n"] == 40
        and zarr.open_array(url, path="p/_grams/blocks.0/gram", mode="r").attrs["source"][
            "units_done"
        ]
        == 5
    )
    # A finished unit rewritten (a repair or a re-run of it): same counts, new data, recomputed.
    _write_unit(url, "p", 2, rng)
    rewritten = run_cka(CKAConfig(**common, seed=3, name="w"))
    assert not rewritten.reused and rewritten.dataset.attrs["grams_computed"] != []
    reps = activations(url, "p", layers)
    b = rewritten.dataset["batch_image"].values
    np.testing.assert_allclose(
        rewritten.dataset["cka"].values, ref_cka(reps, reps, b, b)[0], atol=1e-10
    )
    # The result written before the rewrite is not reused either.
    assert not run_cka(CKAConfig(**common)).reused
    # Re-extraction (--overwrite) replaces the run, its Gram cache with it.
    create_run(
        url,
        "p",
        image_ids=ids(8),
        labels=[0] * 8,
        chunk=8,
        dtype="float16",
        arrays=[],
        attrs={"chunk_size": 8},
    )
    assert "_grams" not in zarr.open_group(url, path="p", mode="r")


def test_gram_cache_format_read_by_plain_xarray(synth: str, tmp_path: Path) -> None:
    url = copy_store(synth, tmp_path / "s.zarr")
    run_cka(
        CKAConfig(
            store=url, run="vit", layers="blocks.0", batch_size=16, gram_tile=16, progress=False
        )
    )
    x = open_store(url)["vit"]["blocks.0"].values.astype(np.float64).reshape(48, -1)
    usable = np.ones(48, bool)
    usable[5] = False
    code = f"""
import numpy as np, sys, xarray as xr
ds = xr.open_zarr({url!r}, group="vit/_grams/blocks.0", consolidated=False)
g = ds["gram"].values
assert ds["gram"].dims == ("image_a", "image_b"), ds["gram"].dims
assert np.isnan(g[32:, :16]).all() and np.isfinite(g[6:16, 32:]).all()  # upper tiles only
g = np.where(np.isnan(g), g.T, g)
a = ds["offset"].values
np.save(sys.argv[1], g + a[:, None] + a[None, :]); np.save(sys.argv[2], ds["row_mean"].values)
assert "vitcnn_store" not in sys.modules
"""
    out = [str(tmp_path / "g.npy"), str(tmp_path / "m.npy")]
    subprocess.run([sys.executable, "-c", code, *out], check=True)
    g, mean = np.load(out[0]), np.load(out[1])
    # g + a_i + a_j rounds relative to its terms, not to the sum: an entry of X Xᵀ near 0
    # (issue 16: 0.0039864629507 off by 4e-15) needs a tolerance on the Gram's scale.
    ref = (x @ x.T)[np.ix_(usable, usable)]
    np.testing.assert_allclose(
        g[np.ix_(usable, usable)], ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max()
    )
    assert np.isnan(g[5]).all() and np.isnan(mean[5])


def test_each_chunk_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "s.zarr")
    make_run(url, "vit", ids(48), failed=[5])
    layers = ["norm_pre", "blocks.0", "blocks.1"]
    with counted_reads(monkeypatch) as reads:
        run_cka(
            CKAConfig(store=url, run="vit", batch_size=8, repeats=5, gram_tile=16, progress=False)
        )
    read = stored = 0
    for layer in layers:
        chunks = chunk_reads(reads, f"vit/{layer}/activation")
        assert len(chunks) == 6 and all(len(v) == 1 for v in chunks.values()), layer
        read += sum(sum(v) for v in chunks.values())
        stored += stored_bytes(url, f"vit/{layer}/activation")
        tiles = chunk_reads(reads, f"vit/_grams/{layer}/gram")
        assert len(tiles) == 6 and all(len(v) == 1 for v in tiles.values()), layer  # 3×3 upper
    assert read == stored
    for progress in ("done", "failed", "unit_record"):  # one reading per job (Run.pinned)
        chunks = chunk_reads(reads, f"vit/{progress}")
        assert chunks and all(len(v) == 1 for v in chunks.values()), progress


# ---------------------------------------------------------------- constant layers
def test_constant_layer_is_nan_with_a_warning(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    make_run(url, "c", ids(24), depth=1, attention=False, inputs=False)
    writer = RunWriter(url, "c")
    group = zarr.open_group(url, path="c", mode="r")
    for u, (s, e) in enumerate(writer.units):
        values = {
            k: np.asarray(group[k][s:e])
            for k in writer._arrays
            if k not in ("image", "image_id", "label", "failed", "failure")
        }
        values["blocks.0/activation"] = np.full_like(values["blocks.0/activation"], 1000.5)
        writer.write_unit(u, values, np.zeros(e - s, bool), [""] * (e - s))
    with pytest.warns(AnalysisWarning, match=r"blocks\.0 constant over the images"):
        ds = run_cka(CKAConfig(store=url, run="c", batch_size=8, progress=False)).dataset
    m = ds["cka"].values
    assert ds["layer_a"].values.tolist() == ["norm_pre", "blocks.0"]
    assert np.isnan(m[1]).all() and np.isnan(m[:, 1]).all() and m[0, 0] == pytest.approx(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernels' own warnings are not repeated
        run_cka(
            CKAConfig(
                store=url, run="c", batch_size=8, progress=False, layers="norm_pre", name="ok"
            )
        )


# ---------------------------------------------------------------- scale
def test_cluster_workers_never_hold_a_gram(tmp_path: Path) -> None:
    """A worker computes a Gram larger than its memory tile by tile.

    The budget is checked on the worker's peak resident size above its size once the
    analysis modules are imported.  Dask's own memory manager is switched off: at 80 % of
    a limit it pauses the worker, and a paused worker leaves the client waiting forever
    instead of failing the assertion (a CI machine whose worker started larger hung here).
    """
    import dask
    from distributed import Client, LocalCluster

    n = 5120
    gram = 8 * n * n  # 200 MiB for one layer
    budget = gram // 3  # 42 MiB measured: two 512-image blocks, tiles and their sums
    url = str(tmp_path / "big.zarr")
    make_run(url, "big", ids(n), depth=1, chunk=256, attention=False, inputs=False)
    unmanaged = {f"distributed.worker.memory.{k}": False for k in ("target", "spill", "pause")}
    with (
        dask.config.set({**unmanaged, "distributed.worker.memory.terminate": False}),
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        start = max(client.run(_imported_peak_rss).values())
        cfg = CKAConfig(
            store=url,
            run="big",
            batch_size=512,
            max_batches=4,
            repeats=2,
            null_batches=1,
            dask_address=cluster.scheduler_address,
            progress=False,
        )
        ds = run_cka(cfg).dataset
        grown = max(client.run(_peak_rss).values()) - start
    assert grown < budget, f"a worker grew by {grown / 2**20:.0f} MiB computing a 200 MiB Gram"
    layers = ds["layer_a"].values.tolist()
    reps = activations(url, "big", layers)
    b = ds["batch_image"].values
    np.testing.assert_allclose(ds["cka_repeats"].values, ref_cka(reps, reps, b, b), atol=1e-10)
    g = zarr.open_array(url, path="big/_grams/blocks.0/gram", mode="r")
    assert g.shape == (n, n) and g.chunks == (512, 512)


def _imported_peak_rss() -> int:
    # What the tasks import, before they run: their growth is the tiles' alone.
    import importlib

    for module in ("xarray", "zarr", "jobs.analyze.cka", "jobs.analyze.cka_tiles"):
        importlib.import_module(module)

    return _peak_rss()


def _peak_rss() -> int:
    # VmHWM is this process image's peak; getrusage's ru_maxrss survives execve on Linux,
    # so a worker spawned from a large pytest process would report the parent's size.
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


# ---------------------------------------------------------------- options and refusals
def test_capped_batch_warns_and_bad_options_exit_2(synth: str) -> None:
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
    assert cli([*base[:3], "vit", "--roles", "some", *base[3:]]) == 2
    assert cli([*base[:3], "vit", "--gram-tile", "0", *base[3:]]) == 2
    assert cli([*base[:3], "ghost", *base[3:]]) == 2
    assert (
        cli(
            [
                *base[:3],
                "vit",
                "--estimator",
                "unbiased",
                "--null-batches",
                "0",
                "--name",
                "u",
                *base[3:],
            ]
        )
        == 0
    )
    assert "cka_null" not in open_store(synth)["vit"].analysis("u")


def test_incomplete_run_refused_then_masked(synth: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["analyze", "cka", synth, "partial", "--no-progress", "--no-figure", "--batch-size", "8"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert (
        "incomplete" in err and "--allow-incomplete" in err and len(err.strip().splitlines()) == 1
    )
    assert cli([*args, "--allow-incomplete"]) == 0
    from vitcnn_store import open_store

    ds = open_store(synth)["partial"].analysis("cka")
    assert ds.attrs["incomplete_runs"] is True and ds.attrs["n"] == 16
    assert ds.attrs["sources"][0]["units_done"] == 2
    layers = [str(v) for v in ds["layer_a"].values]
    reps = activations(synth, "partial", layers)
    b = ds["batch_image"].values
    assert set(np.unique(b)) <= set(range(8)) | set(range(16, 24))
    np.testing.assert_allclose(ds["cka"].values, ref_cka(reps, reps, b, b)[0], atol=1e-10)


def test_chunk_jobs_on_cluster_equal_threads(synth: str, dask_cluster: str) -> None:
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
            if local[var].dtype.kind not in "fiub":  # recorded image ids: equal, not close
                np.testing.assert_array_equal(remote[var].values, local[var].values)
                continue
            # Results of every scale (pixels, penalties up to 1e5, CKA near 0): the
            # tolerance is relative to each array's largest value.
            scale = 1e-12 * np.nanmax(np.abs(local[var].values), initial=1.0)
            np.testing.assert_allclose(
                remote[var].values, local[var].values, rtol=1e-12, atol=scale
            )
