"""The store format layer: zarr v3 groups labelled for xarray (DESIGN.md §2)."""

from vitcnn_store.store.layout import FORMAT_ATTR, check_name, open_root, unit_bounds
from vitcnn_store.store.reader import Run, Store, open_store
from vitcnn_store.store.writer import ArraySpec, RunWriter, consolidate, create_run, prepare_run

__all__ = [
    "FORMAT_ATTR",
    "ArraySpec",
    "Run",
    "RunWriter",
    "Store",
    "check_name",
    "consolidate",
    "create_run",
    "open_root",
    "open_store",
    "prepare_run",
    "unit_bounds",
]
