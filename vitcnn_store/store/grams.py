"""The Gram cache: ``<run>/_grams/<layer>/gram``, read, written and invalidated here only.

A layer's linear Gram matrix ``K = X Xᵀ`` over all the run's images (features
flattened, or reduced by ``gap``/``cls``) is what every CKA estimator needs, so
it is computed once and kept in the run (docs/format.md, "Gram cache"):

``<run>/_grams/<layer>/``
    ``gram (image_a, image_b)`` for ``flatten``, ``gram_gap``/``gram_cls`` for the
    reductions: float64 (float32 on request; always accumulated in float64),
    chunked in square tiles of ``tile`` images (a multiple of the run's unit
    size). Only the tiles on and above the diagonal are stored: the matrix is
    symmetric, the lower tiles read as the fill value NaN
    (``np.where(np.isnan(g), g.T, g)`` restores them). Stored shifted:
    ``gram[i, j] = (x_i - μ)·(x_j - μ)``, and ``offset`` (``offset_gap``, ...)
    ``(image_a)`` gives ``X Xᵀ = gram + offset[i] + offset[j]``. Rows and columns
    of images that were not usable when it was computed (failed, or in unwritten
    units) are NaN. ``row_mean`` (``row_mean_gap``, ...) ``(image_a)``: each row's
    mean of ``gram`` over the usable images, used to centre tiles before summing them.

The attributes of a Gram say what it was computed from, as the run records
it: the run's creation id (its manifest's ``creation_id``, new at every
``--overwrite``), each work unit's ``done`` flag and content fingerprint (its
``unit_record``: the lengths and crc32c checksums of the unit's chunks, written
by the unit's writer) and the usable images, digested into ``source.digest``.
Nothing depends on where the store lives or when its files were touched: a
copied store (``cp -r``, an upload to a bucket) keeps its Grams, while a
repaired (``done`` cleared), resumed with other bytes, or re-extracted run
changes that state, and :func:`find_gram` then no longer returns the Gram: it
is recomputed. Runs written before unit records fall back to each chunk
object's size, modification time and etag. ``complete`` is set last, after
every tile is written.

Examples
--------
>>> gram_path("vitb16", "blocks.3", "gap")
'vitb16/_grams/blocks.3/gram_gap'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.errors import DamagedDataError
from vitcnn_store.store.checked import damage_error, read_many
from vitcnn_store.store.codecs import checksummed
from vitcnn_store.store.gram_inline import INLINE_MAX, VECTORS_ATTR, decode_vectors, encode_vectors
from vitcnn_store.store.layout import (
    FEATURE_REDUCTIONS,
    GRAM_DTYPES,
    GRAMS,
    open_root,
    quiet_zarr,
    store_io,
    zarr_store,
)

if TYPE_CHECKING:
    from vitcnn_store.store.reader import Run, Store

__all__ = [
    "FEATURE_REDUCTIONS",
    "GRAM_DTYPES",
    "GramInfo",
    "GramReader",
    "create_gram",
    "delete_grams",
    "find_gram",
    "find_grams",
    "finish_gram",
    "gram_layer",
    "gram_path",
    "read_blocks",
    "read_vector_kinds",
    "read_vectors",
    "source_state",
    "source_states",
    "write_tile",
]

STORAGE = "tiles on and above the diagonal; lower tiles are the transpose, not stored (NaN)"
SHIFT = (
    "gram[i, j] = (x_i - mu) . (x_j - mu), mu the mean features of the first tile's usable "
    "images; X Xᵀ = gram + offset[i] + offset[j]; no CKA estimator depends on the shift"
)


def _suffix(reduce: str) -> str:
    if reduce not in FEATURE_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}: use {', '.join(FEATURE_REDUCTIONS)}")
    return "" if reduce == "flatten" else f"_{reduce}"


def gram_path(run: str, layer: str, reduce: str = "flatten") -> str:
    """Path of a layer's Gram array inside the store."""
    return f"{run}/{GRAMS}/{layer}/gram{_suffix(reduce)}"


def _row_mean_path(run: str, layer: str, reduce: str) -> str:
    return f"{run}/{GRAMS}/{layer}/row_mean{_suffix(reduce)}"


def _offset_path(run: str, layer: str, reduce: str) -> str:
    return f"{run}/{GRAMS}/{layer}/offset{_suffix(reduce)}"


