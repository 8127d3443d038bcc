"""``vitcnn report``: one self-contained HTML page over every analysis in a store.

Figures are embedded as PNG data URIs and the numbers behind each figure as CSV
data URIs, so ``report.html`` opens from disk with no server and survives being
mailed around; the PNG and CSV files are also written beside it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitcnn_store.store import open_store
from vitcnn_store.store.analyses import analysis_group

__all__ = ["SECTIONS", "ResultEntry", "build_report", "collect_results"]

# analysis -> (title, what the figure shows, after which paper figure)
SECTIONS: dict[str, tuple[str, str]] = {
    "cka": (
        "Representation similarity (CKA)",
        "Linear CKA between every pair of layers, layers in forward order on both axes "
        "(paper Figs. 1–2). Bright off-diagonal blocks mean layers that represent the "
        "images alike; across models, the diagonal band shows which depths correspond.",
    ),
    "attention": (
        "Attention distance",
        "Mean attention distance in input pixels per head (dots, sorted) for every "
        "attention layer in forward order (paper Fig. 3); small distances are "
        "local, convolution-like heads.",
    ),
    "localization": (
        "Localization",
        "For chosen tokens of a late layer, CKA between the token's representation "
        "and the raw pixels of every input patch, on the patch grid (paper Fig. 9); "
        "the chosen token is marked.",
    ),
    "skip": (
        "Skip connections",
        "Ratio of the norm of the representation on the skip path to the norm of the "
        "branch output, per block, CLS separate from spatial tokens (paper Fig. 7).",
    ),
    "probe": (
        "Linear probes",
        "Accuracy of closed-form ridge probes per layer against normalized depth "
        "(paper Figs. 11/13).",
    ),
}


@dataclass
class ResultEntry:
    """One ``<run>/_analyses/<name>`` group of a store."""

    run: str
    name: str
    analysis: str
    dataset: Any

    @property
    def group(self) -> str:
        return analysis_group(self.run, self.name)


def collect_results(url: str) -> list[ResultEntry]:
    """Every analysis result stored in ``url``, by run then name."""
    store = open_store(url)
    out = []
    for name in store.runs:
        run = store[name]
        for result in run.analyses:
            ds = run.analysis(result)
            out.append(ResultEntry(name, result, str(ds.attrs.get("analysis", "")), ds))
    return out


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _csv(ds: Any) -> dict[str, bytes]:
    """One CSV per data variable (their dims differ, so one table would be a cross product)."""
    return {
        str(var): ds[var].to_dataframe().to_csv().encode()
        for var in ds.data_vars
        if ds[var].size <= 2_000_000
    }


def _params(ds: Any) -> str:
    keys = (
        "estimator",
        "kernel",
        "reduce",
        "n",
        "n_images",
        "batch_size",
        "repeats",
        "seed",
        "renormalize",
        "shots",
        "features",
        "layer",
        "summary",
    )
    parts = [f"{k}={ds.attrs[k]}" for k in keys if k in ds.attrs and k != "summary"]
    text = ", ".join(parts)
    if "summary" in ds.attrs:
        text = f"{ds.attrs['summary']}" + (f" ({text})" if text else "")
    if ds.attrs.get("incomplete_runs"):
        text += " — computed on an incomplete run (unfinished units masked)"
    return text


def _provenance_rows(run: Any) -> list[tuple[str, str]]:
    a = run.attrs
    weights = str(a.get("weights_source"))
    if a.get("checkpoint"):
        weights += f" ({a['checkpoint']})"
    layers = a.get("layers") or []
    return [
        ("model", f"{a.get('model')} {a.get('model_args') or ''}".strip()),
        ("weights", f"{weights}, sha256 {str(a.get('weights_sha256'))[:12]}…"),
        (
            "images",
            f"{a.get('n_images')} from {a.get('image_set')} "
            f"(sha256 {str(a.get('image_set_sha256'))[:12]}…)",
        ),
        ("input", f"{a.get('input_size')} {a.get('interpolation')}, crop {a.get('crop_pct')}"),
        ("layers", f"{len(layers)} ({', '.join(layers[:4])}{' …' if len(layers) > 4 else ''})"),
        ("attention", f"{len(a.get('attention_layers') or [])} module(s)"),
        ("dtype, chunk", f"{a.get('dtype')}, {a.get('chunk_size')} images"),
        (
            "versions",
            f"timm {a.get('timm_version')}, torch {a.get('torch_version')}, "
            f"vitcnn_store {a.get('code_version')}",
        ),
        ("created", str(a.get("created_at"))),
        ("complete", f"{int(run.done.sum())}/{run.done.size} units, {len(run.failed)} failed"),
    ]


CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px} h2{margin-top:36px;border-bottom:2px solid #d8dce3}
.note{background:#fff4e0;border-left:4px solid #f0a020;padding:10px 14px;margin:14px 0}
.card{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:14px;margin:14px 0}
.card img{max-width:100%;height:auto;display:block;margin:8px auto}
.meta{color:#5a6272;font-size:13px}
table{border-collapse:collapse;font-size:13px} td{padding:3px 10px 3px 0;vertical-align:top}
td:first-child{color:#5a6272;white-space:nowrap}
pre{background:#1d2330;color:#e8eaf0;padding:10px;border-radius:6px;overflow-x:auto;
font-size:12px}
a.dl{display:inline-block;margin-right:10px;font-size:13px}
.runs{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:14px}
"""


