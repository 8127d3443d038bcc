"""What a store holds, written by its writers so that readers never list a folder.

Three records, each written by the one job allowed to write it, so two jobs
writing different runs of one store never overwrite each other's entries:

**The run registry** ``<store>/_runs/<seq>/zarr.json`` (``seq`` = 0, 1, 2, ...
as ten digits): an append-only log of zarr groups whose attribute
``vitcnn_store.runs`` names runs added to the store. A job creating a run
appends an entry by creating the next free ``seq`` *only if absent* (a hard
link locally, ``If-None-Match: *`` on object stores, as the leases do); of
two jobs racing for one ``seq`` one wins and the other takes the next. No
entry is ever rewritten, so no read-modify-write of a shared object exists.
Readers fetch ``0, 1, ...`` until one is missing (batched: one round trip per
eight entries). The first entry written into a store made before the registry
also names the runs already there (found by the writer's listing).

**Per-run consolidated metadata**: each run's ``zarr.json`` carries zarr's
consolidated metadata of everything below it (layers, coordinates, the Gram
cache, analysis results), rewritten by whichever job changed metadata below
the run — its creator (holding the run's lease) or an analysis (holding the
run's analysis lock). Opening a run is one read; its layers, attributes and
results come from that snapshot.

**Per-unit records** ``unit_record (unit, field)`` int64: for each work unit,
the stored bytes of all its chunks and a 63-bit fingerprint of them (each
chunk's length and crc32c), written by the worker just before ``done[unit]``.
Sizes come from here, not from stat-ing objects, and the Gram cache is keyed
on the fingerprints (content, not modification times: a copied store keeps
its Grams, a rewritten unit with other bytes invalidates them).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from typing import Any

import numpy as np

from vitcnn_store.errors import StoreError
from vitcnn_store.store.gram_inline import VECTORS_ATTR, is_gram, lean_entry
from vitcnn_store.store.layout import (
    LEASES,
    RUNS_INDEX,
    create_if_absent,
    filesystem,
    group_doc,
    is_local,
    quiet_zarr,
    store_io,
    zarr_store,
)

__all__ = [
    "RECORD",
    "RECORD_FIELDS",
    "RUNS_ATTR",
    "CountingStore",
    "can_list",
    "consolidate_run",
    "lean_consolidated",
    "listed_runs",
    "refresh_derived",
    "register_run",
    "registered_runs",
    "run_group",
    "spliced",
    "unit_fingerprint",
]

RUNS_ATTR = "vitcnn_store.runs"
#: Run array of per-unit records (bytes, fingerprint), one chunk per unit.
RECORD = "unit_record"
RECORD_FIELDS = ("nbytes", "fingerprint")
_BATCH = 8  # registry entries fetched per round trip


def _entry(url: str, seq: int) -> str:
    _, root = filesystem(url)
    return f"{str(root).rstrip('/')}/{RUNS_INDEX}/{seq:010d}/zarr.json"


_WHY = "so runs cannot be registered safely"


def registered_runs(url: str) -> list[str] | None:
    """Run names of the registry, in registration order (None: the store has none)."""
    fs, _ = filesystem(url)
    names: list[str] = []
    seq, found_any = 0, False
    while True:
        paths = [_entry(url, s) for s in range(seq, seq + _BATCH)]
        with store_io(url):
            got = fs.cat(paths, on_error="return")
        for path in paths:
            raw = got.get(path) if isinstance(got, dict) else None
            if raw is None or isinstance(raw, BaseException):
                if isinstance(raw, BaseException) and not isinstance(raw, FileNotFoundError):
                    with store_io(url):
                        raise raw
                return names if found_any else None
            found_any = True
            try:
                runs = json.loads(raw)["attributes"][RUNS_ATTR]
            except (ValueError, KeyError, TypeError):
                continue  # an entry we did not write: skip it, never guess
            names += [str(n) for n in runs if str(n) not in names]
        seq += _BATCH


def listed_runs(url: str) -> list[str]:
    """Run-like children of the store's root found by a listing (writers, legacy stores)."""
    fs, path = filesystem(url)
    with store_io(url):
        entries = fs.ls(path, detail=True)
    names = sorted(
        posixpath.basename(str(e["name"]).rstrip("/"))
        for e in entries
        if e.get("type") == "directory"
    )
    return [n for n in names if n and not n.startswith(("_", "."))]


