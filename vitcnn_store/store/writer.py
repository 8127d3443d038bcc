"""Create runs from a template and write work units (docs/format.md).

The driver calls :func:`create_run` once, up front, with the shape of every
array (from a dry-run forward pass): workers never create or resize arrays.
The run's creation marker (``vitcnn_store.created``) is written last, so a run
whose creation was interrupted is "broken" to every reader, never half-valid.
Workers use :class:`RunWriter` to write whole chunks — one work unit is one
chunk along ``image`` of every array — and set ``done[unit]`` last, so a unit
is either complete and flagged or absent. Writes are idempotent: rewriting a
unit overwrites the same chunk objects with the same bytes.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitcnn_store._version import FORMAT_VERSION
from vitcnn_store.errors import (
    DtypeOverflowError,
    ImageSetError,
    NonFiniteActivationError,
    StoreError,
)
from vitcnn_store.store.chunks import unit_arrays
from vitcnn_store.store.codecs import COMPRESSIONS, checksummed
from vitcnn_store.store.index import (
    RECORD,
    RECORD_FIELDS,
    consolidate_run,
    lean_consolidated,
    register_run,
    unit_fingerprint,
)
from vitcnn_store.store.layout import (
    ANALYSES,
    CREATED_ATTR,
    FORMAT_ATTR,
    IMAGE_COORDS,
    LABEL_FILL,
    RUN_ARRAYS,
    check_layer_name,
    check_name,
    open_root,
    quiet_zarr,
    store_io,
    unit_bounds,
    zarr_store,
)
from vitcnn_store.store.manifest import MANIFEST_ATTR, build_manifest

__all__ = [
    "COMPRESSIONS",
    "ArraySpec",
    "RunWriter",
    "check_peaks",
    "consolidate",
    "coord_chunk",
    "create_run",
    "restore_run",
    "write_coordinate",
]

FLOAT16_MAX = float(np.finfo(np.float16).max)
INT64 = np.iinfo(np.int64)
# Coordinate arrays are written once, at creation: big chunks (whole units each).
_COORD_CHUNK_IMAGES = 65536
# Groups of a run created at once (each zarr call mostly waits for its write).
_CREATE_THREADS = 8


@dataclass(frozen=True)
class ArraySpec:
    """One image-indexed array of a run, described without its image axis.

    ``group`` is the layer path (``""`` for arrays directly under the run);
    ``coords`` are the array's own coordinate arrays, ``{name: (dims, values)}``,
    each over dims of the array; ``attrs`` are the group's attributes.
    """

    group: str
    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    coords: Mapping[str, tuple[tuple[str, ...], np.ndarray]] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}" if self.group else self.name


def _json_safe(attrs: Mapping[str, Any]) -> dict[str, Any]:
    # Attributes are plain JSON, never pickles; fail early on anything else.
    return dict(json.loads(json.dumps(dict(attrs))))


def coord_chunk(n_images: int, chunk: int) -> int:
    """Chunk length of coordinate arrays along ``image``: whole units, about 64k images.

    Examples
    --------
    >>> coord_chunk(100, 32), coord_chunk(10**6, 32)
    (128, 65536)
    """
    units = max(1, _COORD_CHUNK_IMAGES // chunk)
    return min(units * chunk, -(-n_images // chunk) * chunk)


def _check_labels(labels: Sequence[int]) -> np.ndarray:
    bad = [v for v in labels if not (-1 <= int(v) <= INT64.max)]
    if bad:
        raise ImageSetError(
            f"label {bad[0]} is out of range: labels are integers from -1 (unknown) "
            f"to {INT64.max}; fix the manifest"
        )
    return np.asarray([int(v) for v in labels], dtype=np.int64)


def _check_specs(arrays: Sequence[ArraySpec]) -> None:
    for spec in arrays:
        if spec.group:
            check_layer_name(spec.group)
        if spec.group in RUN_ARRAYS or spec.group.startswith((ANALYSES, "_")):
            raise StoreError(f"layer name {spec.group!r} collides with a run array name")
        for cname, (cdims, _) in spec.coords.items():
            # A coordinate over dims the array lacks would be a wrong `coordinates` attr.
            if not set(cdims) <= set(spec.dims):
                raise StoreError(
                    f"{spec.key}: coordinate {cname} has dims {cdims}, not in {spec.dims}"
                )


def _layout(
    image_ids: Sequence[str],
    labels: Sequence[int],
    chunk: int,
    dtype: str,
    arrays: Sequence[ArraySpec],
    compression: str,
    image_sha256: Sequence[str] | None,
) -> _Layout:
    """Check a run's inputs before any write and gather them."""
    n = len(image_ids)
    if n == 0:
        raise StoreError("cannot create a run over zero images")
    label_values = _check_labels(labels)
    hashes = list(image_sha256) if image_sha256 is not None else [""] * n
    if len(hashes) != n:
        raise StoreError(f"{len(hashes)} image hashes for {n} images")
    checksummed(compression)  # refuses an unknown compression before any write
    _check_specs(arrays)
    layout = _Layout(
        n=n,
        chunk=chunk,
        dtype=dtype,
        compression=compression,
        arrays=list(arrays),
        image_values={
            "image": np.arange(n, dtype=np.int64),
            "image_id": np.asarray(list(image_ids), dtype=object),
            "label": label_values,
            "image_sha256": np.asarray(hashes, dtype=object),
        },
    )
    return layout


