"""Figures of analysis results (PNG, matplotlib's Agg canvas).

Each function takes a result dataset as written by ``jobs.analyze`` (or read
back with ``Run.analysis(name)``, or plain ``xr.open_zarr(store,
group="<run>/_analyses/<name>")``) and a path,
draws the figure, saves it and returns the path. matplotlib is imported only
when a figure is drawn, and pyplot never is: figures are built on
:class:`matplotlib.figure.Figure` with an Agg canvas, so no GUI backend or
global state is touched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import xarray as xr
    from matplotlib.figure import Figure

__all__ = [
    "PLOTTERS",
    "cka_figure",
    "figure_dir",
    "plot_attention",
    "plot_cka",
    "plot_localization",
    "plot_probe",
    "plot_result",
    "plot_skip",
    "save_result_figure",
]


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _names(values: Any) -> list[str]:
    return [str(v) for v in np.asarray(values).tolist()]


def _ticks(ax: Any, axis: str, names: list[str], max_labels: int = 24) -> None:
    # Every k-th label: a 72-layer ViT-B preset would print an unreadable wall of text.
    step = max(1, int(np.ceil(len(names) / max_labels)))
    pos = np.arange(0, len(names), step)
    labels = [names[i] for i in pos]
    if axis == "x":
        ax.set_xticks(pos, labels, rotation=90, fontsize=6)
    else:
        ax.set_yticks(pos, labels, fontsize=6)


def _edges(centres: np.ndarray) -> np.ndarray | None:
    """Cell edges around increasing centres (midpoints; half a step past each end)."""
    c = np.asarray(centres, dtype=float)
    if c.size < 2 or not np.all(np.isfinite(c)) or np.any(np.diff(c) <= 0):
        return None
    mid = (c[1:] + c[:-1]) / 2.0
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def _cka_axes(ds: xr.Dataset, side: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Positions of a side's layers (normalized depth when the result has it) and cell edges."""
    depth = ds.coords.get(f"depth_{side}")
    if depth is not None:
        edges = _edges(np.asarray(depth.values, dtype=float))
        if edges is not None:
            return np.asarray(depth.values, dtype=float), edges, True
    n = ds.sizes[f"layer_{side}"]
    return np.arange(n, dtype=float), np.arange(n + 1, dtype=float) - 0.5, False


def _name_ticks(
    axis: Any, positions: np.ndarray, names: list[str], rotation: float = 0.0, max_labels: int = 14
) -> None:
    step = max(1, int(np.ceil(len(names) / max_labels)))
    axis.set_ticks(positions[::step], names[::step], fontsize=6, rotation=rotation)


def _protocol(ds: xr.Dataset) -> str:
    a = ds.attrs
    if a.get("estimator") == "unbiased-minibatch":
        images = (f"batch {a.get('batch_size', '?')} × {a.get('n_batches', '?')}, "
                  f"{a.get('repeats', 1)} repeat(s)")  # fmt: skip
    else:
        images = "all images"
    return (
        f"{a.get('estimator', '')}, {a.get('kernel', 'linear')} kernel, {a.get('reduce', '')}, "
        f"n={a.get('n', '?')} ({images})"
    )


def plot_cka(ds: xr.Dataset, path: str | Path) -> Path:
    """CKA matrix heatmap, rows ``layer_a`` and columns ``layer_b`` from the first layer up.

    With ``depth_a``/``depth_b`` (the fraction of the residual stream) the axes
    are normalized depth, so a ViT and a ResNet line up, and layer names label
    the opposite axes. With ``cka_null`` (the same estimate over randomly
    permuted images) a second panel shows the null on the same colour scale
    and the colour bar marks its largest magnitude: values near it are what
    unrelated images give.
    """
    return _save(cka_figure(ds), path)


