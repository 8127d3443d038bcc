"""Analysis results in the store: ``<run>/_analyses/<name>/<key>``, read and written here only.

A result is an :class:`xarray.Dataset` written as a zarr v3 group, so plain
``xr.open_zarr(store, group="<run>/_analyses/<name>/<key>")`` reads it. Results
are kept: ``<key>`` is a short hash of the result's ``parameters`` attribute
(plain JSON: the job's options and the source runs' fingerprints), so a rerun
with other parameters *adds* a result beside the earlier ones, and a rerun with
the same parameters finds the stored one (:func:`find_reusable`).

A result becomes visible only when complete (written by
:func:`vitcnn_store.store.result_write.write_analysis`): its arrays are written first,
then, last, the commit marker — attributes ``vitcnn_store.complete = true``,
``vitcnn_store.arrays`` (each array's shape) and ``vitcnn_store.digest`` (a
sha256 over every array's name, dtype, shape and values, as stored). A result
without the marker (a job killed while writing it) is never read, reused,
reported or pointed at; ``vitcnn verify`` reports it and ``--repair`` removes
it. The ``<name>`` group's attribute ``vitcnn_store.latest`` names the key of
the most recently written complete result: what :func:`read_analysis` returns
unless asked for another key (a job that reuses a result points it there too).

Examples
--------
>>> analysis_group("vitb16", "cka__r50", "3f2a9c1b7e4d")
'vitb16/_analyses/cka__r50/3f2a9c1b7e4d'
>>> parameters_key({"analysis": "cka", "seed": 0})
'256e98b4161c'
>>> run = open_store("acts.zarr")["vitb16"]  # doctest: +SKIP
>>> run.analyses  # doctest: +SKIP
['attention', 'cka', 'cka__r50']
>>> run.analysis("cka")["cka"]  # doctest: +SKIP
<xarray.DataArray 'cka' (layer_a: 13, layer_b: 13)> ...
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.errors import DamagedDataError, RunNotFoundError
from vitcnn_store.store.index import refresh_derived
from vitcnn_store.store.layout import ANALYSES, check_name, quiet_zarr, store_io

if TYPE_CHECKING:
    import xarray as xr

    from vitcnn_store.store.reader import Run, Store

__all__ = [
    "ARRAYS_ATTR",
    "COMPLETE_ATTR",
    "DIGEST_ATTR",
    "LATEST_ATTR",
    "ResultInfo",
    "analysis_group",
    "analysis_names",
    "delete_result",
    "find_reusable",
    "latest_result",
    "list_results",
    "load_result",
    "parameters_key",
    "plain_json",
    "read_analysis",
    "result_digest",
    "set_latest",
    "stored_result",
]

#: Commit marker of a result, written last: without it the result does not exist to readers.
COMPLETE_ATTR = "vitcnn_store.complete"
#: Shapes of the result's arrays, written with the marker: a missing array is damage.
ARRAYS_ATTR = "vitcnn_store.arrays"
#: sha256 of the result's arrays as stored (see :func:`result_digest`).
DIGEST_ATTR = "vitcnn_store.digest"
#: Attribute of ``<run>/_analyses/<name>``: key of the result last written or reused.
LATEST_ATTR = "vitcnn_store.latest"
_MARKER = (COMPLETE_ATTR, ARRAYS_ATTR, DIGEST_ATTR)
KEY_LENGTH = 12  # hex digits of the parameters' sha256: collisions need ~16M results


def analysis_group(run: str, name: str, key: str | None = None) -> str:
    """Group path of result ``name`` (one parameter ``key`` of it) of ``run`` in the store."""
    group = f"{run}/{ANALYSES}/{check_name(name, 'analysis')}"
    return group if key is None else f"{group}/{check_name(key, 'result key')}"


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


def parameters_key(parameters: Any) -> str:
    """The result key of ``parameters``: the first hex digits of the sha256 of their
    plain JSON with sorted keys (equal parameters, equal key)."""
    text = json.dumps(plain_json(parameters), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def result_digest(group: Any) -> tuple[str, dict[str, list[int]]]:
    """``("sha256:<hex>", {array: shape})`` of a result group's arrays as stored.

    The digest covers each array's name, dtype, shape and values in name order;
    numbers as their little-endian bytes, strings as a JSON list. Reading every
    value also checks every chunk's crc32c.
    """
    h = hashlib.sha256()
    shapes: dict[str, list[int]] = {}
    with quiet_zarr():
        arrays = sorted(group.arrays(), key=lambda kv: kv[0])
        for name, arr in arrays:
            values = np.asarray(arr[...])
            shapes[name] = [int(s) for s in arr.shape]
            head = json.dumps([name, str(arr.dtype), shapes[name]])
            h.update(head.encode() + b"\0")
            if values.dtype.kind in "biufc":
                h.update(np.ascontiguousarray(values, values.dtype.newbyteorder("<")).tobytes())
            else:  # vlen strings (object or numpy StringDType)
                h.update(json.dumps([str(v) for v in values.ravel().tolist()]).encode())
    return f"sha256:{h.hexdigest()}", shapes


@dataclass(frozen=True)
class ResultInfo:
    """One stored result of a run: where it is and whether readers may use it."""

    run: str
    name: str
    key: str  # "" for a result written before keys (directly in <name>)
    attrs: dict[str, Any]
    problem: str = ""  # why it is not usable ("" when complete)
    latest: bool = False

    @property
    def group(self) -> str:
        """Group path of the result inside the store."""
        return analysis_group(self.run, self.name, self.key or None)

    @property
    def complete(self) -> bool:
        return not self.problem

    @property
    def computed_at(self) -> str:
        return str(self.attrs.get("computed_at") or "")

    @property
    def parameters(self) -> Any:
        return self.attrs.get("parameters")


def _stored_shapes(node: Any, names: Any) -> dict[str, list[int]]:
    """Shapes of the arrays ``names`` of result group ``node`` as stored now: each
    array's own ``zarr.json`` is read (all at once, concurrently), since the group's
    consolidated snapshot still names an array that was lost since."""
    import asyncio

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    names = list(names)
    prefix = f"{node.path}/" if node.path else ""

    async def read_all() -> list[Any]:
        proto = default_buffer_prototype()
        return await asyncio.gather(
            *(node.store.get(f"{prefix}{k}/zarr.json", prototype=proto) for k in names)
        )

    have: dict[str, list[int]] = {}
    for k, raw in zip(names, sync(read_all()), strict=True):
        if raw is None:
            continue  # absent: missing
        doc = json.loads(raw.to_bytes())  # unreadable metadata raises: reported as damage
        if doc.get("node_type") == "array":
            have[k] = [int(s) for s in doc["shape"]]
    return have


def _problem(node: Any, attrs: dict[str, Any], legacy: bool) -> str:
    """Why a result group is not usable, "" when its marker and arrays are there."""
    if legacy:
        return "no commit marker (written by an older vitcnn_store, or interrupted)"
    if attrs.get(COMPLETE_ATTR) is not True:
        return "incomplete: no commit marker (its job was interrupted while writing it)"
    want = attrs.get(ARRAYS_ATTR) or {}
    have = _stored_shapes(node, want)
    missing = sorted(set(want) - set(have))
    if missing:
        return f"damaged: array(s) {', '.join(missing)} missing"
    changed = sorted(k for k in want if have[k] != list(want[k]))
    if changed:
        return f"damaged: array(s) {', '.join(changed)} changed shape"
    return ""


def _fresh_attrs(store: Store | None, node: Any) -> dict[str, Any]:
    """A group's attributes as stored now (``store`` given: read its zarr.json, one
    request), not as a consolidated snapshot recorded them."""
    if store is None:
        return dict(node.attrs)
    from vitcnn_store.store.index import run_group

    return dict(run_group(store.url, node.path, consolidated=False).attrs)


def _results_of(
    run_name: str, name: str, node: Any, store: Store | None = None
) -> list[ResultInfo]:
    with quiet_zarr():
        latest = _fresh_attrs(store, node).get(LATEST_ATTR)
        children = sorted(node.groups(), key=lambda kv: kv[0])
        has_arrays = any(True for _ in node.arrays())
    out = []
    if has_arrays:  # a result of the layout before keys: arrays directly in <name>
        attrs = {k: v for k, v in dict(node.attrs).items() if k != LATEST_ATTR}
        out.append(ResultInfo(run_name, name, "", attrs, _problem(node, attrs, legacy=True)))
    for key, child in children:
        try:
            with quiet_zarr():
                attrs = _fresh_attrs(store, child)
            problem = _problem(child, attrs, legacy=False)
        except Exception as e:  # unreadable metadata: report it, never crash a listing
            attrs, problem = {}, f"damaged: metadata unreadable ({type(e).__name__})"
        out.append(ResultInfo(run_name, name, key, attrs, problem, latest=key == latest))
    return out


def list_results(
    store: Store,
    run_name: str,
    name: str | None = None,
    *,
    listing: bool | None = None,
) -> list[ResultInfo]:
    """Every stored result of run ``run_name`` (of one ``name``), complete or not, by
    name then computation time.

    Where the storage lists folders (``listing`` None: local disks, object
    stores), the results are found as stored, below the store's open root group
    (opened without consolidated metadata). Where it cannot (plain HTTP), they
    are found from the run's consolidated metadata, and each result's commit
    marker is then read from its own ``zarr.json`` (a snapshot may predate an
    interrupted rewrite).
    """
    from vitcnn_store.store.index import can_list, run_group

    listing = can_list(store.url) if listing is None else listing
    with quiet_zarr():
        try:
            if listing:  # a path below the root: read as stored, not from a snapshot
                with store_io(store.url):
                    base = store.root[f"{run_name}/{ANALYSES}"]
            else:
                base = run_group(store.url, run_name, consolidated=True)[ANALYSES]
        except (KeyError, FileNotFoundError):
            return []
        if not hasattr(base, "groups"):
            return []
        names = sorted(k for k, _ in base.groups())
    out: list[ResultInfo] = []
    for n in names if name is None else [name]:
        with quiet_zarr():
            try:
                node = base[n]
            except KeyError:
                continue
        fresh = None if listing else store
        out += sorted(_results_of(run_name, n, node, fresh), key=lambda r: (r.computed_at, r.key))
    return out


def latest_result(results: list[ResultInfo]) -> ResultInfo | None:
    """Of one name's ``results``: the one the ``latest`` pointer names if it is complete,
    else the most recently computed complete one."""
    complete = [r for r in results if r.complete]
    pointed = [r for r in complete if r.latest]
    return pointed[0] if pointed else (complete[-1] if complete else None)


def analysis_names(run: Run) -> list[str]:
    """Names under which ``run`` holds at least one complete result, sorted."""
    return sorted({r.name for r in list_results(run.store, run.name) if r.complete})


def _open(store: Store, group: str) -> xr.Dataset:
    import warnings

    import xarray as xr

    from vitcnn_store.store.index import can_list

    # A result carries its own consolidated metadata (one read opens it, and a server that
    # cannot list serves it); results written before that are listed where possible.
    with quiet_zarr(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated")
        # chunks=None: numpy, not dask (a dask compute would import ``distributed``).
        ds = xr.open_zarr(
            store.zarr_store,
            group=group,
            zarr_format=3,
            chunks=None,
            consolidated=None if can_list(store.url) else True,
        ).load()
    if ds.attrs.get(COMPLETE_ATTR) is not True and ARRAYS_ATTR in ds.attrs:
        raise DamagedDataError(f"analysis result {group} lost its commit marker")
    # The marker describes the stored group, not the data: a rewrite computes its own.
    for attr in _MARKER:
        ds.attrs.pop(attr, None)
    return ds


def read_analysis(run: Run, name: str, key: str | None = None) -> xr.Dataset:
    """Result ``name`` of ``run`` (the latest complete one, or the one of ``key``), loaded."""
    results = [r for r in list_results(run.store, run.name, name) if r.complete]
    if key is None:
        chosen = latest_result(results)
    else:
        chosen = next((r for r in results if r.key == key), None)
    if chosen is None:
        known = ", ".join(analysis_names(run)) or "none"
        what = f"{name!r}" if key is None else f"{name!r} with key {key!r}"
        raise RunNotFoundError(
            f"no analysis {what} in run {run.name!r} (complete results: {known})"
        )
    return load_result(run.store, chosen.group)


def load_result(store: Store, group: str) -> xr.Dataset:
    """The stored result at ``group`` (``<run>/_analyses/<name>/<key>``), loaded into
    memory (numpy, no dask); :class:`DamagedDataError` naming the repair if it is not whole."""
    try:
        return _open(store, group)
    except Exception as e:  # a chunk that fails its checksum, a lost marker
        run, inside = group.split("/", 1)
        raise DamagedDataError(
            f"analysis result {group} is damaged ({type(e).__name__}): run "
            f"`vitcnn verify {store.url} --repair` and analyse again",
            run=run,
            layer=inside,
        ) from e


def stored_result(store: Store, run_name: str, name: str, parameters: Any) -> ResultInfo | None:
    """The complete stored result ``name`` of run ``run_name`` with ``parameters``, else None.

    Read through the store's open root group: the result's group is
    found by the key of ``parameters`` (no listing) and its own ``zarr.json`` read
    as stored now (one read: attributes, commit marker and, consolidated in it,
    its arrays), then the stored ``parameters`` are compared as plain JSON.
    Nothing is loaded (:func:`load_result` loads it).
    """
    key = parameters_key(parameters)
    group = analysis_group(run_name, name, key)
    try:
        with quiet_zarr():
            node = store.root[group]
            attrs = dict(node.attrs)
            problem = _problem(node, attrs, legacy=False)
    except Exception:  # absent, or unreadable metadata: nothing to reuse (verify reports it)
        return None
    if problem or plain_json(attrs.get("parameters")) != plain_json(parameters):
        return None  # incomplete, damaged, or a hash collision (48 bits): compute again
    return ResultInfo(run_name, name, key, attrs)


def find_reusable(store: Store, run_name: str, name: str, parameters: Any) -> xr.Dataset | None:
    """The complete stored result ``name`` of run ``run_name`` whose ``parameters``
    attribute equals ``parameters`` (compared as plain JSON), else None."""
    key = parameters_key(parameters)
    for result in list_results(store, run_name, name):
        if result.key == key and result.complete:
            if plain_json(result.parameters) != plain_json(parameters):
                return None  # a hash collision (48 bits): compute again
            try:
                return _open(store, result.group)
            except Exception:  # damaged: recompute (verify reports it)
                return None
    return None


def set_latest(store: Store, run_name: str, name: str, key: str | None) -> None:
    """Point ``<run_name>/_analyses/<name>``'s ``latest`` at ``key`` (None: at the newest
    complete result left, or nowhere)."""
    if key is None:
        newest = latest_result(list_results(store, run_name, name, listing=True))
        key = newest.key if newest is not None and newest.key else None
    root = store.writable_root()
    with quiet_zarr():
        try:
            node = root[analysis_group(run_name, name)]
        except KeyError:
            return
        if key is not None:
            node.attrs[LATEST_ATTR] = key
        elif LATEST_ATTR in node.attrs:
            del node.attrs[LATEST_ATTR]
    # Readers see it through the run's metadata.
    refresh_derived(store.url, run_name, f"{ANALYSES}/{name}")


def delete_result(store: Store, result: ResultInfo) -> None:
    """Delete one stored result (a legacy result: its arrays and attributes only); a
    ``latest`` pointer at it moves to the newest complete result left."""
    root = store.writable_root()
    with quiet_zarr():
        name_group = root[analysis_group(result.run, result.name)]
        pointed = name_group.attrs.get(LATEST_ATTR)
        if result.key:
            del name_group[result.key]
            if pointed == result.key:
                set_latest(store, result.run, result.name, None)
            return
        node = root[result.group]
        for k in [k for k, _ in node.arrays()]:
            del node[k]
        if not any(True for _ in node.groups()):
            del root[f"{result.run}/{ANALYSES}"][result.name]
        else:  # results with keys live below it: keep only their pointer
            latest = node.attrs.get(LATEST_ATTR)
            node.attrs.put({} if latest is None else {LATEST_ATTR: latest})
