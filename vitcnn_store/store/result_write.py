"""Writing an analysis result: built in memory, uploaded in a few concurrent batches.

On object storage every object is a request, and a sequence of requests is a
sequence of round trips. Writing the dataset through xarray straight into the
store, then re-reading it for the digest and listing the name's results for the
snapshot, cost ~400 sequential requests per CKA result on S3. Here the result's
objects are built in a zarr ``MemoryStore`` (the bytes xarray and zarr would
write, byte for byte), its digest and commit marker computed there, and the
store sees, in this order (each step one concurrent batch):

1. reads: the run's, ``_analyses``', ``<name>``'s and the key's ``zarr.json``;
2. an earlier write of the key removed, if its ``zarr.json`` is there (then one
   listing of the key);
3. the result's group without its marker, and missing parent groups;
4. every array object (metadata and chunks);
5. the commit marker: the result's ``zarr.json`` with ``vitcnn_store.complete``,
   and in the same round the run's and the root's ``zarr.json`` read again, with
   the name's other results' (their markers, for the report);
6. the ``latest`` pointer and the run's and the root's consolidated metadata (the
   result spliced in from memory, the rest of the snapshot kept as read).

A job killed at any step leaves a result without its marker (or none), which
readers never see and ``verify --repair`` removes, as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitcnn_store.errors import RunNotFoundError
from vitcnn_store.store.analyses import (
    ARRAYS_ATTR,
    COMPLETE_ATTR,
    DIGEST_ATTR,
    LATEST_ATTR,
    analysis_group,
    delete_result,
    list_results,
    parameters_key,
    result_digest,
)
from vitcnn_store.store.codecs import xarray_encoding
from vitcnn_store.store.index import consolidate_run, refresh_derived, spliced
from vitcnn_store.store.layout import ANALYSES, is_local, quiet_zarr, store_io

if TYPE_CHECKING:
    import xarray as xr

    from vitcnn_store.store.reader import Store

__all__ = ["WriteOutcome", "write_analysis"]


@dataclass
class WriteOutcome:
    """What :func:`write_analysis` did: the group written and what it kept or removed."""

    group: str
    key: str
    digest: str = ""  # the commit marker's digest of the written arrays
    replaced: bool = False  # a stored result with the same parameters was rewritten
    kept: list[str] = field(default_factory=list)  # other results of the name, left alone
    removed: list[str] = field(default_factory=list)  # other results deleted (replace_all)


@dataclass
class _Staged:
    """A result's objects built in memory, keyed by path below the result's group."""

    arrays: dict[str, bytes]  # every array's zarr.json and chunks
    unmarked: bytes  # the group's zarr.json without the commit marker
    marked: bytes  # the same with the marker: the commit
    digest: str


def _stage(ds: xr.Dataset) -> _Staged:
    """Write ``ds`` into memory as zarr v3 (its own consolidated metadata included), and
    compute its digest and commit marker there."""
    import zarr
    from zarr.storage import MemoryStore

    memory = MemoryStore()
    with quiet_zarr():
        ds.to_zarr(
            memory, mode="w", zarr_format=3, consolidated=False, encoding=xarray_encoding(ds)
        )
        zarr.consolidate_metadata(memory, zarr_format=3)
        unmarked = memory._store_dict["zarr.json"].to_bytes()
        node = zarr.open_group(memory, mode="r+", zarr_format=3)
        digest, shapes = result_digest(node)
        node.attrs.update({ARRAYS_ATTR: shapes, DIGEST_ATTR: digest, COMPLETE_ATTR: True})
    objects = {k: v.to_bytes() for k, v in memory._store_dict.items()}
    marked = objects.pop("zarr.json")
    return _Staged(objects, unmarked, marked, digest)


def _group_bytes(doc: dict[str, Any] | None, attributes: dict[str, Any]) -> bytes:
    """A group's ``zarr.json`` as zarr writes it: ``doc`` (None: a new group) with
    ``attributes``."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import GroupMetadata

    meta = GroupMetadata.from_dict(doc) if doc is not None else GroupMetadata()
    meta = dataclasses.replace(meta, attributes=attributes)
    return meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _read(store: Store, paths: list[str], put: dict[str, bytes] | None = None) -> dict[str, Any]:
    """Parsed JSON of the objects ``paths`` (None where absent), read concurrently; with
    ``put``, those objects written in the same round on object storage (:func:`_put`;
    a failed write raises, as there)."""
    if put and (is_local(store.url) or not getattr(store.fs, "async_impl", False)):
        _put(store, put)
        put = None
    if not paths and not put:
        return {}
    with store_io(store.url):
        got = _pipe_and_cat(store.fs, put, paths) if put else store.fs.cat(paths, on_error="return")
    out: dict[str, Any] = {}
    for path in paths:
        raw = got.get(path) if isinstance(got, dict) else None
        if isinstance(raw, FileNotFoundError) or raw is None:
            out[path] = None
        elif isinstance(raw, BaseException):
            with store_io(store.url):
                raise raw
        else:
            try:
                out[path] = json.loads(raw)
            except ValueError:
                out[path] = None  # unreadable: treated as absent (verify reports it)
    return out


