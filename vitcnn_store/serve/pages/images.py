"""An image's page: the image, its attention maps per layer and head (click a query patch),
the CLS map, localization maps over it, and the same image in other runs."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from vitcnn_store.serve.errors import ApiError
from vitcnn_store.serve.pages import data
from vitcnn_store.serve.pages.html import esc, link, page, url
from vitcnn_store.serve.pages.views import _label, html_response
from vitcnn_store.store import schema

__all__ = ["router"]

router = APIRouter(tags=["explorer"], include_in_schema=False)
MAIN = 320  # px of the image one clicks on
HEAD = 150  # px of each head's map


def _query(a: Any, q: str | None) -> tuple[int, int | None]:
    """The query token index (``q``: ``cls``, a token index, or the centre patch when absent)
    and the CLS index."""
    kinds = schema.as_str_array(a["query_kind"].values) if "query_kind" in a.coords else None
    cls = None
    if kinds is not None:
        found = np.flatnonzero(kinds == schema.CLS)
        cls = int(found[0]) if found.size else None
    if q is None or q == "":
        grid = data.layer_grid(a, "query")
        if grid is None:
            return 0, cls
        r, c = grid.shape
        return int(grid.index[r // 2, c // 2]), cls
    if q == "cls":
        if cls is None:
            raise ApiError(400, "q=cls: this attention layer has no CLS token")
        return cls, cls
    try:
        token = int(q)
    except ValueError:
        raise ApiError(400, f"q={q!r}: want cls or a token index") from None
    if not 0 <= token < a.sizes["query"]:
        raise ApiError(400, f"q={token}: want 0..{a.sizes['query'] - 1}")
    return token, cls


def _attention_section(
    r: Any, run: str, i: int, layer: str | None, q: str | None
) -> tuple[str, Any]:
    if not r.attention_layers:
        return (
            '<p class="muted">No stored attention in this run (ResNets have none; ViTs: '
            "extract with --attention).</p>",
            None,
        )
    layer = layer or r.attention_layers[-1]
    if layer not in r.attention_layers:
        raise ApiError(404, f"no attention layer {layer!r} in run {run!r}")
    a = data.attention(r, layer)
    token, cls = _query(a, q)
    grid = data.layer_grid(a, "query")
    tabs = " ".join(
        f"<b>{esc(n)}</b>" if n == layer else link(url("runs", run, "images", i, layer=n, q=q), n)
        for n in r.attention_layers
    )
    kind = "CLS" if token == cls else f"patch token {token}"
    cls_link = (
        link(url("runs", run, "images", i, layer=layer, q="cls"), "CLS map")
        if cls is not None
        else ""
    )
    heads = ["mean", *range(int(a.sizes["head"]))]
    cards = []
    for h in heads:
        template = url(
            "png", "runs", run, "images", i, "attention", layer=layer, head=h, q="QUERY", size=HEAD
        )
        src = template.replace("QUERY", str(token))
        title = "mean over heads" if h == "mean" else f"head {h}"
        cards.append(
            f'<figure class="card"><img class="photo attn" src="{esc(src)}" '
            f'data-template="{esc(template)}" width="{HEAD}" height="{HEAD}" alt="{title}">'
            f"<figcaption>{title}</figcaption></figure>"
        )
    payload = None
    if grid is not None:
        payload = {
            "rows": grid.shape[0],
            "cols": grid.shape[1],
            "tokens": grid.index.tolist(),
            "query": token,
        }
    html = (
        f'<h2>Attention</h2><p class="meta">layer {tabs}</p>'
        f'<p class="meta">query: <b id="query-name">{esc(kind)}</b> · {cls_link} · click a patch '
        "of the image to see where it attends (each map: the query's attention to every patch "
        f'key; prefix keys not drawn)</p><div class="cards">{"".join(cards)}</div>'
    )
    return html, payload


def _localization_section(r: Any, run: str, i: int) -> str:
    out = []
    for name in data.analyses(r):
        ds = data.analysis(r, name)
        if ds.attrs.get("analysis") != "localization":
            continue
        cards = []
        for t in range(ds.sizes["target"]):
            src = url(
                "png", "runs", run, "images", i, "localization", name=name, target=t, size=HEAD
            )
            row, col = int(ds["target_row"].values[t]), int(ds["target_col"].values[t])
            cards.append(
                f'<figure class="card"><img class="photo" src="{esc(src)}" width="{HEAD}" '
                f'height="{HEAD}" alt="localization of token {row}:{col}">'
                f"<figcaption>token ({row}, {col})</figcaption></figure>"
            )
        out.append(
            f"<h3>{link(url('runs', run, 'analyses', name), name)}: layer "
            f'{esc(ds.attrs.get("layer"))}</h3><p class="meta">CKA over {ds.attrs.get("n")} '
            "images between one token's representation and the raw pixels of each input "
            "patch (a property of the layer, drawn over this image)</p>"
            f'<div class="cards">{"".join(cards)}</div>'
        )
    return "<h2>Localization</h2>" + "".join(out) if out else ""


def _other_runs(request: Request, r: Any, i: int) -> str:
    from vitcnn_store.store import open_store

    image_id = str(r.image_ids[i])
    links = []
    store = request.app.state.config.store
    for name in data.recent((store, "runs"), lambda: open_store(store).runs):
        if name == r.name:
            continue
        try:
            other = data.open_run(request, name)
        except Exception:  # a damaged run: not offered
            continue
        where = np.flatnonzero(other.image_ids == image_id)
        if where.size:
            links.append(link(url("runs", name, "images", int(where[0])), name))
    return f'<p class="meta">same image in: {" · ".join(links)}</p>' if links else ""


@router.get("/runs/{run}/images/{i}", response_class=HTMLResponse)
def image_page(
    run: str,
    i: int,
    request: Request,
    layer: str | None = Query(None, description="attention layer"),
    q: str | None = Query(None, description="query token: cls or a token index"),
) -> HTMLResponse:
    r = data.open_run(request, run)
    data.check_image(r, i)
    _, source = data.image_pixels(r, i)
    attention, payload = _attention_section(r, run, i, layer, q)
    near = " · ".join(
        link(url("runs", run, "images", k), f"image {k}")
        for k in (i - 1, i + 1)
        if 0 <= k < r.n_images
    )
    picker = ' id="picker"' if payload else ""
    main = url("png", "runs", run, "images", i, size=MAIN)
    body = (
        f'<p class="meta">{near}</p><div class="cols"><div class="picker"{picker}>'
        f'<img class="photo" id="main-image" src="{esc(main)}" '
        f'width="{MAIN}" height="{MAIN}" alt="image {i}"><span class="qbox" id="qbox"></span></div>'
        f"<div><p><b>{esc(r.image_ids[i])}</b><br>label {esc(_label(r, i))}<br>"
        f'<span class="meta">{esc(source)}</span></p>{_other_runs(request, r, i)}</div></div>'
        f"{attention}{_localization_section(r, run, i)}"
    )
    crumbs = [("/", "runs"), (url("runs", run), run), (url("runs", run, "images", i), f"image {i}")]
    return html_response(page(f"{run} / image {i}", crumbs, body, payload))
