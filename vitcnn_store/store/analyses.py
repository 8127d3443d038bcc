"""Analysis results in the store: ``<run>/_analyses/<name>``, read and written here only.

A result is an :class:`xarray.Dataset` written as a zarr v3 group under the
run it belongs to, so plain ``xr.open_zarr(store, group="<run>/_analyses/<name>")``
reads it. Its attributes say how it was computed; one of them, ``parameters``
(plain JSON: the job's options and the source runs' fingerprints), is the
reuse key: :func:`find_reusable` returns a stored result only when its
``parameters`` equal the ones asked for, and :func:`write_analysis` replaces
the result group (its siblings and the run are left alone).

Examples
--------
>>> analysis_group("vitb16", "cka__r50")
'vitb16/_analyses/cka__r50'
>>> run = open_store("acts.zarr")["vitb16"]  # doctest: +SKIP
>>> run.analyses  # doctest: +SKIP
['attention', 'cka', 'cka__r50']
>>> run.analysis("cka")["cka"]  # doctest: +SKIP
<xarray.DataArray 'cka' (layer_a: 13, layer_b: 13)> ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.errors import RunNotFoundError
from vitcnn_store.store.codecs import xarray_encoding
from vitcnn_store.store.layout import ANALYSES, check_name, open_root, quiet_zarr
from vitcnn_store.store.writer import consolidate

if TYPE_CHECKING:
    import xarray as xr

    from vitcnn_store.store.reader import Run

__all__ = [
    "analysis_group",
    "analysis_names",
    "find_reusable",
    "plain_json",
    "read_analysis",
    "write_analysis",
]


def analysis_group(run: str, name: str) -> str:
    """Group path of result ``name`` of ``run`` inside the store (the one place it is built)."""
    return f"{run}/{ANALYSES}/{check_name(name, 'analysis')}"


def plain_json(value: Any) -> Any:
    """A plain-JSON copy of ``value`` (numpy scalars and arrays, paths become JSON values).

    Attributes round-trip through zarr as JSON, so reuse keys are compared in
    this form.

    Examples
    --------
    >>> plain_json({"n": np.int64(3), "x": np.array([0.5]), "t": (1, 2)})
    {'n': 3, 'x': [0.5], 't': [1, 2]}
    """

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serializable: {type(o).__name__}")

    return json.loads(json.dumps(value, default=default))


def analysis_names(run: Run) -> list[str]:
    """Names of the results stored under ``run``, sorted."""
    with quiet_zarr():
        if ANALYSES not in run.group:
            return []
        return sorted(k for k, _ in run.group[ANALYSES].groups())


def _open(url: str, group: str) -> xr.Dataset:
    import xarray as xr

    with quiet_zarr():
        return xr.open_zarr(url, group=group, consolidated=False, zarr_format=3).load()


def read_analysis(run: Run, name: str) -> xr.Dataset:
    """Result ``name`` of ``run``, loaded into memory."""
    if name not in analysis_names(run):
        known = ", ".join(analysis_names(run)) or "none"
        raise RunNotFoundError(f"no analysis {name!r} in run {run.name!r} (stored: {known})")
    return _open(run.store.url, analysis_group(run.name, name))


def find_reusable(url: str, run: str, name: str, parameters: Any) -> xr.Dataset | None:
    """The stored result ``name`` of ``run`` if its ``parameters`` attribute equals
    ``parameters`` (compared as plain JSON), else None."""
    group = analysis_group(run, name)
    root = open_root(url, mode="r")
    with quiet_zarr():
        try:
            node = root[group]
        except KeyError:
            return None
        if plain_json(node.attrs.get("parameters")) != plain_json(parameters):
            return None
    return _open(url, group)


def write_analysis(url: str, run: str, name: str, ds: xr.Dataset) -> str:
    """Write ``ds`` as result ``name`` of ``run``, replacing an older one; returns its group."""
    group = analysis_group(run, name)
    with quiet_zarr():
        # mode="w" replaces this result's group only; siblings and the run stay.
        # Checksummed like the run's own arrays, with integer fills that are not data.
        ds.to_zarr(url, group=group, mode="w", zarr_format=3, consolidated=False,
                   encoding=xarray_encoding(ds))  # fmt: skip
    consolidate(url)
    return group
