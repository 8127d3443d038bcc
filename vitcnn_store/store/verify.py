"""Scrub a store: read every chunk a run claims to hold, report what is damaged or missing.

For each fully created run, every chunk of every done unit must exist and
decode (its crc32c checksum matches); coordinate and flag arrays are checked
whole. Runs whose creation was interrupted are reported as broken. With
``repair``, the ``done`` flag of every unit with a damaged or missing chunk is
cleared, so ``vitcnn extract --resume`` rewrites exactly those units — the
same bytes a clean run writes.

Derived data is checked too: every analysis result must carry its commit
marker, hold the arrays the marker lists, with checksums, and match its
digest; every cached Gram must be marked complete. While an analysis job holds
a run's analysis lock, what it is writing is not reported. ``repair`` removes
incomplete or damaged results and Grams (the next analysis computes them).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.errors import DamagedDataError, RunNotFoundError
from vitcnn_store.store.analyses import ResultInfo, delete_result, list_results, result_digest
from vitcnn_store.store.checked import failure_reason
from vitcnn_store.store.chunks import chunk_key, grid, list_objects, unit_arrays, walk_arrays
from vitcnn_store.store.codecs import has_checksum
from vitcnn_store.store.grams import delete_grams, gram_layer
from vitcnn_store.store.index import can_list, run_group
from vitcnn_store.store.layout import (
    IMAGE_COORDS,
    check_name,
    environment_error,
    quiet_zarr,
    store_io,
    unit_bounds,
)
from vitcnn_store.store.manifest import manifest_problems, missing_names
from vitcnn_store.store.runs import run_format

if TYPE_CHECKING:
    from vitcnn_store.store.reader import Store

__all__ = ["Problem", "VerifyReport", "verify_store"]

RECOVER = "recover with `vitcnn extract ... --overwrite` (or --resume)"
RESTORE = "`vitcnn extract ... --resume` recreates it and rewrites the run's units"
#: Lost arrays that ``--repair`` restores without the model (the manifest or a copy suffices).
REPAIRED_HERE = {"done", *IMAGE_COORDS}
REDO = "--repair removes it, `vitcnn analyze` redoes it"


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (run, array, unit) and what."""

    run: str
    layer: str
    unit: int | None
    problem: str
    repairable: bool = False  # clearing done[unit] lets --resume rewrite it


@dataclass
class VerifyReport:
    """What :func:`verify_store` checked and found."""

    url: str
    runs: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: dict[str, list[int]] = field(default_factory=dict)
    #: Analysis results found incomplete or damaged: what ``repair`` removes.
    bad_results: list[ResultInfo] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Task:
    run: str
    path: str
    array: Any
    selection: tuple[slice, ...]
    unit: int | None


def _check(task: _Task) -> str | None:
    try:
        with quiet_zarr():
            task.array[task.selection]
    except Exception as e:
        if environment_error("", e) is not None:
            raise
        return f"damaged chunk ({failure_reason(e)})"
    return None


def _whole_chunks(array: Any) -> Iterable[tuple[tuple[int, ...], tuple[slice, ...]]]:
    chunks = array.chunks
    for coords in grid(array):
        yield (
            coords,
            tuple(
                slice(c * k, min((c + 1) * k, n))
                for c, k, n in zip(coords, chunks, array.shape, strict=True)
            ),
        )


class _Present(dict):
    """Where nothing lists: every chunk counts as present, and reading it decides."""

    def __contains__(self, key: object) -> bool:
        return True