def cka_figure(ds: xr.Dataset) -> Figure:
    """The figure :func:`plot_cka` saves (panels: CKA, then the null; then the colour bar)."""
    cka = np.asarray(ds["cka"].values, dtype=float)
    la, lb = _names(ds["layer_a"].values), _names(ds["layer_b"].values)
    ya, ea, depth_a = _cka_axes(ds, "a")
    xb, eb, depth_b = _cka_axes(ds, "b")
    null = np.asarray(ds["cka_null"].values, dtype=float) if "cka_null" in ds else None
    panels = 1 if null is None else 2
    side = float(np.clip(0.12 * max(len(la), len(lb)) + 3.0, 4.0, 10.0))
    fig = _figure(side * panels + 1.4, side + 0.6)
    axes = np.atleast_1d(fig.subplots(1, panels, squeeze=False)[0])
    a, b = ds.attrs.get("run_a", "a"), ds.attrs.get("run_b", "b")
    im = None
    for ax, values, title in zip(
        axes, [cka] if null is None else [cka, null], ["CKA", "null: images permuted"], strict=False
    ):
        im = ax.pcolormesh(eb, ea, values, vmin=0.0, vmax=1.0, cmap="magma", shading="flat")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"{b}: normalized depth" if depth_b else f"{b} layer", fontsize=8)
        ax.set_ylabel(f"{a}: normalized depth" if depth_a else f"{a} layer", fontsize=8)
        ax.set_aspect("auto")
        if depth_b:
            ax.set_xticks(np.linspace(0.0, 1.0, 5))
            _name_ticks(ax.secondary_xaxis("top").xaxis, xb, lb, rotation=90.0)
        else:
            _ticks(ax, "x", lb)
        if depth_a:
            ax.set_yticks(np.linspace(0.0, 1.0, 5))
            _name_ticks(ax.secondary_yaxis("right").yaxis, ya, la)
        else:
            _ticks(ax, "y", la)
    assert im is not None
    bar = fig.colorbar(im, ax=list(axes), shrink=0.8, label="CKA")
    lines = [f"CKA {a} × {b}: {_protocol(ds)}"]
    if null is not None and np.isfinite(null).any():
        level = float(np.nanmax(np.abs(null)))
        bar.ax.axhline(min(level, 1.0), color="cyan", linewidth=2.0)
        bar.ax.text(1.6, min(level, 1.0), "null max", color="black", fontsize=7,
                    va="center", transform=bar.ax.get_yaxis_transform())  # fmt: skip
        lines.append(
            f"null (same layers, images permuted): mean {np.nanmean(null):.3f}, "
            f"max |CKA| {level:.3f} over {ds.attrs.get('null_batches', '?')} batch(es)"
        )
    if depth_a or depth_b:
        lines.append("depth: fraction of the stored residual stream (stem 0, last block 1)")
    fig.suptitle("\n".join(lines), fontsize=8)
    return fig


def _column_dots(ax: Any, values: np.ndarray, cmap: Any) -> None:
    """One column per layer at x = layer index, heads as dots sorted by value."""
    n_layers, n_heads = values.shape
    spread = np.linspace(-0.3, 0.3, n_heads) if n_heads > 1 else np.zeros(1)
    for i in range(n_layers):
        v = np.sort(values[i][np.isfinite(values[i])])
        ax.scatter(i + spread[: v.size], v, s=12, color=cmap(i / max(n_layers - 1, 1)))


