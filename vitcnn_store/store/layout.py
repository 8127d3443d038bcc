"""Names and rules of store format v1 (DESIGN.md §2), shared by writer and reader."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from vitcnn_store._version import FORMAT_VERSION
from vitcnn_store.errors import NotAStoreError, StoreError, StoreVersionError, UsageError

__all__ = [
    "ANALYSES",
    "FORMAT_ATTR",
    "FORMAT_VERSION",
    "RUN_ARRAYS",
    "check_name",
    "open_root",
    "quiet_zarr",
    "unit_bounds",
]

FORMAT_ATTR = "vitcnn_store.format"
ANALYSES = "_analyses"
# Arrays directly under a run; layer groups may not take these names.
RUN_ARRAYS = (
    "image", "image_id", "label", "done", "failed", "failure", "input", "input_y", "input_x",
)  # fmt: skip

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def check_name(name: str, what: str = "run") -> str:
    """Validate a run or analysis name: no ``/``, no ``..``, no leading ``_`` or ``.``.

    Examples
    --------
    >>> check_name("vitb16")
    'vitb16'
    """
    if not _NAME.fullmatch(name) or ".." in name:
        raise UsageError(
            f"invalid {what} name {name!r}: use letters, digits, '_', '-', '.', "
            "starting with a letter or digit, without '/' or '..'"
        )
    return name


def unit_bounds(n_images: int, chunk: int) -> list[tuple[int, int]]:
    """Image ranges of the work units: one per chunk along ``image``.

    Examples
    --------
    >>> unit_bounds(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    return [(s, min(s + chunk, n_images)) for s in range(0, n_images, chunk)]


@contextmanager
def quiet_zarr() -> Iterator[None]:
    """Silence zarr's notice that consolidated metadata is not in the v3 spec."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
        yield


def _is_empty_location(url: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return True
    return fs.isdir(path) and not fs.ls(path)


def open_root(url: str, mode: Literal["r", "r+", "a"] = "r", *, create: bool = False) -> Any:
    """Open the root group of a vitcnn store (creating an empty store if asked).

    Raises :class:`NotAStoreError` for a location holding something else,
    :class:`StoreVersionError` for a newer format, :class:`StoreError` when the
    location cannot be reached or written.
    """
    import zarr

    url = str(url)
    try:
        with quiet_zarr():
            if create and _is_empty_location(url):
                root = zarr.open_group(url, mode="w", zarr_format=3)
                root.attrs[FORMAT_ATTR] = FORMAT_VERSION
                return root
            try:
                # Never mode "a" here: it would turn any folder into a zarr group.
                existing: Literal["r", "r+"] = "r" if mode == "r" else "r+"
                root = zarr.open_group(url, mode=existing, zarr_format=3, use_consolidated=False)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
                if not create and _is_empty_location(url):
                    raise StoreError(f"no store at {url}") from e
                raise NotAStoreError(f"{url} is not a vitcnn store (no zarr v3 group there)") from e
    except PermissionError as e:
        raise StoreError(f"cannot write to store {url}: permission denied") from e
    except OSError as e:
        raise StoreError(f"cannot open store {url}: {e}") from e
    version = root.attrs.get(FORMAT_ATTR)
    if version is None:
        raise NotAStoreError(
            f"{url} is a zarr group but not a vitcnn store ({FORMAT_ATTR} missing)"
        )
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise StoreVersionError(
            f"{url} has store format {version}; this vitcnn_store reads up to "
            f"{FORMAT_VERSION}: upgrade vitcnn_store"
        )
    return root
