"""Names and rules of the store format (docs/format.md), shared by writer and reader.

Also the one place that turns failures of the storage underneath (a read-only
or full disk, missing credentials, a corrupt ``zarr.json``) into typed,
one-line errors.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from vitcnn_store._version import FORMAT_VERSION, READABLE_FORMATS
from vitcnn_store.errors import (
    DamagedDataError,
    NotAStoreError,
    StoreError,
    StoreUnavailableError,
    StoreVersionError,
    UsageError,
    VitcnnError,
)

__all__ = [
    "ANALYSES",
    "CREATED_ATTR",
    "FORMAT_ATTR",
    "FORMAT_VERSION",
    "GRAMS",
    "IMAGE_COORDS",
    "LABEL_FILL",
    "LEASES",
    "MAX_NAME_LENGTH",
    "RUN_ARRAYS",
    "check_layer_name",
    "check_name",
    "check_writable",
    "environment_error",
    "is_empty_location",
    "open_root",
    "quiet_zarr",
    "store_io",
    "unit_bounds",
]

FORMAT_ATTR = "vitcnn_store.format"
#: Run attribute written last at creation: a run without it is broken (format 2).
CREATED_ATTR = "vitcnn_store.created"
ANALYSES = "_analyses"
#: Per-image coordinates of a run, copied into every layer group (format 2).
IMAGE_COORDS = ("image", "image_id", "label", "image_sha256")
#: Root folder of the run leases (store/lease.py): outside every run, so a lease can
#: guard a run's creation and replacement. Not a zarr node; readers skip it.
LEASES = "_leases"
GRAMS = "_grams"  # the Gram cache (store/grams.py); like _analyses, derived from the run
# The Gram cache's feature reductions and dtypes (here, not in grams.py: the analysis
# options name them, and building the CLI's parser must not import numpy).
REDUCTIONS = ("flatten", "gap", "cls")
GRAM_DTYPES = ("float64", "float32")
# Arrays directly under a run; layer groups may not take these names.
RUN_ARRAYS = (
    *IMAGE_COORDS, "done", "failed", "failure", "input", "input_y", "input_x",
)  # fmt: skip
#: Fill value of ``label``: never a real label (labels are >= -1, -1 = unknown).
LABEL_FILL = -(2**63)
#: Longest run or analysis name: a path component on every file system and object store.
MAX_NAME_LENGTH = 128
# Names zarr itself uses inside a group: a run of that name would clobber metadata.
_RESERVED = {"zarr.json"}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def check_name(name: str, what: str = "run") -> str:
    """Validate a run or analysis name: a short path component zarr does not use itself.

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
    if len(name) > MAX_NAME_LENGTH:
        raise UsageError(
            f"invalid {what} name {name[:20]!r}... ({len(name)} characters): "
            f"use at most {MAX_NAME_LENGTH}"
        )
    if name.lower() in _RESERVED:
        raise UsageError(f"invalid {what} name {name!r}: zarr uses that name; choose another")
    return name


#: Longest layer name: a file or object name component on every file system (bytes).
MAX_LAYER_NAME_BYTES = 255