@dataclass(frozen=True)
class GramInfo:
    """Where a layer's Gram lives and how it is tiled."""

    url: str
    run: str
    layer: str
    reduce: str
    n: int
    tile: int
    #: The ``zarr.json`` documents of ``gram``, ``row_mean`` and ``offset`` as read by
    #: :func:`find_grams` ("" where absent): readers open the arrays from them, no request.
    meta: tuple[str, str, str] | None = field(default=None, compare=False, repr=False)

    @property
    def path(self) -> str:
        return gram_path(self.run, self.layer, self.reduce)

    @property
    def row_mean_path(self) -> str:
        return _row_mean_path(self.run, self.layer, self.reduce)

    @property
    def offset_path(self) -> str:
        return _offset_path(self.run, self.layer, self.reduce)

    @property
    def panels(self) -> list[tuple[int, int]]:
        """Image ranges of the tile rows."""
        return [(s, min(s + self.tile, self.n)) for s in range(0, self.n, self.tile)]


# -- what a Gram is computed from -----------------------------------------------------


def _chunk_stamps(run: Run, layer: str) -> dict[int, list[Any]]:
    """Per unit: size, modification time and etag of the layer's chunk object (runs
    written before unit records only)."""
    from vitcnn_store.store.chunks import list_object_info

    base = f"{layer}/activation/c"
    out: dict[int, list[Any]] = {}
    for path, info in list_object_info(run.store, run.name, base).items():
        rel = path[len(base) :].lstrip("/")
        try:
            unit = int(rel.split("/")[0])
        except ValueError:
            continue
        stamp = next(
            (
                str(info[k])
                for k in ("mtime", "LastModified", "last_modified", "updated", "created")
                if k in info
            ),
            "",
        )
        etag = str(info.get("ETag", info.get("etag", "")))
        out[unit] = [int(info.get("size", 0) or 0), stamp, etag]
    return out


def source_states(run: Run, layers: list[str], mask: np.ndarray) -> dict[str, dict[str, Any]]:
    """:func:`source_state` of each of ``layers``, reading the run's flags and records once."""
    done = np.asarray(run.done, dtype=bool)
    records = run.unit_records
    return {layer: source_state(run, layer, mask, _read=(done, records)) for layer in layers}


def source_state(
    run: Run, layer: str, mask: np.ndarray, *, _read: tuple[Any, Any] | None = None
) -> dict[str, Any]:
    """What a Gram of ``layer`` over the usable images ``mask`` is computed from.

    The run's creation id, and per work unit its ``done`` flag and content
    fingerprint (``unit_record``), and the usable images, digested into
    ``digest``; a few readable counts beside it. Only what the run records
    enters, so the digest survives copying the store anywhere. For a run with
    units written before records existed, each unit's chunk object's size,
    modification time and etag stand in for the fingerprint.
    """
    from vitcnn_store.store.manifest import MANIFEST_ATTR

    if _read is None:
        done, records = np.asarray(run.done, dtype=bool), run.unit_records
    else:
        done, records = _read
    usable = hashlib.sha256(np.packbits(np.asarray(mask, dtype=bool)).tobytes()).hexdigest()
    manifest = run.attrs.get(MANIFEST_ATTR)
    creation = manifest.get("creation_id") if isinstance(manifest, dict) else None
    recorded = records is not None and creation and bool((records[done, 1] != 0).all())
    if recorded:
        assert records is not None
        units: list[Any] = [[bool(done[u]), int(records[u, 1])] for u in range(done.size)]
        payload = {"creation_id": creation, "units": units, "usable": usable}
        how = "creation id, done flag and content fingerprint (unit_record) per unit"
    else:
        stamps = _chunk_stamps(run, layer)
        units = [[bool(done[u]), *stamps.get(u, [0, "", ""])] for u in range(done.size)]
        payload = {"created_at": run.attrs.get("created_at"), "units": units, "usable": usable}
        how = "done flag, size, modification time, etag per unit"
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return {
        "digest": digest,
        "created_at": run.attrs.get("created_at"),
        "creation_id": creation,
        "units_done": int(done.sum()),
        "units_total": int(done.size),
        "n_usable": int(np.asarray(mask, dtype=bool).sum()),
        "chunks": how,
    }


# -- writing ----------------------------------------------------------------------------


def _compressors() -> Any:
    # Gram entries are float64 noise to a compressor; blosc-lz4 with bit shuffle (the
    # run's lz4 chain) is fast and still saves the exponent bits. crc32c last, as on
    # every array of format 2.
    return checksummed("lz4")


