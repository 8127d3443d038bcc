"""The skip-ratio job equals the kernel on the loaded taps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.analyze.skip import SkipConfig, run_skip
from tests.jobs.test_analyze_common import cli, ids, make_run
from vitcnn_store import open_store
from vitcnn_store.analysis.skip import skip_norm_ratio


def test_vit_ratios_match_kernel(synth: str) -> None:
    ds = run_skip(SkipConfig(store=synth, run="vit", progress=False)).dataset
    run = open_store(synth)["vit"]
    valid = run.valid
    assert ds["block"].values.tolist() == ["blocks.0", "blocks.1"]
    assert ds["skip_tap"].values.tolist() == ["norm_pre", "blocks.0"]
    for i, z_name in enumerate(["norm_pre", "blocks.0"]):
        z = run[z_name].values[valid].astype(np.float64)
        attn = run[f"blocks.{i}.attn"].values[valid].astype(np.float64)
        mlp = run[f"blocks.{i}.mlp"].values[valid]
        r_attn, r_mlp = skip_norm_ratio(z, attn), skip_norm_ratio(z + attn, mlp)
        np.testing.assert_allclose(ds["ratio"].values[0, i], r_attn, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(ds["ratio"].values[1, i], r_mlp, rtol=1e-10, atol=1e-10)
        assert ds["ratio_cls"].values[0, i] == pytest.approx(r_attn[0])
        assert ds["ratio_spatial"].values[1, i] == pytest.approx(r_mlp[1:].mean())
    assert ds["ratio"].dims == ("branch", "block", "position")
    assert ds["position_kind"].values.tolist()[:2] == ["cls", "patch"]
    assert "identity" in ds.attrs["layer_scale"]


def test_resnet_ratios_use_downsample(synth: str) -> None:
    ds = run_skip(SkipConfig(store=synth, run="resnet", progress=False)).dataset
    run = open_store(synth)["resnet"]
    assert ds["skip_tap"].values.tolist() == ["maxpool", "layer2.0.downsample"]
    assert ds["branch_tap"].values.tolist() == [["layer1.0.bn2", "layer2.0.bn2"]]
    for j, (z, f) in enumerate(
        [("maxpool", "layer1.0.bn2"), ("layer2.0.downsample", "layer2.0.bn2")]
    ):
        ref = skip_norm_ratio(run[z].values, run[f].values).mean()
        assert ds["ratio_spatial"].values[0, j] == pytest.approx(ref, rel=1e-10)
    assert "ratio_cls" not in ds


def test_missing_taps_name_the_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(tmp_path / "m.zarr")
    make_run(url, "v", ids(16), attention_only=True, inputs=False)  # no blocks.N.attn outputs
    assert cli(["analyze", "skip", url, "v", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "blocks.0.attn" in err and "preset:paper" in err and len(err.splitlines()) == 1


def test_skip_inputs_come_from_recorded_roles(tmp_path: Path) -> None:
    """Layer names no rule knows: the job follows the roles recorded at extraction."""
    from tests.jobs.test_analyze_common import _token_coords
    from vitcnn_store.store import ArraySpec, RunWriter, create_run

    roles = {
        "stem": {"role": "stream"},
        "enc.0.mix": {"role": "branch", "block": "enc.0", "branch": "mix", "skip_input": ["stem"]},
        "enc.0": {"role": "stream", "block": "enc.0", "branches": ["enc.0.mix"]},
        # A branch whose skip path is the sum of two earlier layers.
        "enc.1.mix": {
            "role": "branch",
            "block": "enc.1",
            "branch": "mix",
            "skip_input": ["stem", "enc.0"],
        },
        "enc.1": {"role": "stream", "block": "enc.1", "branches": ["enc.1.mix"]},
    }
    specs = [
        ArraySpec(
            name,
            "activation",
            ("token", "channel"),
            (5, 6),
            _token_coords(),
            {"kind": "token", "depth_index": i, "depth_fraction": i / 4, **attrs},
        )
        for i, (name, attrs) in enumerate(roles.items())
    ]
    url = str(tmp_path / "r.zarr")
    create_run(
        url,
        "r",
        image_ids=ids(16),
        labels=[0] * 16,
        chunk=8,
        dtype="float32",
        arrays=specs,
        attrs={"model": "custom", "chunk_size": 8},
    )
    writer, rng = RunWriter(url, "r"), np.random.default_rng(0)
    for u in range(2):
        values = {s.key: rng.normal(size=(8, 5, 6)).astype(np.float32) for s in specs}
        writer.write_unit(u, values, np.zeros(8, bool), [""] * 8)
    ds = run_skip(SkipConfig(store=url, run="r", progress=False)).dataset
    run = open_store(url)["r"]
    z = run["stem"].values.astype(np.float64) + run["enc.0"].values
    ref = skip_norm_ratio(z, run["enc.1.mix"].values)
    np.testing.assert_allclose(ds["ratio"].values[0, 1], ref, rtol=1e-10, atol=1e-10)
    assert ds["skip_taps"].values.tolist() == [["stem", "stem + enc.0"]]
    assert ds["branch"].values.tolist() == ["mix"]


def test_real_extraction_records_roles(tiny_store: str) -> None:
    vit, resnet = open_store(tiny_store)["vit"], open_store(tiny_store)["resnet"]
    assert vit["blocks.1.mlp"].attrs["skip_input"] == ["blocks.0", "blocks.1.attn"]
    assert vit["blocks.1"].attrs["branches"] == ["blocks.1.attn", "blocks.1.mlp"]
    assert vit["blocks.0.norm1"].attrs["role"] == "inner"
    assert resnet["layer2.0.bn2"].attrs["skip_input"] == ["layer2.0.downsample"]
    assert resnet["maxpool"].attrs["role"] == "stream"


def test_run_roles_read_back_the_model_roles(tiny_store: str) -> None:
    """The roles an analysis reads off a run are those the family rule gave the model at
    extraction: one rule, read at two levels."""
    import timm

    from jobs.analyze.layers import run_roles
    from tests.conftest import TINY_VIT
    from vitcnn_store.models import model_roles

    run = open_store(tiny_store)["vit"]
    model = timm.create_model(TINY_VIT["name"], img_size=32, **TINY_VIT["model_args"])
    expected = model_roles(model)
    read = run_roles(run)
    assert set(read) == set(run.layers)
    for name in run.layers:
        assert {k: read[name][k] for k in expected[name]} == expected[name], name


def test_vit_block_output_is_skip_input_plus_branches(tiny_store: str) -> None:
    """The recorded skip inputs are what the model adds: blocks.i = z + attn + mlp."""
    run = open_store(tiny_store)["vit"]
    for i in range(2):
        z = run["norm_pre" if i == 0 else f"blocks.{i - 1}"].values.astype(np.float64)
        attn = run[f"blocks.{i}.attn"].values.astype(np.float64)
        mlp = run[f"blocks.{i}.mlp"].values.astype(np.float64)
        out = run[f"blocks.{i}"].values.astype(np.float64)
        # float16 storage: each stored tensor carries a relative rounding of 2^-11.
        scale = np.abs(z) + np.abs(attn) + np.abs(mlp) + np.abs(out)
        assert np.all(np.abs(z + attn + mlp - out) <= 2e-3 * scale + 1e-3)


@pytest.fixture(scope="module")
def bottleneck_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real ResNet-50-style bottleneck network (one block per stage), its last BNs
    initialised like the others so the branches are alive, preset:paper taps."""
    from jobs.extract import ExtractConfig, extract
    from vitcnn_store.models import ModelSpec

    url = str(tmp_path_factory.mktemp("bottleneck") / "b.zarr")
    spec = ModelSpec(
        "resnet50", img_size=32, model_args={"layers": [1, 1, 1, 1], "zero_init_last": False}
    )
    cfg = ExtractConfig(
        model=spec,
        images="builtin:faces",
        store=url,
        run="r50",
        layers="preset:paper",
        limit=24,
        chunk_size=12,
        progress=False,
    )
    extract(cfg)
    return url


