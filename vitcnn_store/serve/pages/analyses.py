"""The analyses' pages: CKA heatmaps (hover for values, click through to both layers),
attention distance per head against depth with the uniform baseline, probe and skip
curves with their baselines, localization maps, and the caveats the report names.

Every page is ``/runs/{run}/analyses/{name}``, laid out by the result's
``analysis`` attribute; a CKA cell is ``?a=LAYER&b=LAYER``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from vitcnn_store.interface.registry import ANALYSES, run_findings
from vitcnn_store.serve.errors import ApiError
from vitcnn_store.serve.pages import data
from vitcnn_store.serve.pages.html import esc, link, page, qs, table, url
from vitcnn_store.serve.pages.svg import PALETTE, Series, chart
from vitcnn_store.serve.pages.views import html_response

__all__ = ["router"]

router = APIRouter(tags=["explorer"], include_in_schema=False)
_findings = data.LRU(64)


def _names(values: Any) -> list[str]:
    return [str(v) for v in np.asarray(values).tolist()]


def _plain(values: Any) -> Any:
    out = np.asarray(values, dtype=float)
    return [[None if not np.isfinite(v) else round(float(v), 5) for v in row] for row in out]


def _caveats(request: Request, ds: Any, kind: str) -> str:
    """The artifacts found in the result's source runs that concern this figure, and a
    note on random weights."""
    kinds = ANALYSES[kind].findings if kind in ANALYSES else ()
    items, random = [], []
    for name in _names(ds.attrs.get("source_runs", [ds.attrs.get("run")])):
        try:
            run = data.open_run(request, name)
        except Exception:  # a source run since removed: its caveats are unknown
            continue
        if run.attrs.get("weights_source") == "random-init":
            random.append(name)
        if kinds:
            key = (run.store.url, name, data.run_version(run))

            def find(run: Any = run) -> Any:
                names = [n for n in data.analyses(run) if n.startswith(("cka", "skip"))]
                return run_findings(run, [data.analysis(run, n) for n in names])

            found = _findings.get(key, find)
            for f in found:
                if f.kind in kinds:
                    cause = f" <i>{esc(f.cause)}</i>" if f.cause else ""
                    items.append(f"<li><b>{esc(name)}</b>: {esc(f.message)}{cause}</li>")
    out = ""
    if random:
        out += (
            f'<div class="note"><b>Random-init weights</b> in {esc(", ".join(random))}: the '
            "pipeline at work, not how trained networks represent images.</div>"
        )
    if items:
        out += f'<div class="caveat"><b>Caveats</b><ul>{"".join(items)}</ul></div>'
    return out


def _protocol(ds: Any, kind: str) -> str:
    paper = ANALYSES[kind].paper if kind in ANALYSES else ""
    summary = ds.attrs.get("summary", "")
    return (
        f'<div class="protocol"><b>This result:</b> {esc(summary)}'
        + (f"<br><b>Paper:</b> {esc(paper)}." if paper else "")
        + "</div>"
    )


def _cka(request: Request, run: str, name: str, ds: Any, a: str | None, b: str | None) -> str:
    rows, cols = _names(ds["layer_a"].values), _names(ds["layer_b"].values)
    run_a = str(ds.attrs.get("run_a", run))
    run_b = str(ds.attrs.get("run_b", run))
    cell = int(np.clip(360 // max(len(rows), len(cols)), 8, 40))
    values = np.asarray(ds["cka"].values, dtype=float)
    null = np.asarray(ds["cka_null"].values, dtype=float) if "cka_null" in ds else None
    src = url("png", "runs", run, "analyses", name, "matrix", var="cka", cell=cell)
    row_labels = "".join(f'<div style="height:{cell}px">{esc(n)}</div>' for n in rows)
    col_labels = "".join(f'<div style="width:{cell}px">{esc(n)}</div>' for n in cols)
    mark = ""
    panel = '<p class="meta">Hover a cell for its value; click it to open both layers.</p>'
    if a is not None or b is not None:
        if a not in rows or b not in cols:
            raise ApiError(404, f"no cell a={a!r}, b={b!r} in {name!r}")
        i, j = rows.index(a), cols.index(b)
        mark = (
            f'<span class="cellmark" style="top:{i * cell}px;left:{j * cell}px;'
            f'width:{cell}px;height:{cell}px"></span>'
        )
        nv = f"; permutation null {null[i, j]:.3f}" if null is not None else ""
        panel = (
            f'<div class="pair"><b>CKA({esc(run_a)}/{esc(a)}, {esc(run_b)}/{esc(b)}) = '
            f"{values[i, j]:.4f}</b>{nv}<br>"
            f"{link(url('runs', run_a, 'layers', a), f'{run_a} / {a}')} · "
            f"{link(url('runs', run_b, 'layers', b), f'{run_b} / {b}')}</div>"
        )
    payload = {
        "rows": rows,
        "cols": cols,
        "values": _plain(values),
        "cell": cell,
        "null": _plain(null) if null is not None else None,
        "href": url("runs", run, "analyses", name),
        "runA": run_a,
        "runB": run_b,
    }
    request.state.page_data = payload
    return (
        f'<p class="meta">rows: {esc(run_a)} ({len(rows)} layers) · columns: {esc(run_b)} '
        f"({len(cols)} layers) · {esc(ds.attrs.get('estimator'))}, n = {esc(ds.attrs.get('n'))}"
        f'</p><div class="heat"><div class="rowlabels">{row_labels}</div><div>'
        f'<div class="matrix" id="matrix"><img src="{esc(src)}" width="{cell * len(cols)}" '
        f'height="{cell * len(rows)}" alt="CKA matrix">{mark}'
        f'<span class="tip" id="tip"></span></div><div class="collabels">{col_labels}</div>'
        f'</div></div>{panel}<p class="meta">colour: CKA from 0 (dark) to 1 (yellow)</p>'
    )


def _depth(ds: Any, dim: str = "layer") -> tuple[np.ndarray, str]:
    if "depth_fraction" in ds.coords and ds["depth_fraction"].dims == (dim,):
        return np.asarray(ds["depth_fraction"].values, dtype=float), "normalized depth"
    return np.arange(ds.sizes[dim], dtype=float), dim


def _attention(run: str, name: str, ds: Any) -> str:
    layers = _names(ds["layer"].values)
    x, xlabel = _depth(ds)
    dist = np.asarray(ds["mean_distance"].values, dtype=float)
    heads = dist.shape[1]
    series = [
        Series(
            f"head {h}" if heads <= 6 else ("heads" if h == 0 else ""),
            x,
            dist[:, h],
            "dots",
            PALETTE[h % len(PALETTE)] if heads <= 6 else PALETTE[0],
            [f"{layers[j]} head {h}: {dist[j, h]:.1f} px" for j in range(len(layers))],
        )
        for h in range(heads)
    ]
    series.append(Series("mean over heads", x, np.nanmean(dist, axis=1), "line", "#222222"))
    series.append(Series("uniform attention", x, ds["uniform_distance"].values, "dash", "#888888"))
    body = chart(series, xlabel=xlabel, ylabel="mean attention distance (px)")
    ent = np.asarray(ds["entropy"].values, dtype=float)
    body += chart(
        [
            Series("mean over heads", x, np.nanmean(ent, axis=1), "line", "#222222"),
            Series("uniform attention", x, ds["uniform_entropy"].values, "dash", "#888888"),
        ],
        xlabel=xlabel,
        ylabel="attention entropy (nats)",
        height=240,
    )
    notes = [ds.attrs.get(k) for k in ("baseline", "cls_key", "grid") if ds.attrs.get(k)]
    body = "".join(f'<p class="meta">{esc(n)}</p>' for n in notes) + body
    if "cls_key_mass" in ds:
        mass = np.asarray(ds["cls_key_mass"].values, dtype=float)
        rows = [[esc(layers[j])] + [f"{m:.1%}" for m in mass[j]] for j in range(len(layers))]
        body += "<h2>Attention mass on the CLS key (per head)</h2>" + table(
            ["layer", *[f"head {h}" for h in range(heads)]], rows
        )
    if "cls_attention" in ds:
        rows = []
        for j in range(len(layers)):
            base = url("png", "runs", run, "analyses", name, "grid")
            maps = "".join(
                f'<img class="photo" src="{esc(base + qs(var="cls_attention", at=f"{j},{h}"))}'
                f'&amp;size=72" width="72" height="72" alt="CLS map {layers[j]} head {h}" '
                f'title="head {h}">'
                for h in range(heads)
            )
            rows.append([esc(layers[j]), f'<div class="strip">{maps}</div>'])
        body += "<h2>Mean CLS attention to each patch</h2>" + table(["layer", "heads"], rows)
    return body


def _probe(run: str, ds: Any) -> str:
    layers = _names(ds["layer"].values)
    x, xlabel = _depth(ds)
    acc = np.asarray(ds["accuracy"].values, dtype=float)
    feats = _names(ds["feature"].values) if "feature" in ds.coords else [""] * len(layers)
    tips = [f"{n} ({f}): {v:.3f}" for n, f, v in zip(layers, feats, acc, strict=True)]
    series = [Series("test accuracy", x, acc, "line", PALETTE[0], tips)]
    if "chance_accuracy" in ds:
        chance = float(ds["chance_accuracy"].values)
        series.append(Series("chance", [x.min(), x.max()], [chance, chance], "dash", "#888888"))
    body = chart(series, xlabel=xlabel, ylabel="accuracy", ylim=(0.0, 1.0))
    body += "".join(
        f'<p class="meta">{esc(k)}: {esc(ds.attrs[k])}</p>'
        for k in ("protocol", "l2_selection", "features_used", "chance")
        if k in ds.attrs
    )
    rows = [
        [link(url("runs", run, "layers", n), n), esc(f), f"{v:.3f}"]
        for n, f, v in zip(layers, feats, acc, strict=True)
    ]
    return body + table(["layer", "feature", "accuracy"], rows)


def _skip(run: str, ds: Any) -> str:
    blocks = _names(ds["block"].values)
    x, xlabel = _depth(ds, "block")
    series = []
    for k, branch in enumerate(_names(ds["branch"].values)):
        for var, style in (("ratio_spatial", "line"), ("ratio_cls", "dots")):
            if var in ds:
                v = np.asarray(ds[var].values[k], dtype=float)
                label = f"{branch}, {'CLS' if var == 'ratio_cls' else 'spatial'}"
                tips = [f"{b} {label}: {r:.3g}" for b, r in zip(blocks, v, strict=True)]
                series.append(Series(label, x, v, style, PALETTE[k % len(PALETTE)], tips))
    series.append(Series("equal norms", [x.min(), x.max()], [1.0, 1.0], "dash", "#888888"))
    body = chart(series, xlabel=xlabel, ylabel="‖z‖ / ‖f(z)‖")
    body += "".join(
        f'<p class="meta">{esc(k)}: {esc(ds.attrs[k])}</p>'
        for k in ("block_output", "dead_branches", "norm")
        if k in ds.attrs
    )
    rows = [[link(url("runs", run, "layers", b), b)] for b in blocks if b]
    return body + table(["block"], rows)


def _localization(run: str, name: str, ds: Any) -> str:
    layer = str(ds.attrs.get("layer", ""))
    cards = []
    for t in range(ds.sizes["target"]):
        row, col = int(ds["target_row"].values[t]), int(ds["target_col"].values[t])
        src = url("png", "runs", run, "analyses", name, "grid", var="localization", at=t, size=150)
        cards.append(
            f'<figure class="card"><img class="photo" src="{esc(src)}" width="150" height="150" '
            f'alt="localization of token {row}:{col}"><figcaption>token ({row}, {col})'
            "</figcaption></figure>"
        )
    return (
        f'<p class="meta">layer {link(url("runs", run, "layers", layer), layer)}: CKA between '
        "each target token's representation and the raw pixels of every input patch (bright: "
        "high). Each image's page draws these maps over the image.</p>"
        f'<div class="cards">{"".join(cards)}</div>'
    )


def _top_images(run: str, ds: Any) -> str:
    rows = [
        [link(url("runs", run, "layers", n), n), esc(k), str(int(c))]
        for n, k, c in zip(
            _names(ds["layer"].values),
            _names(ds["kind"].values),
            ds["n_channels"].values,
            strict=True,
        )
    ]
    return f'<p class="meta">{esc(ds.attrs.get("statistic", ""))}</p>' + table(
        ["layer", "kind", "channels"], rows
    )


def _generic(run: str, name: str, ds: Any) -> str:
    rows = [[esc(v), esc(" × ".join(map(str, ds[v].dims))), esc(ds[v].shape)] for v in ds.data_vars]
    return table(["variable", "dims", "shape"], rows)


@router.get("/runs/{run}/analyses/{name}", response_class=HTMLResponse)
def analysis_page(
    run: str,
    name: str,
    request: Request,
    a: str | None = Query(None, description="CKA: row layer"),
    b: str | None = Query(None, description="CKA: column layer"),
) -> HTMLResponse:
    r = data.open_run(request, run)
    ds = data.analysis(r, name)
    kind = str(ds.attrs.get("analysis", ""))
    request.state.page_data = None
    if kind == "cka":
        body = _cka(request, run, name, ds, a, b)
    elif kind == "attention":
        body = _attention(run, name, ds)
    elif kind == "probe":
        body = _probe(run, ds)
    elif kind == "skip":
        body = _skip(run, ds)
    elif kind == "localization":
        body = _localization(run, name, ds)
    elif kind == "top-images":
        body = _top_images(run, ds)
    else:
        body = _generic(run, name, ds)
    raw = url("api", "runs", run, "analyses", name)
    main = ANALYSES[kind].main_variable if kind in ANALYSES else None
    csv = link(raw + f"?format=csv&var={main}", f"{main}.csv") + " · " if main in ds else ""
    body = (
        _protocol(ds, kind)
        + _caveats(request, ds, kind)
        + body
        + f'<p class="meta">data: {link(raw, "JSON")} · {csv}'
        f"{link(raw + '?format=netcdf', 'netCDF')}</p>"
    )
    crumbs = [("/", "runs"), (url("runs", run), run), (url("runs", run, "analyses", name), name)]
    return html_response(page(f"{run} / {name} ({kind})", crumbs, body, request.state.page_data))
