"""Figures of analysis results (PNG, matplotlib's Agg canvas).

Each ``plot_*`` function takes a result dataset as written by ``jobs.analyze``
(or read back with ``Run.analysis(name)``, or plain ``xr.open_zarr(store,
group="<run>/_analyses/<name>/<key>")``) and a path, draws the figure, saves it and
returns the path; the ``draw_*`` functions return the figure itself (tests
read its axes and baselines). Curves along depth use the results'
normalized depth by block, so a ViT and a ResNet share an axis
(:func:`draw_overlay` puts several runs on one), and every figure with a
baseline draws it: chance for probes, uniform attention for attention
distance and entropy, ‖z‖ = ‖f(z)‖ for skip ratios. matplotlib is imported only
when a figure is drawn, and pyplot never is: figures are built on
:class:`matplotlib.figure.Figure` with an Agg canvas, so no GUI backend or
global state is touched.

Each figure is drawn once, layout included, and written with its stamp
(:mod:`vitcnn_store.interface.figure_stamp`: the result it shows and
:data:`PLOTS_VERSION`) to a temporary name beside its final one, then renamed:
a killed process never leaves a half-written PNG under the final name.
:func:`figure_is_current` tells whether a PNG already shows a result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import xarray as xr
    from matplotlib.figure import Figure

__all__ = [
    "DEPTH_LABEL",
    "LOCALIZATION_SCALE",
    "OVERLAYS",
    "PLOTS_VERSION",
    "attention_convention",
    "cka_figure",
    "draw_attention",
    "draw_heads",
    "draw_localization",
    "draw_overlay",
    "draw_probe",
    "draw_skip",
    "figure_dir",
    "figure_is_current",
    "plot_attention",
    "plot_cka",
    "plot_heads",
    "plot_localization",
    "plot_overlay",
    "plot_probe",
    "plot_result",
    "plot_skip",
    "result_stamp",
    "save_result_figure",
]

#: Version of what the figures show: bump it when a change here alters a figure's
#: content (panels, labels, scales, annotations), so stamped figures drawn by the
#: older code are drawn again instead of kept.
PLOTS_VERSION = 1
#: Pixels per inch of the saved figures.
DPI = 110


def result_stamp(group: str, digest: str, computed_at: str = "") -> dict[str, Any]:
    """What a figure of the result at ``group`` is stamped with: the group, the digest of
    its stored arrays, when it was computed (a recomputed result is drawn again even if
    its values come out the same) and :data:`PLOTS_VERSION`.

    Examples
    --------
    >>> result_stamp("v/_analyses/cka/abc", "sha256:00", "2026-01-01T00:00:00")["plots"]
    1
    """
    return {"group": group, "digest": digest, "computed_at": computed_at, "plots": PLOTS_VERSION}


def figure_is_current(path: str | Path, stamp: dict[str, Any]) -> bool:
    """Whether the PNG at ``path`` was drawn from what ``stamp`` names (and by this
    plotting code): False when it is missing, unstamped, differently stamped, or
    ``stamp`` knows no digest. Reads the PNG's chunks only (no matplotlib)."""
    from vitcnn_store.interface.figure_stamp import read_stamp

    return bool(stamp.get("digest")) and read_stamp(path) == stamp


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: str | Path, stamp: dict[str, Any] | None = None) -> Path:
    """Draw ``fig`` once and write it to ``path`` as PNG, with ``stamp`` if given.

    ``savefig`` would draw twice (a pass for the layout, then the pixels); the
    canvas's own draw runs the layout and renders in one pass, and PIL (which
    matplotlib writes PNGs with anyway) encodes its pixels. Written beside
    ``path`` under a temporary name, then renamed over it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image, PngImagePlugin

    from vitcnn_store.interface.figure_stamp import STAMP_KEYWORD, stamp_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.set_dpi(DPI)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    size = canvas.get_width_height(physical=True)
    image = Image.frombuffer("RGBA", size, canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    info = PngImagePlugin.PngInfo()
    if stamp is not None:
        info.add_text(STAMP_KEYWORD.decode("latin-1"), stamp_text(stamp))
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        image.save(partial, format="PNG", pnginfo=info)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
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


def plot_cka(ds: xr.Dataset, path: str | Path, *, stamp: dict[str, Any] | None = None) -> Path:
    """CKA matrix heatmap, rows ``layer_a`` and columns ``layer_b`` from the first layer up.

    With ``depth_a``/``depth_b`` (the fraction of the residual stream) the axes
    are normalized depth, so a ViT and a ResNet line up, and layer names label
    the opposite axes. The colour scale is diverging around 0 and spans the
    data (at least [-0.05, 1]): unbiased estimates below 0 show, nothing is
    clipped. Further panels, each with its own colour bar: the standard
    deviation over repeats (``cka_std``), the null (``cka_null``, the same
    estimate over randomly permuted images, on a symmetric scale of its own;
    its largest magnitude is also marked on the CKA colour bar), and each
    value's percentile among the null's permutations (``cka_percentile``).
    The PNG is stamped with ``stamp``, if given.
    """
    return _save(cka_figure(ds), path, stamp)


def _cka_norm(values: list[np.ndarray]) -> Any:
    """Diverging around 0, from the data's minimum (at most -0.05) to its maximum (at least 1)."""
    from matplotlib.colors import TwoSlopeNorm

    finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.zeros(1)])
    return TwoSlopeNorm(
        vcenter=0.0, vmin=min(float(finite.min()), -0.05), vmax=max(float(finite.max()), 1.0)
    )


