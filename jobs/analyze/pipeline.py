"""The steps every analysis job shares: reuse, compute, label, write.

A job (``jobs/analyze/<analysis>.py``) opens its runs, checks what it needs
*before* any work (so a refused job fails fast with a one-line
:class:`~vitcnn_store.errors.VitcnnError`), and hands :func:`run_analysis` a
``compute`` function. :func:`run_analysis` then

1. builds the reuse key: the job's options (``AnalysisOptions.parameters``),
   what the job chose from the runs' metadata, and the source runs' provenance
   fingerprints — no stored layer is opened for it;
2. returns the stored complete result when its key matches, unless ``recompute``,
   found through the store as opened and not loaded (it loads, without dask,
   when its ``dataset`` is first used);
3. otherwise runs the job's ``prepare`` (checks that open stored arrays), takes
   the analysis lock of every run it may write
   (:mod:`vitcnn_store.store.locks`: the Gram caches of the source runs and
   the result's run; a second job is refused with one line), runs ``compute``
   on an :class:`~jobs.analyze.executor.Executor` (local threads or a
   ``distributed`` cluster), adds the attributes every result carries, and
   writes it through :mod:`vitcnn_store.store.analyses` — beside the name's
   earlier results, which are kept unless ``replace``.

Drawing and printing are the interface's (:mod:`vitcnn_store.interface.cli_analyze`,
:mod:`vitcnn_store.interface.plots`); a job returns an :class:`AnalysisResult`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.executor import Executor
from jobs.analyze.options import AnalysisOptions
from vitcnn_store._version import __version__
from vitcnn_store.errors import StoreUnavailableError
from vitcnn_store.store.analyses import (
    ARRAYS_ATTR,
    COMPLETE_ATTR,
    DIGEST_ATTR,
    ResultInfo,
    analysis_group,
    delete_result,
    list_results,
    load_result,
    parameters_key,
    plain_json,
    set_latest,
    stored_result,
)
from vitcnn_store.store.index import refresh_derived
from vitcnn_store.store.layout import ANALYSES, check_name
from vitcnn_store.store.locks import analysis_lock
from vitcnn_store.store.reader import Run, Store
from vitcnn_store.store.result_write import write_analysis

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["AnalysisResult", "run_analysis", "source_fingerprint"]


@dataclass
class AnalysisResult:
    """What a job produced: the labelled dataset, where it lives in the store (the job's
    handle on it: ``store.url`` says where), and what happened to the name's other
    results (``kept`` beside it, or ``removed``). ``run`` is the name of the run that
    holds it.

    A reused result is loaded from the store on first use of :attr:`dataset`: a
    caller that needs only its attributes (:attr:`attrs`), its ``digest`` or where
    it is never loads it (nor imports xarray).
    """

    analysis: str
    store: Store
    run: str
    name: str
    loaded: xr.Dataset | None  # None until a reused result is loaded
    reused: bool
    key: str = ""
    replaced: bool = False  # a result with the same parameters was rewritten (--recompute)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    digest: str = ""  # the stored arrays' digest (the commit marker's)
    stored_attrs: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def group(self) -> str:
        """Group path of the result inside the store."""
        return analysis_group(self.run, self.name, self.key or None)

    @property
    def dataset(self) -> xr.Dataset:
        """The result, loaded into memory (read from the store on first use if reused)."""
        if self.loaded is None:
            self.loaded = load_result(self.store, self.group)
        return self.loaded

    @property
    def attrs(self) -> dict[str, Any]:
        """The result's attributes (for a reused result: as stored, without loading it)."""
        return dict(self.loaded.attrs) if self.loaded is not None else dict(self.stored_attrs)


