"""Analysis jobs: dask maps the analysis kernels over a store's chunks, no model loaded.

Each job reads stored activations (``vitcnn_store.open_store``), computes on
local threads or a ``distributed`` cluster, and writes a labelled
:class:`xarray.Dataset` to ``<run>/_analyses/<name>/<key>`` through
:mod:`vitcnn_store.store.analyses`. Re-running with the same parameters reuses
the stored result unless ``recompute`` is set. Jobs draw and print nothing:
the CLI (:mod:`vitcnn_store.interface.cli_analyze`) does. Which analyses exist,
and how the interface finds their jobs, is the interface's registry
(:mod:`vitcnn_store.interface.registry`); this package knows nothing of it.

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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The configs are light (the CLI builds its parser from them); the jobs load on
# first use, so importing a config does not import the analyses.
from jobs.analyze.options import (
    AnalysisOptions,
    AnalysisWarning,
    AttentionConfig,
    CKAConfig,
    HeadsConfig,
    LocalizationConfig,
    ProbeConfig,
    SkipConfig,
    TopImagesConfig,
)

if TYPE_CHECKING:
    from jobs.analyze.attention import run_attention
    from jobs.analyze.cka import run_cka
    from jobs.analyze.heads import run_heads
    from jobs.analyze.localization import run_localization
    from jobs.analyze.pipeline import AnalysisResult
    from jobs.analyze.probe import run_probe
    from jobs.analyze.skip import run_skip
    from jobs.analyze.top_images import run_top_images

__all__ = [
    "AnalysisOptions",
    "AnalysisResult",
    "AnalysisWarning",
    "AttentionConfig",
    "CKAConfig",
    "HeadsConfig",
    "LocalizationConfig",
    "ProbeConfig",
    "SkipConfig",
    "TopImagesConfig",
    "run_attention",
    "run_cka",
    "run_heads",
    "run_localization",
    "run_probe",
    "run_skip",
    "run_top_images",
]


def __getattr__(name: str) -> Any:
    # ``run_<job>`` is the job of module ``jobs.analyze.<job>``, loaded on first use.
    if name == "AnalysisResult":
        return importlib.import_module("jobs.analyze.pipeline").AnalysisResult
    if name.startswith("run_"):
        path = f"{__name__}.{name.removeprefix('run_')}"
        try:
            module = importlib.import_module(path)
        except ModuleNotFoundError as e:
            if e.name != path:  # a job whose own imports fail says so
                raise
        else:
            if hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
