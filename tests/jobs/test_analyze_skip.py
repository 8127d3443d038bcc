"""The skip-ratio job equals the kernel on the loaded taps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.analyze.skip import SkipConfig, run_skip
from tests.jobs.test_analyze_common import cli, ids, make_run, synth  # noqa: F401
from vitcnn_store import open_store
from vitcnn_store.analysis.skip import skip_norm_ratio


def test_vit_ratios_match_kernel(synth: str) -> None:  # noqa: F811
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
        np.testing.assert_allclose(ds["ratio"].values[0, i], r_attn, rtol=1e-10)
        np.testing.assert_allclose(ds["ratio"].values[1, i], r_mlp, rtol=1e-10)
        assert ds["ratio_cls"].values[0, i] == pytest.approx(r_attn[0])
        assert ds["ratio_spatial"].values[1, i] == pytest.approx(r_mlp[1:].mean())
    assert ds["ratio"].dims == ("branch", "block", "position")
    assert ds["position_kind"].values.tolist()[:2] == ["cls", "patch"]
    assert "identity" in ds.attrs["layer_scale"]


def test_resnet_ratios_use_downsample(synth: str) -> None:  # noqa: F811
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
        "enc.1.mix": {"role": "branch", "block": "enc.1", "branch": "mix",
                      "skip_input": ["stem", "enc.0"]},
        "enc.1": {"role": "stream", "block": "enc.1", "branches": ["enc.1.mix"]},
    }  # fmt: skip
    specs = [
        ArraySpec(name, "activation", ("token", "channel"), (5, 6), _token_coords(),
                  {"kind": "token", "depth_index": i, "depth_fraction": i / 4, **attrs})
        for i, (name, attrs) in enumerate(roles.items())
    ]  # fmt: skip
    url = str(tmp_path / "r.zarr")
    create_run(url, "r", image_ids=ids(16), labels=[0] * 16, chunk=8, dtype="float32",
               arrays=specs, attrs={"model": "custom", "chunk_size": 8})  # fmt: skip
    writer, rng = RunWriter(url, "r"), np.random.default_rng(0)
    for u in range(2):
        values = {s.key: rng.normal(size=(8, 5, 6)).astype(np.float32) for s in specs}
        writer.write_unit(u, values, np.zeros(8, bool), [""] * 8)
    ds = run_skip(SkipConfig(store=url, run="r", progress=False)).dataset
    run = open_store(url)["r"]
    z = run["stem"].values.astype(np.float64) + run["enc.0"].values
    ref = skip_norm_ratio(z, run["enc.1.mix"].values)
    np.testing.assert_allclose(ds["ratio"].values[0, 1], ref, rtol=1e-10)
    assert ds["skip_taps"].values.tolist() == [["stem", "stem + enc.0"]]
    assert ds["branch"].values.tolist() == ["mix"]


def test_real_extraction_records_roles(tiny_store: str) -> None:
    vit, resnet = open_store(tiny_store)["vit"], open_store(tiny_store)["resnet"]
    assert vit["blocks.1.mlp"].attrs["skip_input"] == ["blocks.0", "blocks.1.attn"]
    assert vit["blocks.1"].attrs["branches"] == ["blocks.1.attn", "blocks.1.mlp"]
    assert vit["blocks.0.norm1"].attrs["role"] == "inner"
    assert resnet["layer2.0.bn2"].attrs["skip_input"] == ["layer2.0.downsample"]
    assert resnet["maxpool"].attrs["role"] == "stream"
