"""One image of a set, as a record: what every other data module builds on."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ImageRecord"]


@dataclass(frozen=True)
class ImageRecord:
    """One image of a set: its stable id, label, and where its pixels come from.

    Attributes
    ----------
    image_id : str
        Stable id: posix path relative to the folder, manifest path as written,
        or built-in name such as ``"photos/astronaut/03"``.
    label : int
        Class index into :attr:`ImageSet.label_names`, or -1 when unknown.
    source : str
        Absolute file path, or a ``"builtin:..."`` reference.
    size : int
        File size in bytes (0 for built-ins and for files missing at open time).
    """

    image_id: str
    label: int
    source: str
    size: int
