"""Analysis jobs: dask maps the analysis kernels over a store's chunks, no model loaded.

Each job reads stored activations (``vitcnn_store.open_store``), computes on
local threads or a ``distributed`` cluster, and writes a labelled
:class:`xarray.Dataset` to ``<run>/_analyses/<name>/<key>`` through
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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The configs are light (the CLI builds its parser from them); the jobs load on
# first use, so importing a config does not import the analyses.
from jobs.analyze.options import (
    CONFIGS,
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
    from collections.abc import Callable

    from jobs.analyze.attention import run_attention
    from jobs.analyze.cka import run_cka
    from jobs.analyze.heads import run_heads
    from jobs.analyze.localization import run_localization
    from jobs.analyze.pipeline import AnalysisResult
    from jobs.analyze.probe import run_probe
    from jobs.analyze.skip import run_skip
    from jobs.analyze.top_images import run_top_images

    # analysis name -> (config class, job function), as the CLI dispatches them.
    JOBS: dict[str, tuple[type[AnalysisOptions], Callable[[Any], AnalysisResult]]]

__all__ = [
    "CONFIGS",
    "JOBS",
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

_LAZY = {
    "AnalysisResult": "jobs.analyze.pipeline",
    "run_attention": "jobs.analyze.attention",
    "run_heads": "jobs.analyze.heads",
    "run_cka": "jobs.analyze.cka",
    "run_localization": "jobs.analyze.localization",
    "run_probe": "jobs.analyze.probe",
    "run_skip": "jobs.analyze.skip",
    "run_top_images": "jobs.analyze.top_images",
}


def __getattr__(name: str) -> Any:
    if name == "JOBS":
        return {
            analysis: (config, __getattr__(f"run_{analysis.replace('-', '_')}"))
            for analysis, config in CONFIGS.items()
        }
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