@dataclass
class _Layout:
    """Everything a run's arrays are made from (checked by :func:`_layout`)."""

    n: int
    chunk: int
    dtype: str
    compression: str
    arrays: list[ArraySpec]
    image_values: dict[str, np.ndarray]
    created: list[str] = field(default_factory=list)  # paths made by populate()
    made: list[tuple[str, Any]] = field(default_factory=list)  # (path, array) made
    copies: _Copies = field(default_factory=lambda: _Copies())

    def _made(self, group: Any, name: str, array: Any) -> None:
        path = f"{group.path}/{name}"
        self.created.append(path)  # list.append: safe from populate()'s threads
        self.made.append((path, array))

    def coord(
        self,
        group: Any,
        cname: str,
        values: np.ndarray,
        dims: Sequence[str],
        cshape: Any,
        restore: bool,
        fresh: bool,
    ) -> None:
        if not fresh and cname in group:
            if restore and not _readable(group[cname]):
                group[cname][...] = values  # a damaged coordinate: its values are known
                self.created.append(f"{group.path}/{cname}")
            return
        if not fresh:
            self._made(group, cname, write_coordinate(group, cname, values, dims, cshape))
            return
        self._made(group, cname, self.copies.write(group, cname, values, dims, cshape))

    def image_coords(self, group: Any, restore: bool, fresh: bool) -> None:
        cchunk = coord_chunk(self.n, self.chunk)
        for cname, values in self.image_values.items():
            self.coord(group, cname, values, ("image",), (cchunk,), restore, fresh)

    def populate(self, run: Any, restore: bool = False, fresh: bool = False) -> bool:
        """Create every array of ``run`` that is absent; True if a unit array was made.

        With ``restore``, coordinate arrays that exist but cannot be read are
        rewritten (their values are known here). ``fresh``: ``run`` was just
        created empty, so nothing is looked up before it is made. Groups are
        made concurrently: every zarr call waits for its own small write, and a
        run of a few dozen layers makes hundreds of arrays.
        """
        by_group: dict[str, list[ArraySpec]] = {}
        for spec in self.arrays:
            by_group.setdefault(spec.group, []).append(spec)
        run_specs = by_group.pop("", [])
        with ThreadPoolExecutor(_CREATE_THREADS, thread_name_prefix="vitcnn-create") as pool:
            futures = [pool.submit(self._run_arrays, run, run_specs, restore, fresh)]
            futures += [
                pool.submit(self._layer, run, name, specs, restore, fresh)
                for name, specs in by_group.items()
            ]
            made = [f.result() for f in futures]  # every one, so that the first error raises
        return any(made)

    def _run_arrays(self, run: Any, specs: list[ArraySpec], restore: bool, fresh: bool) -> bool:
        """The run's own arrays: image coordinates, unit flags, failures, the input."""
        n, chunk = self.n, self.chunk
        image_attrs = {"coordinates": "image_id label image_sha256"}
        unit_made = False
        self.image_coords(run, restore, fresh)
        if fresh or "done" not in run:
            done = run.create_array(
                "done",
                shape=(len(unit_bounds(n, chunk)),),
                chunks=(1,),
                dtype=bool,
                fill_value=False,
                dimension_names=["unit"],
                compressors=checksummed("none"),
                attributes={"long_name": "unit fully written (all arrays)"},
            )
            self.made.append((f"{run.path}/done", done))
            unit_made = True
        if fresh or RECORD not in run:
            # Per unit: stored bytes and a fingerprint of its chunks (store/index.py). Not a
            # "unit array": a resumed older run gains it without rewriting its units.
            record = run.create_array(
                RECORD,
                shape=(len(unit_bounds(n, chunk)), len(RECORD_FIELDS)),
                chunks=(1, len(RECORD_FIELDS)),
                dtype="int64",
                fill_value=0,
                dimension_names=["unit", "unit_field"],
                compressors=checksummed("none"),
                attributes={
                    "long_name": "per unit: stored bytes of its chunks, and a "
                    "fingerprint of their lengths and crc32c (0: not recorded)",
                    "fields": list(RECORD_FIELDS),
                },
            )
            self.made.append((f"{run.path}/{RECORD}", record))
        for key, kind, fill in (("failed", bool, False), ("failure", str, "")):
            if fresh or key not in run:
                arr = run.create_array(
                    key,
                    shape=(n,),
                    chunks=(chunk,),
                    dtype=kind,
                    fill_value=fill,
                    dimension_names=["image"],
                    attributes=image_attrs,
                    compressors=checksummed("zstd"),
                )
                self.made.append((f"{run.path}/{key}", arr))
                unit_made = True
        for spec in specs:
            unit_made |= self._array(run, spec, restore, fresh)
        return unit_made

    def _layer(
        self, run: Any, name: str, specs: list[ArraySpec], restore: bool, fresh: bool
    ) -> bool:
        """One layer's group: its attributes (one write), coordinates and arrays."""
        attrs: dict[str, Any] = {}
        for spec in specs:
            attrs.update(_json_safe(spec.attrs))
        if fresh:
            group = run.create_group(name, attributes=attrs)
        else:
            group = run.require_group(name)
            group.update_attributes(attrs)
        self.image_coords(group, restore, fresh)
        unit_made = False
        for spec in specs:
            unit_made |= self._array(group, spec, restore, fresh)
        return unit_made

    def _array(self, group: Any, spec: ArraySpec, restore: bool, fresh: bool) -> bool:
        own = []
        for cname, (cdims, values) in spec.coords.items():
            if cname not in cdims:
                own.append(cname)  # dimension coordinates need no `coordinates` entry
            self.coord(group, cname, values, cdims, values.shape, restore, fresh)
        if not fresh and spec.name in group:
            return False
        arr = group.create_array(
            spec.name,
            shape=(self.n, *spec.shape),
            chunks=(self.chunk, *spec.shape),
            dtype=self.dtype,
            fill_value=np.nan,
            compressors=checksummed(self.compression),
            dimension_names=["image", *spec.dims],
            attributes={"coordinates": " ".join([*own, *IMAGE_COORDS[1:]])},
        )
        self.created.append(spec.key)
        self.made.append((f"{group.path}/{spec.name}", arr))
        return True


