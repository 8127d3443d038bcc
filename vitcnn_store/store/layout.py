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
    "create_if_absent",
    "environment_error",
    "filesystem",
    "group_doc",
    "is_empty_location",
    "is_local",
    "open_root",
    "quiet_zarr",
    "storage_options",
    "storage_options_scope",
    "store_io",
    "store_object",
    "unit_bounds",
    "use_storage_options",
    "zarr_store",
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
#: Root folder of the run registry (store/index.py): which runs the store holds, readable
#: without a folder listing. Not a run; readers skip it.
RUNS_INDEX = "_runs"
GRAMS = "_grams"  # the Gram cache (store/grams.py); like _analyses, derived from the run
# How an analysis turns a stored layer into one feature vector per image, the keys of the
# Gram cache (here, not in grams.py: the analysis options name them, and building the
# CLI's parser must not import numpy). "gap" is the same operation as extraction's
# "mean" (models/reduce.py EXTRACT_REDUCTIONS): the mean over patch tokens or positions.
FEATURE_REDUCTIONS = ("flatten", "gap", "cls")
#: Other spellings the analyses accept, stored as the reduction they stand for (so a result
#: and its Gram cache are the same whichever the user typed).
FEATURE_ALIASES = {"mean": "gap"}
GRAM_DTYPES = ("float64", "float32")
# Arrays directly under a run; layer groups may not take these names.
RUN_ARRAYS = (
    *IMAGE_COORDS,
    "done",
    "failed",
    "failure",
    "input",
    "input_y",
    "input_x",
    "unit_record",
)
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


# -- where a store lives: fsspec options --------------------------------------------------

#: Environment variable holding storage options (a JSON object) for every remote store.
OPTIONS_ENV = "VITCNN_STORAGE_OPTIONS"
_OPTIONS: dict[str, dict[str, Any]] = {}  # URL prefix -> fsspec options, set by use_storage_options


def use_storage_options(url: str, options: dict[str, Any] | None) -> None:
    """Use ``options`` (fsspec keyword arguments) for ``url`` and every URL below it,
    in this process (the store handle and the CLI's ``--storage-option`` set them)."""
    if options:
        _OPTIONS[str(url).rstrip("/")] = dict(options)


@contextmanager
def storage_options_scope() -> Iterator[None]:
    """Storage options set inside the block (and ``VITCNN_STORAGE_OPTIONS``) are forgotten
    after it: one command's credentials never leak into the next call in this process."""
    saved, env = dict(_OPTIONS), os.environ.get(OPTIONS_ENV)
    try:
        yield
    finally:
        _OPTIONS.clear()
        _OPTIONS.update(saved)
        if env is None:
            os.environ.pop(OPTIONS_ENV, None)
        else:
            os.environ[OPTIONS_ENV] = env


def storage_options(url: str) -> dict[str, Any]:
    """The fsspec options for ``url``: the config file's, then ``VITCNN_STORAGE_OPTIONS``,
    then those given to :func:`use_storage_options` (later ones win); ``{}`` for local paths."""
    import json

    url = str(url)
    if "://" not in url or url.startswith("file://"):
        return {}
    from vitcnn_store.store.options_file import file_options

    out: dict[str, Any] = dict(file_options(url))
    raw = os.environ.get(OPTIONS_ENV)
    if raw:
        try:
            env = json.loads(raw)
        except ValueError as e:
            raise UsageError(f"{OPTIONS_ENV} must be a JSON object, got {raw[:40]!r}") from e
        if not isinstance(env, dict):
            raise UsageError(f"{OPTIONS_ENV} must be a JSON object, got {raw[:40]!r}")
        out.update(env)
    for prefix in sorted(_OPTIONS, key=len):  # longest (most specific) prefix last
        if url == prefix or url.startswith(prefix + "/"):
            out.update(_OPTIONS[prefix])
    return out


def _fsspec_options(url: str) -> dict[str, Any]:
    """The options fsspec gets for ``url``: ours, then the user's (which win).

    On S3 each object is read in one GET: s3fs's default (``max_concurrency`` 10)
    first asks an object's size (a HEAD) to split large ones into ranged reads, a
    second request for every chunk and ``zarr.json`` of a store whose objects are
    all far below its 50 MiB part size.
    """
    options = storage_options(url)
    if str(url).startswith(("s3://", "s3a://")):
        return {"max_concurrency": 1, **options}
    return options


def _options_key(options: dict[str, Any]) -> str:
    import json

    # The process id too: a forked worker must not reuse its parent's event loop.
    return f"{os.getpid()}:{json.dumps(options, sort_keys=True, default=repr)}"


