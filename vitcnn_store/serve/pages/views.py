"""The explorer's pages: runs → a run → a layer → a channel, and an image.

Every view is a plain GET with a stable URL (its state in the path and query
string), rendered on the server from the store; pictures are ``<img>`` of
:mod:`~vitcnn_store.serve.pages.pictures` routes. The analyses' pages are in
:mod:`~vitcnn_store.serve.pages.analyses`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from vitcnn_store.serve.errors import ApiError
from vitcnn_store.serve.pages import data
from vitcnn_store.serve.pages.html import esc, link, page, table, url

__all__ = ["html_response", "router"]

router = APIRouter(tags=["explorer"], include_in_schema=False)
CHANNELS_PER_PAGE = 24
IMAGES_PER_PAGE = 60
THUMBS = 8  # top images shown per channel on a layer's page

_PROVENANCE = (
    "model",
    "model_args",
    "weights_source",
    "checkpoint",
    "weights_hub_id",
    "weights_sha256",
    "input_size",
    "mean",
    "std",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "image_set",
    "image_set_sha256",
    "n_images",
    "label_names",
    "dtype",
    "chunk_size",
    "compression",
    "timm_version",
    "torch_version",
    "code_version",
    "created_at",
)


def html_response(text: str) -> HTMLResponse:
    return HTMLResponse(text, headers={"Cache-Control": "no-cache"})


def _label(run: Any, i: int) -> str:
    label = int(run.labels[i])
    names = run.attrs.get("label_names") or []
    return f"{label} ({names[label]})" if 0 <= label < len(names) else str(label)


def _thumb(
    run: str,
    i: int,
    size: int = 96,
    marker: tuple[float, float] | None = None,
    shape: tuple[int, int] | None = None,
    title: str = "",
) -> str:
    """An image thumbnail linking to the image's page, with a dot where a channel peaks."""
    dot = ""
    if marker is not None and shape is not None and all(np.isfinite(marker)):
        top, left = 100 * marker[0] / shape[0], 100 * marker[1] / shape[1]
        dot = f'<span class="dot" style="top:{top:.1f}%;left:{left:.1f}%"></span>'
    src = url("png", "runs", run, "images", i, size=size)
    return (
        f'<a class="thumb" href="{esc(url("runs", run, "images", i))}" title="{esc(title)}">'
        f'<img src="{esc(src)}" width="{size}" height="{size}" alt="image {i}" '
        f'loading="lazy">{dot}</a>'
    )


def _input_shape(run: Any) -> tuple[int, int]:
    size = run.attrs.get("input_size") or [3, 224, 224]
    return int(size[1]), int(size[2])


def _pager(base: str, page_no: int, pages: int, **query: Any) -> str:
    if pages <= 1:
        return ""
    items = []
    for p in range(pages):
        href = base + "?" + "&".join(f"{k}={esc(v)}" for k, v in {**query, "page": p}.items())
        items.append(f"<b>{p + 1}</b>" if p == page_no else f'<a href="{href}">{p + 1}</a>')
    return f'<div class="pager">page {" ".join(items)}</div>'


@router.get("/", response_class=HTMLResponse)
def index(request: Request) -> HTMLResponse:
    """Every run of the store with its provenance, images, layers and analyses."""
    from vitcnn_store.store import open_store

    store = open_store(request.app.state.config.store)
    rows = []
    broken = []
    for entry in store.entries:
        if not entry.created:
            broken.append(f"<li>{esc(entry.name)}: {esc(entry.problem)}</li>")
            continue
        try:
            run = data.open_run(request, entry.name)
        except Exception as e:  # a damaged run is listed, never a failed page
            broken.append(f"<li>{esc(entry.name)}: {esc(e)}</li>")
            continue
        a = run.attrs
        done = run.done
        analyses = " ".join(
            link(url("runs", run.name, "analyses", n), n) for n in data.analyses(run)
        )
        rows.append(
            [
                link(url("runs", run.name), run.name),
                esc(a.get("model")),
                esc(a.get("weights_source")),
                esc(a.get("image_set")),
                str(run.n_images),
                str(len(run.layers)),
                str(len(run.attention_layers)),
                f"{int(done.sum())}/{done.size}",
                analyses or '<span class="muted">none</span>',
            ]
        )
    body = (
        f'<p class="meta">store <code>{esc(request.app.state.config.store)}</code> · '
        f"{len(rows)} run(s)</p>"
        + table(
            [
                "run",
                "model",
                "weights",
                "image set",
                "images",
                "layers",
                "attention",
                "units",
                "analyses",
            ],
            rows,
        )
        + (f"<h2>Broken runs</h2><ul>{''.join(broken)}</ul>" if broken else "")
        + '<p class="meta">Raw data: <a href="/docs">API</a> · <code>/zarr/</code> for '
        "xarray and zarr readers.</p>"
    )
    return html_response(page("Runs", [("/", "runs")], body))