class _Copies:
    """Coordinate arrays of a new run, written once per content and copied after that.

    Every layer group holds the same image coordinates, and layers of one shape
    the same token or pixel coordinates: the first such array is made by zarr,
    its objects (metadata document and chunks, a few small files) are kept, and
    every identical one is those bytes written under its own path, all at once —
    the same objects zarr would have written, at a fraction of the calls.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[tuple[Any, ...], Future[tuple[Any, dict[str, Any]]]] = {}

    def write(
        self, group: Any, cname: str, values: np.ndarray, dims: Sequence[str], chunks: Sequence[int]
    ) -> Any:
        """Create ``group/cname`` holding ``values``; returns an array with its metadata."""
        content = np.asarray(values, dtype=str) if values.dtype.kind in "OUT" else values
        key = (
            cname,
            tuple(dims),
            tuple(chunks),
            values.dtype.str,
            values.shape,
            hashlib.sha256(np.ascontiguousarray(content).tobytes()).hexdigest(),
        )
        with self._lock:
            source = self._sources.get(key)
            first = source is None
            if first:
                source = self._sources[key] = Future()
        assert source is not None
        if first:
            try:
                arr = write_coordinate(group, cname, values, dims, chunks)
                source.set_result((arr, _objects(arr)))
            except BaseException as e:
                source.set_exception(e)
                raise
            return arr
        arr, objects = source.result()
        _put_objects(group.store_path.store, f"{_path_of(group)}{cname}", objects)
        return arr


def _path_of(group: Any) -> str:
    path = str(group.store_path.path)
    return f"{path}/" if path else ""


def _objects(array: Any) -> dict[str, Any]:
    """Every stored object of ``array``: ``{key relative to it: bytes buffer}``."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    store, prefix = array.store_path.store, f"{array.store_path.path}/"

    async def read() -> dict[str, Any]:
        keys = [k async for k in store.list_prefix(prefix)]
        values = await asyncio.gather(
            *(store.get(k, prototype=default_buffer_prototype()) for k in keys)
        )
        return {k[len(prefix) :]: v for k, v in zip(keys, values, strict=True)}

    return sync(read())


