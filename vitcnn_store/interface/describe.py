"""Human-readable summaries for ``vitcnn layers``, ``ls``, ``show`` and ``verify``.

``show`` lists a run's analysis results too: every parameter set kept, which
one is the latest, and any left incomplete by an interrupted job.

``ls`` and ``show`` never crash on a damaged or half-created run: they say so
(``BROKEN``, ``DAMAGED``) and point at the command that recovers it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitcnn_store.errors import DamagedDataError, StoreUnavailableError

if TYPE_CHECKING:
    from vitcnn_store.store.reader import Run, Store

__all__ = [
    "describe_model_layers",
    "describe_run",
    "describe_store",
    "describe_verify",
    "format_bytes",
    "parameter_summary",
    "table",
]


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def describe_model_layers(spec: Any, patterns: str | None = None) -> str:
    """Every module of the model with its type and output shape (batch of one)."""
    import torch

    from vitcnn_store.models import (
        PRESETS,
        attention_modules,
        build_model,
        data_config,
        expand_layers,
        model_family,
    )
    from vitcnn_store.models.capture import output_shapes

    model = build_model(spec)
    cfg = data_config(model, spec.img_size)
    shapes = output_shapes(model, torch.zeros(1, *cfg["input_size"]))
    modules = dict(model.named_modules())
    chosen = expand_layers(model, patterns) if patterns else [n for n in modules if n]
    attn = set(attention_modules(model))
    rows = []
    for name in chosen:
        shape = shapes.get(name)
        shown = "not run" if name not in shapes else "-" if shape is None else str(tuple(shape[1:]))
        rows.append(
            [name, type(modules[name]).__name__, shown, "attention" if name in attn else ""]
        )
    family = model_family(model)
    presets = ", ".join(PRESETS) if family else "none for this family"
    head = (
        f"{spec.name}: input {tuple(cfg['input_size'])}, {len(rows)} module(s) "
        f"(shapes per image; presets: {presets})"
    )
    return head + "\n" + table(rows, ["layer", "type", "output shape", ""])


RECOVER = "--overwrite or --resume recovers it"


def _damage(run: Any, objects: dict[str, int] | None) -> str:
    """``""`` when every done unit has all its chunks, else a short note."""
    from vitcnn_store.store.chunks import missing_unit_chunks

    if objects is None:
        return ""  # a store that cannot be listed cheaply: verify checks it
    missing = missing_unit_chunks(run.group, run.done, objects)
    if not missing:
        return ""
    units = sorted({u for _, u in missing})
    return f"DAMAGED: {len(missing)} missing chunk(s) in {len(units)} unit(s), run vitcnn verify"


def _objects(run: Run) -> dict[str, int] | None:
    """One listing of a local run's objects (chunk keys and sizes); None for remote
    stores, where a listing costs a request per thousand objects (verify checks them)."""
    from vitcnn_store.store.chunks import list_objects
    from vitcnn_store.store.layout import is_local

    if not is_local(run.store.url):
        return None
    try:
        return list_objects(run.store, run.name)
    except (StoreUnavailableError, OSError, NotImplementedError):
        return None


def _size(run: Any, objects: dict[str, int] | None) -> str:
    """The run's stored bytes: as its writers recorded them, else counted from a listing."""
    try:
        recorded = run.recorded_bytes()
    except DamagedDataError:
        recorded = None
    if recorded is not None:
        return format_bytes(recorded)
    return format_bytes(sum(objects.values())) if objects is not None else "?"


def _run_row(store: Store, name: str) -> list[str]:
    run = store[name]
    a = run.attrs
    objects = _objects(run)
    size = _size(run, objects)
    try:
        done = run.done
        units = f"{int(done.sum())}/{done.size}" + ("" if done.all() else " INCOMPLETE")
        damage = _damage(run, objects)
        failed = str(len(run.failed))
    except DamagedDataError:
        units, damage, failed = "?", "DAMAGED: unreadable flags, run vitcnn verify", "?"
    return [
        name,
        str(a.get("model")),
        str(a.get("weights_source")),
        str(run.n_images),
        str(len(run.layers)),
        str(len(run.attention_layers)),
        str(a.get("dtype")),
        size,
        units + (f" {damage}" if damage else ""),
        failed,
    ]


def _broken_row(name: str, problem: str) -> list[str]:
    return [name, "-", "-", "-", "-", "-", "-", "-", f"BROKEN: {problem} ({RECOVER})", "-"]


def _damaged_row(name: str, problem: str) -> list[str]:
    what = f"DAMAGED: {problem.removeprefix('damaged: ')}, run vitcnn verify"
    return [name, "-", "-", "-", "-", "-", "-", "-", what, "-"]


