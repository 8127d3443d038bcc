"""Figures of result datasets: each draws a non-blank PNG without pyplot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from vitcnn_store import plots


def _png_ok(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(str(path))
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 8


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
        },
        coords={"branch": np.array(["attn", "mlp"], dtype=object), "block": _names("blocks.", 12)},
        attrs={"analysis": "skip", "run": "vit"},
    )
    probe = xr.Dataset(
        {"accuracy": ("layer", rng.uniform(size=8)), "accuracy_std": ("layer", np.full(8, 0.05))},
        coords={"layer": _names("l", 8), "depth_fraction": ("layer", np.linspace(0, 1, 8))},
        attrs={"analysis": "probe", "run": "vit", "n_classes": 2, "shots": 10},
    )
    return {"cka": cka, "attention": att, "localization": loc, "skip": skip, "probe": probe}


@pytest.mark.parametrize("kind", list(plots.PLOTTERS))
def test_each_figure_is_a_png(kind: str, tmp_path: Path) -> None:
    path = plots.plot_result(_datasets()[kind], tmp_path / "sub" / f"{kind}.png")
    assert path == tmp_path / "sub" / f"{kind}.png"
    _png_ok(path)


def test_attention_without_cls_and_skip_without_cls(tmp_path: Path) -> None:
    ds = _datasets()
    _png_ok(plots.plot_attention(ds["attention"].drop_vars("cls_attention"), tmp_path / "a.png"))
    _png_ok(plots.plot_skip(ds["skip"].drop_vars("ratio_cls"), tmp_path / "s.png"))


def test_no_pyplot_and_unknown_analysis(tmp_path: Path) -> None:
    # A fresh interpreter: drawing must not import pyplot (no GUI backend, no global state).
    code = (
        "import sys, numpy as np, xarray as xr; from vitcnn_store import plots; "
        "ds = xr.Dataset({'accuracy': ('layer', np.r_[0.2, 0.9])}, "
        "coords={'depth_fraction': ('layer', np.r_[0.0, 1.0])}); "
        f"plots.plot_probe(ds, {str(tmp_path / 'p.png')!r}); "
        "print('matplotlib.pyplot' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    _png_ok(tmp_path / "p.png")
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
    _png_ok(path)