def _plan_run(store: Store, name: str, group: Any, report: VerifyReport) -> list[_Task]:
    """Missing-chunk problems now; decode tasks for every chunk that should exist."""
    from vitcnn_store.store.checked import read_checked

    objects = _Present() if not can_list(store.url) else list_objects(store, name)
    chunk = int(group.attrs["chunk_size"])
    tasks: list[_Task] = []
    try:
        done = read_checked(group["done"], store.url, name, "done").astype(bool)
    except Exception:
        # A damaged flag chunk: check each unit's flag on its own below.
        done = np.ones(group["done"].shape[0], dtype=bool)
    per_unit = {p for p, _ in unit_arrays(group)}
    unchecked = [p for p, a in walk_arrays(group) if not has_checksum(a)]
    if unchecked and run_format(dict(group.attrs)) < 2:
        report.notes.append(
            f"run {name!r} is format 1: no checksums, so only missing chunks can be found"
        )
    n_images = int(group["image"].shape[0])
    units = unit_bounds(n_images, chunk)
    for path, arr in walk_arrays(group):
        if path in per_unit:
            rest = (0,) * (len(arr.shape) - 1)
            for unit in np.flatnonzero(done):
                u = int(unit)
                if f"{path}/{chunk_key(arr, (u, *rest))}" not in objects:
                    report.problems.append(Problem(name, path, u, "missing chunk", True))
                    continue
                sel = (slice(*units[u]), *(slice(None) for _ in rest))
                tasks.append(_Task(name, path, arr, sel, u))
            continue
        analysis = path.startswith("_")
        for coords, sel in _whole_chunks(arr):
            present = f"{path}/{chunk_key(arr, coords)}" in objects
            if path == "done":
                if present:
                    tasks.append(_Task(name, path, arr, sel, coords[0]))
                continue
            if not present:
                if not analysis:  # analyses may leave all-fill chunks unwritten
                    report.problems.append(
                        Problem(name, path, None, f"missing chunk {coords}: {RECOVER}")
                    )
                continue
            tasks.append(_Task(name, path, arr, sel, None))
    return tasks


def _check_manifest(name: str, group: Any, report: VerifyReport) -> set[str]:
    """Problems for arrays of the run's manifest that are missing or differ; their paths."""
    attrs = dict(group.attrs)
    gone = set(missing_names(None, group, name, attrs))  # whole layers: one row each
    found = manifest_problems(group, attrs)
    for layer in sorted(gone - {p for p, _ in found}):
        report.problems.append(Problem(name, layer, None, f"layer missing: {RESTORE}"))
    for path, what in found:
        if path.split("/", 1)[0] in gone and "/" in path:
            continue
        restorable = path in REPAIRED_HERE
        how = "--repair recreates it" if restorable else RESTORE
        report.problems.append(Problem(name, path, None, f"{what}: {how}", restorable))
    return {path for path, _ in found} | gone


def _copy_from_intact(store: Store, run_name: str, path: str, report: VerifyReport) -> bool:
    """Rewrite (or recreate) image coordinate ``path`` from an intact copy: the run and
    every layer hold one. False when no intact copy exists."""
    from vitcnn_store.store.chunks import walk_arrays
    from vitcnn_store.store.writer import write_coordinate

    name = path.rsplit("/", 1)[-1]
    with quiet_zarr(), store_io(store.url):
        group = run_group(store.url, run_name, mode="r+", consolidated=False)
        copies = [p for p, _ in walk_arrays(group) if p.rsplit("/", 1)[-1] == name]
        for source in (p for p in copies if p != path and not p.startswith("_")):
            try:
                src = group[source]
                values = np.asarray(src[...])
            except Exception:
                continue
            if path in group:
                group[path][...] = values
            else:
                parent, _, cname = path.rpartition("/")
                target = group[parent] if parent else group
                write_coordinate(target, cname, values, ["image"], src.chunks)
            report.notes.append(f"rewrote {run_name}/{path} from its intact copy {source}")
            return True
    return False


def _restore_done(store: Store, run_name: str, report: VerifyReport) -> None:
    """Recreate a lost ``done`` array as the manifest says, every unit not done."""
    from vitcnn_store.store.codecs import checksummed
    from vitcnn_store.store.manifest import manifest_arrays

    with quiet_zarr(), store_io(store.url):
        group = run_group(store.url, run_name, mode="r+", consolidated=False)
        want = (manifest_arrays(dict(group.attrs)) or {}).get("done")
        if want is None:
            return
        group.create_array(
            "done",
            shape=tuple(want["shape"]),
            chunks=tuple(want["chunks"]),
            dtype=bool,
            fill_value=False,
            dimension_names=["unit"],
            compressors=checksummed("none"),
            attributes={"long_name": "unit fully written (all arrays)"},
        )
    report.repaired[run_name] = list(range(int(want["shape"][0])))


