"""The store's analysis results: kept per parameter set, visible only once committed,
checked by verify, read by plain xarray."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from tests.jobs.test_analyze_common import ids, make_run
from vitcnn_store import open_store
from vitcnn_store.errors import RunNotFoundError, UsageError
from vitcnn_store.store.analyses import (
    COMPLETE_ATTR,
    LATEST_ATTR,
    analysis_group,
    find_reusable,
    list_results,
    parameters_key,
    plain_json,
)
from vitcnn_store.store.result_write import write_analysis
from vitcnn_store.store.verify import verify_store


def _result(value: float, parameters: dict[str, object]) -> xr.Dataset:
    layers = np.array(["blocks.0", "blocks.1"], dtype=object)
    return xr.Dataset(
        {"cka": (("layer_a", "layer_b"), np.full((2, 2), value))},
        coords={"layer_a": layers, "layer_b": layers},
        attrs={"analysis": "cka", "parameters": plain_json(parameters)},
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The store the tests start from, made once; read-only (each test takes a copy)."""
    url = str(tmp_path_factory.mktemp("analyses") / "a.zarr")
    make_run(url, "v", ids(8), depth=1, attention=False, inputs=False)
    return url


@pytest.fixture
def store(template: str, tmp_path: Path) -> str:
    """A private copy of :func:`template` (copying its files costs less than making its run)."""
    return str(shutil.copytree(template, tmp_path / "a.zarr"))


def _uncommit(store: str, group: str) -> None:
    """What a job killed between writing a result's arrays and its marker leaves."""
    node = zarr.open_group(store, path=group, mode="r+")
    for attr in (COMPLETE_ATTR, "vitcnn_store.digest", "vitcnn_store.arrays"):
        node.attrs.pop(attr, None)


def test_write_list_read_and_reuse(store: str) -> None:
    params = {"analysis": "cka", "seed": np.int64(3), "layers": ("a", "b")}
    assert open_store(store)["v"].analyses == []
    written = write_analysis(open_store(store), "v", "cka", _result(0.5, params))
    assert written.group == f"v/_analyses/cka/{parameters_key(params)}"
    assert written.group == analysis_group("v", "cka", written.key)
    write_analysis(open_store(store), "v", "other", _result(0.25, {"x": 1}))
    run = open_store(store)["v"]
    assert run.analyses == ["cka", "other"]
    np.testing.assert_array_equal(run.analysis("cka")["cka"].values, np.full((2, 2), 0.5))
    assert run.analysis("cka")["layer_a"].values.tolist() == ["blocks.0", "blocks.1"]
    assert COMPLETE_ATTR not in run.analysis("cka").attrs  # the marker is the store's, not data
    # Reuse only when the parameters are equal as JSON (numpy ints and tuples included).
    again = find_reusable(
        open_store(store), "v", "cka", {"analysis": "cka", "seed": 3, "layers": ["a", "b"]}
    )
    assert again is not None and float(again["cka"][0, 0]) == 0.5
    assert find_reusable(open_store(store), "v", "cka", {**params, "seed": 4}) is None
    assert find_reusable(open_store(store), "v", "missing", params) is None
    # The layers still read as before: results are not layers.
    assert run.layers == ["norm_pre", "blocks.0.attn", "blocks.0.mlp", "blocks.0"]


def test_other_parameters_add_a_result_and_keep_the_earlier(store: str) -> None:
    first = write_analysis(open_store(store), "v", "cka", _result(0.5, {"seed": 0}))
    write_analysis(open_store(store), "v", "keep", _result(0.75, {}))
    second = write_analysis(open_store(store), "v", "cka", _result(0.125, {"seed": 1}))
    assert second.key != first.key and second.kept == [first.group] and not second.replaced
    run = open_store(store)["v"]
    # The latest is what the name reads as; the earlier one is still there, by key.
    assert float(run.analysis("cka")["cka"][0, 0]) == 0.125
    assert float(run.analysis("cka", first.key)["cka"][0, 0]) == 0.5
    assert float(run.analysis("keep")["cka"][0, 0]) == 0.75
    assert zarr.open_group(store, mode="r")["v/_analyses/cka"].attrs[LATEST_ATTR] == second.key
    assert [r.key for r in list_results(open_store(store), "v", "cka")] == [first.key, second.key]
    # Same parameters again: rewritten in place (the caller asked: --recompute), none added.
    third = write_analysis(open_store(store), "v", "cka", _result(0.25, {"seed": 1}))
    assert third.replaced and third.key == second.key and third.kept == [first.group]
    assert len(list_results(open_store(store), "v", "cka")) == 2
    # replace_all deletes the others once the new one is written.
    fourth = write_analysis(
        open_store(store), "v", "cka", _result(1.0, {"seed": 2}), replace_all=True
    )
    assert sorted(fourth.removed) == sorted([first.group, second.group])
    assert [r.key for r in list_results(open_store(store), "v", "cka")] == [fourth.key]
    assert verify_store(store).ok


