"""The steps every analysis job shares: reuse, compute, label, write.

A job (``jobs/analyze/<analysis>.py``) opens its runs, checks what it needs
*before* any work (so a refused job fails fast with a one-line
:class:`~vitcnn_store.errors.VitcnnError`), and hands :func:`run_analysis` a
``compute`` function. :func:`run_analysis` then

1. builds the reuse key: the job's options (``AnalysisOptions.parameters``)
   plus the source runs' provenance fingerprints;
2. returns the stored result when its key matches, unless ``recompute``;
3. otherwise runs ``compute`` on an :class:`~jobs.analyze.executor.Executor`
   (local threads or a ``distributed`` cluster), adds the attributes every
   result carries, and writes it through :mod:`vitcnn_store.store.analyses`.

Drawing and printing are the interface's (:mod:`vitcnn_store.cli_analyze`,
:mod:`vitcnn_store.plots`); a job returns an :class:`AnalysisResult`.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.executor import Executor
from jobs.analyze.options import AnalysisOptions
from vitcnn_store._version import __version__
from vitcnn_store.store.analyses import (
    analysis_group,
    find_reusable,
    plain_json,
    write_analysis,
)
from vitcnn_store.store.layout import check_name
from vitcnn_store.store.reader import Run

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["AnalysisResult", "run_analysis", "source_fingerprint"]


@dataclass
class AnalysisResult:
    """What a job produced: the labelled dataset and where it lives in the store."""

    analysis: str
    store: str
    run: str
    name: str
    dataset: xr.Dataset
    reused: bool

    @property
    def group(self) -> str:
        """Group path of the result inside the store."""
        return analysis_group(self.run, self.name)


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
    ds = None if opts.recompute else find_reusable(opts.store, opts.run, name, parameters)
    if ds is not None:
        return AnalysisResult(analysis, opts.store, opts.run, name, ds, reused=True)
    with Executor(opts.dask_address, opts.threads, opts.progress) as executor:
        ds = compute(executor)
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
    write_analysis(opts.store, opts.run, name, ds)
    return AnalysisResult(analysis, opts.store, opts.run, name, ds, reused=False)
