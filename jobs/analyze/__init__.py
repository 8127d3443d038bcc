"""Analysis jobs: dask maps the analysis kernels over a store's chunks, no model loaded.

Each job reads stored activations (``vitcnn_store.open_store``), computes on
local threads or a ``distributed`` cluster, and writes a labelled
:class:`xarray.Dataset` to ``<run>/_analyses/<name>`` through
:mod:`vitcnn_store.store.analyses`. Re-running with the same parameters reuses
the stored result unless ``recompute`` is set. Jobs draw and print nothing:
the CLI (:mod:`vitcnn_store.cli_analyze`) does.

Modules: ``options`` (what every job takes), ``pipeline`` (reuse, compute,
write), ``runs`` (runs, usable images, cross-run pairing), ``layers`` (layer
selection, roles, reductions, geometry), ``tasks`` (dask task builders),
``executor`` (local threads or a dask cluster), and one module per analysis.

Examples
--------
>>> from jobs.analyze import CKAConfig, run_cka
>>> result = run_cka(CKAConfig(store="acts.zarr", run="vitb16", run2="r50"))  # doctest: +SKIP
>>> result.dataset["cka"]  # doctest: +SKIP
"""

from collections.abc import Callable
from typing import Any

from jobs.analyze.attention import AttentionConfig, run_attention
from jobs.analyze.cka import CKAConfig, run_cka
from jobs.analyze.localization import LocalizationConfig, run_localization
from jobs.analyze.options import AnalysisOptions, AnalysisWarning
from jobs.analyze.pipeline import AnalysisResult
from jobs.analyze.probe import ProbeConfig, run_probe
from jobs.analyze.skip import SkipConfig, run_skip

__all__ = [
    "JOBS",
    "AnalysisOptions",
    "AnalysisResult",
    "AnalysisWarning",
    "AttentionConfig",
    "CKAConfig",
    "LocalizationConfig",
    "ProbeConfig",
    "SkipConfig",
    "run_attention",
    "run_cka",
    "run_localization",
    "run_probe",
    "run_skip",
]

# analysis name -> (config class, job function), as the CLI dispatches them.
JOBS: dict[str, tuple[type[AnalysisOptions], Callable[[Any], AnalysisResult]]] = {
    "cka": (CKAConfig, run_cka),
    "attention": (AttentionConfig, run_attention),
    "localization": (LocalizationConfig, run_localization),
    "skip": (SkipConfig, run_skip),
    "probe": (ProbeConfig, run_probe),
}
