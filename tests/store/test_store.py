"""Store format 2: create from a template, write units, read back, refuse what is wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from vitcnn_store import open_store
from vitcnn_store.errors import (
    DtypeOverflowError,
    NonFiniteActivationError,
    NotAStoreError,
    RunExistsError,
    RunMismatchError,
    RunNotFoundError,
    StoreError,
    StoreVersionError,
    UsageError,
)
from vitcnn_store.store import ArraySpec, RunWriter, create_run, prepare_run
from vitcnn_store.store.chunks import walk_arrays
from vitcnn_store.store.codecs import has_checksum
from vitcnn_store.store.layout import CREATED_ATTR, FORMAT_ATTR, check_name, unit_bounds
from vitcnn_store.store.writer import check_peaks

TOKENS = {
    "token_kind": (("token",), np.array(["cls", "patch", "patch"])),
    "token_y": (("token",), np.array([np.nan, 8.0, 8.0], dtype=np.float32)),
    "token_x": (("token",), np.array([np.nan, 8.0, 24.0], dtype=np.float32)),
}
SPECS = [
    ArraySpec(
        "blocks.0",
        "activation",
        ("token", "channel"),
        (3, 4),
        TOKENS,
        {"kind": "token", "depth_index": 0, "depth_fraction": 0.0},
    ),
    ArraySpec(
        "layer1.0",
        "activation",
        ("y", "x", "channel"),
        (2, 2, 5),
        {"y": (("y",), np.array([8.0, 24.0])), "x": (("x",), np.array([8.0, 24.0]))},
        {"kind": "spatial", "depth_index": 1, "depth_fraction": 1.0},
    ),
]
PROVENANCE = {"model": "m", "dtype": "float32", "chunk_size": 2, "n_images": 5}


ATTENTION = ArraySpec(
    "blocks.0",
    "attention",
    ("head", "query", "key"),
    (2, 3, 3),
    {
        f"{axis}_{c.removeprefix('token_')}": ((axis,), v)
        for axis in ("query", "key")
        for c, (_, v) in TOKENS.items()
    },
    {"kind": "token", "depth_index": 0, "depth_fraction": 0.0},
)


def hashes(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(n)]


def make_run(url: str, name: str = "r", n: int = 5, attention: bool = False) -> None:
    create_run(
        url,
        name,
        image_ids=[f"img{i}" for i in range(n)],
        labels=list(range(n)),
        chunk=2,
        dtype="float32",
        arrays=[*SPECS, ATTENTION] if attention else SPECS,
        attrs=PROVENANCE,
        image_sha256=hashes(n),
    )


def fill_run(url: str, name: str = "r", attention: bool = False) -> dict[int, dict]:
    """Write every unit of a run made by :func:`make_run`; returns what was written."""
    writer = RunWriter(url, name)
    written = {}
    for unit, (start, stop) in enumerate(writer.units):
        values = unit_values(stop - start, unit)
        if attention:
            rng = np.random.default_rng(100 + unit)
            a = rng.random((stop - start, 2, 3, 3)).astype(np.float32)
            values["blocks.0/attention"] = a / a.sum(-1, keepdims=True)
        written[unit] = values
        writer.write_unit(unit, values, np.zeros(stop - start, bool), [""] * (stop - start))
    return written


def filled_store(tmp_path: Path) -> str:
    """A store with two complete runs: ``r`` (with attention) and ``other``."""
    url = str(tmp_path / "s.zarr")
    make_run(url, attention=True)
    fill_run(url, attention=True)
    make_run(url, "other")
    fill_run(url, "other")
    return url


def unit_values(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "blocks.0/activation": rng.standard_normal((n, 3, 4)).astype(np.float32),
        "layer1.0/activation": rng.standard_normal((n, 2, 2, 5)).astype(np.float32),
    }


def test_round_trip(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    make_run(url)
    writer = RunWriter(url, "r")
    assert writer.units == unit_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]
    written = {}
    for unit in (2, 0):  # any order
        start, stop = writer.units[unit]
        written[unit] = unit_values(stop - start, unit)
        writer.write_unit(unit, written[unit], np.zeros(stop - start, bool), [""] * (stop - start))
    assert writer.pending_units() == [1]
    run = open_store(url)["r"]
    assert list(run.done) == [True, False, True]
    assert not run.complete
    assert list(run.valid) == [True, True, False, False, True]
    x = run["blocks.0"]
    assert x.dims == ("image", "token", "channel") and x.chunks[0] == (2, 2, 1)
    np.testing.assert_array_equal(x.values[:2], written[0]["blocks.0/activation"])
    assert np.isnan(x.values[2:4]).all()  # unwritten unit reads as NaN
    assert list(x.sel(image=x.image_id.isin(["img4"])).label.values) == [4]
    assert run.layers == ["blocks.0", "layer1.0"]
    assert run["layer1.0"].x.values.tolist() == [8.0, 24.0]


def test_run_to_datatree_is_the_run_as_xarray_reads_it(tmp_path: Path) -> None:
    """``run.to_datatree()`` (a fixed name, DESIGN.md §3) holds this run's written values
    and provenance, not the store's root or another run."""
    url = filled_store(tmp_path)
    run = open_store(url)["r"]
    tree = run.to_datatree()
    assert tree.attrs["model"] == PROVENANCE["model"] and "other" not in tree.children
    assert set(tree.children) >= {"blocks.0", "layer1.0"}
    for layer in run.layers:
        np.testing.assert_array_equal(tree[layer]["activation"].values, run[layer].values)
    np.testing.assert_array_equal(
        tree["blocks.0"]["attention"].values, run.attention("blocks.0").values
    )


