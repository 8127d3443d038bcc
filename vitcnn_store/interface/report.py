"""``vitcnn report``: one self-contained HTML page over every analysis in a store.

Figures are embedded as PNG data URIs and the numbers behind each figure as CSV
data URIs, so ``report.html`` opens from disk with no server and survives being
mailed around; the PNG and CSV files are also written beside it.

A figure is only as good as what a reader knows about it, so beside each one
the report states how it was made (images, resolution, weights, n, batches,
repeats, penalty selection, baselines) next to the protocol of Raghu et al.
(2021), and a caveats section names artifacts found in the runs and results
(:mod:`jobs.analyze.checks`): bitwise-identical layers, CKA of one between
distinct layers, residual branches that output exactly zero. Probe and skip
results of several runs are also drawn on one normalized-depth axis.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitcnn_store.interface.registry import ANALYSES
from vitcnn_store.store.analyses import (
    DIGEST_ATTR,
    analysis_group,
    latest_result,
    list_results,
    read_analysis,
)
from vitcnn_store.store.reader import Store, as_store

__all__ = ["ResultEntry", "build_report", "collect_results", "sections"]


def sections() -> list[tuple[str, tuple[str, str]]]:
    """(analysis, (title, caption)) of the report's sections, in the registry's order."""
    return [(e.name, e.section) for e in ANALYSES.values() if e.section is not None]


@dataclass
class ResultEntry:
    """One ``<run>/_analyses/<name>/<key>`` group of a store: the latest complete result
    of its name."""

    run: str
    name: str
    analysis: str
    dataset: Any
    key: str = ""
    earlier: int = 0  # other complete results of the name, kept in the store
    digest: str = ""  # of the stored arrays (the commit marker's)

    @property
    def stamp(self) -> dict[str, Any]:
        """What its figure is stamped with (:func:`vitcnn_store.interface.plots.result_stamp`)."""
        from vitcnn_store.interface.plots import result_stamp

        return result_stamp(self.group, self.digest, str(self.dataset.attrs.get("computed_at", "")))

    @property
    def group(self) -> str:
        return analysis_group(self.run, self.name, self.key or None)


def collect_results(where: Store | str, skipped: list[str] | None = None) -> list[ResultEntry]:
    """The latest complete result of every analysis name in the store ``where`` (opened,
    or its URL), by run then name.

    Incomplete or damaged results are left out (and named in ``skipped``), so
    one of them never stops the report of the others.
    """
    from vitcnn_store.errors import VitcnnError

    store = as_store(where)
    out = []
    for name in store.runs:
        run = store[name]
        results = list_results(store, name)
        for info in results:
            if not info.complete and skipped is not None:
                skipped.append(f"{info.group}: {info.problem}")
        for result in sorted({r.name for r in results if r.complete}):
            mine = [r for r in results if r.name == result]
            latest = latest_result(mine)
            assert latest is not None  # the name has a complete result
            try:
                ds = read_analysis(run, result, latest.key)
            except VitcnnError as e:  # a chunk that fails its checksum
                if skipped is not None:
                    skipped.append(f"{latest.group}: {e}")
                continue
            earlier = sum(1 for r in mine if r.complete) - 1
            out.append(
                ResultEntry(
                    name,
                    result,
                    str(ds.attrs.get("analysis", "")),
                    ds,
                    latest.key,
                    earlier,
                    str(latest.attrs.get(DIGEST_ATTR, "")),
                )
            )
    return out


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _csv(ds: Any) -> dict[str, bytes]:
    """One CSV per data variable (their dims differ, so one table would be a cross product)."""
    return {
        str(var): ds[var].to_dataframe().to_csv().encode()
        for var in ds.data_vars
        if ds[var].ndim > 0 and ds[var].size <= 2_000_000  # scalars are in the attributes
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


def _weights(attrs: Any) -> str:
    source = str(attrs.get("weights_source"))
    return {"random-init": "random init", "timm-pretrained": "pretrained"}.get(source, source)


def _run_protocol(run: Any) -> str:
    a = run.attrs
    size = a.get("input_size") or [None, "?"]
    return f"{run.name} = {a.get('model')} ({_weights(a)}) on {a.get('image_set')} at {size[1]} px"


def _estimate_protocol(kind: str, ds: Any) -> str:
    """How the numbers were estimated: n, batches, repeats, penalty, baseline."""
    from jobs.analyze.protocol import cka_protocol, sampling

    a = ds.attrs
    n = f"n = {a.get('n', '?')} images"
    if kind == "cka":
        return cka_protocol(a)
    if kind == "localization":
        return f"{n} ({sampling(a)})"
    if kind == "attention":
        return f"{n}, {a.get('grid', '')}; baseline: {a.get('baseline', 'none stored')}"
    if kind == "probe":
        return (
            f"{a.get('protocol', n)}; penalty {a.get('l2_selection', a.get('l2', '?'))}; "
            f"chance {a.get('chance', 'not stored')}"
        )
    return n


def _protocol_html(entry: ResultEntry, runs: dict[str, Any]) -> str:
    sources = [str(r) for r in entry.dataset.attrs.get("source_runs", [entry.run])]
    here = "; ".join(_run_protocol(runs[r]) for r in sources if r in runs)
    estimate = _estimate_protocol(entry.analysis, entry.dataset)
    # What the paper did, with the section or figure that says so (the registry's entry;
    # Raghu et al. 2021, arXiv:2108.08810; docs/reproduce.md has more).
    paper = ANALYSES[entry.analysis].paper if entry.analysis in ANALYSES else ""
    esc = html.escape
    return (
        f'<div class="protocol"><b>This figure:</b> {esc(here)}; {esc(estimate)}.'
        + (f"<br><b>Paper:</b> {esc(paper)}." if paper else "")
        + "</div>"
    )


def _figure_layers(entry: ResultEntry) -> set[tuple[str, str]]:
    """(run, layer) pairs a result's figure draws: a finding is shown only beside figures
    that contain one of its layers."""
    ds = entry.dataset
    a = ds.attrs

    def names(var: str) -> list[str]:
        if var not in ds.variables:
            return []
        out = []
        for v in ds[var].values.ravel().tolist():
            out += [n.strip() for n in str(v).split(" + ") if n.strip()]
        return out

    pairs = {(str(a.get("run_a", entry.run)), n) for n in names("layer_a")}
    pairs |= {(str(a.get("run_b", entry.run)), n) for n in names("layer_b")}
    for var in ("layer", "block", "branch_tap", "skip_taps"):
        pairs |= {(entry.run, n) for n in names(var)}
    if "layer" in a:
        pairs.add((entry.run, str(a["layer"])))
    return pairs


def _findings(runs: dict[str, Any], results: list[ResultEntry]) -> dict[str, list[Any]]:
    """Artifacts per run (:func:`jobs.analyze.checks.run_findings`)."""
    from jobs.analyze.checks import run_findings

    return {
        name: run_findings(run, [r.dataset for r in results if r.run == name])
        for name, run in runs.items()
    }


def _numbered(findings: dict[str, list[Any]]) -> list[tuple[int, str, Any]]:
    """Each finding once, numbered from 1: (number, run, finding)."""
    flat = [(run, f) for run, found in findings.items() for f in found]
    return [(i + 1, run, f) for i, (run, f) in enumerate(flat)]


def _caveats_html(findings: dict[str, list[Any]]) -> str:
    esc = html.escape
    items, causes = [], []
    for number, run, f in _numbered(findings):
        items.append(
            f'<li id="finding-{number}" value="{number}"><b>{esc(run)}</b>: {esc(f.message)}</li>'
        )
        if f.cause and f.cause not in causes:
            causes.append(f.cause)
    if not items:
        return (
            '<section id="caveats"><h2>Caveats</h2><p>No identical or all-zero layers, '
            "CKA-of-one blocks or dead residual branches were found.</p></section>"
        )
    why = "".join(f'<p class="cause"><b>Why:</b> {esc(c)}</p>' for c in causes)
    return (
        '<section id="caveats"><h2>Caveats: artifacts found</h2>'
        "<p>Structure in the figures below that comes from arithmetic, not from "
        "learned representations (each figure links the ones among its layers):</p>"
        f"<ol>{''.join(items)}</ol>{why}</section>"
    )


def _card_caveats(entry: ResultEntry, findings: dict[str, list[Any]]) -> str:
    """Links to the caveats whose layers this figure draws (the text stays in one place)."""
    drawn = _figure_layers(entry)
    numbers = [
        number
        for number, run, f in _numbered(findings)
        if any((run, layer) in drawn for layer in f.layers)
    ]
    if not numbers:
        return ""
    links = ", ".join(f'<a href="#finding-{n}">{n}</a>' for n in numbers)
    return f'<div class="caveat"><b>Caveats</b> among this figure\'s layers: {links}</div>'


def _overlay_html(
    analysis: str, entries: list[ResultEntry], runs: dict[str, Any], out: Path
) -> str:
    """One figure with every run's curve on the normalized-depth axis (probe, skip)."""
    from vitcnn_store.interface.plots import OVERLAYS, figure_is_current, plot_overlay

    if analysis not in OVERLAYS or len({e.run for e in entries}) < 2:
        return ""
    labels = [
        f"{e.run}{'' if e.name == analysis else f'/{e.name}'} ({runs[e.run].attrs.get('model')})"
        for e in entries
    ]
    # Kept while it shows the same results under the same labels (a run's model in them);
    # its digest joins theirs, empty (so never kept) if one of them has none.
    parts = [{"label": label, **e.stamp} for label, e in zip(labels, entries, strict=True)]
    digests = [str(part["digest"]) for part in parts]
    stamp = {
        "overlay": analysis,
        "results": parts,
        "digest": "|".join(digests) if all(digests) else "",
        "plots": parts[0]["plots"],
    }
    png = out / f"overlay__{analysis}.png"
    if not figure_is_current(png, stamp):
        plot_overlay(
            analysis, list(zip(labels, [e.dataset for e in entries], strict=True)), png, stamp=stamp
        )
    alt = f"{analysis} of {', '.join(e.run for e in entries)} on one depth axis"
    return (
        f'<div class="card"><b>All runs on one normalized-depth axis</b>'
        f'<div class="meta">block k of K at k/K, so models of different depth line up</div>'
        f'<img alt="{html.escape(alt)}" src="{_data_uri(png.read_bytes(), "image/png")}">'
        "</div>"
    )