def _check_results(store: Store, run_name: str, report: VerifyReport) -> None:
    """Problems of run ``run_name``'s analysis results: no commit marker, a missing array, an
    array without checksums, a digest that does not match."""
    from vitcnn_store.store.locks import lock_holder

    results = list_results(store, run_name, listing=can_list(store.url))
    grams = _incomplete_grams(store, run_name)
    if not results and not grams:
        return
    # Incomplete derived data is expected while a job writes it: ask who, once.
    holder = lock_holder(store, run_name) if grams or any(not r.complete for r in results) else None
    group = run_group(store.url, run_name, consolidated=not can_list(store.url))
    for result in results:
        where = result.group.split("/", 1)[1]
        problem = result.problem
        if not problem:
            with quiet_zarr():
                node = group[where]
                unchecked = [k for k, a in node.arrays() if not has_checksum(a)]
            if unchecked:
                problem = f"damaged: array(s) {', '.join(sorted(unchecked))} without crc32c"
            else:
                try:
                    digest, _ = result_digest(node)
                except Exception as e:
                    if environment_error("", e) is not None:
                        raise
                    continue  # a chunk that does not decode: reported by the chunk check
                if digest != result.attrs.get("vitcnn_store.digest"):
                    problem = "damaged: its arrays do not match the digest written with them"
        if not problem:
            continue
        if holder is not None and not result.complete:
            report.notes.append(f"{run_name}/{where}: being written by {holder}, not checked")
            continue
        report.bad_results.append(result)
        report.problems.append(Problem(run_name, where, None, f"analysis result {problem}; {REDO}"))
    for path in grams:
        if holder is not None:
            report.notes.append(f"{run_name}/{path}: being written by {holder}, not checked")
            continue
        what = "incomplete cached Gram (its job was interrupted); --repair drops it, "
        report.problems.append(
            Problem(run_name, path, None, what + "`vitcnn analyze cka` redoes it")
        )


def _result_of(run: str, path: str) -> ResultInfo | None:
    """The analysis result an array path of a run belongs to, else None.

    Examples
    --------
    >>> _result_of("v", "_analyses/cka/256e98b4161c/cka").group
    'v/_analyses/cka/256e98b4161c'
    >>> _result_of("v", "_analyses/cka/cka").key, _result_of("v", "blocks.0/activation")
    ('', None)
    """
    from vitcnn_store.store.layout import ANALYSES

    parts = path.split("/")
    if parts[0] != ANALYSES or len(parts) < 3:
        return None
    key = parts[2] if len(parts) > 3 else ""  # "": an array directly in <name> (older layout)
    return ResultInfo(run, parts[1], key, {}, "damaged chunk")


def _incomplete_grams(store: Store, run_name: str) -> list[str]:
    """Paths (in the run) of cached Grams not marked complete."""
    from vitcnn_store.store.layout import GRAMS

    out = []
    with quiet_zarr():
        group = run_group(store.url, run_name, consolidated=not can_list(store.url))
        if GRAMS not in group:
            return []
        for path, arr in walk_arrays(group[GRAMS], f"{GRAMS}/"):
            name = path.rsplit("/", 1)[1]
            if name.startswith("gram") and arr.attrs.get("complete") is not True:
                out.append(path)
    return out


def _repair_derived(store: Store, report: VerifyReport) -> bool:
    """Remove bad analysis results and Grams, under each run's analysis lock; whether
    anything was removed."""
    from vitcnn_store.errors import RunLockedError
    from vitcnn_store.store.locks import analysis_lock

    grams: dict[str, set[str]] = {}
    for p in report.problems:
        layer = gram_layer(p.layer)
        if layer is not None:
            grams.setdefault(p.run, set()).add(layer)
    results: dict[str, list[ResultInfo]] = {}
    for r in report.bad_results:
        results.setdefault(r.run, []).append(r)
    changed = False
    for run in sorted(set(grams) | set(results)):
        try:
            with analysis_lock(store, [run], "vitcnn verify --repair"):
                for layer in sorted(grams.get(run, ())):
                    delete_grams(store, run, layer)
                    report.notes.append(
                        f"dropped the damaged Gram cache of {run}/{layer}: "
                        "`vitcnn analyze cka` recomputes it"
                    )
                for result in results.get(run, []):
                    delete_result(store, result)
                    report.notes.append(
                        f"removed the analysis result {result.group}: "
                        "`vitcnn analyze` recomputes it"
                    )
                changed = True
        except RunLockedError as e:
            report.notes.append(f"left {run}'s derived data alone: {e}")
    return changed


def _repair(store: Store, report: VerifyReport) -> None:
    """Repair holding the lease of every run it touches (refused while a job holds one)."""
    from vitcnn_store.store.lease import acquire_lease, new_owner, release_lease

    touched = {p.run for p in report.problems if p.repairable or gram_layer(p.layer) is not None}
    owner, held = new_owner(), []
    try:
        for run in sorted(touched):
            acquire_lease(store.url, run, owner)
            held.append(run)
        _repair_held(store, report)
    finally:
        for run in held:
            release_lease(store.url, run, owner)