def test_opens_with_plain_xarray_and_zarr(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    make_run(url, attention=True)
    fill_run(url, attention=True)
    tree = xr.open_datatree(url, engine="zarr")
    assert tree.attrs[FORMAT_ATTR] == 2
    assert tree["r"].attrs[CREATED_ATTR] is True
    x = tree["r"]["blocks.0"]["activation"]
    assert x.dims == ("image", "token", "channel")
    # Every layer node carries the per-image coordinates, not only the run node.
    for node in ("blocks.0", "layer1.0"):
        for name in ("activation",):
            da = tree["r"][node][name]
            assert list(da["image_id"].values) == [f"img{i}" for i in range(5)]
            assert list(da["label"].values) == list(range(5))
            assert list(da["image_sha256"].values) == hashes(5)
    a = tree["r"]["blocks.0"]["attention"]
    assert list(a["query_kind"].values) == ["cls", "patch", "patch"]
    assert list(a["key_x"].values[1:]) == [8.0, 24.0] and "token_kind" not in a.coords
    ds = xr.open_zarr(url, group="r/layer1.0")
    assert list(ds["activation"]["image_id"].values) == [f"img{i}" for i in range(5)]
    assert zarr.open_group(url, mode="r")["r/layer1.0/activation"].shape == (5, 2, 2, 5)


def test_every_array_is_checksummed_with_safe_fill_values(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    make_run(url, attention=True)
    fill_run(url, attention=True)
    group = zarr.open_group(url, mode="r")
    seen = 0
    for path, arr in walk_arrays(group):
        seen += 1
        assert has_checksum(arr), path
        if arr.dtype.kind in "iu":
            values = arr[...]
            assert arr.fill_value not in values, path  # a missing chunk never reads as data
        names = str(arr.attrs.get("coordinates", "")).split()
        parent = group[path.rsplit("/", 1)[0]] if "/" in path else group
        dims = set(arr.metadata.dimension_names)
        for name in names:  # no `coordinates` entry names a missing array or a foreign dim
            assert set(parent[name].metadata.dimension_names) <= dims, (path, name)
    assert seen > 20


def test_unit_write_checks_shapes_and_arrays(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    make_run(url)
    writer = RunWriter(url, "r")
    with pytest.raises(StoreError, match="missing or unknown"):
        writer.write_unit(0, {"blocks.0/activation": np.zeros((2, 3, 4))}, np.zeros(2), ["", ""])
    bad = unit_values(3, 0)
    with pytest.raises(StoreError, match="chunk-aligned"):
        writer.write_unit(0, bad, np.zeros(2, bool), ["", ""])
    assert writer.pending_units() == [0, 1, 2]


def test_existing_run_resume_and_overwrite(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    make_run(url)
    with pytest.raises(RunExistsError, match="--resume"):
        prepare_run(url, "r", PROVENANCE, resume=False, overwrite=False)
    assert prepare_run(url, "r", PROVENANCE, resume=True, overwrite=False) is False
    ids = [f"img{i}" for i in range(5)]
    assert (
        prepare_run(
            url,
            "r",
            PROVENANCE,
            resume=True,
            overwrite=False,
            image_ids=ids,
            image_sha256=hashes(5),
        )
        is False
    )
    changed = hashes(5)
    changed[3] = "f" * 64
    with pytest.raises(RunMismatchError, match=r"1 image\(s\) changed .*img3"):
        prepare_run(
            url, "r", PROVENANCE, resume=True, overwrite=False, image_ids=ids, image_sha256=changed
        )
    with pytest.raises(RunMismatchError, match="dtype"):
        prepare_run(url, "r", {**PROVENANCE, "dtype": "float16"}, resume=True, overwrite=False)
    assert prepare_run(url, "r", PROVENANCE, resume=False, overwrite=True) is True
    assert prepare_run(url, "new", PROVENANCE, resume=False, overwrite=False) is True


def test_not_a_store_and_newer_version(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("hello")
    with pytest.raises(NotAStoreError):
        open_store(str(tmp_path / "plain"))
    zarr.open_group(str(tmp_path / "z.zarr"), mode="w")
    with pytest.raises(NotAStoreError, match="not a vitcnn store"):
        open_store(str(tmp_path / "z.zarr"))
    newer = zarr.open_group(str(tmp_path / "n.zarr"), mode="w")
    newer.attrs[FORMAT_ATTR] = 3
    with pytest.raises(StoreVersionError, match="upgrade"):
        open_store(str(tmp_path / "n.zarr"))
    with pytest.raises(StoreError, match="no store"):
        open_store(str(tmp_path / "missing.zarr"))


def test_unknown_run_and_layer(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    make_run(url)
    with pytest.raises(RunNotFoundError, match="runs: r"):
        open_store(url)["x"]
    with pytest.raises(RunNotFoundError, match=r"near: blocks\.0"):
        open_store(url)["r"]["blocks.00"]


@pytest.mark.parametrize("name", ["a/b", "..", "_x", ".x", "", "a..b", "zarr.json", "x" * 300])
def test_invalid_names(name: str) -> None:
    with pytest.raises(UsageError):
        check_name(name)


def test_float16_overflow_is_an_error() -> None:
    check_peaks([("l/activation", 60000.0)], "float16")
    with pytest.raises(DtypeOverflowError, match="float32"):
        check_peaks([("l/activation", 70000.0)], "float16")
    with pytest.raises(DtypeOverflowError, match="float32"):  # inf after the float16 cast
        check_peaks([("l/activation", float("inf"))], "float16")
    check_peaks([("l/activation", 70000.0)], "float32")
    with pytest.raises(NonFiniteActivationError, match="NaN"):
        check_peaks([("l/activation", float("nan"))], "float32")


def test_memory_url() -> None:
    url = "memory://vitcnn-test/s.zarr"
    make_run(url)
    writer = RunWriter(url, "r")
    writer.write_unit(2, unit_values(1, 2), np.array([True]), ["bad file"])
    run = open_store(url)["r"]
    assert run.failed == {"img4": "bad file"}


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_compressions_round_trip(tmp_path: Path, compression: str) -> None:
    url = str(tmp_path / "s.zarr")
    create_run(
        url,
        "r",
        image_ids=["a", "b"],
        labels=[0, 1],
        chunk=2,
        dtype="float32",
        arrays=SPECS[:1],
        attrs=PROVENANCE,
        compression=compression,
    )
    values = {"blocks.0/activation": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}
    RunWriter(url, "r").write_unit(0, values, np.zeros(2, bool), ["", ""])
    np.testing.assert_array_equal(
        open_store(url)["r"]["blocks.0"].values, values["blocks.0/activation"]
    )
    with pytest.raises(UsageError):
        create_run(
            url,
            "r2",
            image_ids=["a"],
            labels=[0],
            chunk=1,
            dtype="float32",
            arrays=SPECS[:1],
            attrs=PROVENANCE,
            compression="gzip",
        )


def test_xarray_encoding_checksums_derived_results(tmp_path: Path) -> None:
    from vitcnn_store.store import xarray_encoding

    ds = xr.Dataset(
        {
            "cka": (("a", "b"), np.eye(3)),
            "depth_index_a": ("a", np.arange(3)),
            "offset": ("a", np.array([-1, 0, 1])),
        },
        coords={"layer": ("a", ["x", "y", "z"])},
    )
    url = str(tmp_path / "r.zarr")
    ds.to_zarr(url, mode="w", zarr_format=3, consolidated=False, encoding=xarray_encoding(ds))
    group = zarr.open_group(url, mode="r")
    assert all(has_checksum(group[k]) for k in ("cka", "depth_index_a", "offset", "layer"))
    assert group["depth_index_a"].fill_value == -1
    assert group["offset"].fill_value == np.iinfo(np.int64).min
    xr.testing.assert_identical(xr.open_zarr(url).load(), ds)
