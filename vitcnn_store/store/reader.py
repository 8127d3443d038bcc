"""Read a store: :func:`open_store` → :class:`Store` → :class:`Run` → lazy DataArrays.

Arrays come back as :class:`xarray.DataArray` backed by dask, labelled with the
run's ``image``, ``image_id`` and ``label`` coordinates and the layer's own
coordinates; nothing is read until computed. The same store opens without this
package through ``xarray.open_datatree(url, engine="zarr")``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.errors import RunNotFoundError
from vitcnn_store.store.layout import ANALYSES, open_root, quiet_zarr, unit_bounds

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["Run", "Store", "open_store"]


def open_store(url: str) -> Store:
    """Open the store at ``url`` (a local path or any fsspec URL) for reading.

    Examples
    --------
    >>> store = open_store("acts.zarr")  # doctest: +SKIP
    >>> store.runs  # doctest: +SKIP
    ['r50', 'vitb16']
    >>> x = store["vitb16"]["blocks.3"]  # doctest: +SKIP
    """
    return Store(str(url))


class Store:
    """A vitcnn store: a zarr v3 group of runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._root = open_root(url, mode="r")

    @property
    def runs(self) -> list[str]:
        """Run names, sorted."""
        with quiet_zarr():
            return sorted(k for k, _ in self._root.groups() if not k.startswith(("_", ".")))

    def __contains__(self, run: str) -> bool:
        return run in self.runs

    def __iter__(self) -> Iterator[str]:
        return iter(self.runs)

    def __getitem__(self, run: str) -> Run:
        if run not in self.runs:
            known = ", ".join(self.runs) or "none"
            raise RunNotFoundError(f"no run {run!r} in {self.url} (runs: {known})")
        return Run(self, run)

    def __repr__(self) -> str:
        return f"<vitcnn_store.Store {self.url} runs={self.runs}>"


