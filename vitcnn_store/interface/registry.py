"""The registry of analyses: one :class:`AnalysisEntry` per ``vitcnn analyze`` subcommand.

An entry says everything the rest of the program needs to know about one
analysis, in the manner of xarray's ``BackendEntrypoint``: its name, its
config class (whose option table builds the CLI's and the service's options),
its job and its plotter (named, and imported only when called, so building the
parser loads no dask, xarray or matplotlib), its report section, what the
paper did, which caveats concern its figure, and which variable its CSV link
tabulates. ``vitcnn analyze``, the report, :func:`plots.plot_result
<vitcnn_store.interface.plots.plot_result>`, the service's job queue and the
explorer all read :data:`ANALYSES`; adding an analysis is adding one entry
here (``docs/architecture.md`` has a worked example).

Examples
--------
>>> ANALYSES["skip"].config.__name__, ANALYSES["skip"].draws_figure
('SkipConfig', True)
>>> ANALYSES["top-images"].draws_figure, list(ANALYSES)[:2]
(False, ['cka', 'attention'])
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
from vitcnn_store.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import xarray as xr

    from jobs.analyze import AnalysisResult

__all__ = ["ANALYSES", "AnalysisEntry", "AnalysisWarning", "entry", "run_findings"]

_PLOTS = "vitcnn_store.interface.plots"


@dataclass(frozen=True, kw_only=True)
class AnalysisEntry:
    """One analysis, as every part of the interface and the service finds it.

    Parameters
    ----------
    name
        The subcommand (``vitcnn analyze NAME``), the results' ``analysis`` attribute
        and their default name in the store.
    config
        The job's config dataclass; its option table is the CLI's and the service's.
    job
        ``"module:function"`` of the job, imported when the analysis runs.
    help, description
        The subcommand's one-line help and its longer description (None: the help).
    plotter
        Name of the function of :mod:`vitcnn_store.interface.plots` that draws a
        result to a PNG, or None for an analysis without a static figure (the
        explorer of ``vitcnn serve`` shows it, the report leaves it out).
    section
        (title, caption) of the report's section, or None for no section.
    paper
        What Raghu et al. 2021 did for this figure, citing section or figure.
    findings
        Kinds of :class:`jobs.analyze.checks.Finding` that concern the figure.
    main_variable
        The variable the explorer's CSV link tabulates, or None.
    """

    name: str
    config: type[AnalysisOptions]
    job: str
    help: str
    description: str | None = None
    plotter: str | None = None
    section: tuple[str, str] | None = None
    paper: str = ""
    findings: tuple[str, ...] = ()
    main_variable: str | None = None

    @property
    def draws_figure(self) -> bool:
        """Whether ``vitcnn analyze`` and the report draw a PNG of the result."""
        return self.plotter is not None

    def run(self, config: AnalysisOptions) -> AnalysisResult:
        """Run the job on ``config`` (the job's module loads now)."""
        module, function = self.job.split(":")
        job: Any = getattr(importlib.import_module(module), function)
        result: AnalysisResult = job(config)
        return result

    def plot(self, ds: xr.Dataset, path: str | Path, stamp: dict[str, Any] | None = None) -> Path:
        """Draw result ``ds`` to ``path``, stamped with ``stamp`` if given (matplotlib
        loads now)."""
        if self.plotter is None:
            raise ValueError(f"no figure for analysis {self.name!r}")
        plotter: Any = getattr(importlib.import_module(_PLOTS), self.plotter)
        out: Path = plotter(ds, path, stamp=stamp)
        return out


ANALYSES: dict[str, AnalysisEntry] = {
    e.name: e
    for e in (
        AnalysisEntry(
            name="cka",
            config=CKAConfig,
            job="jobs.analyze.cka:run_cka",
            help="all-pairs CKA between layers of one or two runs",
            plotter="plot_cka",
            section=(
                "Representation similarity (CKA)",
                "Linear CKA between every pair of layers, layers in forward order on both "
                "axes (paper Sec. 4, Figs. 1–2). Bright off-diagonal blocks mean layers that "
                "represent the images alike; across models, the diagonal band shows which "
                "depths correspond.",
            ),
            paper="trained ViTs and ResNets (ViT-B/16, ViT-L/16, ResNet-50 among them) on "
            "224-px ImageNet images, Sec. 4, Figs. 1–2; minibatch CKA with the unbiased HSIC "
            "(Sec. 3), 10 batches of 1024 images (n = 10,240), averaged over 20 samplings",
            findings=("identical-layers", "zero-layers", "cka-one"),
            main_variable="cka",
        ),
        AnalysisEntry(
            name="attention",
            config=AttentionConfig,
            job="jobs.analyze.attention:run_attention",
            help="mean attention distance, entropy, CLS maps per head",
            plotter="plot_attention",
            section=(
                "Attention distance",
                "Mean attention distance in input pixels per head (dots, sorted) for every "
                "attention layer in forward order (paper Sec. 5, Fig. 3); small distances are "
                "local, convolution-like heads. The dashed line is uniform attention over all "
                "tokens at this run's resolution and patch size: a head on it has learnt "
                "nothing about position.",
            ),
            paper="trained ViTs at 224 px (Sec. 5, Fig. 3; Fig. 4: ViTs trained on ImageNet "
            "only), mean attention distance over 5000 images (with 16-px patches, uniform "
            "attention over all 197 tokens reads 115.9 px)",
            main_variable="mean_distance",
        ),
        AnalysisEntry(
            name="localization",
            config=LocalizationConfig,
            job="jobs.analyze.localization:run_localization",
            help="CKA of chosen tokens with every input patch",
            plotter="plot_localization",
            section=(
                "Localization",
                "For chosen tokens of a late layer, CKA between the token's representation "
                "and the raw pixels of every input patch, on the patch grid (paper Sec. 7, "
                "Fig. 9); the chosen token is marked. Below: the same map for the token's own "
                "input patch (an identity map), the baseline for fall-off from correlated "
                "neighbours.",
            ),
            paper="trained ViTs and ResNets on 224-px ImageNet images, the token's "
            "representation against the raw pixels of every input patch (Sec. 7, Fig. 9; "
            "Fig. 10: ViTs trained with global average pooling)",
            main_variable="localization",
        ),
        AnalysisEntry(
            name="skip",
            config=SkipConfig,
            job="jobs.analyze.skip:run_skip",
            help="skip-connection norm ratios ||z||/||f(z)|| per block",
            plotter="plot_skip",
            section=(
                "Skip connections",
                "Ratio of the norm of the representation on the skip path to the norm of the "
                "branch output, per block against normalized depth, CLS separate from spatial "
                "tokens (paper Sec. 6, Fig. 7); above the dashed line the skip path dominates. "
                "Runs of different models share one axis in the overlay.",
            ),
            paper="trained ViTs, ‖z‖/‖f(z)‖ per block for the CLS and the spatial tokens, "
            "compared with a ResNet (Sec. 6, Fig. 7)",
            findings=("dead-branches", "zero-layers"),
            main_variable="ratio_spatial",
        ),
        AnalysisEntry(
            name="probe",
            config=ProbeConfig,
            job="jobs.analyze.probe:run_probe",
            help="linear probes per layer (closed-form ridge, penalty by cross-validation)",
            description="Ridge probes onto {-1,1} one-hot targets per layer, plotted against "
            "normalized depth with the chance level. The penalty is chosen per layer by "
            "stratified k-fold cross-validation on the training split unless --l2 fixes it.",
            plotter="plot_probe",
            section=(
                "Linear probes",
                "Test accuracy of closed-form ridge probes on the residual stream (the stem "
                "and every block output) against normalized depth, with the chance level "
                "dashed and the same probe on the raw input pixels dotted (paper Sec. 8, "
                "Fig. 13). The ridge penalty is chosen per layer by cross-validation on the "
                "training split (lower panel); filled circles probe the CLS token, squares "
                "the token or spatial mean.",
            ),
            paper="closed-form linear probes on the CLS token or the token mean at the output "
            "of every block, ViTs and ResNets trained on data of different scales (Sec. 8, "
            "Fig. 13)",
            findings=("identical-layers",),
            main_variable="accuracy",
        ),
        AnalysisEntry(
            name="heads",
            config=HeadsConfig,
            job="jobs.analyze.heads:run_heads",
            help="per-head CKA with a CNN's lower layers against mean attention distance",
            description="Each ViT head's output (extract --attention-heads, with --attention) "
            "compared by minibatch CKA with RUN2's layers (default: its residual stream up to "
            "half depth), plotted against the head's mean attention distance (paper Sec. 5, "
            "Fig. 5).",
            plotter="plot_heads",
            section=(
                "Attention heads against the CNN",
                "Each ViT head's output compared by CKA with the CNN's lower layers, against "
                "the head's mean attention distance (paper Sec. 5, Fig. 5): heads that attend "
                "locally resemble the CNN's lower layers more.",
            ),
            paper="individual heads of the lower layers of a trained ViT against the lower "
            "layers of a ResNet by CKA, sorted by mean attention distance (Sec. 5, Fig. 5)",
        ),
        AnalysisEntry(
            name="top-images",
            config=TopImagesConfig,
            job="jobs.analyze.top_images:run_top_images",
            help="the k images that drive each channel most, and where (max over positions)",
            description="For every channel of every selected layer, the k images with the "
            "highest maximum over positions (patch tokens, or y*x), with the position of that "
            "maximum, and each channel's mean and std. One pass over the stored chunks. No "
            "figure: vitcnn serve STORE shows them.",
            main_variable="value",
        ),
    )
}


def entry(name: str) -> AnalysisEntry:
    """The entry of analysis ``name``; an unknown name is a :class:`UsageError`.

    Examples
    --------
    >>> entry("probe").job
    'jobs.analyze.probe:run_probe'
    >>> entry("nope")
    Traceback (most recent call last):
    ...
    vitcnn_store.errors.UsageError: unknown analysis 'nope': want one of cka, attention, \
localization, skip, probe, heads, top-images
    """
    if name not in ANALYSES:
        raise UsageError(f"unknown analysis {name!r}: want one of {', '.join(ANALYSES)}")
    return ANALYSES[name]


def run_findings(run: Any, results: Sequence[xr.Dataset] = ()) -> list[Any]:
    """Artifacts of ``run`` and its ``results`` (:func:`jobs.analyze.checks.run_findings`):
    the service reaches the jobs' checks through the interface."""
    from jobs.analyze.checks import run_findings as find

    return find(run, results)
