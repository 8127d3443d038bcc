"""``vitcnn demo``: the main job on an embedded default, no network and no GPU needed.

Starts a local Ray cluster, extracts a ViT and a ResNet over built-in real
photographs into a local store (random-init weights unless weights are given),
runs every analysis on it with dask, and writes ``report.html``.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jobs.extract import ExtractConfig, extract
from vitcnn_store.models import ModelSpec

__all__ = ["DemoPlan", "demo_plan", "run_demo"]


@dataclass(frozen=True)
class DemoPlan:
    """The demo's two extractions."""

    vit: ExtractConfig
    resnet: ExtractConfig


def demo_plan(args: argparse.Namespace, store: str) -> DemoPlan:
    """Full demo: ViT-S/16 and ResNet-50 at 128 px over 256 photographs;
    quick: tiny models at 64 px over 64 photographs."""
    pretrained = bool(getattr(args, "pretrained", False))
    if args.quick:
        vit_model = ModelSpec("vit_tiny_patch16_224", img_size=64, model_args={"depth": 4})
        resnet_model = ModelSpec("resnet18", img_size=64)
        n = 64
    else:
        vit_model = ModelSpec("vit_small_patch16_224", img_size=128)
        resnet_model = ModelSpec("resnet50", img_size=128)
        n = 256
    vit_model = replace(vit_model, pretrained=pretrained, checkpoint=args.vit_checkpoint)
    resnet_model = replace(resnet_model, pretrained=pretrained, checkpoint=args.resnet_checkpoint)
    common: dict[str, Any] = {
        "images": "builtin:photos",
        "store": store,
        "limit": n,
        "chunk_size": 16 if args.quick else 32,
        "inputs": True,
        "workers": args.workers,
        "overwrite": True,
    }
    vit = ExtractConfig(
        model=vit_model, run="vit", attention=True,
        layers="preset:blocks,blocks.*.attn,blocks.*.mlp", **common,
    )  # fmt: skip
    resnet = ExtractConfig(model=resnet_model, run="resnet", layers="preset:blocks", **common)
    return DemoPlan(vit, resnet)


def run_analyses(store: str, quick: bool) -> list[Any]:
    """Every analysis of the report over the demo store (figures drawn by the report)."""
    from jobs.analyze import (
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

    common: dict[str, Any] = {"store": store, "figure": False}
    batch = 32 if quick else 128  # minibatch CKA as in the paper, at demo scale
    n = 64 if quick else 256  # localization: one batch of every image
    jobs: list[tuple[str, Any, Any]] = [
        ("CKA within the ViT", run_cka,
         CKAConfig(run="vit", batch_size=batch, repeats=2, **common)),
        ("CKA within the ResNet", run_cka,
         CKAConfig(run="resnet", batch_size=batch, repeats=2, **common)),
        ("CKA ViT × ResNet", run_cka,
         CKAConfig(run="vit", run2="resnet", batch_size=batch, repeats=2, **common)),
        ("attention distance and entropy", run_attention, AttentionConfig(run="vit", **common)),
        ("ViT localization", run_localization,
         LocalizationConfig(run="vit", batch_size=n, **common)),
        ("ResNet localization", run_localization,
         LocalizationConfig(run="resnet", batch_size=n, **common)),
        ("skip-connection norm ratios", run_skip, SkipConfig(run="vit", **common)),
        ("ViT linear probes", run_probe, ProbeConfig(run="vit", features="cls", **common)),
        ("ResNet linear probes", run_probe, ProbeConfig(run="resnet", features="gap", **common)),
    ]  # fmt: skip
    results = []
    for title, job, cfg in jobs:
        print(f"\n== {title}")
        result = job(cfg)
        print(result)
        results.append(result)
    return results


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    from vitcnn_store.inspect import describe_store
    from vitcnn_store.store import open_store

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = str(out / "acts.zarr")
    plan = demo_plan(args, store)
    t0 = time.perf_counter()
    print(f"vitcnn demo: store {store}")
    import ray

    started = not ray.is_initialized()
    if started:  # one local Ray cluster for every step
        ray.init(
            include_dashboard=False, logging_level=logging.WARNING, _node_ip_address="127.0.0.1"
        )
    try:
        for cfg in (plan.vit, plan.resnet):
            name, weights = cfg.model.name, cfg.model.weights_source
            print(f"\n== extracting {name} ({weights}) as run {cfg.run!r}")
            print(extract(cfg))
    finally:
        if started:
            ray.shutdown()
    print("\n" + describe_store(store))
    run_analyses(store, args.quick)
    from vitcnn_store.report import build_report

    report = build_report(store, out)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s.")
    print(f"report: {report}  (open it in a browser; it needs no server)")
    print("explore the store with:")
    print(f"  vitcnn show {store} vit")
    last = open_store(store)["vit"].layers[-1]
    snippet = f"import vitcnn_store as v; print(v.open_store('{store}')['vit']['{last}'])"
    print(f'  python -c "{snippet}"')
    return 0