class Run:
    """One model + weights + preprocessing over one image set, as stored."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        with quiet_zarr():
            self.group = store._root[name]

    # -- metadata -------------------------------------------------------------------

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """Provenance: model, weights, preprocessing, image set, layers, versions."""
        return dict(self.group.attrs)

    @property
    def provenance(self) -> dict[str, Any]:
        """Alias of :attr:`attrs`."""
        return self.attrs

    def _groups(self) -> dict[str, Any]:
        with quiet_zarr():
            return {k: g for k, g in self.group.groups() if not k.startswith(ANALYSES)}

    @cached_property
    def layers(self) -> list[str]:
        """Stored layer paths in forward order."""
        groups = self._groups()
        names = [k for k, g in groups.items() if "activation" in g]
        return sorted(names, key=lambda k: groups[k].attrs.get("depth_index", 0))

    @cached_property
    def attention_layers(self) -> list[str]:
        """Attention module paths with stored probabilities, in forward order."""
        groups = self._groups()
        names = [k for k, g in groups.items() if "attention" in g]
        return sorted(names, key=lambda k: groups[k].attrs.get("depth_index", 0))

    def _read(self, key: str) -> np.ndarray:
        with quiet_zarr():
            return np.asarray(self.group[key][...])

    @cached_property
    def image_ids(self) -> np.ndarray:
        # zarr returns numpy's variable-width StringDType; plain str arrays are friendlier.
        return np.array(self._read("image_id").tolist(), dtype=str)

    @cached_property
    def labels(self) -> np.ndarray:
        return self._read("label")

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def done(self) -> np.ndarray:
        """Per work unit: fully written."""
        return self._read("done")

    @property
    def image_done(self) -> np.ndarray:
        """Per image: its unit is fully written."""
        per_unit = self.done
        out = np.zeros(self.n_images, dtype=bool)
        for u, (s, e) in enumerate(unit_bounds(self.n_images, int(self.attrs["chunk_size"]))):
            out[s:e] = per_unit[u]
        return out

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @property
    def failed(self) -> dict[str, str]:
        """Images that could not be decoded: ``{image_id: reason}``."""
        flags, reasons = self._read("failed"), self._read("failure").tolist()
        return {str(self.image_ids[i]): str(reasons[i]) for i in np.flatnonzero(flags)}

    @property
    def valid(self) -> np.ndarray:
        """Per image: written and decoded (use it to mask incomplete units)."""
        return self.image_done & ~self._read("failed")

    # -- arrays ---------------------------------------------------------------------

    def _data_array(self, group: Any, name: str, layer: str) -> xr.DataArray:
        import dask.array as da
        import xarray as xr

        with quiet_zarr():
            arr = group[name]
            dims = list(arr.metadata.dimension_names)
            coords: dict[str, Any] = {
                "image": np.arange(self.n_images),
                "image_id": ("image", self.image_ids),
                "label": ("image", self.labels),
            }
            for cname in str(arr.attrs.get("coordinates", "")).split():
                if cname in group and cname not in coords:
                    c = group[cname]
                    if not set(c.metadata.dimension_names) <= set(dims):
                        continue  # e.g. token coords of an attention group (query/key dims)
                    values = np.asarray(c[...])
                    if values.dtype.kind not in "biuf":
                        values = np.array(values.tolist(), dtype=str)
                    coords[cname] = (list(c.metadata.dimension_names), values)
            for dim in dims[1:]:
                if dim in group and dim not in coords:
                    coords[dim] = np.asarray(group[dim][...])
            data = da.from_zarr(arr, name=f"vitcnn-{self.store.url}-{self.name}-{layer}-{name}")
            attrs = dict(group.attrs) if group is not self.group else {}
        attrs.update(run=self.name, layer=layer)
        return xr.DataArray(data, dims=dims, coords=coords, name=name, attrs=attrs)

    def __getitem__(self, layer: str) -> xr.DataArray:
        """Activations of ``layer`` as a lazy DataArray."""
        if layer not in self.layers:
            raise RunNotFoundError(self._unknown(layer, self.layers, "layer"))
        return self._data_array(self.group[layer], "activation", layer)

    def attention(self, layer: str) -> xr.DataArray:
        """Attention probabilities ``(image, head, query, key)`` of an attention module."""
        if layer not in self.attention_layers:
            raise RunNotFoundError(self._unknown(layer, self.attention_layers, "attention layer"))
        da_ = self._data_array(self.group[layer], "attention", layer)
        for axis in ("query", "key"):
            for cname in ("token_kind", "token_y", "token_x"):
                if cname in self.group[layer]:
                    da_ = da_.assign_coords(
                        {
                            f"{axis}_{cname.removeprefix('token_')}": (
                                axis,
                                self._read(f"{layer}/{cname}"),
                            )
                        }
                    )
        return da_

    @property
    def inputs(self) -> xr.DataArray:
        """Preprocessed model inputs ``(image, input_y, input_x, rgb)`` (``--inputs``)."""
        if "input" not in self.group:
            raise RunNotFoundError(f"run {self.name!r} has no stored inputs; extract with --inputs")
        return self._data_array(self.group, "input", "input")

    def _unknown(self, layer: str, known: list[str], what: str) -> str:
        import difflib

        near = difflib.get_close_matches(layer, known, n=4, cutoff=0.5)
        hint = f"; near: {', '.join(near)}" if near else f"; stored: {', '.join(known[:8])}"
        return f"no {what} {layer!r} in run {self.name!r}{hint}"

    def to_datatree(self) -> xr.DataTree:
        """The run as an :class:`xarray.DataTree` read by xarray's own zarr backend."""
        import xarray as xr

        with quiet_zarr():
            return xr.open_datatree(self.store.url, engine="zarr", group=self.name)

    def nbytes_stored(self) -> int:
        """Bytes the run takes in the store (compressed)."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.store.url)
        return int(fs.du(f"{path.rstrip('/')}/{self.name}"))

    @property
    def analyses(self) -> list[str]:
        """Names of the analysis results stored under this run (``<run>/_analyses/``)."""
        from vitcnn_store.store.analyses import analysis_names

        return analysis_names(self)

    def analysis(self, name: str) -> xr.Dataset:
        """One stored analysis result, loaded (see :mod:`vitcnn_store.store.analyses`)."""
        from vitcnn_store.store.analyses import read_analysis

        return read_analysis(self, name)

    def __repr__(self) -> str:
        done = self.done
        return (
            f"<vitcnn_store.Run {self.name!r} model={self.attrs.get('model')} "
            f"images={self.n_images} layers={len(self.layers)} units={int(done.sum())}/{done.size}>"
        )