def create_gram(
    run: Run,
    layer: str,
    reduce: str,
    *,
    n: int,
    tile: int,
    features: int,
    state: dict[str, Any],
    dtype: str = "float64",
) -> GramInfo:
    """Create (or replace) the empty Gram of a layer; tiles are then written by
    :func:`write_tile` and :func:`finish_gram` marks it complete."""
    if dtype not in GRAM_DTYPES:
        raise ValueError(f"Gram dtype must be one of {', '.join(GRAM_DTYPES)}, got {dtype!r}")
    if tile < 1 or n < 1:
        raise ValueError(f"a Gram needs n >= 1 and tile >= 1, got n={n}, tile={tile}")
    from vitcnn_store.store.index import run_group

    url = run.store.url
    info = GramInfo(url, run.name, layer, reduce, n, min(tile, n))
    run.store.writable_root()  # refuses a read-only or foreign location with one line
    with quiet_zarr(), store_io(url):
        group = run_group(url, run.name, mode="r+", consolidated=False)
        group = group.require_group(GRAMS).require_group(layer)
        name = info.path.rsplit("/", 1)[1]
        for key in (name, *(p.rsplit("/", 1)[1] for p in (info.row_mean_path, info.offset_path))):
            if key in group:
                del group[key]
        group.create_array(
            name,
            shape=(n, n),
            chunks=(info.tile, info.tile),
            dtype=dtype,
            fill_value=np.nan,
            compressors=_compressors(),
            dimension_names=["image_a", "image_b"],
            attributes={
                "complete": False,
                "long_name": f"linear Gram matrix of {layer} ({reduce}), shifted",
                "layer": layer,
                "reduce": reduce,
                "features": int(features),
                "tile": info.tile,
                "storage": STORAGE,
                "accumulation": "float64",
                "shift": SHIFT,
                "source": state,
            },
        )
    return info


def write_tile(info: GramInfo, p: int, q: int, block: np.ndarray) -> None:
    """Write tile (p, q), p <= q: one whole chunk (safe from any worker, idempotent)."""
    import zarr

    if p > q:
        raise ValueError(f"only tiles on or above the diagonal are stored, got ({p}, {q})")
    (r0, r1), (c0, c1) = info.panels[p], info.panels[q]
    if block.shape != (r1 - r0, c1 - c0):
        raise ValueError(f"tile ({p}, {q}) has shape {block.shape}, expected {(r1 - r0, c1 - c0)}")
    with quiet_zarr(), store_io(info.url):
        arr = zarr.open_array(zarr_store(info.url), path=info.path, mode="r+", zarr_format=3)
        arr[r0:r1, c0:c1] = block


def finish_gram(info: GramInfo, row_mean: np.ndarray, offset: np.ndarray | None = None) -> None:
    """Write the row means and offsets, then mark the Gram complete (last), with a copy
    of both vectors in its ``vectors`` attribute when it has at most
    :data:`~vitcnn_store.store.gram_inline.INLINE_MAX` images (one write: the read that
    checks the Gram brings them; :mod:`vitcnn_store.store.gram_inline`).

    The store's consolidated metadata is left to the caller (once per job).
    """
    root = open_root(info.url, mode="r+")
    with quiet_zarr():
        group = root[f"{info.run}/{GRAMS}/{info.layer}"]
        vectors = [
            (info.row_mean_path, row_mean, "mean of each row of gram over the usable images")
        ]
        if offset is not None:
            vectors.append(
                (
                    info.offset_path,
                    offset,
                    "x_i . mu - |mu|^2 / 2: X Xᵀ = gram + offset[i] + offset[j]",
                )
            )
        for path, values, what in vectors:
            arr = group.create_array(
                path.rsplit("/", 1)[1],
                shape=(info.n,),
                chunks=(info.n,),
                dtype="float64",
                fill_value=np.nan,
                compressors=_compressors(),
                dimension_names=["image_a"],
                attributes={"long_name": what},
            )
            arr[...] = np.asarray(values, dtype=np.float64)
        last: dict[str, Any] = {"complete": True}
        if info.n <= INLINE_MAX:
            last[VECTORS_ATTR] = encode_vectors(row_mean, offset)
        root[info.path].attrs.update(last)


# -- reading ----------------------------------------------------------------------------


def find_gram(
    run: Run, layer: str, reduce: str, state: dict[str, Any], dtype: str | None = None
) -> GramInfo | None:
    """The stored Gram of ``layer`` if it is complete, was computed from ``state`` and (when
    given) is stored in ``dtype``."""
    return find_grams(run, [layer], reduce, {layer: state}, dtype)[0]


