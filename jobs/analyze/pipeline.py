"""The steps every analysis job shares: reuse, compute, label, write.

A job (``jobs/analyze/<analysis>.py``) opens its runs, checks what it needs
*before* any work (so a refused job fails fast with a one-line
:class:`~vitcnn_store.errors.VitcnnError`), and hands :func:`run_analysis` a
``compute`` function. :func:`run_analysis` then

1. builds the reuse key: the job's options (``AnalysisOptions.parameters``)
   plus the source runs' provenance fingerprints;
2. returns the stored complete result when its key matches, unless ``recompute``;
3. otherwise takes the analysis lock of every run it may write
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
    analysis_group,
    delete_result,
    find_reusable,
    list_results,
    parameters_key,
    plain_json,
    set_latest,
    write_analysis,
)
from vitcnn_store.store.index import refresh_derived
from vitcnn_store.store.layout import ANALYSES, check_name
from vitcnn_store.store.locks import analysis_lock
from vitcnn_store.store.reader import Run

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["AnalysisResult", "run_analysis", "source_fingerprint"]


@dataclass
class AnalysisResult:
    """What a job produced: the labelled dataset, where it lives in the store, and what
    happened to the name's other results (``kept`` beside it, or ``removed``)."""

    analysis: str
    store: str
    run: str
    name: str
    dataset: xr.Dataset
    reused: bool
    key: str = ""
    replaced: bool = False  # a result with the same parameters was rewritten (--recompute)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def group(self) -> str:
        """Group path of the result inside the store."""
        return analysis_group(self.run, self.name, self.key or None)


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
) -> AnalysisResult:
    """Reuse or compute, label and write one analysis result.

    ``compute`` builds the dataset (its own attrs describe the estimate); this
    function adds ``analysis``, ``parameters`` (the reuse key), the source
    runs' provenance, ``computed_at`` and ``code_version``.
    """
    name = check_name(opts.name or default_name, "analysis")
    prints = [source_fingerprint(run, mask) for run, mask in sources]
    parameters = plain_json(
        {"analysis": analysis, **opts.parameters(), **(extra_parameters or {}), "sources": prints}
    )
    key = parameters_key(parameters)
    # Reading a complete result needs no lock: incomplete ones are invisible.
    ds = None if opts.recompute else find_reusable(opts.store, opts.run, name, parameters)
    if ds is not None and not opts.replace:
        return _reused(analysis, opts, name, key, ds)
    runs = {opts.run, *(run.name for run, _ in sources)}
    with analysis_lock(opts.store, runs, f"vitcnn analyze {analysis} {opts.run}"):
        if not opts.recompute:  # another job may have written it while we were not locked
            ds = find_reusable(opts.store, opts.run, name, parameters)
        if ds is not None:
            return _reused(analysis, opts, name, key, ds)
        with Executor(opts.dask_address, opts.threads, opts.progress) as executor:
            ds = compute(executor)
        _label(ds, analysis, opts, prints, parameters)
        written = write_analysis(opts.store, opts.run, name, ds, replace_all=opts.replace)
    return AnalysisResult(
        analysis, opts.store, opts.run, name, ds, reused=False, key=key,
        replaced=written.replaced, kept=written.kept, removed=written.removed,
    )  # fmt: skip


def _reused(
    analysis: str, opts: AnalysisOptions, name: str, key: str, ds: xr.Dataset
) -> AnalysisResult:
    """The stored result reused; the name's other results kept, or deleted with
    ``replace`` (the caller then holds the lock)."""
    result = AnalysisResult(analysis, opts.store, opts.run, name, ds, reused=True, key=key)
    results = list_results(opts.store, opts.run, name)
    for other in results:
        if other.key == key:
            continue
        if opts.replace:
            delete_result(opts.store, other)
            result.removed.append(other.group)
        elif other.complete:
            result.kept.append(other.group)
    if opts.replace or not any(r.latest and r.key == key for r in results):
        # ``latest`` names what the last job produced; a read-only store keeps its pointer.
        with contextlib.suppress(StoreUnavailableError):
            set_latest(opts.store, opts.run, name, key)
    if result.removed:
        refresh_derived(opts.store, opts.run, f"{ANALYSES}/{name}")
    return result


def _label(
    ds: xr.Dataset, analysis: str, opts: AnalysisOptions, prints: list[dict[str, Any]],
    parameters: Any,
) -> None:  # fmt: skip
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