def _put_objects(store: Any, path: str, objects: Mapping[str, Any]) -> None:
    """Write ``objects`` (from :func:`_objects`) under ``path``, all at once."""
    from zarr.core.sync import sync

    async def write() -> None:
        await asyncio.gather(*(store.set(f"{path}/{k}", v) for k, v in objects.items()))

    sync(write())


_FILLS: dict[str, Any] = {"image": -1, "label": LABEL_FILL, "image_id": "", "image_sha256": ""}


def write_coordinate(
    group: Any, cname: str, values: np.ndarray, dims: Sequence[str], chunks: Sequence[int]
) -> Any:
    """Create coordinate array ``cname`` of ``group`` holding ``values``; returns it."""
    is_str = values.dtype.kind in "OUT"
    default: Any = "" if is_str else np.nan if values.dtype.kind == "f" else -1
    arr = group.create_array(
        cname,
        shape=values.shape,
        dtype=str if is_str else values.dtype,
        chunks=tuple(chunks),
        dimension_names=list(dims),
        compressors=checksummed("zstd"),
        fill_value=_FILLS.get(cname, default),
    )
    arr[...] = values
    return arr


def _readable(array: Any) -> bool:
    try:
        array[...]
    except Exception:
        return False
    return True


def create_run(
    url: str,
    name: str,
    *,
    image_ids: Sequence[str],
    labels: Sequence[int],
    chunk: int,
    dtype: str,
    arrays: Sequence[ArraySpec],
    attrs: Mapping[str, Any],
    compression: str = "lz4",
    image_sha256: Sequence[str] | None = None,
) -> None:
    """Create run ``name`` with every array it will ever hold (replacing any old one).

    ``image_sha256`` is each image's content hash (``""`` when unknown). The
    manifest of the run's arrays and the creation marker are written last, in
    one metadata write; callers decide beforehand (holding the run's lease)
    whether an old run may be replaced. The store's consolidated metadata is
    retaken only when an old run was replaced (its snapshot would describe arrays
    that are gone); a new run joins it when its job consolidates at the end.
    """
    import zarr

    check_name(name)
    layout = _layout(image_ids, labels, chunk, dtype, arrays, compression, image_sha256)
    with quiet_zarr(), store_io(url), zarr.config.set({"array.write_empty_chunks": True}):
        root = open_root(url, mode="a", create=True)
        if root.attrs.get(FORMAT_ATTR) != FORMAT_VERSION:
            # A format-1 store holding a format-2 run: older readers must refuse it.
            root.attrs[FORMAT_ATTR] = FORMAT_VERSION
        register_run(url, name)  # before the group: an interrupted creation is listed, broken
        if name in root:
            del root[name]
        provenance = _json_safe({**attrs, "format": FORMAT_VERSION, "created_at": _now()})
        run = root.create_group(name, attributes=provenance)  # one metadata write
        layout.populate(run, fresh=True)
        made = [(path.removeprefix(f"{run.path}/"), arr) for path, arr in layout.made]
        # Last: every array exists, so readers may now trust the run.
        run.update_attributes({MANIFEST_ATTR: build_manifest(run, made), CREATED_ATTR: True})
    consolidate(url, name)  # the run's own zarr.json names what it holds (no listing)


