"""The CKA figure: normalized-depth axes, layer names, and the permutation null as a baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from vitcnn_store.interface import plots


def _result(null: bool = True, depth: bool = True) -> xr.Dataset:
    rng = np.random.default_rng(0)
    a = np.array(["norm_pre"] + [f"blocks.{i}" for i in range(12)], dtype=object)
    b = np.array(
        ["maxpool"] + [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)], dtype=object
    )
    ds = xr.Dataset(
        {"cka": (("layer_a", "layer_b"), rng.uniform(0.2, 1.0, size=(13, 9)))},
        coords={"layer_a": a, "layer_b": b},
        attrs={
            "analysis": "cka",
            "run_a": "vit",
            "run_b": "r50",
            "estimator": "unbiased-minibatch",
            "n": 4096,
            "batch_size": 512,
            "n_batches": 8,
            "repeats": 20,
            "reduce": "flatten",
            "null_batches": 8,
        },
    )
    if depth:
        ds = ds.assign_coords(
            depth_a=("layer_a", np.linspace(0, 1, 13)), depth_b=("layer_b", np.linspace(0, 1, 9))
        )
    if null:
        ds["cka_null"] = (("layer_a", "layer_b"), rng.uniform(0.0, 0.08, size=(13, 9)))
    return ds


def test_depth_axes_and_null_panel(tmp_path: Path) -> None:
    ds = _result()
    fig = plots.cka_figure(ds)
    cka_ax, null_ax = fig.axes[0], fig.axes[1]
    bar = next(ax for ax in fig.axes if ax.get_ylabel() == "CKA")  # the CKA colour bar
    assert cka_ax.get_title() == "CKA" and "null" in null_ax.get_title()
    assert "normalized depth" in cka_ax.get_xlabel() and "normalized depth" in cka_ax.get_ylabel()
    # Both axes span the residual stream 0..1 however many layers each model has.
    lo, hi = cka_ax.get_xlim()
    assert lo < 0 < 1 < hi and hi - lo < 1.2
    # The null's largest magnitude is marked on the colour bar.
    level = float(np.abs(ds["cka_null"].values).max())
    marks = [ln.get_ydata()[0] for ln in bar.get_lines()]
    assert any(abs(m - level) < 1e-9 for m in marks)
    assert "null (same layers, images permuted)" in fig.texts[0].get_text()
    assert [t.get_text() for t in cka_ax.get_xticklabels()] == [
        "0.00",
        "0.25",
        "0.50",
        "0.75",
        "1.00",
    ]
    top, right = cka_ax.child_axes  # layer names on the opposite sides
    assert "layer4.1" in [t.get_text() for t in top.get_xticklabels()]
    assert "blocks.11" in [t.get_text() for t in right.get_yticklabels()]
    path = plots.plot_cka(ds, tmp_path / "cka.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_older_results_without_depth_or_null_still_draw(tmp_path: Path) -> None:
    fig = plots.cka_figure(_result(null=False, depth=False))
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    assert fig.axes[0].get_xlabel() == "r50 layer"
    plots.plot_cka(_result(null=False, depth=False), tmp_path / "old.png")


def _panel(fig, title: str):  # type: ignore[no-untyped-def]
    return next(ax for ax in fig.axes if title in ax.get_title())


def test_negative_values_sd_and_percentile_are_shown_not_clipped() -> None:
    """Unbiased CKA below 0 keeps its colour (the scale reaches the minimum, diverging
    at 0); sd over repeats and the null's percentile get panels and colour bars; the
    "null max" label sits beside the bar, away from its tick labels."""
    ds = _result()
    ds["cka"][0, 0] = -0.3
    ds["cka_std"] = (("layer_a", "layer_b"), np.full((13, 9), 0.02))
    ds["cka_null"][1, 1] = -0.07
    ds["cka_percentile"] = (("layer_a", "layer_b"), np.full((13, 9), 97.5))
    ds = ds.assign_coords(permutation=np.arange(20))
    fig = plots.cka_figure(ds)
    mesh = fig.axes[0].collections[0]
    assert mesh.norm.vmin <= -0.3 and mesh.norm.vmax >= 1.0
    assert mesh.norm(0.0) == 0.5  # 0 is the centre of a diverging scale
    null_mesh = _panel(fig, "null").collections[0]
    assert null_mesh.norm.vmin <= -0.07 and null_mesh.norm.vmax >= ds["cka_null"].values.max()
    assert "sd over" in _panel(fig, "sd over").get_title()
    assert "20 permutations" in _panel(fig, "percentile").get_title()
    labels = sorted(
        ax.get_ylabel()
        for ax in fig.axes
        if ax.get_ylabel() in ("CKA", "sd of CKA", "null CKA", "percentile")
    )
    assert labels == ["CKA", "null CKA", "percentile", "sd of CKA"]  # one bar per panel
    bar = next(ax for ax in fig.axes if ax.get_ylabel() == "CKA")
    (label,) = [t for t in bar.texts if t.get_text() == "null max"]
    assert label.get_position()[0] < 0 and label.get_ha() == "right"  # left of the bar
    assert all(t.get_position()[0] >= 0 for t in bar.get_yticklabels())