def find_grams(
    run: Run,
    layers: list[str],
    reduce: str,
    states: dict[str, dict[str, Any]],
    dtype: str | None = None,
) -> list[GramInfo | None]:
    """:func:`find_gram` of each of ``layers``: their metadata read at once, concurrently.

    Each Gram's own ``zarr.json``, never the run's consolidated snapshot: a Gram
    being rewritten must not pass for the complete one it replaces (its ``complete``
    flag and source digest are read fresh). The row means' and offsets' metadata only
    say how to decode their chunks (shape, dtype, codecs; the chunks themselves are
    read fresh), so they come from the snapshot when it holds both of a layer's, and
    match the Gram's size; otherwise they are read with the Gram's. The documents
    travel in the :class:`GramInfo`, so readers open the arrays without asking again.
    """
    url = run.store.url
    known = _snapshot_vectors(run, layers, reduce)
    wanted = [gram_path(run.name, layer, reduce) for layer in layers]
    wanted += [
        p
        for layer in layers
        if layer not in known
        for p in (_row_mean_path(run.name, layer, reduce), _offset_path(run.name, layer, reduce))
    ]
    docs = dict(zip(wanted, _read_docs(run, wanted), strict=True))
    out: list[GramInfo | None] = []
    for layer in layers:
        gram = docs[gram_path(run.name, layer, reduce)]
        try:
            meta = json.loads(gram) if gram else None
        except ValueError:
            meta = None  # unreadable metadata: not a usable Gram, computed again
        if not isinstance(meta, dict):
            out.append(None)
            continue
        attrs = meta.get("attributes") or {}
        source = attrs.get("source") or {}
        n = int((meta.get("shape") or [0])[0])
        usable = (
            (dtype is None or meta.get("data_type") == dtype)
            and attrs.get("complete") is True
            and source.get("digest") == states[layer].get("digest")
            and n == run.n_images
        )
        if not usable:
            out.append(None)
            continue
        if layer in known and known[layer][2] != n:  # a snapshot of other vectors
            paths = [_row_mean_path(run.name, layer, reduce), _offset_path(run.name, layer, reduce)]
            docs.update(zip(paths, _read_docs(run, paths), strict=True))
            del known[layer]
        row_mean, offset = (
            known[layer][:2]
            if layer in known
            else (
                docs[_row_mean_path(run.name, layer, reduce)],
                docs[_offset_path(run.name, layer, reduce)],
            )
        )
        tile = int(attrs.get("tile", n))
        out.append(GramInfo(url, run.name, layer, reduce, n, tile, (gram, row_mean, offset)))
    return out


def _read_docs(run: Run, paths: list[str]) -> list[str]:
    """The text of the ``zarr.json`` of each array at ``paths`` (inside the store), read
    concurrently; "" where absent."""
    if not paths:
        return []
    url = run.store.url
    fs, base = run.store.fs, run.store.path
    full = [f"{base}/{p}/zarr.json" for p in paths]
    with store_io(url):
        got = fs.cat(full, on_error="return")
    docs: list[str] = []
    for path in full:
        raw = got.get(path, got.get(fs._strip_protocol(path))) if isinstance(got, dict) else None
        if isinstance(raw, BaseException):
            if not isinstance(raw, (FileNotFoundError, KeyError)):
                with store_io(url):
                    raise raw
            raw = None
        docs.append("" if raw is None else bytes(raw).decode("utf-8", "replace"))
    return docs


def _snapshot_vectors(run: Run, layers: list[str], reduce: str) -> dict[str, tuple[str, str, int]]:
    """Per layer whose row means and offsets both appear in the run's consolidated
    snapshot: their ``zarr.json`` documents, and their length."""
    try:
        with quiet_zarr():
            snapshot = run.group.metadata.consolidated_metadata
            flat = {} if snapshot is None else snapshot.flattened_metadata
    except Exception:
        return {}
    out: dict[str, tuple[str, str, int]] = {}
    for layer in layers:
        row_mean = flat.get(_row_mean_path(run.name, layer, reduce).split("/", 1)[1])
        offset = flat.get(_offset_path(run.name, layer, reduce).split("/", 1)[1])
        if row_mean is None or offset is None:
            continue  # not in the snapshot (a Gram stored unshifted has no offset)
        shape = getattr(row_mean, "shape", None)
        if shape is None or len(shape) != 1 or getattr(offset, "shape", None) != shape:
            continue
        docs = (json.dumps(row_mean.to_dict()), json.dumps(offset.to_dict()))
        out[layer] = (*docs, int(shape[0]))
    return out