def describe_store(where: Store | str) -> str:
    """One line per run: model, weights, images, layers, size, completeness, damage.

    ``where``: the store, opened, or its URL."""
    from vitcnn_store.store.reader import as_store

    store = as_store(where)
    url = where if isinstance(where, str) else store.url
    entries = store.entries
    if not entries:
        return f"{url}: empty store (no runs)"
    rows = []
    for entry in entries:
        if entry.damaged:  # lost arrays of its manifest: never shown as complete
            rows.append(_damaged_row(entry.name, entry.problem))
            continue
        if not entry.created:
            rows.append(_broken_row(entry.name, entry.problem))
            continue
        try:
            rows.append(_run_row(store, entry.name))
        except DamagedDataError as e:  # e.g. a damaged image_id chunk
            rows.append(_broken_row(entry.name, f"damaged ({str(e).split(':')[0]})"))
    header = [
        "run",
        "model",
        "weights",
        "images",
        "layers",
        "attn",
        "dtype",
        "size",
        "units",
        "failed",
    ]
    return f"{url}: {len(rows)} run(s)\n" + table(rows, header)


_RESTORE = "vitcnn verify lists what is lost; --resume restores it"


def _describe_broken(
    store: Store,
    url: str,
    run_name: str,
    problem: str,
    state: str = "BROKEN",
    recover: str = RECOVER,
) -> str:
    from vitcnn_store.store.layout import quiet_zarr

    lines = [f"run {run_name!r} in {url}: {state} ({problem}); {recover}"]
    try:
        with quiet_zarr():
            attrs = dict(store.root[run_name].attrs)
    except Exception:
        return lines[0]
    lines += ["", "provenance (as far as it was written):"]
    lines += [f"  {k}: {v}" for k, v in sorted(attrs.items()) if k not in _SKIP]
    return "\n".join(lines)


_SKIP = {"layers", "attention_layers", "label_names", "vitcnn_store.manifest"}


# Parameters no user option sets, or too long for one line.
_QUIET_PARAMETERS = {"analysis", "run", "name", "sources", "source_states", "allow_incomplete"}
# Shown when a name's results do not differ in any option (or it has one result).
_USUAL_PARAMETERS = (
    "run2",
    "estimator",
    "reduce",
    "batch_size",
    "repeats",
    "seed",
    "layer",
    "features",
    "shots",
)


def parameter_summary(parameters: Any, keys: Any = None, width: int = 60) -> str:
    """The options ``keys`` of a result's ``parameters`` (default: the usual ones) on
    one line, at most ``width`` characters.

    Examples
    --------
    >>> parameter_summary({"analysis": "cka", "batch_size": 128, "seed": 0, "layers": None,
    ...                    "layers_a": ["a", "b"]}, ["seed", "layers_a"])
    'seed=0, layers_a=[2 items]'
    """
    if not isinstance(parameters, dict):
        return "-"
    parts = []
    for k in _USUAL_PARAMETERS if keys is None else keys:
        v = parameters.get(k)
        if k in _QUIET_PARAMETERS or v is None:
            continue
        shown = f"[{len(v)} items]" if isinstance(v, list | dict) else str(v)
        parts.append(f"{k}={shown}")
    text = ", ".join(parts) or "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def _differing(parameters: list[Any]) -> list[str]:
    """Options whose values differ between results of one name, in their order."""
    dicts = [p for p in parameters if isinstance(p, dict)]
    keys = list(dict.fromkeys(k for p in dicts for k in p if k not in _QUIET_PARAMETERS))
    return [k for k in keys if len({repr(p.get(k)) for p in dicts}) > 1]


def _describe_analyses(run: Run) -> list[str]:
    """One row per stored result of the run: name, key, parameters, state, when."""
    from vitcnn_store.store.analyses import latest_result, list_results

    try:
        results = list_results(run.store, run.name)
    except (DamagedDataError, StoreUnavailableError) as e:
        return [f"analyses: unreadable ({str(e).split(':')[0]})"]
    if not results:
        return ["analyses: none"]
    rows = []
    for name in sorted({r.name for r in results}):
        mine = [r for r in results if r.name == name]
        latest = latest_result(mine)
        keys = _differing([r.parameters for r in mine]) or None
        for r in mine:
            state = "complete" + (" (latest)" if r is latest else "") if r.complete else r.problem
            rows.append(
                [
                    name,
                    r.key or "-",
                    parameter_summary(r.parameters, keys),
                    r.computed_at[:19] or "-",
                    state,
                ]
            )
    n_bad = sum(1 for r in results if not r.complete)
    head = f"analyses ({len(results)} result(s)"
    head += f", {n_bad} not usable: vitcnn verify --repair removes them):" if n_bad else "):"
    return [head, table(rows, ["name", "key", "parameters", "computed", "state"])]


