"""The demo's jobs: two extractions and every analysis, on an embedded default.

A ViT and a ResNet over built-in real photographs (random-init weights
unless weights are given), extracted into one local store on a local Ray
cluster, then every analysis of the report. :func:`demo_plan` says what runs;
the interface (:mod:`vitcnn_store.demo`) runs it, prints as it goes and
writes the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jobs.analyze import (
    AnalysisOptions,
    AnalysisResult,
    AttentionConfig,
    CKAConfig,
    LocalizationConfig,
    ProbeConfig,
    SkipConfig,
    run_attention,
    run_cka,
    run_localization,
    run_probe,
    run_skip,
)
from jobs.extract import ExtractConfig
from vitcnn_store.models import ModelSpec

__all__ = ["DemoAnalysis", "DemoConfig", "DemoPlan", "demo_plan", "local_ray"]


@dataclass(frozen=True)
class DemoConfig:
    """Options of ``vitcnn demo``.

    Examples
    --------
    >>> DemoConfig(out="/tmp/demo").store
    '/tmp/demo/acts.zarr'
    """

    out: str = "vitcnn_demo"
    quick: bool = False
    workers: int = 2
    pretrained: bool = False
    vit_checkpoint: str | None = None
    resnet_checkpoint: str | None = None

    @property
    def store(self) -> str:
        """The demo's store: ``<out>/acts.zarr``."""
        return str(Path(self.out).resolve() / "acts.zarr")


@dataclass(frozen=True)
class DemoAnalysis:
    """One analysis of the demo: a title, the job and its config."""

    title: str
    job: Callable[[Any], AnalysisResult]
    config: AnalysisOptions

    def run(self) -> AnalysisResult:
        return self.job(self.config)


@dataclass(frozen=True)
class DemoPlan:
    """The demo's two extractions and its analyses, in order."""

    vit: ExtractConfig
    resnet: ExtractConfig
    analyses: tuple[DemoAnalysis, ...]


def _extractions(cfg: DemoConfig) -> tuple[ExtractConfig, ExtractConfig]:
    """Full demo: ViT-S/16 and ResNet-50 at 128 px over 256 photographs;
    quick: tiny models at 64 px over 64 photographs."""
    if cfg.quick:
        vit_model = ModelSpec("vit_tiny_patch16_224", img_size=64, model_args={"depth": 4})
        resnet_model = ModelSpec("resnet18", img_size=64)
    else:
        vit_model = ModelSpec("vit_small_patch16_224", img_size=128)
        resnet_model = ModelSpec("resnet50", img_size=128)
    vit_model = replace(vit_model, pretrained=cfg.pretrained, checkpoint=cfg.vit_checkpoint)
    resnet_model = replace(
        resnet_model, pretrained=cfg.pretrained, checkpoint=cfg.resnet_checkpoint
    )
    common: dict[str, Any] = {
        "images": "builtin:photos",
        "store": cfg.store,
        "limit": 64 if cfg.quick else 256,
        "chunk_size": 16 if cfg.quick else 32,
        "inputs": True,
        "workers": cfg.workers,
        "overwrite": True,
    }
    vit = ExtractConfig(
        model=vit_model, run="vit", attention=True,
        layers="preset:blocks,blocks.*.attn,blocks.*.mlp", **common,
    )  # fmt: skip
    resnet = ExtractConfig(model=resnet_model, run="resnet", layers="preset:blocks", **common)
    return vit, resnet


def _analyses(store: str, quick: bool) -> tuple[DemoAnalysis, ...]:
    """Every analysis of the report over the demo store."""
    common: dict[str, Any] = {"store": store}
    batch = 32 if quick else 128  # minibatch CKA as in the paper, at demo scale
    n = 64 if quick else 256  # localization: one batch of every image
    return (
        DemoAnalysis("CKA within the ViT", run_cka,
                     CKAConfig(run="vit", batch_size=batch, repeats=2, **common)),
        DemoAnalysis("CKA within the ResNet", run_cka,
                     CKAConfig(run="resnet", batch_size=batch, repeats=2, **common)),
        DemoAnalysis("CKA ViT × ResNet", run_cka,
                     CKAConfig(run="vit", run2="resnet", batch_size=batch, repeats=2, **common)),
        DemoAnalysis("attention distance and entropy", run_attention,
                     AttentionConfig(run="vit", **common)),
        DemoAnalysis("ViT localization", run_localization,
                     LocalizationConfig(run="vit", batch_size=n, **common)),
        DemoAnalysis("ResNet localization", run_localization,
                     LocalizationConfig(run="resnet", batch_size=n, **common)),
        DemoAnalysis("skip-connection norm ratios", run_skip, SkipConfig(run="vit", **common)),
        DemoAnalysis("ViT linear probes", run_probe,
                     ProbeConfig(run="vit", features="cls", **common)),
        DemoAnalysis("ResNet linear probes", run_probe,
                     ProbeConfig(run="resnet", features="gap", **common)),
    )  # fmt: skip


def demo_plan(cfg: DemoConfig) -> DemoPlan:
    """What the demo runs, in order.

    Examples
    --------
    >>> plan = demo_plan(DemoConfig(out="/tmp/demo", quick=True))
    >>> plan.vit.model.name, plan.resnet.limit, len(plan.analyses)
    ('vit_tiny_patch16_224', 64, 9)
    """
    vit, resnet = _extractions(cfg)
    return DemoPlan(vit, resnet, _analyses(cfg.store, cfg.quick))


@contextmanager
def local_ray() -> Iterator[None]:
    """One local Ray cluster (loopback only) for every extraction of a block, unless
    Ray is already running; shut down on exit if started here."""
    from jobs.ray_cluster import connect, disconnect

    started = connect(None)  # the tool's own Ray: loopback only (jobs/ray_cluster.py)
    try:
        yield
    finally:
        disconnect(started)