def _cka_panels(ds: xr.Dataset) -> list[tuple[str, np.ndarray, Any, str, str]]:
    """(title, values, norm, colour map, colour-bar label) of each panel, CKA first."""
    from matplotlib.colors import Normalize, TwoSlopeNorm

    def get(var: str) -> np.ndarray | None:
        return np.asarray(ds[var].values, dtype=float) if var in ds else None

    cka = np.asarray(ds["cka"].values, dtype=float)
    panels = [("CKA", cka, _cka_norm([cka]), "RdBu_r", "CKA")]
    std = get("cka_std")
    if std is not None and np.isfinite(std).any():
        top = max(float(np.nanmax(std)), 1e-6)
        panels.append(
            (
                f"sd over {ds.attrs.get('repeats', '?')} repeats",
                std,
                Normalize(0.0, top),
                "viridis",
                "sd of CKA",
            )
        )
    null = get("cka_null")
    if null is not None:
        level = float(np.nanmax(np.abs(null))) if np.isfinite(null).any() else 1.0
        level = max(level, 1e-6)
        panels.append(
            (
                "null: images permuted (own scale)",
                null,
                TwoSlopeNorm(vcenter=0.0, vmin=-level, vmax=level),
                "RdBu_r",
                "null CKA",
            )
        )
    pct = get("cka_percentile")
    if pct is not None:
        k = ds.sizes.get("permutation", "?")
        panels.append(
            (
                f"percentile among {k} permutations",
                pct,
                Normalize(0.0, 100.0),
                "cividis",
                "percentile",
            )
        )
    return panels


