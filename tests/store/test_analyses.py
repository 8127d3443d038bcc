"""The store's analysis results: one writer with the reuse key, readers, plain-xarray access."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.jobs.test_analyze_common import ids, make_run
from vitcnn_store import open_store
from vitcnn_store.errors import RunNotFoundError, UsageError
from vitcnn_store.store.analyses import (
    analysis_group,
    find_reusable,
    plain_json,
    write_analysis,
)


def _result(value: float, parameters: dict[str, object]) -> xr.Dataset:
    layers = np.array(["blocks.0", "blocks.1"], dtype=object)
    return xr.Dataset(
        {"cka": (("layer_a", "layer_b"), np.full((2, 2), value))},
        coords={"layer_a": layers, "layer_b": layers},
        attrs={"analysis": "cka", "parameters": plain_json(parameters)},
    )


@pytest.fixture()
def store(tmp_path: Path) -> str:
    url = str(tmp_path / "a.zarr")
    make_run(url, "v", ids(8), depth=1, attention=False, inputs=False)
    return url


def test_write_list_read_and_reuse(store: str) -> None:
    params = {"analysis": "cka", "seed": np.int64(3), "layers": ("a", "b")}
    assert open_store(store)["v"].analyses == []
    assert write_analysis(store, "v", "cka", _result(0.5, params)) == "v/_analyses/cka"
    write_analysis(store, "v", "other", _result(0.25, {"x": 1}))
    run = open_store(store)["v"]
    assert run.analyses == ["cka", "other"]
    np.testing.assert_array_equal(run.analysis("cka")["cka"].values, np.full((2, 2), 0.5))
    assert run.analysis("cka")["layer_a"].values.tolist() == ["blocks.0", "blocks.1"]
    # Reuse only when the parameters are equal as JSON (numpy ints and tuples included).
    again = find_reusable(store, "v", "cka", {"analysis": "cka", "seed": 3, "layers": ["a", "b"]})
    assert again is not None and float(again["cka"][0, 0]) == 0.5
    assert find_reusable(store, "v", "cka", {**params, "seed": 4}) is None
    assert find_reusable(store, "v", "missing", params) is None
    # The layers still read as before: results are not layers.
    assert run.layers == ["norm_pre", "blocks.0.attn", "blocks.0.mlp", "blocks.0"]


def test_rewrite_replaces_one_result_only(store: str) -> None:
    write_analysis(store, "v", "cka", _result(0.5, {}))
    write_analysis(store, "v", "keep", _result(0.75, {}))
    write_analysis(store, "v", "cka", _result(0.125, {"new": True}))
    run = open_store(store)["v"]
    assert float(run.analysis("cka")["cka"][0, 0]) == 0.125
    assert run.analysis("cka").attrs["parameters"] == {"new": True}
    assert float(run.analysis("keep")["cka"][0, 0]) == 0.75


def test_bad_and_unknown_names(store: str) -> None:
    with pytest.raises(UsageError, match="invalid analysis name"):
        analysis_group("v", "../escape")
    with pytest.raises(RunNotFoundError, match="no analysis 'nope'"):
        open_store(store)["v"].analysis("nope")


def test_plain_xarray_reads_a_result(store: str) -> None:
    write_analysis(store, "v", "cka", _result(0.5, {"seed": 1}))
    code = (
        "import sys, xarray as xr; "
        f"ds = xr.open_zarr({store!r}, group='v/_analyses/cka', consolidated=False); "
        "print(float(ds['cka'][1, 1]), ds.attrs['parameters']['seed'], "
        "'vitcnn_store' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0.5", "1", "False"]