_FS_CACHE: dict[tuple[str, str], tuple[Any, str]] = {}
_ZARR_CACHE: dict[tuple[str, str], Any] = {}


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path)`` of ``url``, with its storage options (one instance
    per URL and options in this process)."""
    import fsspec

    url = str(url)
    options = _fsspec_options(url)
    key = (url, _options_key(options))
    if key not in _FS_CACHE:
        _FS_CACHE[key] = fsspec.core.url_to_fs(url, **options)
    return _FS_CACHE[key]


def is_local(url: str) -> bool:
    """``url`` is a path on this machine's file system."""
    url = str(url)
    return "://" not in url or url.startswith("file://")


def group_doc(attributes: dict[str, Any]) -> bytes:
    """The ``zarr.json`` of a zarr v3 group holding ``attributes`` (leases, the run log)."""
    import json

    doc = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def create_if_absent(url: str, target: str, data: bytes, why: str) -> bool:
    """Write object ``target`` of ``url``'s file system only if it is absent; True when this
    call created it. Atomic: of racing writers exactly one creates it — a hard link of a
    complete file on a local disk (``link(2)`` fails if the name exists, so no reader sees a
    half-written object), a conditional PUT elsewhere (``If-None-Match: *`` on S3).
    ``why`` finishes the refusal on storage that cannot do this ("so ... safely")."""
    import uuid

    fs, _ = filesystem(url)
    with store_io(url):
        if is_local(url):
            folder = target.rsplit("/", 1)[0]
            os.makedirs(folder, exist_ok=True)
            tmp = f"{folder}/.{uuid.uuid4().hex}.tmp"
            with open(tmp, "xb") as f:
                f.write(data)
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        try:
            fs.pipe_file(target, data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError) as e:
            raise StoreError(
                f"{url}: this storage cannot create an object only if absent "
                f"({type(e).__name__}), {why}"
            ) from e
        return True


def zarr_store(url: str) -> Any:
    """What zarr opens for ``url``: the path itself (local), or an fsspec store carrying
    the URL's storage options."""
    url = str(url)
    if is_local(url):
        return url
    options = _fsspec_options(url)
    if not options:
        return url
    key = (url, _options_key(options))
    if key not in _ZARR_CACHE:  # one store (and its file system) per URL and options
        from zarr.storage import FsspecStore

        _ZARR_CACHE[key] = FsspecStore.from_url(url, storage_options=options)
    return _ZARR_CACHE[key]


_STORE_CACHE: dict[tuple[str, str], Any] = {}


def store_object(url: str) -> Any:
    """A zarr ``Store`` object for ``url`` (a ``LocalStore`` for local paths), one per URL
    and options in this process: for arrays opened from metadata already read."""
    url = str(url)
    target = zarr_store(url)
    if not isinstance(target, str):
        return target
    key = (url, _options_key({}))
    if key not in _STORE_CACHE:
        from zarr.storage import FsspecStore, LocalStore

        _STORE_CACHE[key] = (
            LocalStore(target.removeprefix("file://"))
            if is_local(target)
            else FsspecStore.from_url(target)
        )
    return _STORE_CACHE[key]


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
                "(or --storage-option key=... secret=...) and retry"
            )
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"):
            return StoreUnavailableError(
                f"cannot reach store {url}: no server answers at its endpoint; check "
                "--storage-option endpoint_url=... (or AWS_ENDPOINT_URL)"
            )
        if name == "InvalidAccessKeyId" or "InvalidAccessKeyId" in str(cause)[:200]:
            return StoreUnavailableError(
                f"credentials rejected by {url}: the access key is unknown to that endpoint"
            )
        if isinstance(cause, NotImplementedError) and str(url).startswith(("http://", "https://")):
            return StoreUnavailableError(
                f"store {url} is read-only (a plain HTTP server): read it here, and write "
                "analyses or runs into a writable copy or the bucket behind it"
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
    fs, path = filesystem(url)
    if fs.exists(f"{str(path).rstrip('/')}/zarr.json"):
        return False  # a store (asked first: a server that cannot list folders still answers)
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
    with store_io(url):
        fs, path = filesystem(url)
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
                root = zarr.open_group(zarr_store(url), mode="a", zarr_format=3)
                root.attrs[FORMAT_ATTR] = FORMAT_VERSION
                return root
            # Never mode "a" here: it would turn any folder into a zarr group.
            existing: Literal["r", "r+"] = "r" if mode == "r" else "r+"
            root = zarr.open_group(
                zarr_store(url), mode=existing, zarr_format=3, use_consolidated=False
            )
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