def test_uncommitted_result_is_invisible_flagged_and_removed(store: str) -> None:
    good = write_analysis(open_store(store), "v", "cka", _result(0.5, {"seed": 0}))
    half = write_analysis(open_store(store), "v", "cka", _result(0.25, {"seed": 1}))
    _uncommit(store, half.group)
    run = open_store(store)["v"]
    # Not reused, not read: the name reads as its last complete result.
    assert find_reusable(open_store(store), "v", "cka", {"seed": 1}) is None
    assert float(run.analysis("cka")["cka"][0, 0]) == 0.5
    with pytest.raises(RunNotFoundError, match="no analysis 'cka' with key"):
        run.analysis("cka", half.key)
    report = verify_store(store)
    assert [(p.layer, "incomplete" in p.problem) for p in report.problems] == [
        (half.group.split("/", 1)[1], True)
    ]
    assert verify_store(store, repair=True).notes
    assert [r.key for r in list_results(open_store(store), "v", "cka")] == [good.key]
    assert verify_store(store).ok
    # Only uncommitted results under a name: the name is not listed at all.
    _uncommit(store, good.group)
    assert open_store(store)["v"].analyses == []


def test_verify_finds_missing_arrays_changed_values_and_no_checksum(store: str) -> None:
    missing = write_analysis(open_store(store), "v", "a", _result(0.5, {"k": 1}))
    changed = write_analysis(open_store(store), "v", "b", _result(0.5, {"k": 2}))
    ok = write_analysis(open_store(store), "v", "c", _result(0.5, {"k": 3}))
    del zarr.open_group(store, path=missing.group, mode="r+")["cka"]
    # A valid chunk (its crc32c matches) with other values: only the digest sees it.
    zarr.open_array(store, path=f"{changed.group}/cka", mode="r+")[0, 0] = 0.75
    problems = {p.layer.split("/")[1]: p.problem for p in verify_store(store).problems}
    assert set(problems) == {"a", "b"}
    assert "cka missing" in problems["a"] and "digest" in problems["b"]
    # Readers skip a result missing an array (seen from metadata); values are verify's.
    assert open_store(store)["v"].analyses == ["b", "c"]
    verify_store(store, repair=True)
    assert open_store(store)["v"].analyses == ["c"]
    assert [r.key for r in list_results(open_store(store), "v")] == [ok.key]
    assert verify_store(store).ok


def test_result_of_the_older_layout_is_not_used(store: str) -> None:
    # Before keys, a result was written directly as <run>/_analyses/<name>, marker-less.
    _result(0.5, {"seed": 0}).to_zarr(
        store, group="v/_analyses/cka", mode="w", zarr_format=3, consolidated=False
    )
    assert open_store(store)["v"].analyses == []
    assert find_reusable(open_store(store), "v", "cka", {"seed": 0}) is None
    (old,) = list_results(open_store(store), "v")
    assert old.key == "" and "no commit marker" in old.problem
    new = write_analysis(open_store(store), "v", "cka", _result(0.25, {"seed": 0}))
    assert float(open_store(store)["v"].analysis("cka")["cka"][0, 0]) == 0.25
    assert not verify_store(store).ok
    verify_store(store, repair=True)
    assert [r.key for r in list_results(open_store(store), "v")] == [new.key]
    assert verify_store(store).ok


def test_bad_and_unknown_names(store: str) -> None:
    with pytest.raises(UsageError, match="invalid analysis name"):
        analysis_group("v", "../escape")
    with pytest.raises(RunNotFoundError, match="no analysis 'nope'"):
        open_store(store)["v"].analysis("nope")


def test_plain_xarray_reads_a_result(store: str) -> None:
    group = write_analysis(open_store(store), "v", "cka", _result(0.5, {"seed": 1})).group
    code = (
        "import sys, xarray as xr, zarr; "
        f"key = zarr.open_group({store!r}, path='v/_analyses/cka').attrs[{LATEST_ATTR!r}]; "
        f"ds = xr.open_zarr({store!r}, group='v/_analyses/cka/' + key, consolidated=False); "
        "print(float(ds['cka'][1, 1]), ds.attrs['parameters']['seed'], "
        f"ds.attrs[{COMPLETE_ATTR!r}], 'vitcnn_store' in sys.modules, key)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0.5", "1", "True", "False", group.rsplit("/", 1)[1]]