def _provenance_rows(run: Any) -> list[tuple[str, str]]:
    a = run.attrs
    weights = str(a.get("weights_source"))
    if a.get("checkpoint"):
        weights += f" ({a['checkpoint']})"
    if a.get("weights_hub_id"):
        weights += f" ({a['weights_hub_id']})"
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
.protocol{font-size:13px;background:#eef3fb;border-left:4px solid #4a7bd0;padding:6px 10px;
margin:8px 0}
.caveat{font-size:13px;background:#fff4e0;border-left:4px solid #f0a020;padding:6px 10px;
margin:8px 0} .caveat ul{margin:4px 0;padding-left:18px}
.cause{font-size:13px;color:#5a6272}
"""


def build_report(where: Store | str, out_dir: str | Path | None = None) -> Path:
    """Write ``report.html`` with its PNG figures and its ``data/*.csv`` for the store
    ``where`` (opened, or its URL).

    They go to ``out_dir``, by default the store's figure folder
    (:func:`vitcnn_store.interface.plots.figure_dir`), where ``vitcnn analyze`` draws its
    figures under the same names (``<run>__<name>.png``). A figure already there whose
    stamp names the result it would show, drawn by the same plotting code
    (:func:`vitcnn_store.interface.plots.figure_is_current`), is kept; any other is drawn
    again.
    """
    from vitcnn_store.interface.plots import figure_dir, figure_is_current, plot_result

    store = as_store(where)
    url = where if isinstance(where, str) else store.url
    out = figure_dir(url, None if out_dir is None else str(out_dir))
    (out / "data").mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    results = collect_results(store, skipped)
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
        args = {n: runs[n].attrs.get("model_args") or {} for n in random_runs}
        live = [n for n in random_runs if args[n].get("zero_init_last") is False]
        branches = (
            f" Run(s) {esc(', '.join(live))} were built with <code>zero_init_last=False</code>: "
            "timm's default zero-initialises the last BatchNorm of every ResNet residual "
            "branch, so at random init every branch would output exactly 0 and the blocks "
            "of a stage would repeat their input."
            if live
            else ""
        )
        body.append(
            '<div class="note"><b>Random-init weights</b> in run(s) '
            f"{esc(', '.join(random_runs))}: "
            "figures made from untrained networks show the pipeline at work but say nothing "
            "about how trained ViTs or CNNs represent images. Extract with "
            f"<code>--pretrained</code> or <code>--checkpoint</code> for science.{branches}</div>"
        )
    if not results:
        body.append(
            '<div class="note">No analyses in this store yet: run '
            "<code>vitcnn analyze ...</code> first.</div>"
        )
    if skipped:
        items = "".join(f"<li><code>{esc(s)}</code></li>" for s in skipped)
        body.append(
            f'<div class="note"><b>Left out</b>: {len(skipped)} incomplete or damaged analysis '
            f"result(s); <code>vitcnn verify --repair</code> removes them.<ul>{items}</ul></div>"
        )
    findings = _findings(runs, results)
    body.append(_caveats_html(findings))
    for analysis, (title, caption) in sections():
        entries = [r for r in results if r.analysis == analysis]
        if not entries:
            continue
        body += [f'<h2 id="{analysis}">{esc(title)}</h2>', f"<p>{esc(caption)}</p>"]
        body.append(_overlay_html(analysis, entries, runs, out))
        for entry in entries:
            stem = f"{entry.run}__{entry.name}"
            png = out / f"{stem}.png"
            if not figure_is_current(png, entry.stamp):  # e.g. drawn by vitcnn analyze
                plot_result(entry.dataset, png, stamp=entry.stamp)
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
            if entry.earlier:
                snippet += f"\n# {entry.earlier} earlier result(s) of {entry.name!r} kept beside it"
            body.append(
                f'<div class="card"><b>{esc(entry.name)}</b> · runs {esc(sources)}'
                f'<div class="meta">{esc(_params(entry.dataset))}</div>'
                f"{_protocol_html(entry, runs)}{_card_caveats(entry, findings)}"
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