def plot_attention(ds: xr.Dataset, path: str | Path) -> Path:
    """Mean attention distance and entropy per head (one column of dots per layer,
    heads sorted), and the mean CLS attention map of each layer (paper Fig. 3)."""
    from matplotlib import colormaps

    layers = _names(ds["layer"].values)
    has_cls = "cls_attention" in ds
    n = len(layers)
    fig = _figure(float(np.clip(1.0 + 0.9 * n, 6.0, 16.0)), 7.0 if has_cls else 4.5)
    top: Any = fig
    bottom: Any = None
    if has_cls:
        subs: Any = fig.subfigures(2, 1, height_ratios=[2.2, 1.0])
        top, bottom = subs[0], subs[1]
    axes = top.subplots(1, 2)
    cmap = colormaps["viridis"]
    for ax, var, label in (
        (axes[0], "mean_distance", "mean attention distance (px)"),
        (axes[1], "entropy", "attention entropy (nats)"),
    ):
        _column_dots(ax, np.asarray(ds[var].values, dtype=float), cmap)
        ax.set_xticks(np.arange(n), layers, rotation=90, fontsize=6)
        ax.set_xlabel("layer (forward order); dots = heads, sorted", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    top.suptitle(
        f"attention of run {ds.attrs.get('run', '')} (n={ds.attrs.get('n', '?')}, "
        f"{'renormalized' if ds.attrs.get('renormalize') else 'not renormalized'})",
        fontsize=9,
    )
    if has_cls and bottom is not None:
        maps = np.nanmean(np.asarray(ds["cls_attention"].values, dtype=float), axis=1)
        small = bottom.subplots(1, n, squeeze=False)[0]
        for i, ax in enumerate(small):
            ax.imshow(maps[i], cmap="viridis", interpolation="nearest")
            ax.set_title(layers[i], fontsize=6)
            ax.set_axis_off()
        bottom.suptitle("mean CLS attention to patches (mean over heads)", fontsize=8)
    return _save(fig, path)


def plot_localization(ds: xr.Dataset, path: str | Path) -> Path:
    """A heatmap per chosen token over the input-patch grid, the token marked (paper Fig. 9)."""
    from matplotlib.patches import Rectangle

    maps = np.asarray(ds["localization"].values, dtype=float)
    rows = np.asarray(ds["target_row"].values)
    cols = np.asarray(ds["target_col"].values)
    t = maps.shape[0]
    ncols = min(t, 5)
    nrows = int(np.ceil(t / ncols))
    fig = _figure(2.4 * ncols + 0.8, 2.4 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    vmax = float(np.nanmax(maps)) if np.isfinite(maps).any() else 1.0
    im = None
    for i, ax in enumerate(axes):
        if i >= t:
            ax.set_axis_off()
            continue
        im = ax.imshow(
            maps[i], cmap="magma", vmin=0.0, vmax=max(vmax, 1e-6), interpolation="nearest"
        )
        # Outline the chosen token's own cell.
        ax.add_patch(
            Rectangle(
                (cols[i] - 0.5, rows[i] - 0.5),
                1.0,
                1.0,
                fill=False,
                edgecolor="cyan",
                linewidth=2.0,
            )
        )
        ax.set_title(f"token ({int(rows[i])}, {int(cols[i])})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=list(axes[:t]), shrink=0.8, label="CKA with input patch")
    fig.suptitle(
        f"localization: {ds.attrs.get('run', '')} {ds.attrs.get('layer', '')} "
        f"(patch {ds.attrs.get('patch_size', '?')} px, n={ds.attrs.get('n', '?')})",
        fontsize=9,
    )
    return _save(fig, path)


def plot_skip(ds: xr.Dataset, path: str | Path) -> Path:
    """Skip-connection norm ratio ‖z‖/‖f(z)‖ per block, CLS apart from spatial (paper Fig. 7)."""
    blocks = _names(ds["block"].values)
    branches = _names(ds["branch"].values)
    fig = _figure(float(np.clip(0.35 * len(blocks) + 4.0, 5.0, 12.0)), 4.0)
    ax = fig.add_subplot()
    x = np.arange(len(blocks))
    for j, branch in enumerate(branches):
        color = f"C{j}"
        ax.plot(
            x,
            ds["ratio_spatial"].values[j],
            "-o",
            color=color,
            ms=3,
            label=f"{branch}: spatial tokens",
        )
        if "ratio_cls" in ds:
            ax.plot(x, ds["ratio_cls"].values[j], "--s", color=color, ms=3, label=f"{branch}: CLS")
    ax.set_yscale("log")
    ax.set_xticks(x, blocks, rotation=90, fontsize=6)
    ax.set_xlabel("block")
    ax.set_ylabel("‖z‖ / ‖f(z)‖")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"skip-connection norm ratio, run {ds.attrs.get('run', '')}", fontsize=9)
    return _save(fig, path)


def plot_probe(ds: xr.Dataset, path: str | Path) -> Path:
    """Linear-probe accuracy against normalized depth (paper Fig. 11/13)."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    x = np.asarray(ds["depth_fraction"].values, dtype=float)
    y = np.asarray(ds["accuracy"].values, dtype=float)
    err = np.asarray(ds["accuracy_std"].values, dtype=float) if "accuracy_std" in ds else None
    ax.errorbar(
        x, y, yerr=err, fmt="-o", ms=3, capsize=2, label=f"features: {ds.attrs.get('features', '')}"
    )
    n_classes = int(ds.attrs.get("n_classes", 0) or 0)
    if n_classes:
        ax.axhline(1.0 / n_classes, color="gray", ls=":", label="chance")
    ax.set_xlabel("normalized layer depth")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    shots = ds.attrs.get("shots")
    ax.set_title(
        f"linear probes, run {ds.attrs.get('run', '')} "
        f"({'full' if not shots else f'{shots}-shot'}, n_test={ds.attrs.get('n_test', '?')})",
        fontsize=9,
    )
    return _save(fig, path)


PLOTTERS: dict[str, Callable[[xr.Dataset, str | Path], Path]] = {
    "cka": plot_cka,
    "attention": plot_attention,
    "localization": plot_localization,
    "skip": plot_skip,
    "probe": plot_probe,
}


def plot_result(ds: xr.Dataset, path: str | Path) -> Path:
    """Draw any result dataset by its ``analysis`` attribute."""
    kind = str(ds.attrs.get("analysis", ""))
    if kind not in PLOTTERS:
        raise ValueError(f"no figure for analysis {kind!r}")
    return PLOTTERS[kind](ds, path)


def figure_dir(store: str, figures: str | None = None) -> Path:
    """Folder for figures: ``figures``, else beside a local store, else ``./vitcnn_figures``.

    Examples
    --------
    >>> figure_dir("/data/acts.zarr"), figure_dir("s3://bucket/acts.zarr")
    (PosixPath('/data/acts.zarr.figures'), PosixPath('vitcnn_figures'))
    """
    if figures:
        return Path(figures)
    local = store.removeprefix("file://")
    if "://" in local or local.startswith("memory:"):
        return Path("vitcnn_figures")
    path = Path(local).expanduser()
    return path.parent / f"{path.name}.figures"


def save_result_figure(
    ds: xr.Dataset, store: str, run: str, name: str, figures: str | None = None
) -> Path:
    """Draw result ``name`` of ``run`` as ``<run>__<name>.png`` in :func:`figure_dir`."""
    folder = figure_dir(store, figures)
    folder.mkdir(parents=True, exist_ok=True)
    return plot_result(ds, folder / f"{run}__{name}.png")