def check_layer_name(name: str) -> str:
    """Refuse a module path that cannot be a layer group of a run (before any write).

    A layer group is named by its module path: one zarr node name, so without
    ``/``, not ``.``/``..``, not starting with ``__`` (zarr v3 reserves those), not
    ``zarr.json`` (the run's own metadata), not a run array (``image_id``, ``done``,
    ...) and not starting with ``_`` (``_analyses``, ``_grams``). Module paths from
    ``named_modules()`` satisfy this unless a module was registered under such a name.

    Examples
    --------
    >>> check_layer_name("blocks.3.attn")
    'blocks.3.attn'
    >>> check_layer_name("head/logits")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    vitcnn_store.errors.LayerPatternError: cannot store layer 'head/logits': ...
    """
    why = ""
    if not name or name in (".", ".."):
        why = "an empty or dot-only name is not a zarr node name"
    elif "/" in name:
        why = "a '/' would nest it in groups of other names"
    elif name.lower() in _RESERVED:
        why = "zarr.json is the run's own metadata file"
    elif name in RUN_ARRAYS or name.startswith("_"):
        why = "the run keeps an array or group of that name (names starting with '_' are reserved)"
    elif not name.isprintable():
        why = "control characters do not belong in stored names"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_LAYER_NAME_BYTES:
        why = f"longer than {MAX_LAYER_NAME_BYTES} bytes, the longest file name"
    if why:
        from vitcnn_store.errors import LayerPatternError

        raise LayerPatternError(
            f"cannot store layer {name!r}: {why}; choose another layer (or rename the module)"
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


# -- failures of the storage underneath -----------------------------------------------


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def environment_error(url: str, e: BaseException) -> VitcnnError | None:
    """The one-line error for a storage failure (``None``: not one we recognise).

    Disk full, read-only or forbidden locations, and missing or rejected
    object-store credentials become :class:`StoreUnavailableError` (exit 1).
    """
    for cause in _chain(e):
        name = type(cause).__name__
        if isinstance(cause, VitcnnError):
            return cause
        if name in ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"):
            return StoreUnavailableError(
                f"no credentials for {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "(or your provider's variables) and retry"
            )
        if isinstance(cause, OSError):
            code = cause.errno
            if code in (errno.ENOSPC, errno.EDQUOT):
                return StoreUnavailableError(f"disk full writing {url}: free space and retry")
            if code == errno.EROFS:
                return StoreUnavailableError(f"store {url} is on a read-only file system")
            if isinstance(cause, PermissionError) or code in (errno.EACCES, errno.EPERM):
                return StoreUnavailableError(
                    f"permission denied on store {url}: check its permissions or credentials"
                )
            if isinstance(cause, (ConnectionError, TimeoutError)):
                return StoreUnavailableError(f"cannot reach store {url}: {cause}")
    return None


@contextmanager
def store_io(url: str) -> Iterator[None]:
    """Turn storage failures inside the block into one-line typed errors."""
    try:
        yield
    except VitcnnError:
        raise
    except Exception as e:
        mapped = environment_error(url, e)
        if mapped is None:
            raise
        raise mapped from e


def is_empty_location(url: str) -> bool:
    """No store here yet: nothing, an empty folder, or only the leases of runs about to
    be created (a job takes its run's lease before it creates the store)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return True
    if not fs.isdir(path):
        return False
    names = {str(n).rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False)}
    return names <= {LEASES}


def check_writable(url: str) -> None:
    """Refuse a store location that cannot be written, without writing anything.

    Local paths: the store folder (or its nearest existing parent) must be a
    writable folder on a writable file system. Remote URLs: the location must be
    reachable with the credentials at hand (writability shows at the first write).
    """
    import fsspec

    with store_io(url):
        fs, path = fsspec.core.url_to_fs(url)
        if "file" not in fs.protocol and "local" not in fs.protocol:
            fs.exists(path)  # raises for missing credentials or an unreachable endpoint
            return
        probe = os.path.abspath(path)
        while not os.path.exists(probe):
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        if not os.path.isdir(probe):
            raise StoreError(f"cannot create store {url}: {probe} is a file, not a folder")
        if not os.access(probe, os.W_OK):
            try:
                read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
            except OSError:
                read_only = False
            raise StoreUnavailableError(
                f"store {url} is on a read-only file system"
                if read_only
                else f"permission denied on store {url}: {probe} is not writable"
            )


def open_root(url: str, mode: Literal["r", "r+", "a"] = "r", *, create: bool = False) -> Any:
    """Open the root group of a vitcnn store (creating an empty store if asked).

    Raises :class:`NotAStoreError` for a location holding something else,
    :class:`StoreVersionError` for a newer format, :class:`DamagedDataError` for
    unreadable store metadata, :class:`StoreUnavailableError` when the location
    cannot be reached or written, :class:`StoreError` when there is no store.
    """
    import zarr

    url = str(url)
    with quiet_zarr(), store_io(url):
        try:
            if create and is_empty_location(url):
                # Mode "a", never "w": "w" would delete the leases of jobs about to
                # create their runs here (and a concurrent job's new store).
                root = zarr.open_group(url, mode="a", zarr_format=3)
                root.attrs[FORMAT_ATTR] = FORMAT_VERSION
                return root
            # Never mode "a" here: it would turn any folder into a zarr group.
            existing: Literal["r", "r+"] = "r" if mode == "r" else "r+"
            root = zarr.open_group(url, mode=existing, zarr_format=3, use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            if not create and is_empty_location(url):
                raise StoreError(f"no store at {url}") from e
            raise NotAStoreError(f"{url} is not a vitcnn store (no zarr v3 group there)") from e
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
            if environment_error(url, e) is not None:
                raise
            raise DamagedDataError(
                f"store metadata {url.rstrip('/')}/zarr.json is unreadable "
                f"({type(e).__name__}): restore it from a backup"
            ) from e
    version = root.attrs.get(FORMAT_ATTR)
    if version is None:
        raise NotAStoreError(
            f"{url} is a zarr group but not a vitcnn store ({FORMAT_ATTR} missing)"
        )
    if not isinstance(version, int) or version not in READABLE_FORMATS:
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise StoreVersionError(
                f"{url} has store format {version}; this vitcnn_store reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}: upgrade vitcnn_store"
            )
        raise StoreVersionError(f"{url} has unknown store format {version!r}")
    return root