def test_bottleneck_skip_inputs_are_what_the_block_adds(bottleneck_store: str) -> None:
    run = open_store(bottleneck_store)["r50"]
    assert run["layer1.0.bn3"].attrs["skip_input"] == ["layer1.0.downsample"]
    assert run["layer2.0.bn3"].attrs["skip_input"] == ["layer2.0.downsample"]
    for stage in range(1, 5):
        block = f"layer{stage}.0"
        z = run[f"{block}.downsample"].values.astype(np.float64)
        fz = run[f"{block}.bn3"].values.astype(np.float64)
        out = run[block].values.astype(np.float64)
        # Bottleneck: act3(shortcut + bn3(...)); float16 rounding of each stored tensor.
        scale = np.abs(z) + np.abs(fz) + np.abs(out)
        assert np.all(np.abs(np.maximum(z + fz, 0.0) - out) <= 2e-3 * scale + 1e-3), block
    ds = run_skip(SkipConfig(store=bottleneck_store, run="r50", progress=False)).dataset
    assert ds["block"].values.tolist() == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert ds["branch_tap"].values.tolist() == [[f"layer{s}.0.bn3" for s in range(1, 5)]]
    for j, stage in enumerate(range(1, 5)):
        ref = skip_norm_ratio(
            run[f"layer{stage}.0.downsample"].values, run[f"layer{stage}.0.bn3"].values
        ).mean()
        assert ds["ratio_spatial"].values[0, j] == pytest.approx(ref, rel=1e-10)
    assert (ds["dead_fraction"].values == 0).all() and ds.attrs["dead_branches"] == "none"
    np.testing.assert_allclose(ds["depth_fraction"].values, [0.25, 0.5, 0.75, 1.0], atol=1e-12)


