"""The demo's jobs: four extractions and every analysis, on an embedded default.

Two image sets, each for what it can honestly show. Over built-in
photographs (``builtin:photos``: crops of 16 photographs) a ViT and a ResNet
are compared by CKA, attention distance and localization — analyses that need
no labels. The photographs' labels name the photograph a crop came from, so a
probe on them would measure instance identity; probes therefore run on
``builtin:faces`` (faces against non-faces, two real classes of distinct
images), where the same two architectures at a lower resolution also give the
skip-connection ratios side by side. Weights are random unless given. The
analyses use the residual stream by default and draw their baselines; the
report states how each figure differs from the paper's protocol and names
the artifacts of random initialisation it finds.

:func:`demo_plan` says what runs; the interface (:mod:`vitcnn_store.interface.demo`)
runs it, prints as it goes and writes the report.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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
    TopImagesConfig,
    run_attention,
    run_cka,
    run_localization,
    run_probe,
    run_skip,
    run_top_images,
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
    """The demo's extractions and its analyses, in order."""

    extractions: tuple[ExtractConfig, ...]
    analyses: tuple[DemoAnalysis, ...]

    @property
    def store(self) -> str:
        """The one store every extraction writes to."""
        return self.extractions[0].store


def _models(cfg: DemoConfig, size: int) -> tuple[ModelSpec, ModelSpec]:
    """Full demo: ViT-S/16 and ResNet-50; quick: a 4-block ViT-Ti/16 and ResNet-18. A
    random-init ResNet is built with ``zero_init_last=False`` (live residual branches).

    Examples
    --------
    >>> _models(DemoConfig(quick=True), 64)[1].model_args
    {'zero_init_last': False}
    """
    if cfg.quick:
        vit = ModelSpec("vit_tiny_patch16_224", img_size=size, model_args={"depth": 4})
        resnet = ModelSpec("resnet18", img_size=size)
    else:
        vit = ModelSpec("vit_small_patch16_224", img_size=size)
        resnet = ModelSpec("resnet50", img_size=size)
    if not (cfg.pretrained or cfg.resnet_checkpoint):
        # timm zero-initialises each residual branch's last BatchNorm: at random init every
        # branch would output exactly 0 (dead branches, blocks repeating their input).
        resnet = replace(resnet, model_args={"zero_init_last": False})
    return (
        replace(vit, pretrained=cfg.pretrained, checkpoint=cfg.vit_checkpoint),
        replace(resnet, pretrained=cfg.pretrained, checkpoint=cfg.resnet_checkpoint),
    )


def _extractions(cfg: DemoConfig) -> tuple[ExtractConfig, ...]:
    """Photographs at 128 px (quick: 64 px), 256 of them (quick: 64), with inputs for
    localization and ViT attention; faces (25-px originals) at 64 px, 200 (quick: 100),
    with the taps skip ratios need."""
    common: dict[str, Any] = {"store": cfg.store, "overwrite": True}
    vit, resnet = _models(cfg, 64 if cfg.quick else 128)
    photos: dict[str, Any] = {
        **common,
        "images": "builtin:photos",
        "limit": 64 if cfg.quick else 256,
        "workers": cfg.workers,
        "chunk_size": 16 if cfg.quick else 32,
        "inputs": True,
    }
    vit_faces, resnet_faces = _models(cfg, 64)
    # A few hundred small images: extracted in this process. A Ray actor would start a
    # process that imports torch and timm (about 4 s per run on 2 cores) to run the same
    # forward: one actor gets every CPU, as this process does, so the values are the same.
    faces: dict[str, Any] = {
        **common,
        "images": "builtin:faces",
        "limit": 100 if cfg.quick else 200,
        "chunk_size": 50,
        "workers": 0,
        "inputs": True,  # inputs: the raw-pixel probe
    }
    return (
        ExtractConfig(model=vit, run="vit", layers="preset:blocks", attention=True, **photos),
        ExtractConfig(model=resnet, run="resnet", layers="preset:blocks", **photos),
        ExtractConfig(
            model=vit_faces,
            run="vit_faces",
            layers="preset:blocks,blocks.*.attn,blocks.*.mlp",
            **faces,
        ),
        ExtractConfig(model=resnet_faces, run="resnet_faces", layers="preset:paper", **faces),
    )


