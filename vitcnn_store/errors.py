"""The typed error hierarchy of vitcnn_store.

Every error a user can cause by what they typed or pointed us at derives from
:class:`VitcnnError`; the CLI turns those into a one-line message and exit code 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DtypeOverflowError",
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
    "StoreVersionError",
    "UnknownModelError",
    "UsageError",
    "VitcnnError",
]


class VitcnnError(Exception):
    """Base class of every error caused by user input or by the data pointed at."""


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
