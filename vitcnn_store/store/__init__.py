"""The store format layer: zarr v3 groups labelled for xarray (docs/format.md)."""

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