def _analyses(store: str, quick: bool) -> tuple[DemoAnalysis, ...]:
    """Every analysis of the report over the demo store."""
    common: dict[str, Any] = {"store": store}
    batch = 32 if quick else 128  # minibatch CKA as in the paper, at demo scale
    # Localization: four batches over every image, so its interval (a bootstrap over
    # batches) exists.
    n = 16 if quick else 64
    repeats = 2 if quick else 3  # probe splits: error bars
    return (
        DemoAnalysis(
            "CKA within the ViT",
            run_cka,
            CKAConfig(run="vit", batch_size=batch, repeats=2, **common),
        ),
        DemoAnalysis(
            "CKA within the ResNet",
            run_cka,
            CKAConfig(run="resnet", batch_size=batch, repeats=2, **common),
        ),
        DemoAnalysis(
            "CKA ViT × ResNet",
            run_cka,
            CKAConfig(run="vit", run2="resnet", batch_size=batch, repeats=2, **common),
        ),
        DemoAnalysis(
            "attention distance and entropy", run_attention, AttentionConfig(run="vit", **common)
        ),
        DemoAnalysis(
            "ViT localization",
            run_localization,
            LocalizationConfig(run="vit", batch_size=n, **common),
        ),
        DemoAnalysis(
            "ResNet localization",
            run_localization,
            LocalizationConfig(run="resnet", batch_size=n, **common),
        ),
        DemoAnalysis(
            "ViT skip-connection norm ratios (faces)",
            run_skip,
            SkipConfig(run="vit_faces", **common),
        ),
        DemoAnalysis(
            "ResNet skip-connection norm ratios (faces)",
            run_skip,
            SkipConfig(run="resnet_faces", **common),
        ),
        DemoAnalysis(
            "ViT linear probes: faces vs non-faces",
            run_probe,
            ProbeConfig(run="vit_faces", repeats=repeats, **common),
        ),
        DemoAnalysis(
            "ResNet linear probes: faces vs non-faces",
            run_probe,
            ProbeConfig(run="resnet_faces", repeats=repeats, **common),
        ),
        DemoAnalysis(
            "ViT top images per channel (for the explorer)",
            run_top_images,
            TopImagesConfig(run="vit", **common),
        ),
        DemoAnalysis(
            "ResNet top images per channel (for the explorer)",
            run_top_images,
            TopImagesConfig(run="resnet", **common),
        ),
    )


def demo_plan(cfg: DemoConfig) -> DemoPlan:
    """What the demo runs, in order.

    Examples
    --------
    >>> plan = demo_plan(DemoConfig(out="/tmp/demo", quick=True))
    >>> [e.run for e in plan.extractions], len(plan.analyses)
    (['vit', 'resnet', 'vit_faces', 'resnet_faces'], 12)
    >>> plan.extractions[2].images, plan.extractions[0].model.name
    ('builtin:faces', 'vit_tiny_patch16_224')
    >>> [e.workers for e in plan.extractions]  # photographs on Ray actors, faces in process
    [2, 2, 0, 0]
    """
    return DemoPlan(_extractions(cfg), _analyses(cfg.store, cfg.quick))


def _import_extraction() -> None:
    """Import what an extraction's plan needs (torch, timm): seconds on a small machine."""
    with suppress(Exception):  # an extraction imports it again and says what is wrong
        import jobs.plan  # noqa: F401


@contextmanager
def local_ray() -> Iterator[None]:
    """One local Ray cluster (loopback only) for every extraction of a block, unless
    Ray is already running; shut down on exit if started here.

    While Ray starts (its processes come up: seconds), a thread imports torch and timm
    for the first extraction, as an extraction that starts Ray itself plans meanwhile.
    """
    from jobs.ray_cluster import connect, disconnect

    warm = threading.Thread(target=_import_extraction, name="vitcnn-import", daemon=True)
    warm.start()
    try:
        started = connect(None)  # the tool's own Ray: loopback only (jobs/ray_cluster.py)
    finally:
        warm.join()
    try:
        yield
    finally:
        disconnect(started)
