"""Human-readable summaries for ``vitcnn layers``, ``ls`` and ``show``."""

from __future__ import annotations

from typing import Any

__all__ = ["describe_model_layers", "describe_run", "describe_store", "format_bytes", "table"]


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

    from vitcnn_store.capture import output_shapes
    from vitcnn_store.models import (
        attention_modules,
        build_model,
        data_config,
        expand_layers,
        model_family,
    )

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
    presets = "preset:blocks, preset:paper" if family else "none for this family"
    head = (
        f"{spec.name}: input {tuple(cfg['input_size'])}, {len(rows)} module(s) "
        f"(shapes per image; presets: {presets})"
    )
    return head + "\n" + table(rows, ["layer", "type", "output shape", ""])


def _run_row(store: Any, name: str) -> list[str]:
    run = store[name]
    a = run.attrs
    done = run.done
    try:
        size = format_bytes(run.nbytes_stored())
    except Exception:  # remote stores may not support du cheaply
        size = "?"
    return [
        name, str(a.get("model")), str(a.get("weights_source")), str(run.n_images),
        str(len(run.layers)), str(len(run.attention_layers)), str(a.get("dtype")), size,
        f"{int(done.sum())}/{done.size}" + ("" if done.all() else " INCOMPLETE"),
        str(len(run.failed)),
    ]  # fmt: skip


def describe_store(url: str) -> str:
    """One line per run: model, weights, images, layers, size, completeness."""
    from vitcnn_store.store import open_store

    store = open_store(url)
    if not store.runs:
        return f"{url}: empty store (no runs)"
    rows = [_run_row(store, name) for name in store.runs]
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


def describe_run(url: str, run_name: str) -> str:
    """Provenance, layers with shapes and dtypes, and failed images of one run."""
    from vitcnn_store.store import open_store

    run = open_store(url)[run_name]
    lines = [f"run {run_name!r} in {url}", "", "provenance:"]
    skip = {"layers", "attention_layers", "label_names"}
    for key, value in sorted(run.attrs.items()):
        if key not in skip:
            lines.append(f"  {key}: {value}")
    names = run.attrs.get("label_names") or []
    lines.append(f"  label_names: {len(names)} ({', '.join(map(str, names[:10]))}"
                 f"{' ...' if len(names) > 10 else ''})")  # fmt: skip

    def shape(x: Any) -> str:
        return str(dict(zip(x.dims[1:], x.shape[1:], strict=True)))

    rows = []
    for layer in run.layers:
        x = run[layer]
        rows.append([layer, str(x.attrs.get("kind")), f"{x.attrs.get('depth_fraction', 0):.2f}",
                     shape(x), str(x.dtype)])  # fmt: skip
    for layer in run.attention_layers:
        a = run.attention(layer)
        rows.append([f"{layer}/attention", "attention", "", shape(a), str(a.dtype)])
    if "input" in run.group:
        x = run.inputs
        rows.append(["input", "input", "", shape(x), str(x.dtype)])
    lines += [
        "",
        f"arrays ({len(rows)}):",
        table(rows, ["layer", "kind", "depth", "shape", "dtype"]),
    ]
    done = run.done
    lines += ["", f"units done: {int(done.sum())}/{done.size}"]
    failed = run.failed
    lines.append(f"failed images: {len(failed)}")
    lines += [f"  {k}: {v}" for k, v in list(failed.items())[:20]]
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more")
    return "\n".join(lines)