def gram_layer(where: str) -> str | None:
    """The layer of a Gram path inside a run (``_grams/<layer>/...``), else None.

    Examples
    --------
    >>> gram_layer("_grams/blocks.3/gram"), gram_layer("blocks.3/activation")
    ('blocks.3', None)
    """
    parts = str(where).split("/")
    return parts[1] if len(parts) > 2 and parts[0] == GRAMS else None


def delete_grams(store: Store, run_name: str, layer: str | None = None) -> None:
    """Drop the cached Grams of one layer (or of the whole run ``run_name``); the caller
    consolidates the run's metadata afterwards."""
    from vitcnn_store.store.index import run_group

    store.writable_root()  # refuses a read-only or foreign location with one line
    with quiet_zarr(), store_io(store.url):
        group = run_group(store.url, run_name, mode="r+", consolidated=False)
        if GRAMS not in group:
            return
        grams = group[GRAMS]
        if layer is None:
            del group[GRAMS]
        elif layer in grams:
            del grams[layer]


def _open(info: GramInfo, path: str, doc: str | None) -> Any:
    """The zarr array at ``path``: from its metadata document ``doc`` when given (no
    request), else opened (one read of its ``zarr.json``)."""
    import zarr

    with quiet_zarr():
        if doc:
            from zarr.storage import StorePath

            from vitcnn_store.store.layout import store_object

            return zarr.Array.from_dict(StorePath(store_object(info.url), path), json.loads(doc))
        return zarr.open_array(zarr_store(info.url), path=path, mode="r", zarr_format=3)


