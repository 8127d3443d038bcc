"""Artifact checks: identical and all-zero layers from stored bytes, CKA-of-one blocks
and dead branches from stored results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from jobs.analyze.checks import (
    ZERO_INIT_LAST,
    cka_one_blocks,
    dead_branches,
    identical_layers,
    run_findings,
    zero_layers,
)
from tests.jobs.test_analyze_common import ids, make_run
from vitcnn_store import open_store
from vitcnn_store.store import RunWriter


def _rewrite(url: str, run: str, change: dict[str, object]) -> None:
    """Rewrite every unit with some layers replaced (a copy of another layer, or zeros)."""
    writer, r = RunWriter(url, run), open_store(url)[run]
    for u, (start, stop) in enumerate(writer.units):
        values = {f"{n}/activation": r[n].values[start:stop] for n in r.layers}
        for name, how in change.items():
            key = f"{name}/activation"
            values[key] = (
                np.zeros_like(values[key]) if how == 0 else values[f"{how}/activation"].copy()
            )
        writer.write_unit(u, values, np.zeros(stop - start, bool), [""] * (stop - start))


def test_identical_and_zero_layers_are_found(tmp_path: Path) -> None:
    url = str(tmp_path / "c.zarr")
    make_run(url, "v", ids(24), depth=3, attention=False, inputs=False)
    run = open_store(url)["v"]
    assert identical_layers(run) == [] and zero_layers(run) == []
    _rewrite(url, "v", {"blocks.1": "blocks.0", "blocks.2": "blocks.0", "blocks.1.mlp": 0})
    run = open_store(url)["v"]
    assert identical_layers(run) == [("blocks.0", "blocks.1", "blocks.2")]
    assert zero_layers(run) == ["blocks.1.mlp"]
    found = run_findings(run)
    assert [f.kind for f in found] == ["identical-layers", "zero-layers"]
    assert "on the 8 images compared" in found[0].message  # the first work unit
    assert found[0].cause == ""  # not a random-init ResNet: no cause claimed


def test_random_init_resnet_gets_the_zero_init_cause(tmp_path: Path) -> None:
    url = str(tmp_path / "r.zarr")
    make_run(url, "r", ids(16), family="resnet", inputs=False)
    import zarr

    zarr.open_group(url, path="r", mode="r+").attrs.update(weights_source="random-init")
    _rewrite(url, "r", {"layer1.0": "maxpool", "layer1.0.bn2": 0})
    found = run_findings(open_store(url)["r"])
    assert [f.layers for f in found] == [("maxpool", "layer1.0"), ("layer1.0.bn2",)]
    assert all(f.cause == ZERO_INIT_LAST for f in found)


def _cka(values: np.ndarray, run_b: str = "v") -> xr.Dataset:
    names = [f"l{i}" for i in range(values.shape[0])]
    return xr.Dataset(
        {"cka": (("layer_a", "layer_b"), values)},
        coords={"layer_a": names, "layer_b": names},
        attrs={"analysis": "cka", "run_a": "v", "run_b": run_b},
    )


def test_cka_one_blocks_group_distinct_layers() -> None:
    m = np.full((5, 5), 0.5)
    np.fill_diagonal(m, 1.0)
    m[1, 2] = m[2, 1] = 0.99995
    m[2, 3] = m[3, 2] = 1.0
    m[0, 4] = m[4, 0] = np.nan  # a constant layer's NaN is no block
    assert cka_one_blocks(_cka(m)) == [("l1", "l2", "l3")]
    assert cka_one_blocks(_cka(m, run_b="other")) == []  # cross-run: not a within-run block
    np.fill_diagonal(m, 1.0)
    m[1, 2] = m[2, 1] = m[2, 3] = m[3, 2] = 0.9
    assert cka_one_blocks(_cka(m)) == []


def test_dead_branches_from_a_skip_result() -> None:
    ds = xr.Dataset(
        {"dead_fraction": (("branch", "block"), [[1.0, 0.2, 1.0]])},
        coords={"branch_tap": (("branch", "block"), [["a.bn3", "b.bn3", "c.bn3"]])},
    )
    assert dead_branches(ds) == ["a.bn3", "c.bn3"]
    assert dead_branches(xr.Dataset()) == []
