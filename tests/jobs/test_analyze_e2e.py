"""Every analysis end to end through the CLI on a store made by the real extraction job."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from tests.helpers import png_ok
from tests.jobs.test_analyze_common import cli, copy_store
from vitcnn_store import open_store
from vitcnn_store.store.analyses import LATEST_ATTR
from vitcnn_store.store.layout import quiet_zarr

# Nine analyses with their figures on a real extraction: a minute of CPU, not for the quick loop.
pytestmark = pytest.mark.slow

# (analysis, arguments after STORE, the result's name group)
COMMANDS = [
    ("cka", ["vit"], "vit/_analyses/cka"),
    (
        "cka",
        ["vit", "resnet", "--reduce", "gap", "--batch-size", "16", "--repeats", "2"],
        "vit/_analyses/cka__resnet",
    ),
    ("attention", ["vit"], "vit/_analyses/attention"),
    ("localization", ["vit"], "vit/_analyses/localization"),
    (
        "localization",
        ["resnet", "--layer", "layer2.1", "--tokens", "0:0,3:3"],
        "resnet/_analyses/localization",
    ),
    ("skip", ["vit"], "vit/_analyses/skip"),
    ("skip", ["resnet"], "resnet/_analyses/skip"),
    ("probe", ["vit", "--shots", "5"], "vit/_analyses/probe"),
    ("probe", ["resnet", "--features", "gap"], "resnet/_analyses/probe"),
]


def latest(store: str, name_group: str) -> str:
    """The group of a name's latest result, found as a plain zarr reader would."""
    return f"{name_group}/{zarr.open_group(store, path=name_group).attrs[LATEST_ATTR]}"


@pytest.fixture(scope="module")
def store(tiny_store: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A private copy of the session's tiny store, with every analysis written into it."""
    url = copy_store(tiny_store, tmp_path_factory.mktemp("e2e") / "tiny.zarr")
    for analysis, args, _ in COMMANDS:
        assert cli(["analyze", analysis, url, *args, "--no-progress"]) == 0, (analysis, args)
    return url


def test_results_written_with_figures(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    figures = Path(store + ".figures")  # the default: beside a local store
    for analysis, args, group in COMMANDS:
        ds = xr.open_zarr(store, group=latest(store, group), consolidated=False)
        assert ds.attrs["analysis"] == analysis
        assert ds.attrs["weights_sha256"][0] == open_store(store)[args[0]].attrs["weights_sha256"]
        assert ds.attrs["image_set_sha256"] and ds.attrs["computed_at"]
        if group == "resnet/_analyses/skip":
            # timm zero-initialises every residual branch's last BN: at random init all
            # branches are dead, and their ratio is undefined rather than 1e12.
            assert (ds["dead_fraction"].values == 1.0).all(), group
            assert np.isnan(ds["ratio_spatial"].values).all(), group
        else:
            numeric = [v for v in ds.data_vars.values() if v.dtype.kind in "fiu"]
            assert numeric and all(np.isfinite(v.values).any() for v in numeric), group
        png_ok(figures / f"{group.split('/')[0]}__{group.rsplit('/', 1)[1]}.png")
    # Results do not show up as layers, and the runs read as before.
    run = open_store(store)["vit"]
    assert not any(name.startswith("_") for name in run.layers)
    assert run.layers[0] == "norm_pre"


def test_report_draws_into_the_folder_of_the_analyses_figures(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One folder per store: analyze's figures, and report.html with its figures (under the
    same names) and data, all in <store>.figures/ (issue 16: the demo and analyze used two)."""
    figures = Path(store + ".figures")
    drawn = {p.name: p.stat().st_mtime_ns for p in figures.glob("*.png")}
    assert len(drawn) == len(COMMANDS)
    assert cli(["report", store]) == 0
    assert capsys.readouterr().out == f"report: {figures / 'report.html'}\n"
    assert set(drawn) < {p.name for p in figures.glob("*.png")}  # + the overlays of probe and skip
    # analyze's figures show the results the report shows: kept, not drawn again; and a
    # second report keeps every figure, the overlays of several runs' results too.
    assert {name: (figures / name).stat().st_mtime_ns for name in drawn} == drawn
    every = {p.name: p.stat().st_mtime_ns for p in figures.glob("*.png")}
    assert cli(["report", store]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in figures.glob("*.png")} == every
    assert sorted(p.name for p in figures.iterdir() if p.is_dir()) == ["data"]
    for name in drawn:
        png_ok(figures / name)


def test_datatree_opens_with_results(store: str) -> None:
    with quiet_zarr():
        tree = xr.open_datatree(store, engine="zarr")
    for _, _, name_group in COMMANDS:
        group = latest(store, name_group)
        node = tree[group]
        assert node.has_data
        # No dim of a result may clash with a dim of its run (an ancestor).
        run_dims = dict(tree[group.split("/")[0]].dataset.sizes)
        for dim, size in node.to_dataset(inherit=False).sizes.items():
            assert run_dims.get(dim, size) == size, (group, dim)
    cka = tree[latest(store, "vit/_analyses/cka")]
    assert cka["cka"].dims == ("layer_a", "layer_b")
    attention = tree[latest(store, "vit/_analyses/attention")]
    assert attention["mean_distance"].dims == ("layer", "head")


def test_reuse_unless_recompute(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    name_group = "vit/_analyses/cka"

    def stamp() -> str:
        group = latest(store, name_group)
        return str(xr.open_zarr(store, group=group, consolidated=False).attrs["computed_at"])

    capsys.readouterr()
    before = stamp()
    first = latest(store, name_group)
    assert cli(["analyze", "cka", store, "vit", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"reused {store}/{first} " in out and stamp() == before
    figure = re.search(r"figure: (\S+)", out)
    assert figure is not None and Path(figure.group(1)).exists()
    assert cli(["analyze", "cka", store, "vit", "--no-progress", "--recompute"]) == 0
    assert f"rewrote {store}/{first} " in capsys.readouterr().out and stamp() != before
    # Other parameters: a new result beside the earlier one, which is kept and named.
    assert cli(["analyze", "cka", store, "vit", "--no-progress", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    second = latest(store, name_group)
    assert second != first and f"wrote {store}/{second}\n" in out
    assert "kept 1 earlier result(s) of 'cka'" in out and f"    {store}/{first}" in out
    assert open_store(store)["vit"].analysis("cka").attrs["seed"] == 3
    assert xr.open_zarr(store, group=first, consolidated=False).attrs["seed"] == 0
    # The first again: reused, not recomputed; --replace then deletes the other.
    assert cli(["analyze", "cka", store, "vit", "--no-progress", "--replace"]) == 0
    out = capsys.readouterr().out
    assert f"reused {store}/{first} " in out and f"removed {store}/{second} (--replace)" in out
    with quiet_zarr():
        kept = {k for k, _ in zarr.open_group(store, path=name_group, mode="r").groups()}
    assert kept == {first.rsplit("/", 1)[1]} and latest(store, name_group) == first


def test_errors_on_real_runs(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["analyze", "attention", store, "resnet", "--no-progress"]) == 2
    assert cli(["analyze", "cka", store, "vit", "resnet", "--reduce", "cls", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = [line for line in lines if ": warning: " not in line]  # e.g. the batch size capped
    assert len(err) == 2 and "--attention" in err[0] and "CLS" in err[1]
