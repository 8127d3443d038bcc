"""``vitcnn demo``: the main job on an embedded default, no network and no GPU needed.

Runs the plan of :mod:`jobs.demo` — a local Ray cluster extracts a ViT and a
ResNet over built-in photographs (for CKA, attention and localization), this
process the same two over built-in faces and non-faces (for probes with real
classes, and skip ratios), into ``<out>/acts.zarr``, dask runs every analysis
— printing as it goes, then writes ``report.html`` with each figure's protocol
beside the paper's and the artifacts of random initialisation named, with the
figures, into the store's figure folder ``<out>/acts.zarr.figures/`` (where
``vitcnn analyze`` and ``vitcnn report`` put them too).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.demo import DemoConfig

__all__ = ["demo_config", "run_demo"]


def demo_config(args: argparse.Namespace) -> DemoConfig:
    """The :class:`jobs.demo.DemoConfig` of parsed ``vitcnn demo`` arguments."""
    from jobs.demo import DemoConfig

    return DemoConfig(
        out=args.out,
        quick=args.quick,
        workers=args.workers,
        pretrained=bool(getattr(args, "pretrained", False)),
        vit_checkpoint=args.vit_checkpoint,
        resnet_checkpoint=args.resnet_checkpoint,
    )


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    from pathlib import Path

    from jobs.demo import demo_plan, local_ray
    from jobs.extract import extract
    from vitcnn_store.interface.cli_analyze import describe_result
    from vitcnn_store.interface.describe import describe_store
    from vitcnn_store.interface.report import build_report
    from vitcnn_store.store import open_store

    cfg = demo_config(args)
    plan = demo_plan(cfg)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = plan.store
    t0 = time.perf_counter()
    print(f"vitcnn demo: store {store}")
    with local_ray():
        for extraction in plan.extractions:
            name, weights = extraction.model.name, extraction.model.weights_source
            print(
                f"\n== extracting {name} ({weights}) over {extraction.images} "
                f"as run {extraction.run!r}"
            )
            print(extract(extraction))
    print("\n" + describe_store(store))
    for analysis in plan.analyses:
        print(f"\n== {analysis.title}")
        print(describe_result(analysis.run()))
    report = build_report(store)  # the store's figure folder, as analyze and report use
    print(f"\ndone in {time.perf_counter() - t0:.0f} s.")
    print(f"report: {report}  (open it in a browser; it needs no server)")
    print("explore the store with:")
    print(f"  vitcnn show {store} vit")
    last = open_store(store)["vit"].layers[-1]
    snippet = f"import vitcnn_store as v; print(v.open_store('{store}')['vit']['{last}'])"
    print(f'  python -c "{snippet}"')
    print("browse runs, layers, channels, images and analyses in a browser:")
    print(f"  vitcnn serve {store}    # then open http://127.0.0.1:8000/")
    return 0