def build_report(url: str, out_dir: str | Path) -> Path:
    """Write ``report.html`` (plus its PNG and CSV files) for the store at ``url``."""
    from vitcnn_store.plots import plot_result

    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    store = open_store(url)
    results = collect_results(url)
    runs = {name: store[name] for name in store.runs}
    esc = html.escape
    body = [
        "<h1>vitcnn_store report</h1>",
        f'<div class="meta">store <code>{esc(url)}</code> · {len(runs)} run(s) · '
        f"{len(results)} analysis result(s) · made "
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC</div>",
    ]
    random_runs = [n for n, r in runs.items() if r.attrs.get("weights_source") == "random-init"]
    if random_runs:
        body.append(
            '<div class="note"><b>Random-init weights</b> in run(s) '
            f"{esc(', '.join(random_runs))}: "
            "figures made from untrained networks show the pipeline at work but say nothing "
            "about how trained ViTs or CNNs represent images. Extract with "
            "<code>--pretrained</code> or <code>--checkpoint</code> for science.</div>"
        )
    if not results:
        body.append(
            '<div class="note">No analyses in this store yet: run '
            "<code>vitcnn analyze ...</code> first.</div>"
        )
    for analysis, (title, caption) in SECTIONS.items():
        entries = [r for r in results if r.analysis == analysis]
        if not entries:
            continue
        body += [f'<h2 id="{analysis}">{esc(title)}</h2>', f"<p>{esc(caption)}</p>"]
        for entry in entries:
            stem = f"{entry.run}__{entry.name}"
            png = plot_result(entry.dataset, out / "figures" / f"{stem}.png")
            links = []
            for var, data in _csv(entry.dataset).items():
                (out / "data" / f"{stem}__{var}.csv").write_bytes(data)
                uri = _data_uri(data, "text/csv")
                links.append(
                    f'<a class="dl" download="{esc(stem)}__{esc(var)}.csv" href="{uri}">'
                    f"{esc(var)}.csv</a>"
                )
            sources = ", ".join(map(str, entry.dataset.attrs.get("source_runs", [entry.run])))
            snippet = f'import xarray as xr\nds = xr.open_zarr("{url}", group="{entry.group}")'
            body.append(
                f'<div class="card"><b>{esc(entry.name)}</b> · runs {esc(sources)}'
                f'<div class="meta">{esc(_params(entry.dataset))}</div>'
                f'<img alt="{esc(analysis)} of {esc(sources)}" '
                f'src="{_data_uri(png.read_bytes(), "image/png")}">'
                f"<div>download: {''.join(links)}</div><pre>{esc(snippet)}</pre></div>"
            )
    body.append('<h2 id="provenance">Runs</h2><div class="runs">')
    for name, run in runs.items():
        rows = "".join(
            f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in _provenance_rows(run)
        )
        body.append(f'<div class="card"><b>{esc(name)}</b><table>{rows}</table></div>')
    body.append("</div>")
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>vitcnn_store report</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
