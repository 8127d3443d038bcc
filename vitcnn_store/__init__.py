"""vitcnn_store: a distributed activation store and analyses for ViTs and CNNs.

Extract per-layer activations of timm models or any ``torch.nn.Module`` (in
this process, or on a Ray cluster) into a zarr v3 store labelled for xarray,
then compare representations offline (CKA, attention distance, localization,
skip ratios, linear probes).

``import vitcnn_store`` imports only the errors: the store reader (numpy,
zarr) and :func:`extract` (from :mod:`jobs.api` through
:mod:`vitcnn_store.interface.api`: torch, timm, Ray) are imported
on first use, so that ``vitcnn --help`` and every light command start fast.

Examples
--------
>>> import vitcnn_store
>>> run = vitcnn_store.extract("resnet50", "images/", "acts.zarr", "r50",
...                            layers="preset:blocks")  # doctest: +SKIP
>>> store = vitcnn_store.open_store("acts.zarr")  # doctest: +SKIP
>>> store["vitb16"]["blocks.3"]  # doctest: +SKIP
<xarray.DataArray 'activation' (image: 512, token: 197, channel: 768) ...>
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from vitcnn_store.interface.api import extract
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


#: Where each name imported on first use lives (PEP 562).
_LAZY = {
    "Run": "vitcnn_store.store.reader",
    "Store": "vitcnn_store.store.reader",
    "open_store": "vitcnn_store.store.reader",
    "verify_store": "vitcnn_store.store.verify",
    "extract": "vitcnn_store.interface.api",
}


def __getattr__(name: str) -> Any:
    # PEP 562: the reader and the extraction API load on first use.
    if name not in _LAZY:
        raise AttributeError(f"module 'vitcnn_store' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