class GramReader:
    """Reads blocks ``K[rows, cols]`` of a stored Gram, each stored tile at most once.

    Rows and columns are image indices of the run; tiles below the diagonal are
    read as the transpose of their mirror image.
    """

    def __init__(self, info: GramInfo) -> None:
        self.info = info
        self.array = _open(info, info.path, info.meta[0] if info.meta else None)
        self._tiles: dict[tuple[int, int], np.ndarray] = {}

    @property
    def where(self) -> str:
        """The Gram's path inside its run (named by damage errors)."""
        return self.info.path.split("/", 1)[1]

    def _vector_array(self, kind: str) -> Any:
        """The ``row_mean`` or ``offset`` array (None: an offset never stored)."""
        path = self.info.row_mean_path if kind == "row_mean" else self.info.offset_path
        what = "Gram row means" if kind == "row_mean" else "Gram offsets"
        if self.info.meta is not None:
            doc = self.info.meta[1] if kind == "row_mean" else self.info.meta[2]
            if not doc and kind == "offset":
                return None  # a Gram stored unshifted
            try:
                return _open(self.info, path, doc or None)
            except Exception as e:
                raise damage_error(self.info.url, self.info.run, self.where, e, what=what) from e
        try:
            return _open(self.info, path, None)
        except (FileNotFoundError, KeyError) as e:
            if kind == "offset":
                return None
            raise damage_error(self.info.url, self.info.run, self.where, e, what=what) from e
        except Exception as e:
            raise damage_error(self.info.url, self.info.run, self.where, e, what=what) from e

    def row_mean(self) -> np.ndarray:
        """Mean of each stored row over the usable images."""
        return read_vectors([self.info], "row_mean")[0]

    def offset(self) -> np.ndarray:
        """``a`` with ``X Xᵀ = gram + a_i + a_j`` (zeros for a Gram stored unshifted)."""
        return read_vectors([self.info], "offset")[0]

    def _needed(self, rows: np.ndarray, cols: np.ndarray) -> list[tuple[int, int]]:
        """Stored tiles (p <= q) that ``K[rows][:, cols]`` needs and that are not read yet."""
        T = self.info.tile
        keys = {
            (min(i, j), max(i, j))
            for i in np.unique(rows // T).tolist()
            for j in np.unique(cols // T).tolist()
        }
        return sorted(keys - set(self._tiles))

    def _tile_read(self, key: tuple[int, int]) -> tuple[Any, Any]:
        """``(array, selection)`` of stored tile ``key``, for :func:`read_many`."""
        (r0, r1), (c0, c1) = self.info.panels[key[0]], self.info.panels[key[1]]
        return self.array, (slice(r0, r1), slice(c0, c1))

    def _keep(self, key: tuple[int, int], got: Any) -> None:
        if isinstance(got, BaseException):  # a checksum mismatch: the cache is damaged
            raise damage_error(
                self.info.url, self.info.run, self.where, got, what=f"Gram tile {key}"
            ) from got
        self._tiles[key] = np.asarray(got, dtype=np.float64)

    def _tile(self, i: int, j: int) -> np.ndarray:
        key = (min(i, j), max(i, j))
        if key not in self._tiles:
            self._keep(key, read_many([self._tile_read(key)])[0])
        t = self._tiles[key]
        return t if i <= j else t.T

    def block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``K[rows][:, cols]`` in float64 for index arrays (any order)."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        T = self.info.tile
        out = np.empty((rows.size, cols.size))
        ti, tj = rows // T, cols // T
        for i in np.unique(ti):
            ri = np.flatnonzero(ti == i)
            for j in np.unique(tj):
                cj = np.flatnonzero(tj == j)
                tile = self._tile(int(i), int(j))
                out[np.ix_(ri, cj)] = tile[np.ix_(rows[ri] - i * T, cols[cj] - j * T)]
        if np.isnan(out).any():  # a lost tile reads as NaN, as do images unusable back then
            raise DamagedDataError(
                f"Gram of layer {self.info.layer!r} in run {self.info.run!r} has no values for "
                "some requested images (a tile is missing, or they were unusable when it was "
                f"computed): drop it with `vitcnn verify {self.info.url} --repair` and analyse "
                "again",
                run=self.info.run,
                layer=self.where,
            )
        return out


def read_vectors(infos: Sequence[GramInfo], kind: str) -> list[np.ndarray]:
    """Each Gram's ``row_mean`` or ``offset`` (``kind``; zeros for a Gram stored
    unshifted), read concurrently."""
    return read_vector_kinds(infos, (kind,))[kind]


def _inline(info: GramInfo) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The Gram's row means and offsets from the copy in its metadata document as
    :func:`find_grams` read it (None: no copy, or no document; read the arrays)."""
    if not info.meta or not info.meta[0]:
        return None
    try:
        attrs = json.loads(info.meta[0]).get("attributes") or {}
    except (ValueError, AttributeError):
        return None
    return decode_vectors(attrs, info.n) if isinstance(attrs, dict) else None


def read_vector_kinds(
    infos: Sequence[GramInfo], kinds: Sequence[str] = ("row_mean", "offset")
) -> dict[str, list[np.ndarray]]:
    """:func:`read_vectors` of each of ``kinds``, all read in one round of requests (none
    for a Gram whose metadata carries them: :mod:`vitcnn_store.store.gram_inline`)."""
    readers = [GramReader(info) for info in infos]
    inline = [_inline(info) for info in infos]
    wanted = [
        (kind, r, None if copy is not None else r._vector_array(kind), copy)
        for kind in kinds
        for r, copy in zip(readers, inline, strict=True)
    ]
    got = read_many([(a, slice(None)) for _, _, a, _ in wanted if a is not None])
    out: dict[str, list[np.ndarray]] = {kind: [] for kind in kinds}
    for kind, reader, arr, copy in wanted:
        if copy is not None:
            value = copy[0] if kind == "row_mean" else copy[1]
            out[kind].append(np.zeros(reader.info.n) if value is None else value)
            continue
        if arr is None:
            out[kind].append(np.zeros(reader.info.n))
            continue
        value = got.pop(0)
        if isinstance(value, BaseException):
            what = "Gram row means" if kind == "row_mean" else "Gram offsets"
            raise damage_error(
                reader.info.url, reader.info.run, reader.where, value, what=what
            ) from value
        out[kind].append(np.asarray(value, dtype=np.float64))
    return out


def read_blocks(infos: Sequence[GramInfo], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(len(infos), len(rows), len(cols))``: :meth:`GramReader.block` of each Gram, every
    tile they need read concurrently (one round of requests, not one per tile)."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    readers = [GramReader(info) for info in infos]
    wanted = [(r, key) for r in readers for key in r._needed(rows, cols)]
    for (reader, key), got in zip(
        wanted, read_many([r._tile_read(key) for r, key in wanted]), strict=True
    ):
        reader._keep(key, got)
    out = np.empty((len(readers), rows.size, cols.size))
    for i, reader in enumerate(readers):
        out[i] = reader.block(rows, cols)
    return out