def register_run(url: str, name: str) -> None:
    """Add ``name`` to the store's run registry unless it is there (called by the job that
    creates the run, holding its lease, before the run group exists)."""
    known = registered_runs(url)
    if known is not None and name in known:
        return
    seed: list[str] = []
    if known is None:  # a store made before the registry: name what it holds already
        try:
            seed = [n for n in listed_runs(url) if n not in (LEASES, RUNS_INDEX)]
        except (FileNotFoundError, NotImplementedError):
            seed = []
    _, root = filesystem(url)
    folder = f"{str(root).rstrip('/')}/{RUNS_INDEX}/zarr.json"
    fs, _ = filesystem(url)
    with store_io(url):
        if not fs.exists(folder):
            create_if_absent(url, folder, group_doc({}), _WHY)
    runs = sorted({*seed, name})
    seq = 0 if known is None else _next_free(url)
    for _ in range(10_000):
        if create_if_absent(url, _entry(url, seq), group_doc({RUNS_ATTR: runs}), _WHY):
            return
        seq += 1  # another job registered a run meanwhile: take the next entry
        runs = [name]
    raise StoreError(f"cannot register run {name!r} in {url}: the registry keeps growing")


def _next_free(url: str) -> int:
    fs, _ = filesystem(url)
    seq = 0
    with store_io(url):
        while fs.exists(_entry(url, seq)):
            seq += 1
    return seq


def can_list(url: str) -> bool:
    """Whether the store's storage lists folders (local disks and object stores do; plain
    HTTP servers, CDNs and object-store gateways in front of a bucket do not)."""
    return not str(url).startswith(("http://", "https://"))


def run_group(url: str, path: str, *, mode: str = "r", consolidated: bool = True) -> Any:
    """The zarr group at ``path`` (a run, or below one).

    ``consolidated=False`` ignores the run's consolidated metadata and sees the
    storage as it is (a listing): what writers change and what ``verify`` scrubs.
    """
    import zarr

    with quiet_zarr(), store_io(url):
        return zarr.open_group(
            zarr_store(url),
            path=path,
            mode=mode,  # type: ignore[arg-type]
            zarr_format=3,
            use_consolidated=None if consolidated else False,
        )


def consolidate_run(url: str, run: str) -> None:
    """Rewrite run ``run``'s consolidated metadata (its zarr.json) from its current tree.

    Only the job allowed to change metadata below the run calls this: its
    creator, or an analysis holding the run's analysis lock.
    """
    import zarr

    with quiet_zarr(), store_io(url):
        group = zarr.consolidate_metadata(zarr_store(url), path=run, zarr_format=3)
    lean_consolidated(url, run, group)


def lean_consolidated(url: str, path: str, group: Any) -> None:
    """Rewrite the ``zarr.json`` of ``group`` at ``path`` ("" for the root), just
    consolidated by zarr, without the Grams' copies of their vectors
    (:func:`~vitcnn_store.store.gram_inline.lean_entry`), when it holds any: every
    reader opens this snapshot, only a CKA needs them (from the Gram's own document)."""
    from zarr.core.buffer import default_buffer_prototype

    snapshot = group.metadata.consolidated_metadata
    flat = {} if snapshot is None else snapshot.flattened_metadata
    if not any(VECTORS_ATTR in (v.attributes or {}) for k, v in flat.items() if is_gram(k)):
        return
    raw = group.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
    doc = json.loads(raw)
    meta = doc["consolidated_metadata"]["metadata"]
    doc["consolidated_metadata"]["metadata"] = {k: lean_entry(k, v) for k, v in meta.items()}
    _, root = filesystem(url)
    target = "/".join(p for p in (str(root).rstrip("/"), path, "zarr.json") if p)
    _write_whole(url, target, _snapshot_bytes(doc))


def unit_fingerprint(chunks: dict[str, tuple[int, bytes]]) -> tuple[int, int]:
    """``(bytes, fingerprint)`` of a unit's chunk objects ``{key: (length, crc32c)}``.

    The fingerprint is the first 63 bits of a sha256 over keys, lengths and
    checksums in key order: equal chunks, equal fingerprint (a copied store
    keeps it; a unit rewritten with other values changes it).
    """
    h = hashlib.sha256()
    for key in sorted(chunks):
        length, crc = chunks[key]
        h.update(f"{key}\0{length}\0".encode() + crc + b"\0")
    nbytes = int(sum(length for length, _ in chunks.values()))
    return nbytes, int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def _counting_store_class() -> Any:
    from zarr.storage import WrapperStore

    class _Counting(WrapperStore):
        """A zarr store that remembers the length and last 4 bytes (the crc32c) of every
        object it writes, keyed by the object's key."""

        def __init__(self, store: Any, written: dict[str, tuple[int, bytes]] | None = None):
            super().__init__(store)
            self.written: dict[str, tuple[int, bytes]] = {} if written is None else written

        def _with_store(self, store: Any) -> Any:
            return type(self)(store, self.written)

        async def set(self, key: str, value: Any) -> None:
            await self._store.set(key, value)
            tail = np.asarray(value.as_numpy_array()[-4:]).tobytes()
            self.written[key] = (len(value), tail)

    return _Counting