def test_dead_branches_are_named_not_divided(tmp_path: Path) -> None:
    """A branch that outputs exactly 0 (timm's zero-initialised last BN) has no ratio."""
    url = str(tmp_path / "d.zarr")
    make_run(url, "r", ids(16), family="resnet", inputs=False)
    from vitcnn_store.store import RunWriter

    writer, run = RunWriter(url, "r"), open_store(url)["r"]
    for u, (start, stop) in enumerate(writer.units):
        values = {f"{name}/activation": run[name].values[start:stop] for name in run.layers}
        values["layer2.0.bn2/activation"] = np.zeros_like(values["layer2.0.bn2/activation"])
        writer.write_unit(u, values, np.zeros(stop - start, bool), [""] * (stop - start))
    ds = run_skip(SkipConfig(store=url, run="r", progress=False)).dataset
    assert ds["dead_fraction"].values.tolist() == [[0.0, 1.0]]
    assert np.isfinite(ds["ratio_spatial"].values[0, 0])
    assert np.isnan(ds["ratio_spatial"].values[0, 1])
    assert "1 of 2 branches output exactly 0" in ds.attrs["dead_branches"]
    assert "dead branch" in ds.attrs["summary"]


def test_ratio_intervals_are_the_bootstrap_of_per_image_ratios(synth: str) -> None:
    """Per image, ‖z‖/‖f(z)‖ from plain numpy norms, resampled by a loop drawing from the
    kernel's stream; the percentiles are the stored interval."""
    ds = run_skip(
        SkipConfig(
            store=synth, run="vit", bootstrap=150, ci_level=0.9, progress=False, name="skip-ci"
        )
    ).dataset
    run = open_store(synth)["vit"]
    valid = run.valid
    spatial, cls = [], []
    for i, z_name in enumerate(["norm_pre", "blocks.0"]):
        z = run[z_name].values[valid].astype(np.float64)
        attn = run[f"blocks.{i}.attn"].values[valid].astype(np.float64)
        mlp = run[f"blocks.{i}.mlp"].values[valid].astype(np.float64)
        for zz, f in ((z, attn), (z + attn, mlp)):
            r = np.sqrt((zz**2).sum(-1)) / np.sqrt((f**2).sum(-1))  # (image, token)
            spatial.append(r[:, 1:].mean(axis=1))
            cls.append(r[:, 0])
    # Order above: block-major, branch-minor → (image, branch, block).
    sp = np.stack(spatial, axis=1).reshape(-1, 2, 2).transpose(0, 2, 1)
    cl = np.stack(cls, axis=1).reshape(-1, 2, 2).transpose(0, 2, 1)
    n = sp.shape[0]
    draws = np.random.default_rng(0).integers(0, n, size=(150, n))
    for var, v in (("ratio_spatial", sp), ("ratio_cls", cl)):
        reps = np.stack([v[d].mean(axis=0) for d in draws])
        np.testing.assert_allclose(
            ds[f"{var}_lo"].values, np.percentile(reps, 5, axis=0), rtol=1e-10, atol=1e-10
        )
        np.testing.assert_allclose(
            ds[f"{var}_hi"].values, np.percentile(reps, 95, axis=0), rtol=1e-10, atol=1e-10
        )
        assert (ds[f"{var}_lo"] <= ds[var]).all() and (ds[var] <= ds[f"{var}_hi"]).all()
    assert ds.attrs["ci_level"] == 0.9
