"""Figures of result datasets: each draws a non-blank PNG without pyplot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.helpers import png_ok
from vitcnn_store.interface import plots
from vitcnn_store.interface.registry import ANALYSES


def _names(prefix: str, n: int) -> np.ndarray:
    return np.array([f"{prefix}{i}" for i in range(n)], dtype=object)


def _datasets() -> dict[str, xr.Dataset]:
    rng = np.random.default_rng(0)
    layers = _names("blocks.", 30)
    cka = xr.Dataset(
        {"cka": (("layer_a", "layer_b"), rng.uniform(size=(30, 30)))},
        coords={"layer_a": layers, "layer_b": layers},
        attrs={"analysis": "cka", "run_a": "vit", "run_b": "vit", "reduce": "flatten"},
    )
    att = xr.Dataset(
        {
            "mean_distance": (("layer", "head"), rng.uniform(10, 100, size=(4, 3))),
            "entropy": (("layer", "head"), rng.uniform(1, 4, size=(4, 3))),
            "uniform_distance": ("layer", np.full(4, 65.17)),
            "uniform_entropy": ("layer", np.full(4, 4.11)),
            "cls_attention": (
                ("layer", "head", "grid_y", "grid_x"),
                rng.uniform(size=(4, 3, 5, 5)),
            ),
        },
        coords={"layer": _names("blocks.attn", 4)},
        attrs={"analysis": "attention", "run": "vit", "renormalize": False},
    )
    loc = xr.Dataset(
        {"localization": (("target", "grid_y", "grid_x"), rng.uniform(size=(6, 4, 4)))},
        coords={"target_row": ("target", [0, 1, 2, 3, 0, 3]), "target_col": ("target", [0] * 6)},
        attrs={"analysis": "localization", "layer": "blocks.11", "patch_size": 16},
    )
    skip = xr.Dataset(
        {
            "ratio_cls": (("branch", "block"), rng.uniform(0.5, 50, size=(2, 12))),
            "ratio_spatial": (("branch", "block"), rng.uniform(0.5, 50, size=(2, 12))),
            "dead_fraction": (("branch", "block"), np.zeros((2, 12))),
        },
        coords={
            "branch": np.array(["attn", "mlp"], dtype=object),
            "block": _names("blocks.", 12),
            "depth_fraction": ("block", np.arange(1, 13) / 12),
        },
        attrs={"analysis": "skip", "run": "vit"},
    )
    roles = np.array(["stream"] + ["branch", "stream"] * 3 + ["stream"], dtype=object)
    probe = xr.Dataset(
        {
            "accuracy": ("layer", rng.uniform(size=8)),
            "accuracy_std": ("layer", np.full(8, 0.05)),
            "chance_accuracy": ((), 0.3),
            "l2": (("repeat", "layer"), np.full((2, 8), 10.0)),
        },
        coords={
            "layer": _names("l", 8),
            "depth_fraction": ("layer", np.linspace(0, 1, 8)),
            "role": ("layer", roles),
            "feature": ("layer", np.array(["gap"] + ["cls"] * 7, dtype=object)),
            "l2_grid": [1e-3, 1.0, 1e5],
        },
        attrs={"analysis": "probe", "run": "vit", "n_classes": 2, "shots": 10},
    )
    heads = xr.Dataset(
        {
            "mean_distance": (("head_layer", "head"), rng.uniform(5, 100, size=(3, 4))),
            "cka_lower": (("head_layer", "head"), rng.uniform(0, 0.6, size=(3, 4))),
        },
        coords={"head_layer": _names("blocks.attn.norm", 3), "layer_b": _names("layer1.", 2)},
        attrs={"analysis": "heads", "run_a": "vit", "run_b": "r50", "n": 64},
    )
    return {
        "cka": cka,
        "attention": att,
        "localization": loc,
        "skip": skip,
        "probe": probe,
        "heads": heads,
    }


@pytest.mark.parametrize("kind", [e.name for e in ANALYSES.values() if e.draws_figure])
def test_each_figure_is_a_png(kind: str, tmp_path: Path) -> None:
    path = plots.plot_result(_datasets()[kind], tmp_path / "sub" / f"{kind}.png")
    assert path == tmp_path / "sub" / f"{kind}.png"
    png_ok(path)


def test_attention_without_cls_and_skip_without_cls(tmp_path: Path) -> None:
    ds = _datasets()
    png_ok(plots.plot_attention(ds["attention"].drop_vars("cls_attention"), tmp_path / "a.png"))
    png_ok(plots.plot_skip(ds["skip"].drop_vars("ratio_cls"), tmp_path / "s.png"))


def test_no_pyplot_and_unknown_analysis(tmp_path: Path) -> None:
    # A fresh interpreter: drawing must not import pyplot (no GUI backend, no global state).
    code = (
        "import sys, numpy as np, xarray as xr; from vitcnn_store.interface import plots; "
        "ds = xr.Dataset({'accuracy': ('layer', np.r_[0.2, 0.9])}, "
        "coords={'depth_fraction': ('layer', np.r_[0.0, 1.0])}); "
        f"plots.plot_probe(ds, {str(tmp_path / 'p.png')!r}); "
        "print('matplotlib.pyplot' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    png_ok(tmp_path / "p.png")
    with pytest.raises(ValueError, match="no figure"):
        plots.plot_result(xr.Dataset(attrs={"analysis": "other"}), tmp_path / "x.png")


def test_figure_dir_defaults(tmp_path: Path) -> None:
    assert plots.figure_dir(str(tmp_path / "acts.zarr")) == tmp_path / "acts.zarr.figures"
    assert plots.figure_dir(str(tmp_path / "acts.zarr") + "/") == tmp_path / "acts.zarr.figures"
    assert plots.figure_dir("s3://bucket/acts.zarr") == Path("vitcnn_figures")
    assert plots.figure_dir("memory://acts.zarr") == Path("vitcnn_figures")
    assert plots.figure_dir("s3://bucket/acts.zarr", "figs") == Path("figs")


def test_result_figure_named_after_run_and_result(tmp_path: Path) -> None:
    path = plots.save_result_figure(_datasets()["probe"], str(tmp_path / "s.zarr"), "vit", "p")
    assert path == tmp_path / "s.zarr.figures" / "vit__p.png"
    png_ok(path)


# --- baselines and axes, read off the figures themselves ------------------------------


def _hlines(ax) -> dict[str, float]:
    """Horizontal reference lines of an axes: label -> y."""
    out = {}
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata(), dtype=float)
        if y.size == 2 and y[0] == y[1] and tuple(line.get_xdata()) == (0, 1):
            out[str(line.get_label())] = float(y[0])
    return out


def test_probe_figure_draws_chance_and_normalized_depth() -> None:
    ds = _datasets()["probe"]
    fig = plots.draw_probe(ds)
    ax, ax_l2 = fig.axes[:2]
    assert _hlines(ax) == {"chance (0.30)": 0.3}
    assert ax_l2.get_xlabel() == plots.DEPTH_LABEL and ax_l2.get_yscale() == "log"
    stream = ds["role"].values == "stream"
    curve = next(c for c in ax.containers)  # the error-bar curve: residual stream only
    x, y = curve.lines[0].get_data()
    np.testing.assert_allclose(x, ds["depth_fraction"].values[stream], atol=1e-12)
    np.testing.assert_allclose(y, ds["accuracy"].values[stream], atol=1e-12)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("branch outputs" in t for t in labels) and any("CLS" in t for t in labels)
    # Older results (no chance variable): chance is 1/n_classes.
    old = ds.drop_vars(["chance_accuracy", "l2"])
    assert _hlines(plots.draw_probe(old).axes[0]) == {"chance (0.50)": 0.5}


def test_attention_figure_draws_the_uniform_baseline() -> None:
    fig = plots.draw_attention(_datasets()["attention"])
    dist, ent = fig.axes[:2]
    assert _hlines(dist) == {"uniform attention (65.17)": 65.17}
    assert _hlines(ent) == {"uniform attention (4.11)": 4.11}


def test_skip_figure_uses_depth_and_marks_dead_branches() -> None:
    ds = _datasets()["skip"]
    fig = plots.draw_skip(ds)
    ax = fig.axes[0]
    assert ax.get_xlabel() == plots.DEPTH_LABEL and _hlines(ax)["‖z‖ = ‖f(z)‖"] == 1.0
    first = ax.get_lines()[0]
    np.testing.assert_allclose(first.get_xdata(), ds["depth_fraction"].values, atol=1e-12)
    dead = ds.copy(deep=True)
    dead["dead_fraction"][:] = 1.0
    dead["ratio_spatial"][:] = np.nan
    dead["ratio_cls"][:] = np.nan
    ax = plots.draw_skip(dead).axes[0]
    texts = " ".join(t.get_text() for t in ax.texts)
    assert "exactly 0" in texts
    assert any("f(z) ≡ 0" in str(line.get_label()) for line in ax.get_lines())


def test_overlay_puts_runs_on_one_depth_axis(tmp_path: Path) -> None:
    ds = _datasets()
    short = (
        ds["probe"]
        .isel(layer=[0, 2, 4, 7])
        .assign_coords(depth_fraction=("layer", [0, 1 / 3, 2 / 3, 1]))
    )
    fig = plots.draw_overlay("probe", [("vit", ds["probe"]), ("resnet", short)])
    ax = fig.axes[0]
    assert ax.get_xlabel() == plots.DEPTH_LABEL and ax.get_xlim() == (-0.03, 1.03)
    assert "chance (0.30)" in _hlines(ax)
    fig = plots.draw_overlay("skip", [("vit", ds["skip"]), ("resnet", ds["skip"])])
    assert fig.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="no overlay"):
        plots.draw_overlay("cka", [])


def test_attention_figure_says_what_it_does_with_the_cls_key() -> None:
    ds = _datasets()["attention"]
    ds["cls_key_mass"] = (("layer", "head"), np.full((4, 3), 0.088))
    fig = plots.draw_attention(ds)
    title = fig.subfigs[0]._suptitle.get_text()
    assert "CLS-key mass dropped, rows not renormalized" in title
    assert fig.axes[2].get_ylabel().startswith("attention on the CLS key")
    np.testing.assert_allclose(fig.axes[2].collections[0].get_offsets()[:, 1], 0.088, atol=1e-12)
    ds.attrs["renormalize"] = True
    title = plots.draw_attention(ds).subfigs[0]._suptitle.get_text()
    assert "rows renormalized over patch keys" in title


# --- honest scales, colour bars, series and baselines (issue 21 point 6) --------------


def test_attention_axes_start_at_zero_and_draw_intervals() -> None:
    """Noise of ±0.5 px around a 65-px baseline must not fill the axis: it starts at 0."""
    ds = _datasets()["attention"]
    ds["mean_distance"][:] = 65.17 + np.random.default_rng(1).uniform(-0.5, 0.5, size=(4, 3))
    ds["mean_distance_lo"] = ds["mean_distance"] - 1.0
    ds["mean_distance_hi"] = ds["mean_distance"] + 1.0
    ds.attrs["ci_level"] = 0.95
    fig = plots.draw_attention(ds)
    dist, ent = fig.axes[:2]
    lo, hi = dist.get_ylim()
    assert lo == 0.0 and hi >= float(ds["mean_distance_hi"].max())
    assert ent.get_ylim()[0] == 0.0
    assert any(len(c.get_segments()) == 3 for c in dist.collections if hasattr(c, "get_segments"))


def test_cls_maps_share_one_scale_with_a_colour_bar() -> None:
    fig = plots.draw_attention(_datasets()["attention"])
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 4 and len({im.get_clim() for im in images}) == 1
    assert images[0].get_clim()[0] == 0.0
    assert any(ax.get_ylabel() == "attention" for ax in fig.axes)  # the colour bar


def test_localization_maps_share_the_fixed_scale_with_baseline_and_colour_bar() -> None:
    ds = _datasets()["localization"]
    ds["localization"][0, 0, 0] = -0.2  # an unbiased estimate below 0 extends the scale
    ds["localization_input"] = ds["localization"] * 0 + 0.5
    fig = plots.draw_localization(ds)
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 12  # 6 targets + their 6 input baselines
    assert {im.get_clim() for im in images} == {(-0.2, plots.LOCALIZATION_SCALE[1])}
    assert len([ax for ax in fig.axes if ax.get_ylabel() == "CKA with input patch"]) == 1
    titles = [ax.get_title() for ax in fig.axes]
    assert sum(t.startswith("input patch") for t in titles) == 6
    other = _datasets()["localization"] * 0.1
    other.attrs = ds.attrs
    clims = {im.get_clim() for ax in plots.draw_localization(other).axes for im in ax.get_images()}
    assert clims == {plots.LOCALIZATION_SCALE}  # the same scale for every model


def test_skip_overlay_gives_every_series_its_own_colour_and_marker() -> None:
    ds = _datasets()["skip"]
    ds["ratio_spatial_lo"] = ds["ratio_spatial"] * 0.9
    ds["ratio_spatial_hi"] = ds["ratio_spatial"] * 1.1
    fig = plots.draw_overlay("skip", [("vit", ds), ("resnet", ds.drop_vars("ratio_cls"))])
    series = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith(("vit", "resnet"))]
    assert len(series) == 6  # vit: 2 branches × (spatial, CLS); resnet: 2 × spatial
    styles = {(str(ln.get_color()), ln.get_marker()) for ln in series}
    assert len({c for c, _ in styles}) == 6 and len({m for _, m in styles}) == 6
    assert len(fig.axes[0].collections) == 4  # an interval band per spatial series


def test_probe_figure_draws_the_raw_input_baseline_and_intervals() -> None:
    ds = _datasets()["probe"]
    ds["input_accuracy"] = ((), 0.93)
    ds["accuracy_lo"] = ds["accuracy"] - 0.1
    ds["accuracy_hi"] = ds["accuracy"] + 0.05
    ax = plots.draw_probe(ds).axes[0]
    lines = _hlines(ax)
    assert lines["chance (0.30)"] == 0.3
    assert lines["run vit: raw input pixels (0.93)"] == 0.93
    bars = next(iter(ax.containers)).lines[2][0].get_segments()
    low, high = bars[0][:, 1]
    assert low == pytest.approx(float(ds["accuracy"][0]) - 0.1)
    assert high == pytest.approx(float(ds["accuracy"][0]) + 0.05)