def source_fingerprint(run: Run, mask: np.ndarray) -> dict[str, Any]:
    """Provenance of a source run: a re-extracted or resumed run changes it."""
    attrs = run.attrs
    done = run.done
    return {
        "run": run.name,
        "model": attrs.get("model"),
        "weights_sha256": attrs.get("weights_sha256"),
        "image_set_sha256": attrs.get("image_set_sha256"),
        "created_at": attrs.get("created_at"),
        "units_done": int(done.sum()),
        "units_total": int(done.size),
        "n_images": int(run.n_images),
        "n_usable": int(mask.sum()),
    }


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def run_analysis(
    opts: AnalysisOptions,
    *,
    analysis: str,
    default_name: str,
    sources: Sequence[tuple[Run, np.ndarray]],
    compute: Callable[[Executor], xr.Dataset],
    extra_parameters: dict[str, Any] | None = None,
    prepare: Callable[[], None] | None = None,
) -> AnalysisResult:
    """Reuse or compute, label and write one analysis result.

    The reuse check comes first and needs only the parameters: the options,
    ``extra_parameters`` (what the job chose from the runs' metadata) and the
    source runs' fingerprints. A reused result is not loaded. Otherwise
    ``prepare`` runs the job's checks that open stored arrays (before any lock
    or write), and ``compute`` builds the dataset (its own attrs describe the
    estimate); this function adds ``analysis``, ``parameters`` (the reuse key),
    the source runs' provenance, ``computed_at`` and ``code_version``.
    """
    name = check_name(opts.name or default_name, "analysis")
    prints = [source_fingerprint(run, mask) for run, mask in sources]
    parameters = plain_json(
        {"analysis": analysis, **opts.parameters(), **(extra_parameters or {}), "sources": prints}
    )
    key = parameters_key(parameters)
    store = sources[0][0].store  # the store as the job opened it: no second opening
    # Reading a complete result needs no lock: incomplete ones are invisible.
    stored = None if opts.recompute else stored_result(store, opts.run, name, parameters)
    if stored is not None and not opts.replace:
        return _reused(analysis, opts, name, stored, store)
    if prepare is not None:
        prepare()
    run_names = {opts.run, *(run.name for run, _ in sources)}
    with analysis_lock(store, run_names, f"vitcnn analyze {analysis} {opts.run}"):
        if not opts.recompute:  # another job may have written it while we were not locked
            stored = stored_result(store, opts.run, name, parameters)
        if stored is not None:
            return _reused(analysis, opts, name, stored, store)
        with Executor(opts.dask_address, opts.threads, opts.progress) as executor:
            ds = compute(executor)
        _label(ds, analysis, opts, prints, parameters)
        written = write_analysis(store, opts.run, name, ds, replace_all=opts.replace)
    return AnalysisResult(
        analysis,
        store,
        opts.run,
        name,
        ds,
        reused=False,
        key=key,
        replaced=written.replaced,
        kept=written.kept,
        removed=written.removed,
        digest=written.digest,
    )


def _reused(
    analysis: str, opts: AnalysisOptions, name: str, stored: ResultInfo, store: Store
) -> AnalysisResult:
    """The stored result reused (not loaded); the name's other results kept, or deleted
    with ``replace`` (the caller then holds the lock)."""
    key = stored.key
    attrs = {
        k: v for k, v in stored.attrs.items() if k not in (COMPLETE_ATTR, ARRAYS_ATTR, DIGEST_ATTR)
    }
    result = AnalysisResult(
        analysis,
        store,
        opts.run,
        name,
        None,
        reused=True,
        key=key,
        digest=str(stored.attrs.get(DIGEST_ATTR, "")),
        stored_attrs=attrs,
    )
    results = list_results(store, opts.run, name)
    for other in results:
        if other.key == key:
            continue
        if opts.replace:
            delete_result(store, other)
            result.removed.append(other.group)
        elif other.complete:
            result.kept.append(other.group)
    if opts.replace or not any(r.latest and r.key == key for r in results):
        # ``latest`` names what the last job produced; a read-only store keeps its pointer.
        with contextlib.suppress(StoreUnavailableError):
            set_latest(store, opts.run, name, key)
    if result.removed:
        refresh_derived(store.url, opts.run, f"{ANALYSES}/{name}")
    return result


def _label(
    ds: xr.Dataset,
    analysis: str,
    opts: AnalysisOptions,
    prints: list[dict[str, Any]],
    parameters: Any,
) -> None:
    """The attributes every result carries."""
    ds.attrs.update(
        plain_json(
            {
                "analysis": analysis,
                "run": opts.run,
                "source_runs": [p["run"] for p in prints],
                "weights_sha256": [p["weights_sha256"] for p in prints],
                "image_set_sha256": [p["image_set_sha256"] for p in prints],
                "sources": prints,
                "incomplete_runs": any(p["units_done"] < p["units_total"] for p in prints),
                "allow_incomplete": opts.allow_incomplete,
                "parameters": parameters,
                "computed_at": _now(),
                "code_version": __version__,
            }
        )
    )
