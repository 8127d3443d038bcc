"""Read a store: :func:`open_store` → :class:`Store` → :class:`Run` → lazy DataArrays.

Arrays come back as :class:`xarray.DataArray` backed by dask, labelled with the
run's ``image``, ``image_id``, ``label`` and ``image_sha256`` coordinates and the
layer's own coordinates; nothing is read until computed. Every read checks what
it reads: a damaged or missing chunk of a done unit raises
:class:`~vitcnn_store.errors.DamagedDataError` naming run, layer and unit, and a
run whose creation was interrupted is refused with
:class:`~vitcnn_store.errors.BrokenRunError`. The same store opens without this
package through ``xarray.open_datatree(url, engine="zarr")``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.errors import BrokenRunError, DamagedDataError, RunNotFoundError
from vitcnn_store.store.checked import (
    CheckedArray,
    checked_dask,
    damage_error,
    read_checked,
    read_many,
)
from vitcnn_store.store.layout import (
    IMAGE_COORDS,
    filesystem,
    is_local,
    open_root,
    quiet_zarr,
    unit_bounds,
    use_storage_options,
    zarr_store,
)
from vitcnn_store.store.runs import RunEntry, list_runs, run_entry, run_format

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["Run", "Store", "open_store"]

# The arrays a writer updates as units land (unit_record: see store.index.RECORD).
_PROGRESS = frozenset({"done", "failed", "failure", "unit_record"})


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """Open the store at ``url`` (a local path or any fsspec URL) for reading.

    ``storage_options`` are fsspec's keyword arguments for the URL's file system
    (e.g. ``{"endpoint_url": "http://minio:9000", "key": ..., "secret": ...}`` for
    S3-compatible storage); they are used for every later access to this store in
    this process. Nothing is listed: runs, layers and results come from metadata
    the writers record, so a plain HTTP server that cannot list folders serves
    a store (``open_store("http://host/acts.zarr")``).

    Examples
    --------
    >>> store = open_store("acts.zarr")  # doctest: +SKIP
    >>> store.runs  # doctest: +SKIP
    ['r50', 'vitb16']
    >>> x = store["vitb16"]["blocks.3"]  # doctest: +SKIP
    """
    return Store(str(url), storage_options)


def as_store(store: Store | str) -> Store:
    """``store`` itself, or the store at ``store`` (a URL) opened: for entry points that
    take either, so that a command opens its store once and passes the handle down."""
    return store if isinstance(store, Store) else open_store(store)


class Store:
    """A vitcnn store: a zarr v3 group of runs, opened once.

    The handle owns the store's location, its storage options and its open root
    group; pass it (or its runs) down instead of re-opening the URL.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url).rstrip("/") if "://" in str(url) else str(url)
        use_storage_options(self.url, storage_options)
        self.storage_options = dict(storage_options or {})
        self._root = open_root(self.url, mode="r")

    @property
    def root(self) -> Any:
        """The store's root zarr group (opened read-only)."""
        return self._root

    def writable_root(self) -> Any:
        """The root group opened for writing (opened anew on each call: it refuses a
        read-only or foreign location with one line, at the moment a writer needs it)."""
        return open_root(self.url, mode="r+")

    @property
    def fs(self) -> Any:
        """The store's fsspec file system, with its storage options (one instance per
        URL and options in this process: no new connection pool per call)."""
        return filesystem(self.url)[0]

    @property
    def path(self) -> str:
        """The store's location as :attr:`fs` names it."""
        return str(filesystem(self.url)[1]).rstrip("/")

    @property
    def zarr_store(self) -> Any:
        """What zarr opens for this store: its path (local) or a shared ``FsspecStore``."""
        return zarr_store(self.url)

    def entry(self, run: str) -> RunEntry | None:
        """The run ``run`` as listed by :attr:`entries` (None: no such run)."""
        hidden = not run or run.startswith(("_", ".")) or "/" in run
        return None if hidden else run_entry(self._root, run, self.url)

    @property
    def entries(self) -> list[RunEntry]:
        """Every run group, created or broken (see :mod:`vitcnn_store.store.runs`)."""
        return list_runs(self.url, self._root)

    @property
    def runs(self) -> list[str]:
        """Names of the fully created runs, sorted (damaged ones included: opening one
        says what it lost)."""
        return [e.name for e in self.entries if e.created]

    @property
    def damaged(self) -> dict[str, str]:
        """Created runs that lost arrays or layers of their manifest: name → what."""
        return {e.name: e.problem for e in self.entries if e.damaged}

    @property
    def broken(self) -> dict[str, str]:
        """Runs whose creation was interrupted (or whose metadata is unreadable): name → why."""
        return {e.name: e.problem for e in self.entries if not e.created}

    def __contains__(self, run: str) -> bool:
        return run in self.runs

    def __iter__(self) -> Iterator[str]:
        return iter(self.runs)

    def __getitem__(self, run: str) -> Run:
        entry = self.entry(run)
        if entry is None:
            known = ", ".join(self.runs) or "none"
            raise RunNotFoundError(f"no run {run!r} in {self.url} (runs: {known})")
        if not entry.created:
            raise BrokenRunError(
                f"run {run!r} in {self.url} is broken ({entry.problem}): recover it with "
                "`vitcnn extract ... --overwrite` or `--resume`"
            )
        if entry.damaged:
            raise DamagedDataError(
                f"run {run!r} in {self.url} is {entry.problem}: see `vitcnn verify`; "
                "`vitcnn extract ... --resume` restores it"
            )
        return Run(self, run, entry.group)

    def __repr__(self) -> str:
        return f"<vitcnn_store.Store {self.url} runs={self.runs}>"