def _repair_held(store: Store, report: VerifyReport) -> None:
    from vitcnn_store.store.writer import consolidate

    units: dict[str, set[int]] = {}
    changed = False
    for p in report.problems:
        if p.unit is not None or not p.repairable:
            continue
        if p.layer == "done":
            _restore_done(store, p.run, report)
        elif not _copy_from_intact(store, p.run, p.layer, report):  # an image coordinate
            report.notes.append(f"{p.run}/{p.layer}: no intact copy; {RECOVER}")
            continue
        changed = True
    for p in report.problems:
        if p.repairable and p.unit is not None:
            units.setdefault(p.run, set()).add(p.unit)
    derived = _repair_derived(store, report)
    runs = sorted(
        {p.run for p in report.problems if p.run != "-"} | {r.run for r in report.bad_results}
    )
    if not units:
        if derived or changed:
            consolidate(store.url, *runs)
        return
    store.writable_root()  # refuses a read-only or foreign location with one line
    for run, todo in units.items():
        with quiet_zarr(), store_io(store.url):
            done = run_group(store.url, run, mode="r+", consolidated=False)["done"]
            for u in sorted(todo):
                done[u] = False
        report.repaired[run] = sorted(todo)
    consolidate(store.url, *runs)


def verify_store(
    url: str | Store,
    run: str | None = None,
    *,
    repair: bool = False,
    progress: bool = False,
    threads: int = 8,
    on_progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Scrub ``url`` (or one run of it); with ``repair``, clear ``done`` of damaged units.

    Examples
    --------
    >>> report = verify_store("acts.zarr")  # doctest: +SKIP
    >>> report.ok, len(report.problems)  # doctest: +SKIP
    (True, 0)
    """
    from vitcnn_store.store.reader import as_store

    store = as_store(url)
    url = url if isinstance(url, str) else store.url  # as the caller named it, in messages
    report = VerifyReport(url)
    entries = store.entries
    if run is not None:
        check_name(run)
        entries = [e for e in entries if e.name == run]
        if not entries:
            raise RunNotFoundError(f"no run {run!r} in {url}")
    tasks: list[_Task] = []
    for entry in entries:
        report.runs.append(entry.name)
        if not entry.created:
            report.problems.append(Problem(entry.name, "-", None, f"{entry.problem}: {RECOVER}"))
            continue
        # Scrub what is stored, not the run's metadata snapshot (unless nothing lists).
        group = run_group(store.url, entry.name, consolidated=not can_list(store.url))
        lost = _check_manifest(entry.name, group, report)
        if lost & {"done", "image"}:
            continue  # the unit grid is unknown: nothing more to check until restored
        try:
            tasks += _plan_run(store, entry.name, group, report)
            _check_results(store, entry.name, report)
        except DamagedDataError as e:
            report.problems.append(Problem(entry.name, "-", None, f"{e}: {RECOVER}"))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(tasks), unit="chunk", desc="verify", file=sys.stderr, dynamic_ncols=True
        )
    with ThreadPoolExecutor(max(1, threads)) as pool, store_io(store.url):
        for task, outcome in zip(tasks, pool.map(_check, tasks), strict=True):
            report.chunks_checked += 1
            if bar is not None:
                bar.update(1)
            if on_progress is not None:
                on_progress(report.chunks_checked)
            if outcome is None:
                continue
            per_unit = task.unit is not None
            coordinate = task.path.rsplit("/", 1)[-1] in IMAGE_COORDS
            what = outcome if per_unit else f"{outcome}: {RECOVER}"
            if coordinate:  # the run and every layer hold a copy of the image coordinates
                what = f"{outcome}: --repair rewrites it from an intact copy"
            if gram_layer(task.path) is not None:  # derived data: drop it, analyses redo it
                what = (
                    f"{outcome}: a cached Gram; --repair drops it, `vitcnn analyze cka` redoes it"
                )
            result = _result_of(task.run, task.path)
            if result is not None:
                what = f"{outcome}: an analysis result; {REDO}"
                if all(r.group != result.group for r in report.bad_results):
                    report.bad_results.append(result)
            report.problems.append(
                Problem(task.run, task.path, task.unit, what, per_unit or coordinate)
            )
    if bar is not None:
        bar.close()
    report.problems.sort(key=lambda p: (p.run, p.unit if p.unit is not None else -1, p.layer))
    if repair:
        _repair(store, report)
    return report
