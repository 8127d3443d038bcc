"""Analysis results as JSON (with their coordinates), CSV or netCDF.

JSON is xarray's own dictionary layout (``coords``, ``data_vars``, ``attrs``,
each variable with ``dims`` and ``data``), NaN written as ``null``. CSV is one
row per coordinate combination (``to_dataframe``), for the variables that share
dimensions (``var=`` picks one). netCDF is netCDF-3 through scipy, with
attributes that netCDF cannot hold (dicts, lists of strings, booleans) written
as JSON text.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.serve.errors import ApiError
from vitcnn_store.serve.slices import plain

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["FORMATS", "result_csv", "result_json", "result_netcdf"]

FORMATS = {"json": "application/json", "csv": "text/csv", "netcdf": "application/x-netcdf"}


def result_json(ds: xr.Dataset) -> bytes:
    """The dataset as xarray's dict layout, NaN as null."""
    return json.dumps(plain(ds.to_dict(data="array")), allow_nan=False).encode()


def _pick(ds: xr.Dataset, var: str | None) -> xr.Dataset:
    if var is not None:
        if var not in ds.data_vars:
            raise ApiError(
                404, f"no variable {var!r} (variables: {', '.join(map(str, ds.data_vars))})"
            )
        return ds[[var]]
    dims = {tuple(v.dims) for v in ds.data_vars.values()}
    if len(dims) > 1:
        names = ", ".join(map(str, ds.data_vars))
        raise ApiError(
            400, f"the variables have different dimensions: pick one with var= ({names})"
        )
    return ds


def result_csv(ds: xr.Dataset, var: str | None = None) -> bytes:
    """The variables (or ``var``) as CSV, one row per coordinate combination."""
    picked = _pick(ds, var)
    if not picked.data_vars:
        raise ApiError(400, "the result has no variables to tabulate")
    frame = picked.to_dataframe() if picked.dims else picked.to_pandas().to_frame().T
    return str(frame.to_csv()).encode()


def _netcdf_attr(value: Any) -> Any:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        return value
    return json.dumps(plain(value))


def result_netcdf(ds: xr.Dataset) -> bytes:
    """The dataset as a netCDF-3 file (scipy), odd attributes as JSON text."""
    out = ds.copy()
    out.attrs = {k: _netcdf_attr(v) for k, v in ds.attrs.items()}
    for name in list(out.variables):
        v = out[name]
        v.attrs = {k: _netcdf_attr(x) for k, x in v.attrs.items()}
        v.encoding = {}
        values = v.values
        if values.dtype == bool:
            values = values.astype("i1")
        elif values.dtype.kind in "iu" and values.dtype.itemsize == 8:
            fits = np.abs(values).max(initial=0) < 2**31
            values = values.astype("i4" if fits else "f8")
        elif values.dtype.kind not in "iufcSU":  # numpy StringDType, objects: plain str
            values = np.array(values.tolist(), dtype=str)
        if values is not v.values:
            out[name] = v.copy(data=values)
    data = out.to_netcdf(engine="scipy")
    return bytes(data)
