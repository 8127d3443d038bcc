"""Shared fixtures: one local Ray cluster per test session, and small stores made
by the real extraction job with tiny timm models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Ray prints a token-auth notice and usage-stats prompts; neither helps in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster shared by every test that needs one, started as the tool starts
    its own (loopback only)."""
    import ray

    from jobs.ray_cluster import disconnect, start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=2, object_store_memory=256 * 1024**2)
    yield
    disconnect(started)


TINY_VIT = {"name": "vit_tiny_patch16_224", "img_size": 32, "model_args": {"depth": 2}}
TINY_RESNET = {"name": "resnet18", "img_size": 32}


def extract_tiny(store: str | Path, run: str, family: str = "vit", **options: object) -> object:
    """Run the real extraction job with a tiny model; returns its summary."""
    from jobs.extract import ExtractConfig, extract
    from vitcnn_store.models import ModelSpec

    spec = dict(TINY_VIT if family == "vit" else TINY_RESNET)
    model = ModelSpec(
        spec["name"], img_size=spec["img_size"], model_args=spec.get("model_args", {})
    )  # type: ignore[arg-type]
    defaults: dict[str, object] = {
        "images": "builtin:faces",
        "limit": 40,
        "chunk_size": 16,
        "progress": False,
    }
    defaults.update(options)
    return extract(ExtractConfig(model=model, store=str(store), run=run, **defaults))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_store(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store with runs ``vit`` (preset:paper, attention, inputs) and ``resnet``
    (preset:paper, inputs) over 40 labelled built-in face images. Treat as read-only."""
    store = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    extract_tiny(store, "vit", "vit", layers="preset:paper", attention=True, inputs=True)
    extract_tiny(store, "resnet", "resnet", layers="preset:paper", inputs=True)
    return str(store)
