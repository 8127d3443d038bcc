"""The store format layer: zarr v3 groups labelled for xarray (docs/format.md).

Names are imported from their modules on first use (PEP 562), so that importing
one light module of this package (``layout``, ``codecs``, ``runs``) does not
import the reader, the writer or the scrubber: ``vitcnn --help`` and
``vitcnn ls`` start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitcnn_store.store.codecs import COMPRESSIONS, checksummed, xarray_encoding
    from vitcnn_store.store.layout import (
        CREATED_ATTR,
        FORMAT_ATTR,
        check_name,
        check_writable,
        open_root,
        unit_bounds,
    )
    from vitcnn_store.store.reader import Run, Store, open_store
    from vitcnn_store.store.runs import RunEntry, list_runs, prepare_run
    from vitcnn_store.store.verify import Problem, VerifyReport, verify_store
    from vitcnn_store.store.writer import ArraySpec, RunWriter, consolidate, create_run

#: The module of each name (names first, so no name shadows a module of the package).
_HOMES = {
    "codecs": ("COMPRESSIONS", "checksummed", "xarray_encoding"),
    "layout": (
        "CREATED_ATTR",
        "FORMAT_ATTR",
        "check_name",
        "check_writable",
        "open_root",
        "unit_bounds",
    ),
    "reader": ("Run", "Store", "open_store"),
    "runs": ("RunEntry", "list_runs", "prepare_run"),
    "verify": ("Problem", "VerifyReport", "verify_store"),
    "writer": ("ArraySpec", "RunWriter", "consolidate", "create_run"),
}
_LAZY = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "COMPRESSIONS",
    "CREATED_ATTR",
    "FORMAT_ATTR",
    "ArraySpec",
    "Problem",
    "Run",
    "RunEntry",
    "RunWriter",
    "Store",
    "VerifyReport",
    "check_name",
    "check_writable",
    "checksummed",
    "consolidate",
    "create_run",
    "list_runs",
    "open_root",
    "open_store",
    "prepare_run",
    "unit_bounds",
    "verify_store",
    "xarray_encoding",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vitcnn_store.store' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"vitcnn_store.store.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
