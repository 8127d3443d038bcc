"""Options and results shared by the analysis jobs: reuse, write-back, figures.

Every analysis job follows the same steps:

1. open the store and the run(s), refuse an incomplete run unless
   ``allow_incomplete`` (then unwritten units and failed images are masked;
   :mod:`jobs.analyze.selection`);
2. check what the analysis needs (attention, inputs, taps, labels) *before*
   any work, so a refused job fails fast with a one-line :class:`VitcnnError`;
3. reuse a stored result whose ``parameters`` attribute equals this job's
   (options plus the source runs' provenance fingerprints) unless ``recompute``;
4. otherwise build small dask tasks (one per image chunk or batch), run them on
   local threads or a ``distributed`` scheduler
   (:class:`~jobs.analyze.executor.Executor`), merge the kernels' accumulators
   on the driver, and write the labelled :class:`xarray.Dataset` to
   ``<run>/_analyses/<name>``;
5. draw a PNG figure into the figures folder.

:func:`run_analysis` does steps 3–5 for every job.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.executor import Executor
from vitcnn_store._version import __version__
from vitcnn_store.store import consolidate
from vitcnn_store.store.layout import ANALYSES, check_name, open_root, quiet_zarr
from vitcnn_store.store.reader import Run

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "EXECUTION_OPTIONS",
    "AnalysisOptions",
    "AnalysisResult",
    "figure_dir",
    "run_analysis",
    "source_fingerprint",
]

# Options that change how a result is computed or shown, never what it is: left
# out of the parameter dict compared for reuse.
EXECUTION_OPTIONS = frozenset(
    {
        "store", "recompute", "figures", "figure", "dask_address", "threads", "progress",
        "batches_per_round",
    }
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AnalysisOptions:
    """Options every analysis job takes (see ``vitcnn analyze --help``).

    Parameters
    ----------
    store, run : str
        Store URL and run name (the result is written under this run).
    name : str or None
        Result name under ``<run>/_analyses/``; each job has a default.
    recompute : bool
        Recompute even when a result with the same parameters is stored.
    allow_incomplete : bool
        Use the written units of an unfinished run (the result says so).
    figures : str or None
        Figure folder; ``None``: ``<store>.figures/`` beside a local store,
        ``vitcnn_figures/`` in the working directory for remote URLs.
    figure : bool
        Draw the PNG figure.
    dask_address : str or None
        ``tcp://...`` of a dask scheduler; ``None`` runs on local threads.
    threads : int or None
        Local thread count (default: one per core).
    progress : bool
        Show a progress bar on stderr.
    """

    store: str
    run: str
    name: str | None = None
    recompute: bool = False
    allow_incomplete: bool = False
    figures: str | None = None
    figure: bool = True
    dask_address: str | None = None
    threads: int | None = None
    progress: bool = True

    def parameters(self) -> dict[str, Any]:
        """The options that define the result (compared to decide on reuse)."""
        return {k: v for k, v in asdict(self).items() if k not in EXECUTION_OPTIONS}


@dataclass
class AnalysisResult:
    """What a job produced: the dataset, where it lives, and its figure."""

    analysis: str
    store: str
    run: str
    name: str
    dataset: xr.Dataset
    figure: Path | None
    reused: bool

    @property
    def group(self) -> str:
        """Group path of the result inside the store."""
        return f"{self.run}/{ANALYSES}/{self.name}"

    def __str__(self) -> str:
        where = f"{self.store.rstrip('/')}/{self.group}"
        if self.reused:
            lines = [f"{self.analysis}: reused {where} (same parameters; --recompute to redo)"]
        else:
            lines = [f"{self.analysis}: wrote {where}"]
        summary = self.dataset.attrs.get("summary")
        if summary:
            lines.append(f"  {summary}")
        if self.figure is not None:
            lines.append(f"figure: {self.figure}")
        return "\n".join(lines)


# -- results -------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """A plain-JSON copy (numpy scalars and arrays become Python numbers and lists)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serializable: {type(o).__name__}")

    return json.loads(json.dumps(value, default=default))


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


def figure_dir(store: str, figures: str | None) -> Path:
    """Folder for figures: ``figures``, else beside a local store, else ``./vitcnn_figures``."""
    if figures:
        return Path(figures)
    local = store.removeprefix("file://")
    if "://" in local or local.startswith("memory:"):
        return Path("vitcnn_figures")
    path = Path(local).expanduser()
    return path.parent / f"{path.name}.figures"


def _load_stored(url: str, group: str, parameters: dict[str, Any]) -> xr.Dataset | None:
    import xarray as xr

    root = open_root(url, mode="r")
    with quiet_zarr():
        try:
            node = root[group]
        except KeyError:
            return None
        if _jsonable(node.attrs.get("parameters")) != parameters:
            return None
        return xr.open_zarr(url, group=group, consolidated=False, zarr_format=3).load()


def _write(url: str, group: str, ds: xr.Dataset) -> None:
    with quiet_zarr():
        # mode="w" replaces this result's group only; siblings and the run stay.
        ds.to_zarr(url, group=group, mode="w", zarr_format=3, consolidated=False)
    consolidate(url)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def run_analysis(
    opts: AnalysisOptions,
    *,
    analysis: str,
    default_name: str,
    sources: Sequence[tuple[Run, np.ndarray]],
    compute: Callable[[Executor], xr.Dataset],
    plot: Callable[[xr.Dataset, Path], Path] | None,
    extra_parameters: dict[str, Any] | None = None,
) -> AnalysisResult:
    """Reuse or compute, write, and draw one analysis result.

    ``compute`` builds the dataset (its own attrs describe the estimate); this
    function adds ``analysis``, ``parameters`` (the reuse key), the source
    runs' provenance, ``computed_at`` and ``code_version``.
    """
    name = check_name(opts.name or default_name, "analysis")
    group = f"{opts.run}/{ANALYSES}/{name}"
    prints = [source_fingerprint(run, mask) for run, mask in sources]
    parameters = _jsonable(
        {"analysis": analysis, **opts.parameters(), **(extra_parameters or {}), "sources": prints}
    )
    ds = None if opts.recompute else _load_stored(opts.store, group, parameters)
    reused = ds is not None
    if ds is None:
        with Executor(opts.dask_address, opts.threads, opts.progress) as executor:
            ds = compute(executor)
        incomplete = any(p["units_done"] < p["units_total"] for p in prints)
        ds.attrs.update(
            _jsonable(
                {
                    "analysis": analysis,
                    "run": opts.run,
                    "source_runs": [p["run"] for p in prints],
                    "weights_sha256": [p["weights_sha256"] for p in prints],
                    "image_set_sha256": [p["image_set_sha256"] for p in prints],
                    "sources": prints,
                    "incomplete_runs": incomplete,
                    "allow_incomplete": opts.allow_incomplete,
                    "parameters": parameters,
                    "computed_at": _now(),
                    "code_version": __version__,
                }
            )
        )
        _write(opts.store, group, ds)
    figure = None
    if opts.figure and plot is not None:
        folder = figure_dir(opts.store, opts.figures)
        folder.mkdir(parents=True, exist_ok=True)
        figure = plot(ds, folder / f"{opts.run}__{name}.png")
    return AnalysisResult(analysis, opts.store, opts.run, name, ds, figure, reused)
