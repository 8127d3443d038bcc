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
    ds = run_skip(SkipConfig(store=synth, run="vit", progress=False, figure=False)).dataset
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
    ds = run_skip(SkipConfig(store=synth, run="resnet", progress=False, figure=False)).dataset
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