def CountingStore(url: str) -> Any:
    """A zarr store for ``url`` that records what it writes (see :func:`unit_fingerprint`)."""
    import zarr
    from zarr.storage import LocalStore

    target = zarr_store(url)
    if isinstance(target, str):
        if is_local(target):
            base: Any = LocalStore(target.removeprefix("file://"))
        else:
            from zarr.storage import FsspecStore

            base = FsspecStore.from_url(target)
    else:
        base = target
    del zarr
    return _counting_store_class()(base)


def _empty_children(node: dict[str, Any]) -> dict[str, Any]:
    if node.get("node_type") == "group":
        node = dict(node)
        node["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {}}
    return node


def refresh_derived(url: str, run: str, subtree: str) -> None:
    """Bring the consolidated metadata of ``run`` (and of the root) up to date for one
    subtree of derived data (``_analyses/<name>``, ``_grams``) without re-reading the
    rest of the run: one listing of the subtree, its ``zarr.json`` objects, and a
    rewrite of the run's and the root's ``zarr.json``.

    Called by the job holding the run's analysis lock (the only writer of derived
    data). A run without consolidated metadata is consolidated whole.
    """
    fs, root = filesystem(url)
    base = f"{str(root).rstrip('/')}/{run}"
    with store_io(url):
        try:
            run_doc = json.loads(fs.cat_file(f"{base}/zarr.json"))
        except FileNotFoundError:
            return
        if not isinstance(run_doc.get("consolidated_metadata"), dict):
            consolidate_run(url, run)
            return
        try:
            found = fs.find(f"{base}/{subtree}", withdirs=False)
        except FileNotFoundError:
            found = []
        paths = [str(p) for p in found if str(p).endswith("/zarr.json")]
        raw = fs.cat(paths, on_error="omit") if paths else {}
    strip = fs._strip_protocol(base).rstrip("/") + "/"
    nodes: dict[str, dict[str, Any]] = {}
    for path, data in (raw or {}).items():
        rel = fs._strip_protocol(str(path))
        rel = rel[len(strip) :] if rel.startswith(strip) else rel
        try:
            key = rel.removesuffix("/zarr.json")
            nodes[key] = lean_entry(key, _empty_children(json.loads(data)))
        except ValueError:
            continue  # an unreadable node: verify reports it
    # The groups above the subtree (e.g. ``_analyses``) exist when the subtree does.
    parts = subtree.split("/")
    for i in range(1, len(parts)):
        above = "/".join(parts[:i])
        if nodes and above not in nodes:
            nodes[above] = _empty_children(
                {"zarr_format": 3, "node_type": "group", "attributes": {}}
            )
    _splice(url, f"{base}/zarr.json", run_doc, subtree, nodes)
    with store_io(url):
        try:
            root_doc = json.loads(fs.cat_file(f"{str(root).rstrip('/')}/zarr.json"))
        except FileNotFoundError:
            return
    if isinstance(root_doc.get("consolidated_metadata"), dict):
        prefixed = {f"{run}/{k}": v for k, v in nodes.items()}
        _splice(url, f"{str(root).rstrip('/')}/zarr.json", root_doc, f"{run}/{subtree}", prefixed)


def _splice(
    url: str, target: str, doc: dict[str, Any], subtree: str, nodes: dict[str, dict[str, Any]]
) -> None:
    """Replace ``subtree``'s entries of ``doc``'s consolidated metadata by ``nodes`` and
    write ``doc`` back to ``target`` (whole, atomically on a local disk)."""
    _write_whole(url, target, spliced(doc, subtree, nodes))


def _write_whole(url: str, target: str, data: bytes) -> None:
    """Write ``data`` to ``target`` whole (atomically on a local disk)."""
    fs, _ = filesystem(url)
    with store_io(url):
        if is_local(url):
            tmp = f"{target}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        else:
            fs.pipe_file(target, data)


def spliced(doc: dict[str, Any], subtree: str, nodes: dict[str, dict[str, Any]]) -> bytes:
    """``doc`` (a group's ``zarr.json`` with consolidated metadata) as bytes, with the
    entries of ``subtree`` (and below) replaced by ``nodes`` (paths relative to it)."""
    meta = dict(doc["consolidated_metadata"].get("metadata") or {})
    for key in [k for k in meta if k == subtree or k.startswith(subtree + "/")]:
        del meta[key]
    meta.update(nodes)
    doc = {
        **doc,
        "consolidated_metadata": {
            **doc["consolidated_metadata"],
            "metadata": dict(sorted(meta.items())),
        },
    }
    return _snapshot_bytes(doc)


def _snapshot_bytes(doc: dict[str, Any]) -> bytes:
    """A snapshot's ``zarr.json`` as compact JSON. A run's snapshot runs to hundreds of
    kilobytes, and every result write reads and rewrites it (the run's and the root's):
    ``indent`` would double the bytes sent to object storage and take Python's own
    encoder instead of the C one (about 5x slower)."""
    return json.dumps(doc, separators=(",", ":")).encode()