def describe_run(where: Store | str, run_name: str) -> str:
    """Provenance, layers with shapes and dtypes, failed images and damage of one run.

    ``where``: the store, opened, or its URL."""
    from vitcnn_store.store import check_name
    from vitcnn_store.store.reader import as_store

    check_name(run_name)
    store = as_store(where)
    url = where if isinstance(where, str) else store.url
    entry = store.entry(run_name)
    if entry is not None and not entry.created:
        return _describe_broken(store, url, run_name, entry.problem)
    if entry is not None and entry.damaged:
        return _describe_broken(store, url, run_name, entry.problem, "DAMAGED", _RESTORE)
    run = store[run_name]
    lines = [f"run {run_name!r} in {url}", "", "provenance:"]
    for key, value in sorted(run.attrs.items()):
        if key not in _SKIP:
            lines.append(f"  {key}: {value}")
    names = run.attrs.get("label_names") or []
    lines.append(
        f"  label_names: {len(names)} ({', '.join(map(str, names[:10]))}"
        f"{' ...' if len(names) > 10 else ''})"
    )

    def shape(x: Any) -> str:
        return str(dict(zip(x.dims[1:], x.shape[1:], strict=True)))

    rows = []
    for label, read in [
        *((layer, lambda layer=layer: run[layer]) for layer in run.layers),
        *(
            (f"{layer}/attention", lambda layer=layer: run.attention(layer))
            for layer in run.attention_layers
        ),
        *([("input", lambda: run.inputs)] if "input" in run.group else []),
    ]:
        try:
            x = read()
        except DamagedDataError as e:  # e.g. a damaged coordinate chunk: say so, go on
            rows.append([label, "DAMAGED", "", str(e).split(";")[0][:60], ""])
            continue
        kind = "attention" if label.endswith("/attention") else str(x.attrs.get("kind"))
        depth = "" if kind in ("attention", "input") else f"{x.attrs.get('depth_fraction', 0):.2f}"
        rows.append([label, "input" if label == "input" else kind, depth, shape(x), str(x.dtype)])
    lines += [
        "",
        f"arrays ({len(rows)}):",
        table(rows, ["layer", "kind", "depth", "shape", "dtype"]),
    ]
    lines += ["", *_describe_analyses(run)]
    try:
        done = run.done
        lines += ["", f"units done: {int(done.sum())}/{done.size}"]
        damage = _damage(run, _objects(run))
    except DamagedDataError:
        lines += ["", "units done: unreadable"]
        damage = "DAMAGED: unreadable flags, run vitcnn verify"
    if damage:
        lines.append(damage)
    try:
        failed = run.failed
    except DamagedDataError:
        lines.append("failed images: unreadable (DAMAGED: run vitcnn verify)")
        return "\n".join(lines)
    lines.append(f"failed images: {len(failed)}")
    lines += [f"  {k}: {v}" for k, v in list(failed.items())[:20]]
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more")
    return "\n".join(lines)


def describe_verify(report: Any) -> str:
    """The table ``vitcnn verify`` prints: one row per problem, then a summary line."""
    lines = []
    if report.problems:
        rows = [
            [p.run, p.layer, "-" if p.unit is None else str(p.unit), p.problem]
            for p in report.problems
        ]
        lines += [table(rows, ["run", "layer", "unit", "problem"]), ""]
    lines += report.notes
    n_runs = len(report.runs)
    if report.ok:
        lines.append(
            f"{report.url}: OK, {n_runs} run(s), {report.chunks_checked} chunk(s) read, "
            "no damaged or missing chunks"
        )
    else:
        lines.append(
            f"{report.url}: {len(report.problems)} problem(s) in {n_runs} run(s) "
            f"({report.chunks_checked} chunk(s) read)"
        )
    for run, units in report.repaired.items():
        shown = ", ".join(map(str, units[:10])) + (" ..." if len(units) > 10 else "")
        lines.append(
            f"repaired {run!r}: cleared done for unit(s) {shown}; rewrite them with "
            f"`vitcnn extract ... --run {run} --resume`"
        )
    if not report.ok and not report.repaired and any(p.repairable for p in report.problems):
        lines.append("run again with --repair to mark damaged units for rewriting by --resume")
    return "\n".join(lines)
