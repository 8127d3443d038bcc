"""vitcnn_store: a distributed activation store and analyses for ViTs and CNNs.

Extract per-layer activations of timm models or any ``torch.nn.Module`` (in
this process, or on a Ray cluster) into a zarr v3 store labelled for xarray,
then compare representations offline (CKA, attention distance, localization,
skip ratios, linear probes).

``import vitcnn_store`` stays as light as the store reader: :func:`extract`
(from :mod:`jobs.api`) is imported on first use.

Examples
--------
>>> import vitcnn_store
>>> run = vitcnn_store.extract("resnet50", "images/", "acts.zarr", "r50",
...                            layers="preset:blocks")  # doctest: +SKIP
>>> store = vitcnn_store.open_store("acts.zarr")  # doctest: +SKIP
>>> store["vitb16"]["blocks.3"]  # doctest: +SKIP
<xarray.DataArray 'activation' (image: 512, token: 197, channel: 768) ...>
"""

from typing import Any

from vitcnn_store._version import FORMAT_VERSION, __version__
from vitcnn_store.errors import (
    BrokenRunError,
    CheckpointError,
    ClusterError,
    DamagedDataError,
    DtypeOverflowError,
    EnvironmentFailureError,
    ImageDecodeError,
    ImageSetError,
    IncompleteRunError,
    LayerPatternError,
    ModelError,
    NonFiniteActivationError,
    NotAStoreError,
    RunExistsError,
    RunMismatchError,
    RunNotFoundError,
    StoreError,
    StoreUnavailableError,
    StoreVersionError,
    UnknownModelError,
    UsageError,
    VitcnnError,
)
from vitcnn_store.store.reader import Run, Store, open_store
from vitcnn_store.store.verify import verify_store

__all__ = [
    "FORMAT_VERSION",
    "BrokenRunError",
    "CheckpointError",
    "ClusterError",
    "DamagedDataError",
    "DtypeOverflowError",
    "EnvironmentFailureError",
    "ImageDecodeError",
    "ImageSetError",
    "IncompleteRunError",
    "LayerPatternError",
    "ModelError",
    "NonFiniteActivationError",
    "NotAStoreError",
    "Run",
    "RunExistsError",
    "RunMismatchError",
    "RunNotFoundError",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "StoreVersionError",
    "UnknownModelError",
    "UsageError",
    "VitcnnError",
    "__version__",
    "extract",
    "open_store",
    "verify_store",
]


def __getattr__(name: str) -> Any:
    # PEP 562: the extraction API (torch, timm, Ray behind it) loads on first use.
    if name == "extract":
        from jobs.api import extract

        return extract
    raise AttributeError(f"module 'vitcnn_store' has no attribute {name!r}")