def _pipe_and_cat(fs: Any, objects: dict[str, bytes], paths: list[str]) -> dict[str, Any]:
    """``fs.pipe(objects)`` and ``fs.cat(paths, on_error="return")`` as one round of
    concurrent requests (an asynchronous fsspec file system)."""
    import asyncio

    from fsspec.asyn import sync

    async def both() -> Any:
        _, got = await asyncio.gather(
            fs._pipe(objects), fs._cat(paths, on_error="return") if paths else _nothing()
        )
        return got

    return sync(fs.loop, both) or {}


async def _nothing() -> dict[str, Any]:
    return {}


def _put(store: Store, objects: dict[str, bytes]) -> None:
    """Write ``objects`` (full path -> bytes): one concurrent batch on object storage;
    on a local disk each file whole (a temporary file renamed over it)."""
    if not objects:
        return
    with store_io(store.url):
        if not is_local(store.url):
            store.fs.pipe(objects)
            return
        for path, data in objects.items():
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            tmp = f"{folder}/.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)


def _clear(store: Store, prefix: str, *, listed: bool) -> None:
    """Remove what an earlier write of this key left below ``prefix``: on a local disk
    whatever is there; on object storage, where a listing is a request, when ``listed``
    (the key's ``zarr.json`` exists: a write creates it before any other object of the
    result, and this removes it last, so without it nothing is below)."""
    with store_io(store.url):
        if is_local(store.url):
            if os.path.isdir(prefix):
                shutil.rmtree(prefix)
            return
        if not listed:
            return
        try:
            found = [str(p) for p in store.fs.find(prefix, withdirs=False)]
        except FileNotFoundError:
            return
        group_doc = [p for p in found if p.rstrip("/").endswith(f"{prefix.rstrip('/')}/zarr.json")]
        rest = [p for p in found if p not in group_doc]
        if rest:
            store.fs.rm(rest)
        if group_doc:
            store.fs.rm(group_doc)


def _node(doc: dict[str, Any]) -> dict[str, Any]:
    """A snapshot entry: a node's metadata, a group's own consolidated metadata emptied
    (as ``zarr.consolidate_metadata`` records nested groups)."""
    if doc.get("node_type") == "group":
        doc = {
            **doc,
            "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": {}},
        }
    return doc


def _consolidated(doc: dict[str, Any] | None) -> bool:
    return doc is not None and isinstance(doc.get("consolidated_metadata"), dict)


def _marker(doc: dict[str, Any] | None) -> bool:
    return doc is not None and (doc.get("attributes") or {}).get(COMPLETE_ATTR) is True