class Run:
    """One model + weights + preprocessing over one image set, as stored."""

    def __init__(self, store: Store, name: str, group: Any = None) -> None:
        self.store = store
        self.name = name
        if group is None:
            with quiet_zarr():
                group = store._root[name]
        self.group = group
        # Progress arrays read once, in a pinned view (see pinned()); None: read live.
        self._progress: dict[str, np.ndarray] | None = None

    def pinned(self) -> Run:
        """This run with its progress (``done``, ``failed``, unit records) read once.

        A plain :class:`Run` re-reads progress on every access, so a reader watching
        a live extraction sees units land. A job that derives several things from
        progress — the usable images, the Gram cache's key, the result's provenance —
        wants them from one reading: consistent with each other, and one request each
        on object storage instead of one per use.
        """
        view = copy.copy(self)
        view._progress = {}
        return view

    def preload(self, keys: Sequence[str] = ("done", "failed", "image_id")) -> None:
        """Read the run-level arrays ``keys`` (progress, ``image_id``) at once: on object
        storage one round of concurrent requests instead of one round each as a job
        reaches them. Progress is kept only by a :meth:`pinned` view; what fails here is
        read again, and its damage named, where it is used."""
        wanted = [
            k for k in keys if k == "image_id" or (self._progress is not None and k in _PROGRESS)
        ]
        wanted = [k for k in wanted if k not in (self._progress or {})]
        if "image_ids" in self.__dict__ and "image_id" in wanted:
            wanted.remove("image_id")
        arrays = []
        for key in wanted:
            try:
                with quiet_zarr():
                    arrays.append((key, self.group[key]))
            except Exception:
                continue  # absent (unit_record of an older run) or unreadable: read where used
        got = read_many([(arr, slice(None)) for _, arr in arrays])
        for (key, _), values in zip(arrays, got, strict=True):
            if isinstance(values, BaseException):
                continue
            if key == "image_id":
                self.__dict__["image_ids"] = np.array(np.asarray(values).tolist(), dtype=str)
            elif self._progress is not None:
                self._progress[key] = np.asarray(values).copy()

    # -- metadata -------------------------------------------------------------------

    @cached_property
    def attrs(self) -> dict[str, Any]:
        """Provenance: model, weights, preprocessing, image set, layers, versions."""
        return dict(self.group.attrs)

    @property
    def format(self) -> int:
        """Store format the run was written in (1 or 2)."""
        return run_format(self.attrs)

    @property
    def chunk_size(self) -> int:
        return int(self.attrs["chunk_size"])

    def _holding(self, array: str) -> list[str]:
        """Layer groups holding ``array``, in forward order."""
        try:
            with quiet_zarr():
                groups = self._layer_groups()
                names = [k for k, g in groups.items() if array in g]
                return sorted(names, key=lambda k: groups[k].attrs.get("depth_index", 0))
        except Exception as e:  # a corrupt layer zarr.json: name the run, not a traceback
            raise damage_error(self.store.url, self.name, "-", e, what="metadata") from e

    def _layer_groups(self) -> dict[str, Any]:
        """Layer groups of the run: from its consolidated metadata (free), else a listing,
        else (a server that cannot list, a run written before per-run consolidation)
        the layers its manifest names."""
        if "_groups" not in self.__dict__:
            try:
                found = dict(self.group.groups())
            except (FileNotFoundError, NotImplementedError):
                from vitcnn_store.store.manifest import manifest_arrays

                paths = manifest_arrays(self.attrs) or {}
                found = {}
                for top in sorted({p.split("/", 1)[0] for p in paths if "/" in p}):
                    try:
                        found[top] = self.group[top]
                    except KeyError:
                        continue
            self.__dict__["_groups"] = {
                k: g for k, g in found.items() if not k.startswith(("_", "."))
            }
        return dict(self.__dict__["_groups"])

    @cached_property
    def layers(self) -> list[str]:
        """Stored layer paths in forward order."""
        return self._holding("activation")

    @cached_property
    def attention_layers(self) -> list[str]:
        """Attention module paths with stored probabilities, in forward order."""
        return self._holding("attention")

    def _read(self, key: str) -> np.ndarray:
        if self._progress is not None and key in self._progress:
            return self._progress[key].copy()
        with quiet_zarr():
            array = self.group[key]
        values = read_checked(array, self.store.url, self.name, key)
        if self._progress is not None and key in _PROGRESS:
            self._progress[key] = values.copy()
        return values

    @cached_property
    def image_ids(self) -> np.ndarray:
        # zarr returns numpy's variable-width StringDType; plain str arrays are friendlier.
        return np.array(self._read("image_id").tolist(), dtype=str)

    @cached_property
    def labels(self) -> np.ndarray:
        return self._read("label")

    @cached_property
    def image_sha256(self) -> np.ndarray:
        """Per image: sha256 of its file (built-ins: of its pixels); ``""`` if unknown."""
        with quiet_zarr():
            present = "image_sha256" in self.group
        if not present:  # format 1
            return np.full(self.n_images, "", dtype=str)
        return np.array(self._read("image_sha256").tolist(), dtype=str)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def done(self) -> np.ndarray:
        """Per work unit: fully written."""
        return self._read("done")

    @property
    def units(self) -> list[tuple[int, int]]:
        """Image ranges of the work units."""
        return unit_bounds(self.n_images, self.chunk_size)

    @property
    def image_done(self) -> np.ndarray:
        """Per image: its unit is fully written."""
        per_unit = self.done
        out = np.zeros(self.n_images, dtype=bool)
        for u, (s, e) in enumerate(self.units):
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
        return self.image_done & ~self._read("failed").astype(bool)

    @cached_property
    def _expected(self) -> np.ndarray:
        # Rows that must hold data, read once per Run: arrays made from this Run
        # check against the units done when it was opened.
        return self.valid

    # -- arrays ---------------------------------------------------------------------

    def _image_coords(self) -> dict[str, Any]:
        return {
            "image": np.arange(self.n_images),
            "image_id": ("image", self.image_ids),
            "label": ("image", self.labels),
            "image_sha256": ("image", self.image_sha256),
        }

    def _coord(self, group: Any, cname: str, layer: str) -> tuple[list[str], np.ndarray]:
        # Coordinates are written once, at creation: read each once per Run.
        cache = self.__dict__.setdefault("_coords", {})
        if (layer, cname) not in cache and any(k[0] != layer for k in cache):
            self._prefetch_coords(cache)  # a second layer: this reader opens many
        if (layer, cname) not in cache:
            cache[(layer, cname)] = self._read_coord(group, cname, layer)
        dims, values = cache[(layer, cname)]
        return list(dims), values

    def prefetch(self, layers: Sequence[str]) -> None:
        """Read the coordinates of ``layers`` at once before opening them (a remote store:
        one round of concurrent requests), instead of every layer's when a second layer
        is opened: for a reader that knows which few layers it opens (an analysis)."""
        self._prefetch_coords(self.__dict__.setdefault("_coords", {}), set(layers))

    def _prefetch_coords(
        self, cache: dict[tuple[str, str], Any], layers: set[str] | None = None
    ) -> None:
        """On a remote store, read the coordinates of every layer (or of ``layers``) at
        once, concurrently: one round of requests instead of one request per coordinate
        per layer. Done when a second layer is opened (``show`` opens them all; a query
        of one layer reads only its own). Only once per Run, only from the consolidated
        metadata; what fails here is read again, one by one, by :meth:`_read_coord`
        (which names the damage)."""
        if is_local(self.store.url):
            return
        if layers is None:
            if self.__dict__.get("_prefetched"):
                return
            self.__dict__["_prefetched"] = True
        skip = {*IMAGE_COORDS, "activation", "attention"}
        wanted: list[tuple[str, str, Any]] = []
        try:
            with quiet_zarr():
                for layer, group in self._layer_groups().items():
                    if layers is not None and layer not in layers:
                        continue
                    if group.metadata.consolidated_metadata is None:
                        return  # no snapshot: listing the groups would cost more than it saves
                    for name, arr in group.arrays():
                        if name not in skip and (layer, name) not in cache:
                            wanted.append((layer, name, arr))
        except Exception:
            return
        got = read_many([(arr, slice(None)) for _, _, arr in wanted])
        for (layer, name, arr), values in zip(wanted, got, strict=True):
            if isinstance(values, BaseException):
                continue
            values = np.asarray(values)
            if values.dtype.kind not in "biuf":
                values = np.array(values.tolist(), dtype=str)
            cache[(layer, name)] = (list(arr.metadata.dimension_names), values)

    def _read_coord(self, group: Any, cname: str, layer: str) -> tuple[list[str], np.ndarray]:
        with quiet_zarr():
            c = group[cname]
            dims = list(c.metadata.dimension_names)
        values = read_checked(c, self.store.url, self.name, f"{layer}/{cname}")
        if values.dtype.kind not in "biuf":
            values = np.array(values.tolist(), dtype=str)
        return dims, values

    def _data_array(self, group: Any, name: str, layer: str) -> xr.DataArray:
        import xarray as xr

        with quiet_zarr():
            arr = group[name]
            dims = list(arr.metadata.dimension_names)
            listed = str(arr.attrs.get("coordinates", "")).split()
            attrs = dict(group.attrs) if group is not self.group else {}
        coords: dict[str, Any] = self._image_coords()
        for cname in listed:
            if cname in coords or cname not in group:
                continue
            cdims, values = self._coord(group, cname, layer)
            if set(cdims) <= set(dims):  # format 1 listed token coords on attention arrays
                coords[cname] = (cdims, values)
        for dim in dims[1:]:
            if dim in group and dim not in coords:
                coords[dim] = self._coord(group, dim, layer)[1]
        checked = CheckedArray(
            arr,
            url=self.store.url,
            run=self.name,
            layer=layer,
            chunk=self.chunk_size,
            expected=self._expected,
        )
        data = checked_dask(checked, f"vitcnn-{self.store.url}-{self.name}-{layer}-{name}")
        attrs.update(run=self.name, layer=layer)
        return xr.DataArray(data, dims=dims, coords=coords, name=name, attrs=attrs)

    def __getitem__(self, layer: str) -> xr.DataArray:
        """Activations of ``layer`` as a lazy DataArray."""
        if layer not in self.layers:
            raise RunNotFoundError(self._unknown(layer, self.layers, "layer"))
        # Built once per Run (analyses open every layer several times; each build makes a
        # dask graph and tokenizes the run's masks); each caller gets its own shallow copy.
        built = self.__dict__.setdefault("_arrays", {})
        if layer not in built:
            built[layer] = self._data_array(self.group[layer], "activation", layer)
        return built[layer].copy(deep=False)

    def attention(self, layer: str) -> xr.DataArray:
        """Attention probabilities ``(image, head, query, key)`` of an attention module."""
        if layer not in self.attention_layers:
            raise RunNotFoundError(self._unknown(layer, self.attention_layers, "attention layer"))
        group = self.group[layer]
        da_ = self._data_array(group, "attention", layer)
        if "query_kind" in da_.coords:
            return da_
        # Format 1: query/key coordinates derive from the group's token coordinates.
        for cname in ("token_kind", "token_y", "token_x"):
            if cname in group:
                values = self._coord(group, cname, layer)[1]
                suffix = cname.removeprefix("token_")
                da_ = da_.assign_coords(
                    {f"query_{suffix}": ("query", values), f"key_{suffix}": ("key", values)}
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

        from vitcnn_store.store.layout import storage_options

        options = storage_options(self.store.url)
        with quiet_zarr():
            return xr.open_datatree(
                self.store.url, engine="zarr", group=self.name, storage_options=options or None
            )

    @property
    def unit_records(self) -> np.ndarray | None:
        """Per unit ``[stored bytes, fingerprint]`` as its writer recorded them
        (``unit_record``; None for runs written before it, 0 where not recorded)."""
        from vitcnn_store.store.index import RECORD

        with quiet_zarr():
            present = RECORD in self.group
        return self._read(RECORD).astype(np.int64) if present else None

    def recorded_bytes(self) -> int | None:
        """Bytes of the run's written units as recorded by their writers (no object is
        listed or stat-ed); None when some done unit has no record (older runs)."""
        records, done = self.unit_records, np.asarray(self.done, dtype=bool)
        if records is None or (records[done, 0] <= 0).any():
            return None
        return int(records[done, 0].sum())

    def nbytes_stored(self) -> int:
        """Bytes the run's units take in the store (compressed): recorded by the writers,
        or, for runs written before records, counted from a listing."""
        recorded = self.recorded_bytes()
        if recorded is not None:
            return recorded
        from vitcnn_store.store.chunks import list_objects

        return sum(list_objects(self.store, self.name).values())

    def missing_chunks(self) -> list[tuple[str, int]]:
        """``(array path, unit)`` of every chunk a done unit should have but the store lacks."""
        from vitcnn_store.store.chunks import list_objects, missing_unit_chunks

        return missing_unit_chunks(self.group, self.done, list_objects(self.store, self.name))

    @property
    def analyses(self) -> list[str]:
        """Names of the complete analysis results stored under this run (``<run>/_analyses/``)."""
        from vitcnn_store.store.analyses import analysis_names

        return analysis_names(self)

    def analysis(self, name: str, key: str | None = None) -> xr.Dataset:
        """Analysis result ``name``, loaded: the latest complete one, or the one whose
        parameters hash to ``key`` (see :mod:`vitcnn_store.store.analyses`)."""
        from vitcnn_store.store.analyses import read_analysis

        return read_analysis(self, name, key)

    def __repr__(self) -> str:
        done = self.done
        return (
            f"<vitcnn_store.Run {self.name!r} model={self.attrs.get('model')} "
            f"images={self.n_images} layers={len(self.layers)} units={int(done.sum())}/{done.size}>"
        )