def restore_run(
    url: str,
    name: str,
    *,
    image_ids: Sequence[str],
    labels: Sequence[int],
    chunk: int,
    dtype: str,
    arrays: Sequence[ArraySpec],
    compression: str = "lz4",
    image_sha256: Sequence[str] | None = None,
) -> list[str]:
    """Recreate what an existing run lost, from the job that resumes it; returns the paths.

    Arrays (or whole layers) that are missing are created again as at creation;
    coordinate arrays that cannot be read are rewritten (the resuming job has
    their values: its settings and images match the run's). When any array
    written by work units had to be made, every unit's ``done`` flag is cleared,
    so the job rewrites them all. The result must match the run's manifest.
    Callers hold the run's lease and have checked that the run is theirs to resume.
    """
    import zarr

    from vitcnn_store.store.manifest import manifest_problems

    layout = _layout(image_ids, labels, chunk, dtype, arrays, compression, image_sha256)
    with quiet_zarr(), store_io(url), zarr.config.set({"array.write_empty_chunks": True}):
        run: Any = zarr.open_group(
            zarr_store(url), path=name, mode="r+", zarr_format=3, use_consolidated=False
        )
        if layout.populate(run, restore=True):
            run["done"][...] = False
        problems = manifest_problems(run, dict(run.attrs))
    if problems:
        path, what = problems[0]
        raise StoreError(
            f"run {name!r}: {path} is {what} even after restoring it from this job's template; "
            "use --overwrite to re-extract the run"
        )
    if layout.created:
        consolidate(url, name)
    return [p.removeprefix(f"{name}/") for p in layout.created]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def consolidate(url: str, *runs: str) -> None:
    """Consolidate the metadata of ``runs`` (each run's zarr.json: what readers open), then
    the store's root (what plain xarray opens). A snapshot: call once arrays exist, and
    only for runs this job may write (store/index.py)."""
    import zarr

    for run in dict.fromkeys(runs):
        consolidate_run(url, run)
    with quiet_zarr(), store_io(url):
        group = zarr.consolidate_metadata(zarr_store(url), zarr_format=3)
    lean_consolidated(url, "", group)


def check_peaks(peaks: Iterable[tuple[str, float]], dtype: str) -> None:
    """Refuse NaN/inf activations, and values beyond float16 when storing float16.

    ``peaks`` pairs an array key (``layer/activation``) with its largest magnitude.
    Float16 overflow is an error for that layer, never a silent inf.
    """
    for key, peak in peaks:
        layer = key.rsplit("/", 1)[0]
        if np.isnan(peak):
            raise NonFiniteActivationError(
                f"layer {layer!r} produced NaN activations; check the weights or checkpoint"
            )
        # Peaks taken after the float16 cast show an overflow as inf.
        if dtype == "float16" and peak > FLOAT16_MAX:
            raise DtypeOverflowError(
                f"layer {layer!r} has values up to {peak:.4g}, beyond float16's "
                f"{FLOAT16_MAX:g}; extract with --dtype float32"
            )
        if np.isinf(peak):
            raise NonFiniteActivationError(
                f"layer {layer!r} produced inf activations; check the weights or checkpoint"
            )