def write_analysis(
    store: Store, run_name: str, name: str, ds: xr.Dataset, *, replace_all: bool = False
) -> WriteOutcome:
    """Write ``ds`` as a result of run ``run_name`` under ``name``, keyed by its
    ``parameters``.

    The arrays go first, the commit marker last, then the ``latest`` pointer
    and the run's (and the root's) consolidated metadata, in the steps the
    module describes. Results of ``name`` with other parameters are kept unless
    ``replace_all`` (then deleted once this one is complete). Callers hold the
    run's analysis lock (:mod:`vitcnn_store.store.locks`).
    """
    key = parameters_key(ds.attrs.get("parameters"))
    group = analysis_group(run_name, name, key)
    base = store.path
    name_group = analysis_group(run_name, name)
    where = {
        "root": f"{base}/zarr.json",
        "run": f"{base}/{run_name}/zarr.json",
        "analyses": f"{base}/{run_name}/{ANALYSES}/zarr.json",
        "name": f"{base}/{name_group}/zarr.json",
        "key": f"{base}/{group}/zarr.json",
    }
    docs = _read(store, [where["run"], where["analyses"], where["name"], where["key"]])
    run_doc = docs[where["run"]]
    if run_doc is None:
        raise RunNotFoundError(f"no run {run_name!r} in {store.url}")
    # The name's other results, from the run's snapshot (no listing); their markers
    # are read from their own zarr.json (the snapshot may predate a rewrite).
    snapshot = (run_doc.get("consolidated_metadata") or {}).get("metadata") or {}
    prefix = f"{ANALYSES}/{name}/"
    others = [
        k[len(prefix) :]
        for k, v in snapshot.items()
        if k.startswith(prefix) and "/" not in k[len(prefix) :] and k != prefix + key
        if v.get("node_type") == "group"
    ]
    other_paths = [f"{base}/{name_group}/{k}/zarr.json" for k in others]

    clean = ds.copy(deep=False)
    for attr in (COMPLETE_ATTR, ARRAYS_ATTR, DIGEST_ATTR):  # a rewrite computes its own
        clean.attrs.pop(attr, None)
    staged = _stage(clean)

    # A rewrite (--recompute) or an interrupted write: its objects go first.
    _clear(store, f"{base}/{group}", listed=docs[where["key"]] is not None)
    name_doc = docs[where["name"]]
    first = {where["key"]: staged.unmarked}
    if docs[where["analyses"]] is None:
        first[where["analyses"]] = _group_bytes(None, {})
    if name_doc is None:
        first[where["name"]] = _group_bytes(None, {})
    _put(store, first)
    _put(store, {f"{base}/{group}/{k}": v for k, v in staged.arrays.items()})

    commit = {where["key"]: staged.marked}
    pointer = _group_bytes(
        name_doc, {**((name_doc or {}).get("attributes") or {}), LATEST_ATTR: key}
    )
    nodes = {
        ANALYSES: _node(docs[where["analyses"]] or json.loads(first[where["analyses"]])),
        f"{ANALYSES}/{name}": _node(json.loads(pointer)),
        f"{ANALYSES}/{name}/{key}": _node(json.loads(staged.marked)),
    }
    for k, v in staged.arrays.items():
        if k.endswith("/zarr.json"):
            nodes[f"{ANALYSES}/{name}/{key}/{k.removesuffix('/zarr.json')}"] = json.loads(v)
    # The commit (the last write of the result), and in the same round the run's and
    # the root's snapshots read again just before rewriting them (another job may have
    # rewritten the root), with the other results' markers (only reported).
    fresh = _read(store, [where["run"], where["root"], *other_paths], put=commit)
    run_now, root_now = fresh[where["run"]], fresh[where["root"]]
    subtree = f"{ANALYSES}/{name}/{key}"
    last = {where["name"]: pointer}
    if _consolidated(run_now):
        last[where["run"]] = spliced(run_now, subtree, nodes)
    if _consolidated(root_now):
        prefixed = {f"{run_name}/{k}": v for k, v in nodes.items()}
        last[where["root"]] = spliced(root_now, f"{run_name}/{subtree}", prefixed)
    _put(store, last)
    if not _consolidated(run_now):  # a run without consolidated metadata: all of it
        consolidate_run(store.url, run_name)

    outcome = WriteOutcome(group, key, staged.digest, replaced=_marker(docs[where["key"]]))
    if replace_all:
        for other in list_results(store, run_name, name, listing=True):
            if other.key != key:
                delete_result(store, other)
                outcome.removed.append(other.group)
        refresh_derived(store.url, run_name, f"{ANALYSES}/{name}")
        return outcome
    kept = []
    for k in others:
        doc = fresh[f"{base}/{name_group}/{k}/zarr.json"]
        if _marker(doc):
            kept.append((str(doc["attributes"].get("computed_at") or ""), k))
    outcome.kept = [analysis_group(run_name, name, k) for _, k in sorted(kept)]
    return outcome
