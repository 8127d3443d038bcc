"""The typed error hierarchy of vitcnn_store.

Every error a user can cause by what they typed or pointed us at derives from
:class:`VitcnnError`; the CLI turns those into a one-line message and the
class's :attr:`~VitcnnError.exit_code`: 2 for bad input, 1 for failures of the
environment (:class:`EnvironmentFailureError`: disk full, missing credentials, a
read-only store, an unreachable cluster, damaged data). Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
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
    "RunExistsError",
    "RunLockedError",
    "RunMismatchError",
    "RunNotFoundError",
    "StoreError",
    "StoreUnavailableError",
    "StoreVersionError",
    "UnknownModelError",
    "UsageError",
    "VitcnnError",
]


class VitcnnError(Exception):
    """Base class of every error caused by user input or by the data pointed at."""

    #: Exit code of the CLI: 2 = bad input (fix what you typed).
    exit_code = 2


class EnvironmentFailureError(VitcnnError):
    """The environment failed, not the input: disk, network, credentials, damaged data."""

    exit_code = 1


class UsageError(VitcnnError, ValueError):
    """An option or argument is malformed or out of range."""


# -- models and layers ---------------------------------------------------------------


class ModelError(VitcnnError):
    """A model cannot be built as asked."""


class UnknownModelError(ModelError, KeyError):
    """The model name is not a timm model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(ModelError):
    """A checkpoint is missing, unsafe (pickled code) or does not fit the model."""


class LayerPatternError(VitcnnError, ValueError):
    """A layer pattern or preset matches nothing or is malformed."""


# -- images --------------------------------------------------------------------------


class ImageSetError(VitcnnError, ValueError):
    """An image folder, manifest or built-in set cannot be used."""


# -- store ---------------------------------------------------------------------------


class StoreError(VitcnnError):
    """A store cannot be opened, read or written."""


class NotAStoreError(StoreError):
    """The path exists but holds no vitcnn store."""


class StoreVersionError(StoreError):
    """The store was written in a format version this code does not read."""


class RunNotFoundError(StoreError, KeyError):
    """No run (or layer) of that name in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RunExistsError(StoreError):
    """A run of that name exists and neither resume nor overwrite was asked for."""


class RunMismatchError(StoreError):
    """Resume was asked for but the stored run was made with other settings."""


class IncompleteRunError(StoreError):
    """A run has units not yet written."""


class DtypeOverflowError(StoreError):
    """Activations of a layer do not fit the store's dtype (float16 overflow)."""


class NonFiniteActivationError(StoreError):
    """A model produced NaN or inf for a valid image."""


class ImageDecodeError(VitcnnError):
    """One image file cannot be decoded (recorded per image unless --strict)."""


class RunLockedError(StoreError):
    """Another live job holds the run's lease."""


class StoreUnavailableError(StoreError, EnvironmentFailureError):
    """The store cannot be reached or written: read-only, disk full, no credentials."""


class DamagedDataError(StoreError, EnvironmentFailureError):
    """Stored bytes are damaged or missing: a checksum mismatch, a missing chunk.

    ``run``, ``layer`` and ``unit`` say where, when known. The attributes survive
    pickling (dask and Ray ship errors between processes).
    """

    def __init__(
        self,
        message: str,
        *,
        run: str | None = None,
        layer: str | None = None,
        unit: int | None = None,
    ) -> None:
        super().__init__(message)
        self.run, self.layer, self.unit = run, layer, unit


class BrokenRunError(StoreError, EnvironmentFailureError):
    """A run whose creation was interrupted: ``--overwrite`` or ``--resume`` recovers it."""


class ClusterError(EnvironmentFailureError):
    """The Ray cluster cannot be reached or cannot start the workers."""