def cka_figure(ds: xr.Dataset) -> Figure:
    """The figure :func:`plot_cka` saves: panels (CKA, then sd, null, percentile where
    stored), each with its colour bar."""
    from jobs.analyze.protocol import cka_protocol

    la, lb = _names(ds["layer_a"].values), _names(ds["layer_b"].values)
    ya, ea, depth_a = _cka_axes(ds, "a")
    xb, eb, depth_b = _cka_axes(ds, "b")
    null = np.asarray(ds["cka_null"].values, dtype=float) if "cka_null" in ds else None
    panels = _cka_panels(ds)
    side = float(np.clip(0.12 * max(len(la), len(lb)) + 3.0, 4.0, 10.0))
    fig = _figure((side + 1.2) * len(panels) + 0.4, side + 0.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    a, b = ds.attrs.get("run_a", "a"), ds.attrs.get("run_b", "b")
    bars = []
    for ax, (title, values, norm, cmap, label) in zip(axes, panels, strict=True):
        im = ax.pcolormesh(eb, ea, values, norm=norm, cmap=cmap, shading="flat")
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
        bars.append(fig.colorbar(im, ax=ax, shrink=0.8, label=label))
    cka = panels[0][1]
    lines = [f"CKA {a} × {b}: {cka_protocol(ds.attrs)}"]
    if np.isfinite(cka).any():
        lines.append(
            f"CKA range {np.nanmin(cka):.3f} … {np.nanmax(cka):.3f} (diverging scale "
            "centred on 0, nothing clipped)"
        )
    if null is not None and np.isfinite(null).any():
        level = float(np.nanmax(np.abs(null)))
        bars[0].ax.axhline(level, color="black", linewidth=1.5)
        # On the bar's left: the tick labels (0.0 among them) are on its right.
        bars[0].ax.text(
            -0.15,
            level,
            "null max",
            color="black",
            fontsize=7,
            ha="right",
            va="center",
            transform=bars[0].ax.get_yaxis_transform(),
        )
        lines.append(
            f"null (same layers, images permuted): mean {np.nanmean(null):.3f}, "
            f"max |CKA| {level:.3f} over {ds.attrs.get('null_batches', '?')} batch(es)"
        )
    if depth_a or depth_b:
        lines.append("depth: fraction of the stored residual stream (stem 0, last block 1)")
    fig.suptitle("\n".join(lines), fontsize=8)
    return fig


def _column_dots(
    ax: Any,
    values: np.ndarray,
    cmap: Any,
    lo: np.ndarray | None = None,
    hi: np.ndarray | None = None,
) -> None:
    """One column per layer at x = layer index, heads as dots sorted by value, with their
    intervals (``lo``/``hi``, same shape) as vertical bars."""
    n_layers, n_heads = values.shape
    spread = np.linspace(-0.3, 0.3, n_heads) if n_heads > 1 else np.zeros(1)
    for i in range(n_layers):
        keep = np.isfinite(values[i])
        order = np.argsort(values[i][keep])
        v = values[i][keep][order]
        color = cmap(i / max(n_layers - 1, 1))
        x = i + spread[: v.size]
        if lo is not None and hi is not None:
            ax.vlines(x, lo[i][keep][order], hi[i][keep][order], color=color, lw=0.8)
        ax.scatter(x, v, s=12, color=color)


def _from_zero(ax: Any, values: list[Any]) -> None:
    """A y-axis from 0 to a little above the largest value: distances and entropies are
    non-negative, and a span set by the data's own spread would blow noise up."""
    finite = np.concatenate([np.ravel(np.asarray(v, dtype=float)) for v in values])
    finite = finite[np.isfinite(finite)]
    top = float(finite.max()) if finite.size else 1.0
    ax.set_ylim(0.0, max(top, 1e-9) * 1.12)


def _baseline(ax: Any, values: Any, label: str) -> None:
    """A dashed reference: one level, or a step per layer when the layers differ."""
    v = np.asarray(values, dtype=float)
    if not np.isfinite(v).any():
        return
    if np.allclose(v, v[0], equal_nan=False):
        ax.axhline(v[0], color="0.35", ls="--", lw=1.2, label=f"{label} ({v[0]:.2f})")
    else:
        ax.step(np.arange(v.size), v, where="mid", color="0.35", ls="--", lw=1.2, label=label)


def attention_convention(ds: xr.Dataset) -> str:
    """What an attention result's distances do with the CLS key, in words (figure titles)."""
    if ds.attrs.get("renormalize"):
        return "rows renormalized over patch keys (CLS-key mass rescaled away)"
    return "CLS-key mass dropped, rows not renormalized (it counts 0 px)"


def draw_attention(ds: xr.Dataset) -> Figure:
    """Mean attention distance and entropy per head (one column of dots per layer,
    heads sorted) with the uniform-attention baseline, the attention of patch queries on
    the CLS key per head (what the distances drop or rescale away), and the mean CLS
    attention map of each layer (paper Sec. 5, Fig. 3). The title says which convention
    the distances follow."""
    from matplotlib import colormaps

    layers = _names(ds["layer"].values)
    has_cls = "cls_attention" in ds
    has_mass = "cls_key_mass" in ds
    n = len(layers)
    width = float(np.clip(1.0 + 0.9 * n, 6.0, 16.0)) * (1.5 if has_mass else 1.0)
    fig = _figure(width, 7.0 if has_cls else 4.5)
    top: Any = fig
    bottom: Any = None
    if has_cls:
        subs: Any = fig.subfigures(2, 1, height_ratios=[2.2, 1.0])
        top, bottom = subs[0], subs[1]
    panels = [
        ("mean_distance", "mean attention distance (px)", "uniform_distance"),
        ("entropy", "attention entropy (nats)", "uniform_entropy"),
    ]
    if has_mass:
        panels.append(("cls_key_mass", "attention on the CLS key (share of a patch row)", ""))
    axes = top.subplots(1, len(panels))
    cmap = colormaps["viridis"]
    for ax, (var, label, base) in zip(axes, panels, strict=True):
        values = np.asarray(ds[var].values, dtype=float)
        lo = np.asarray(ds[f"{var}_lo"].values, float) if f"{var}_lo" in ds else None
        hi = np.asarray(ds[f"{var}_hi"].values, float) if f"{var}_hi" in ds else None
        _column_dots(ax, values, cmap, lo, hi)
        _from_zero(
            ax,
            [values, *([ds[base].values] if base in ds else []), *([hi] if hi is not None else [])],
        )
        if base in ds:
            _baseline(ax, ds[base].values, "uniform attention")
            ax.legend(fontsize=7, loc="lower right")
        if lo is not None:
            ax.text(
                0.01,
                0.01,
                f"bars: {ds.attrs.get('ci_level', '?')} bootstrap interval over images",
                transform=ax.transAxes,
                fontsize=6,
                va="bottom",
            )
        ax.set_xticks(np.arange(n), layers, rotation=90, fontsize=6)
        ax.set_xlabel("layer (forward order); dots = heads, sorted", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    grid = f", {ds.attrs['grid']}" if "grid" in ds.attrs else ""
    top.suptitle(
        f"attention of run {ds.attrs.get('run', '')} (n={ds.attrs.get('n', '?')}{grid})\n"
        f"distance and entropy over patch keys: {attention_convention(ds)}",
        fontsize=9,
    )
    if has_cls and bottom is not None:
        maps = np.nanmean(np.asarray(ds["cls_attention"].values, dtype=float), axis=1)
        small = bottom.subplots(1, n, squeeze=False)[0]
        # One scale for every layer (from 0: these are probabilities), one colour bar.
        top_value = float(np.nanmax(maps)) if np.isfinite(maps).any() else 1.0
        im = None
        for i, ax in enumerate(small):
            im = ax.imshow(
                maps[i],
                cmap="viridis",
                interpolation="nearest",
                vmin=0.0,
                vmax=max(top_value, 1e-9),
            )
            ax.set_title(layers[i], fontsize=6)
            ax.set_axis_off()
        if im is not None:
            bottom.colorbar(im, ax=list(small), shrink=0.9, label="attention")
        bottom.suptitle(
            "mean CLS attention to patches (mean over heads; one scale for all layers)", fontsize=8
        )
    return fig


def plot_attention(
    ds: xr.Dataset, path: str | Path, *, stamp: dict[str, Any] | None = None
) -> Path:
    """Draw :func:`draw_attention` to ``path`` (stamped with ``stamp``, if given)."""
    return _save(draw_attention(ds), path, stamp)


def plot_localization(
    ds: xr.Dataset, path: str | Path, *, stamp: dict[str, Any] | None = None
) -> Path:
    """Draw :func:`draw_localization` to ``path`` (stamped with ``stamp``, if given)."""
    return _save(draw_localization(ds), path, stamp)


#: Colour scale of every localization map (CKA): the same for every model and the baseline.
LOCALIZATION_SCALE = (0.0, 1.0)


def draw_localization(ds: xr.Dataset) -> Figure:
    """A heatmap per chosen token over the input-patch grid, the token marked (paper
    Sec. 7); below it, where stored, the input baseline (the token's own input patch
    against every patch). Every map of every model uses :data:`LOCALIZATION_SCALE`
    (extended below 0 when a value is), with one colour bar."""
    from matplotlib.patches import Rectangle

    maps = np.asarray(ds["localization"].values, dtype=float)
    has_base = "localization_input" in ds
    if has_base:
        maps = np.concatenate([maps, np.asarray(ds["localization_input"].values, float)])
    rows = np.asarray(ds["target_row"].values)
    cols = np.asarray(ds["target_col"].values)
    n_targets = rows.size
    rows, cols = np.tile(rows, 1 + has_base), np.tile(cols, 1 + has_base)
    t = maps.shape[0]
    ncols = min(n_targets, 5)
    nrows = int(np.ceil(n_targets / ncols)) * (1 + has_base)
    fig = _figure(2.4 * ncols + 0.8, 2.4 * nrows + 0.6)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    low = min(LOCALIZATION_SCALE[0], float(np.nanmin(maps)) if np.isfinite(maps).any() else 0.0)
    per_block = int(np.ceil(n_targets / ncols)) * ncols
    im = None
    used = []
    for k, ax in enumerate(axes):
        block, j = divmod(k, per_block)
        i = block * n_targets + j
        if j >= n_targets or i >= t:
            ax.set_axis_off()
            continue
        used.append(ax)
        im = ax.imshow(
            maps[i], cmap="magma", vmin=low, vmax=LOCALIZATION_SCALE[1], interpolation="nearest"
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
        what = "input patch" if block else "token"
        ax.set_title(f"{what} ({int(rows[i])}, {int(cols[i])})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(
            im,
            ax=used,
            shrink=0.8,
            label="CKA with input patch",
            extend="min" if low < LOCALIZATION_SCALE[0] else "neither",
        )
    lines = [
        f"localization: {ds.attrs.get('run', '')} {ds.attrs.get('layer', '')} "
        f"(patch {ds.attrs.get('patch_size', '?')} px, n={ds.attrs.get('n', '?')})"
    ]
    if has_base:
        lines.append(
            "lower rows: baseline, the target's own input patch against every patch "
            "(neighbouring patches are correlated)"
        )
    fig.suptitle("\n".join(lines), fontsize=9)
    return fig


DEPTH_LABEL = "normalized depth (block k of K at k/K)"


def _depth(ds: xr.Dataset, dim: str) -> tuple[np.ndarray, bool]:
    """The normalized-depth coordinate along ``dim``, else positions 0..1 (and False)."""
    n = ds.sizes[dim]
    if "depth_fraction" in ds.coords:
        x = np.asarray(ds["depth_fraction"].values, dtype=float)
        if np.isfinite(x).all():
            return x, True
    return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n), False


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _skip_lines(ax: Any, ds: xr.Dataset, label: str = "", start: int = 0) -> int:
    """Each branch's spatial and CLS series in its own colour and marker (series ``start``,
    ``start + 1``, ...), with its bootstrap interval shaded; returns the next series index."""
    x, _ = _depth(ds, "block")
    branches = _names(ds["branch"].values)
    k = start
    for j, branch in enumerate(branches):
        name = f"{label}{branch}"
        for var, ls, what in (("ratio_spatial", "-", "spatial tokens"), ("ratio_cls", "--", "CLS")):
            if var not in ds or not np.isfinite(ds[var].values[j]).any():
                continue
            c, marker = f"C{k % 10}", _MARKERS[k % len(_MARKERS)]
            ax.plot(
                x, ds[var].values[j], ls=ls, marker=marker, color=c, ms=4, label=f"{name}: {what}"
            )
            if f"{var}_lo" in ds:
                ax.fill_between(
                    x,
                    ds[f"{var}_lo"].values[j],
                    ds[f"{var}_hi"].values[j],
                    color=c,
                    alpha=0.2,
                    lw=0,
                )
            k += 1
        if "dead_fraction" in ds:
            dead = np.asarray(ds["dead_fraction"].values[j], dtype=float) == 1.0
            if dead.any():
                ax.plot(
                    x[dead],
                    np.ones(int(dead.sum())),
                    "x",
                    color="0.2",
                    ms=7,
                    mew=2,
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                    label=f"{name}: f(z) ≡ 0, no ratio",
                )
    return k


def draw_skip(ds: xr.Dataset) -> Figure:
    """Skip-connection norm ratio ‖z‖/‖f(z)‖ per block against normalized depth, CLS
    apart from spatial tokens, dead branches marked (paper Sec. 6, Fig. 7)."""
    blocks = _names(ds["block"].values)
    fig = _figure(float(np.clip(0.35 * len(blocks) + 4.0, 5.5, 12.0)), 4.2)
    ax = fig.add_subplot()
    _skip_lines(ax, ds)
    x, by_depth = _depth(ds, "block")
    ax.axhline(1.0, color="0.35", ls="--", lw=1.0, label="‖z‖ = ‖f(z)‖")
    ax.set_yscale("log")
    step = max(1, int(np.ceil(len(blocks) / 24)))
    top = ax.secondary_xaxis("top")
    top.set_xticks(x[::step], blocks[::step], rotation=90, fontsize=6)
    ax.set_xlabel(DEPTH_LABEL if by_depth else "block (forward order)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylabel("‖z‖ / ‖f(z)‖")
    ax.grid(alpha=0.3, which="both")
    if "ratio_spatial" in ds and not np.isfinite(ds["ratio_spatial"].values).any():
        ax.set_ylim(0.1, 10.0)
        ax.text(
            0.5,
            0.5,
            "every branch outputs exactly 0: no ratio\n"
            "(e.g. timm's zero-initialised last BatchNorm at random init)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=8,
        )
    ax.legend(fontsize=7)
    ax.set_title(
        f"skip-connection norm ratio, run {ds.attrs.get('run', '')} (n={ds.attrs.get('n', '?')})",
        fontsize=9,
    )
    return fig


def plot_skip(ds: xr.Dataset, path: str | Path, *, stamp: dict[str, Any] | None = None) -> Path:
    """Draw :func:`draw_skip` to ``path`` (stamped with ``stamp``, if given)."""
    return _save(draw_skip(ds), path, stamp)


def _chance(ds: xr.Dataset) -> float | None:
    if "chance_accuracy" in ds:
        return float(ds["chance_accuracy"].values)
    n_classes = int(ds.attrs.get("n_classes", 0) or 0)
    return 1.0 / n_classes if n_classes else None


def _probe_points(ax: Any, ds: xr.Dataset, label: str, color: str) -> None:
    """Residual-stream layers as a line (marker by feature) with their bootstrap interval
    (else the sd over splits) as error bars, other layers as hollow dots, and the
    raw-pixel probe as a dotted level in the run's colour."""
    x, _ = _depth(ds, "layer")
    y = np.asarray(ds["accuracy"].values, dtype=float)
    err: Any = np.asarray(ds["accuracy_std"].values, dtype=float) if "accuracy_std" in ds else None
    if "accuracy_lo" in ds:
        lo, hi = np.asarray(ds["accuracy_lo"].values, float), np.asarray(ds["accuracy_hi"], float)
        err = np.stack([y - lo, hi - y])
    if "input_accuracy" in ds:
        raw = float(ds["input_accuracy"])
        ax.axhline(raw, color=color, ls=":", lw=1.4, label=f"{label}: raw input pixels ({raw:.2f})")
    roles = _names(ds["role"].values) if "role" in ds.coords else ["stream"] * y.size
    feats = _names(ds["feature"].values) if "feature" in ds.coords else [""] * y.size
    stream = np.array([r in ("stream", "") for r in roles])
    if not stream.any():
        stream[:] = True
    ax.errorbar(
        x[stream],
        y[stream],
        yerr=None if err is None else err[..., stream],
        fmt="-",
        color=color,
        capsize=2,
        lw=1.2,
        label=label,
    )
    for feat, marker, what in (("cls", "o", "CLS token"), ("gap", "s", "token/spatial mean")):
        pick = stream & (np.array(feats) == feat)
        if pick.any():
            ax.plot(x[pick], y[pick], marker, color=color, ms=4, label=f"{label}: {what}")
    other = ~stream
    if other.any():
        ax.plot(
            x[other], y[other], "o", mfc="none", color=color, ms=4, label=f"{label}: branch outputs"
        )


def draw_probe(ds: xr.Dataset) -> Figure:
    """Linear-probe accuracy against normalized depth with the chance level and the
    chosen ridge penalties (paper Sec. 8, Fig. 13)."""
    has_l2 = "l2" in ds
    fig = _figure(6.4, 5.2 if has_l2 else 4.2)
    if has_l2:
        ax, ax_l2 = fig.subplots(2, 1, sharex=True, height_ratios=[3.0, 1.0])
    else:
        ax, ax_l2 = fig.add_subplot(), None
    _probe_points(ax, ds, f"run {ds.attrs.get('run', '')}", "C0")
    chance = _chance(ds)
    if chance is not None:
        ax.axhline(chance, color="0.35", ls="--", lw=1.2, label=f"chance ({chance:.2f})")
    x, by_depth = _depth(ds, "layer")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    shots = ds.attrs.get("shots")
    protocol = ds.attrs.get("protocol") or (
        f"{'full' if not shots else f'{shots}-shot'}, n_test={ds.attrs.get('n_test', '?')}"
    )
    ax.set_title(f"linear probes, run {ds.attrs.get('run', '')}\n{protocol}", fontsize=8)
    last = ax
    if ax_l2 is not None:
        l2 = np.nanmedian(np.asarray(ds["l2"].values, dtype=float), axis=0)
        ax_l2.plot(x, l2, ".", color="C3", ms=5)
        ax_l2.set_yscale("log")
        if "l2_grid" in ds.coords:
            grid = np.asarray(ds["l2_grid"].values, dtype=float)
            ax_l2.set_ylim(grid.min() / 3, grid.max() * 3)
        ax_l2.set_ylabel("ridge λ", fontsize=8)
        ax_l2.grid(alpha=0.3)
        last = ax_l2
    last.set_xlabel(DEPTH_LABEL if by_depth else "layer (forward order)")
    return fig


def plot_probe(ds: xr.Dataset, path: str | Path, *, stamp: dict[str, Any] | None = None) -> Path:
    """Draw :func:`draw_probe` to ``path`` (stamped with ``stamp``, if given)."""
    return _save(draw_probe(ds), path, stamp)


def draw_heads(ds: xr.Dataset) -> Figure:
    """Each ViT head's mean CKA with the CNN's chosen (lower) layers against its mean
    attention distance, one colour and marker per layer (paper Sec. 5, Fig. 5)."""
    from matplotlib import colormaps

    layers = _names(ds["head_layer"].values)
    fig = _figure(6.4, 4.6)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    for j, layer in enumerate(layers):
        x = np.asarray(ds["mean_distance"].values[j], dtype=float)
        y = np.asarray(ds["cka_lower"].values[j], dtype=float)
        keep = np.isfinite(x) & np.isfinite(y)
        ax.scatter(
            x[keep],
            y[keep],
            s=22,
            color=cmap(j / max(len(layers) - 1, 1)),
            marker=_MARKERS[j % len(_MARKERS)],
            label=layer,
        )
    ax.set_xlabel("mean attention distance of the head (px)")
    b = ds.attrs.get("run_b", "run2")
    ax.set_ylabel(f"mean CKA with {b}'s layers")
    ax.set_xlim(left=0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, title="head layer", title_fontsize=7)
    chosen = _names(ds["layer_b"].values)
    shown = ", ".join(chosen[:6]) + (" …" if len(chosen) > 6 else "")
    ax.set_title(
        f"per-head CKA, {ds.attrs.get('run_a', '')} heads × {b} ({shown})\n"
        f"n={ds.attrs.get('n', '?')}, batch {ds.attrs.get('batch_size', '?')} × "
        f"{ds.attrs.get('n_batches', '?')}",
        fontsize=8,
    )
    return fig


def plot_heads(ds: xr.Dataset, path: str | Path, *, stamp: dict[str, Any] | None = None) -> Path:
    """Draw :func:`draw_heads` to ``path`` (stamped with ``stamp``, if given)."""
    return _save(draw_heads(ds), path, stamp)


#: Analyses whose results several runs can share one figure for (:func:`draw_overlay`).
OVERLAYS = ("probe", "skip")


def draw_overlay(kind: str, results: list[tuple[str, xr.Dataset]]) -> Figure:
    """Several runs' probe or skip curves on one normalized-depth axis (e.g. a ViT beside
    a ResNet, as in the paper's Figs. 7 and 13)."""
    if kind not in OVERLAYS:
        raise ValueError(f"no overlay figure for analysis {kind!r}")
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    series = 0
    for i, (label, ds) in enumerate(results):
        if kind == "probe":
            _probe_points(ax, ds, label, f"C{i}")
        else:
            series = _skip_lines(ax, ds, f"{label} ", series)
    if kind == "probe":
        chances = {round(c, 3) for _, ds in results if (c := _chance(ds)) is not None}
        for c in sorted(chances):
            ax.axhline(c, color="0.35", ls="--", lw=1.2, label=f"chance ({c:.2f})")
        ax.set_ylim(0.0, 1.02)
        ax.set_ylabel("test accuracy")
    else:
        ax.axhline(1.0, color="0.35", ls="--", lw=1.0, label="‖z‖ = ‖f(z)‖")
        ax.set_yscale("log")
        ax.set_ylabel("‖z‖ / ‖f(z)‖ (spatial tokens)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel(DEPTH_LABEL)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(f"{kind}: {' vs '.join(label for label, _ in results)}", fontsize=9)
    return fig


def plot_overlay(
    kind: str,
    results: list[tuple[str, xr.Dataset]],
    path: str | Path,
    *,
    stamp: dict[str, Any] | None = None,
) -> Path:
    """Draw :func:`draw_overlay` to ``path`` (stamped with ``stamp``, if given)."""
    return _save(draw_overlay(kind, results), path, stamp)


def plot_result(ds: xr.Dataset, path: str | Path, *, stamp: dict[str, Any] | None = None) -> Path:
    """Draw any result dataset by its ``analysis`` attribute, with the plotter its
    registry entry names (:mod:`vitcnn_store.interface.registry`), stamped with
    ``stamp`` (:func:`result_stamp`) if given."""
    from vitcnn_store.interface.registry import ANALYSES

    kind = str(ds.attrs.get("analysis", ""))
    if kind not in ANALYSES:
        raise ValueError(f"no figure for analysis {kind!r}")
    return ANALYSES[kind].plot(ds, path, stamp=stamp)


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
    ds: xr.Dataset,
    store: str,
    run: str,
    name: str,
    figures: str | None = None,
    *,
    stamp: dict[str, Any] | None = None,
) -> Path:
    """Draw result ``name`` of ``run`` as ``<run>__<name>.png`` in :func:`figure_dir`
    (stamped with ``stamp``, if given)."""
    folder = figure_dir(store, figures)
    folder.mkdir(parents=True, exist_ok=True)
    return plot_result(ds, folder / f"{run}__{name}.png", stamp=stamp)