def _layer_stats(run: Any) -> dict[str, tuple[float, float, float]]:
    """Per layer: mean of the channel means, mean channel std, highest top value."""
    found = data.find_top_images(run)
    if found is None:
        return {}
    ds = found[1]
    out = {}
    for j, name in enumerate(ds["layer"].values.tolist()):
        c = int(ds["n_channels"].values[j])
        out[str(name)] = (
            float(np.nanmean(ds["mean"].values[j, :c])),
            float(np.nanmean(ds["std"].values[j, :c])),
            float(np.nanmax(ds["value"].values[j, :c, 0])),
        )
    return out


@router.get("/runs/{run}", response_class=HTMLResponse)
def run_page(run: str, request: Request, page_no: int = Query(0, alias="page")) -> HTMLResponse:
    """A run: provenance, analyses, layers with shapes and statistics, images."""
    r = data.open_run(request, run)
    a = r.attrs
    prov = table(["", ""], [[esc(k), esc(a[k])] for k in _PROVENANCE if k in a], "kv")
    analyses = (
        "".join(f"<li>{link(url('runs', run, 'analyses', n), n)}</li>" for n in data.analyses(r))
        or "<li class='muted'>none yet: <code>vitcnn analyze ...</code></li>"
    )
    stats = _layer_stats(r)
    rows = []
    for name in r.layers:
        x = data.layer(r, name)
        s = stats.get(name)
        cells = [f"{v:.3g}" for v in s] if s else ["", "", ""]
        rows.append(
            [
                link(url("runs", run, "layers", name), name),
                esc(x.attrs.get("kind", "")),
                esc(" × ".join(f"{d} {n}" for d, n in zip(x.dims, x.shape, strict=True))),
                esc(x.attrs.get("depth_index", "")),
                f"{float(x.attrs.get('depth_fraction', np.nan)):.3f}",
                esc(x.attrs.get("role", "")),
                esc(x.attrs.get("module_type", "")),
                *cells,
            ]
        )
    note = (
        ""
        if stats
        else '<p class="note">Channel statistics and top images come from '
        f"<code>vitcnn analyze top-images {esc(r.store.url)} {esc(run)}</code>.</p>"
    )
    pages = max(1, -(-r.n_images // IMAGES_PER_PAGE))
    page_no = min(max(page_no, 0), pages - 1)
    start = page_no * IMAGES_PER_PAGE
    valid = r.valid
    thumbs = "".join(
        _thumb(run, i, 96, title=f"{r.image_ids[i]} · label {_label(r, i)}")
        for i in range(start, min(r.n_images, start + IMAGES_PER_PAGE))
        if valid[i]
    )
    attention = ", ".join(esc(n) for n in r.attention_layers) or "none"
    body = (
        f'<div class="cols"><section><h2>Provenance</h2>{prov}</section>'
        f"<section><h2>Analyses</h2><ul>{analyses}</ul>"
        f"<h2>Attention</h2><p>{attention}</p></section></div>"
        f"<h2>Layers</h2>{note}"
        + table(
            [
                "layer",
                "kind",
                "shape",
                "depth index",
                "depth fraction",
                "role",
                "module",
                "mean",
                "std",
                "top value",
            ],
            rows,
        )
        + f"<h2>Images</h2>{_pager(url('runs', run), page_no, pages)}"
        f'<div class="thumbs">{thumbs}</div>'
    )
    return html_response(page(f"Run {run}", [("/", "runs"), (url("runs", run), run)], body))


def _layer_or_404(r: Any, layer: str) -> Any:
    if layer not in r.layers:
        raise ApiError(404, f"no layer {layer!r} in run {r.name!r}")
    return data.layer(r, layer)


@router.get("/runs/{run}/layers/{layer}", response_class=HTMLResponse)
def layer_page(
    run: str,
    layer: str,
    request: Request,
    page_no: int = Query(0, alias="page"),
    sort: str = Query("index"),
) -> HTMLResponse:
    """A layer: its facts, and its channels each with the images that drive it most."""
    r = data.open_run(request, run)
    x = _layer_or_404(r, layer)
    if sort not in ("index", "max", "std"):
        raise ApiError(400, f"sort={sort!r}: want index, max or std")
    grid = data.layer_grid(x)
    facts = [
        ("dims", " × ".join(f"{d} {n}" for d, n in zip(x.dims, x.shape, strict=True))),
        ("kind", x.attrs.get("kind", "")),
        ("grid", f"{grid.shape[0]} × {grid.shape[1]} positions" if grid else "pooled"),
        (
            "depth",
            f"index {x.attrs.get('depth_index')}, fraction "
            f"{float(x.attrs.get('depth_fraction', np.nan)):.3f}",
        ),
        ("role", x.attrs.get("role", "")),
        ("module", x.attrs.get("module_type", "")),
    ]
    body = table(["", ""], [[esc(k), esc(v)] for k, v in facts], "kv")
    crumbs = [("/", "runs"), (url("runs", run), run), (url("runs", run, "layers", layer), layer)]
    found = data.find_top_images(r)
    if found is None or layer not in found[1]["layer"].values.tolist():
        body += (
            '<p class="note">No top images for this layer yet: run '
            f"<code>vitcnn analyze top-images {esc(r.store.url)} {esc(run)}</code>.</p>"
        )
        return html_response(page(f"{run} / {layer}", crumbs, body))
    ds = found[1]
    j = ds["layer"].values.tolist().index(layer)
    c = int(ds["n_channels"].values[j])
    value, image = ds["value"].values[j, :c], ds["image"].values[j, :c]
    pos_y, pos_x = ds["position_y"].values[j, :c], ds["position_x"].values[j, :c]
    mean, std = ds["mean"].values[j, :c], ds["std"].values[j, :c]
    order = {
        "index": np.arange(c),
        "max": np.argsort(-value[:, 0], kind="stable"),
        "std": np.argsort(-std, kind="stable"),
    }[sort]
    pages = max(1, -(-c // CHANNELS_PER_PAGE))
    page_no = min(max(page_no, 0), pages - 1)
    shape = _input_shape(r)
    rows = []
    for ch in order[page_no * CHANNELS_PER_PAGE : (page_no + 1) * CHANNELS_PER_PAGE]:
        strip = "".join(
            _thumb(
                run,
                int(image[ch, k]),
                56,
                (float(pos_y[ch, k]), float(pos_x[ch, k])),
                shape,
                f"{value[ch, k]:.3g} on {r.image_ids[int(image[ch, k])]}",
            )
            for k in range(min(THUMBS, image.shape[1]))
            if image[ch, k] >= 0
        )
        rows.append(
            [
                link(url("runs", run, "layers", layer, "channels", int(ch)), f"#{ch}"),
                f"{mean[ch]:.3g}",
                f"{std[ch]:.3g}",
                f"{value[ch, 0]:.3g}",
                f'<div class="strip">{strip}</div>',
            ]
        )
    sorts = " ".join(
        f"<b>{s}</b>" if s == sort else link(url("runs", run, "layers", layer, sort=s), s)
        for s in ("index", "max", "std")
    )
    body += (
        f'<h2>Channels ({c})</h2><p class="meta">sorted by {sorts} · top images ranked by '
        f"the channel's maximum over positions; the dot marks where ({esc(found[0])}, "
        f"n = {ds.attrs.get('n')})</p>"
        + _pager(url("runs", run, "layers", layer), page_no, pages, sort=sort)
        + table(["channel", "mean", "std", "top value", "top images"], rows)
    )
    return html_response(page(f"{run} / {layer}", crumbs, body))


@router.get("/runs/{run}/layers/{layer}/channels/{channel}", response_class=HTMLResponse)
def channel_page(run: str, layer: str, channel: int, request: Request) -> HTMLResponse:
    """A channel: its top images, each with a heat map of where the channel fires."""
    r = data.open_run(request, run)
    x = _layer_or_404(r, layer)
    c = int(x.shape[-1])
    if not 0 <= channel < c:
        raise ApiError(404, f"no channel {channel} in {layer!r} (0..{c - 1})")
    crumbs = [
        ("/", "runs"),
        (url("runs", run), run),
        (url("runs", run, "layers", layer), layer),
        (url("runs", run, "layers", layer, "channels", channel), f"channel {channel}"),
    ]
    near = " · ".join(
        link(url("runs", run, "layers", layer, "channels", k), f"channel {k}")
        for k in (channel - 1, channel + 1)
        if 0 <= k < c
    )
    body = f'<p class="meta">{near}</p>'
    found = data.find_top_images(r)
    ds = found[1] if found else None
    if ds is None or layer not in ds["layer"].values.tolist():
        body += '<p class="note">No top images yet: run <code>vitcnn analyze top-images</code>.</p>'
        return html_response(page(f"{layer} channel {channel}", crumbs, body))
    j = ds["layer"].values.tolist().index(layer)
    pooled = data.layer_grid(x) is None
    cards = []
    for k in range(ds.sizes["rank"]):
        i = int(ds["image"].values[j, channel, k])
        if i < 0:
            continue
        v = float(ds["value"].values[j, channel, k])
        src = (
            url("png", "runs", run, "images", i, size=224)
            if pooled
            else url("png", "runs", run, "images", i, "channel", layer=layer, c=channel, size=224)
        )
        where = int(ds["position"].values[j, channel, k])
        py, px = ds["position_y"].values[j, channel, k], ds["position_x"].values[j, channel, k]
        at = f"position {where} (y {py:.0f}, x {px:.0f} px)" if where >= 0 else "pooled"
        cards.append(
            f'<figure class="card"><a href="{esc(url("runs", run, "images", i))}">'
            f'<img class="photo" src="{esc(src)}" width="224" height="224" alt="image {i}"></a>'
            f"<figcaption>#{k + 1}: {v:.4g} at {esc(at)}<br>"
            f"{esc(r.image_ids[i])} · label {esc(_label(r, i))}</figcaption></figure>"
        )
    body += (
        f'<p class="meta">mean {float(ds["mean"].values[j, channel]):.4g}, std '
        f"{float(ds['std'].values[j, channel]):.4g} over {ds.attrs.get('n')} images and every "
        "position. Heat map: this channel on each image (bright: high), drawn on the layer's "
        f'grid.</p><div class="cards">{"".join(cards)}</div>'
    )
    return html_response(page(f"{layer} channel {channel}", crumbs, body))
