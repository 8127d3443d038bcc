"""Small helpers shared by tests (kept out of conftest so they can be imported)."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr


def store_arrays(url: str, run: str) -> dict[str, np.ndarray]:
    """Every array of a run, read with plain zarr, keyed by path (analyses excluded)."""
    group = zarr.open_group(url, mode="r", path=run, use_consolidated=False)
    out: dict[str, np.ndarray] = {}

    def visit(g: zarr.Group, prefix: str) -> None:
        for key, node in g.members():
            path = f"{prefix}{key}"
            if key.startswith("_"):
                continue
            if isinstance(node, zarr.Group):
                visit(node, path + "/")
            else:
                values = node[...]
                if values.dtype.kind not in "biufc":
                    values = np.array(values.tolist(), dtype=str)
                out[path] = values

    visit(group, "")
    return out


def assert_runs_identical(url_a: str, run_a: str, url_b: str, run_b: str) -> None:
    """Array-for-array identity of two runs (NaN equal to NaN)."""
    a, b = store_arrays(url_a, run_a), store_arrays(url_b, run_b)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        if a[key].dtype.kind == "f":
            assert np.array_equal(a[key], b[key], equal_nan=True), key
        else:
            assert np.array_equal(a[key], b[key]), key


def module_outputs(model: Any, x: Any, names: list[str]) -> dict[str, Any]:
    """Outputs (torch tensors) of ``model``'s modules ``names`` on the batch ``x``, taken
    with the test's own forward hooks: an independent reference for what extraction stores."""
    import torch

    modules = dict(model.named_modules())
    out: dict[str, Any] = {}
    hooks = [
        modules[n].register_forward_hook(
            lambda _m, _i, o, n=n: out.__setitem__(n, o.detach().clone())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def snapshot(path: Any) -> dict[str, str]:
    """Every file under folder ``path`` with a hash of its bytes (``{}`` if it does not exist):
    a refusal must leave it equal."""
    import hashlib
    from pathlib import Path

    root = Path(path)
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
