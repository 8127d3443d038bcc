"""A small store holding everything the explorer shows, made by the real jobs.

Runs ``vit`` (a 2-block ViT-Ti/16 at 64 px: a 4×4 patch grid; preset:paper,
attention, inputs) and ``resnet`` (ResNet-18 at 64 px; preset:paper, inputs)
over 24 built-in faces, then every analysis: top images, CKA within and across
the runs, attention, localization, skip ratios and probes.
"""

from __future__ import annotations

import sys
from pathlib import Path


def build_explorer_store(store: str | Path, images: int = 24) -> str:
    """Extract both runs into ``store`` (in this process) and run every analysis on them."""
    from jobs.analyze import (
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
    from jobs.extract import ExtractConfig, extract
    from vitcnn_store.models import ModelSpec

    store = str(store)
    models = {
        "vit": ModelSpec("vit_tiny_patch16_224", img_size=64, model_args={"depth": 2}),
        "resnet": ModelSpec("resnet18", img_size=64),
    }
    for run, model in models.items():
        extract(
            ExtractConfig(
                model=model,
                store=store,
                run=run,
                images="builtin:faces",
                limit=images,
                chunk_size=8,
                layers="preset:paper",
                attention=run == "vit",
                inputs=True,
                progress=False,
            )
        )
    common = {"store": store, "progress": False, "threads": 2}
    for run in models:
        run_top_images(TopImagesConfig(run=run, k=6, **common))
        run_cka(CKAConfig(run=run, batch_size=images // 2, **common))
        run_localization(LocalizationConfig(run=run, batch_size=images, **common))
        run_skip(SkipConfig(run=run, **common))
        run_probe(ProbeConfig(run=run, l2=1.0, **common))
    run_cka(CKAConfig(run="vit", run2="resnet", batch_size=images // 2, **common))
    run_attention(AttentionConfig(run="vit", **common))
    return store


if __name__ == "__main__":  # python -m tests.serve.explorer_store OUT.zarr
    print(build_explorer_store(sys.argv[1]))
