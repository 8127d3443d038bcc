"""The CKA figure: normalized-depth axes, layer names, and the permutation null as a baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from vitcnn_store import plots


def _result(null: bool = True, depth: bool = True) -> xr.Dataset:
    rng = np.random.default_rng(0)
    a = np.array(["norm_pre"] + [f"blocks.{i}" for i in range(12)], dtype=object)
    b = np.array(["maxpool"] + [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)],
                 dtype=object)  # fmt: skip
    ds = xr.Dataset(
        {"cka": (("layer_a", "layer_b"), rng.uniform(0.2, 1.0, size=(13, 9)))},
        coords={"layer_a": a, "layer_b": b},
        attrs={"analysis": "cka", "run_a": "vit", "run_b": "r50", "estimator":
               "unbiased-minibatch", "n": 4096, "batch_size": 512, "n_batches": 8,
               "repeats": 20, "reduce": "flatten", "null_batches": 8},
    )  # fmt: skip
    if depth:
        ds = ds.assign_coords(depth_a=("layer_a", np.linspace(0, 1, 13)),
                              depth_b=("layer_b", np.linspace(0, 1, 9)))  # fmt: skip
    if null:
        ds["cka_null"] = (("layer_a", "layer_b"), rng.uniform(0.0, 0.08, size=(13, 9)))
    return ds


def test_depth_axes_and_null_panel(tmp_path: Path) -> None:
    ds = _result()
    fig = plots.cka_figure(ds)
    cka_ax, null_ax, bar = fig.axes[0], fig.axes[1], fig.axes[-1]
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
    assert [t.get_text() for t in cka_ax.get_xticklabels()] == ["0.00", "0.25", "0.50", "0.75",
                                                                 "1.00"]  # fmt: skip
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