class RunWriter:
    """Writes whole work units of one run. Safe to use from several threads."""

    def __init__(self, url: str, run: str) -> None:
        import zarr

        from vitcnn_store.store.index import CountingStore

        self.url = url
        self.run = run
        open_root(url, mode="r+")  # refuses what is not a store, with one line
        # Every chunk written is counted (length and crc32c): the unit's record.
        self._store = CountingStore(url)
        root: Any = zarr.open_group(self._store, mode="r+", zarr_format=3, use_consolidated=False)
        # Skip zarr's scan of every chunk for "all fill value" before writing it: our
        # chunks are never empty, and the scan costs as much as the compression. It
        # also means every written unit has every chunk object, which verify checks.
        with quiet_zarr(), zarr.config.set({"array.write_empty_chunks": True}):
            self.group = root[run]
            self.chunk = int(self.group.attrs["chunk_size"])
            self.n_images = int(self.group["image"].shape[0])
            # The arrays a unit writes: the one rule `vitcnn verify` and `ls` check against.
            self._arrays: dict[str, Any] = dict(unit_arrays(self.group))
            self.done = self.group["done"]
            self.record = self.group.get(RECORD, None)

    @property
    def units(self) -> list[tuple[int, int]]:
        return unit_bounds(self.n_images, self.chunk)

    def image_sha256(self, start: int, stop: int) -> list[str] | None:
        """The content hashes the run recorded for images ``start:stop`` (None: none kept)."""
        with quiet_zarr(), store_io(self.url):
            if "image_sha256" not in self.group:
                return None
            return [str(v) for v in np.asarray(self.group["image_sha256"][start:stop]).tolist()]

    def pending_units(self) -> list[int]:
        """Units not yet flagged done."""
        with quiet_zarr(), store_io(self.url):
            done = np.asarray(self.done[:])
        return [int(u) for u in np.flatnonzero(~done)]

    def write_unit(
        self,
        unit: int,
        values: Mapping[str, np.ndarray],
        failed: np.ndarray,
        failure: Sequence[str],
    ) -> None:
        """Write every array of ``unit`` (keys like ``blocks.3/activation``), then flag it done."""
        import zarr

        start, stop = self.units[unit]
        expected = set(self._arrays)
        given = set(values) | {"failed", "failure"}
        if given != expected:
            raise StoreError(f"unit {unit}: arrays {sorted(expected ^ given)} missing or unknown")
        for key, v in values.items():
            arr = self._arrays[key]
            if v.shape != (stop - start, *arr.shape[1:]):
                raise StoreError(f"unit {unit}: {key} has shape {v.shape}, not chunk-aligned")
        with quiet_zarr(), store_io(self.url), zarr.config.set({"array.write_empty_chunks": True}):
            for key, v in values.items():
                self._arrays[key][start:stop] = v
            self._arrays["failed"][start:stop] = np.asarray(failed, dtype=bool)
            self._arrays["failure"][start:stop] = np.asarray(list(failure), dtype=object)
            if self.record is not None:
                self.record[unit] = self._record(unit)
            # Last: the flag says every array of the unit is on disk.
            self.done[unit] = True

    def _record(self, unit: int) -> np.ndarray:
        """``[bytes, fingerprint]`` of the chunks unit ``unit`` just wrote."""
        from vitcnn_store.store.chunks import chunk_key

        written = self._store.written
        chunks = {}
        for key, arr in self._arrays.items():
            rest = (0,) * (len(arr.shape) - 1)
            full = f"{self.run}/{key}/{chunk_key(arr, (unit, *rest))}"
            seen = written.pop(full, None)
            if seen is not None:
                chunks[key] = seen
        return np.asarray(unit_fingerprint(chunks), dtype=np.int64)
