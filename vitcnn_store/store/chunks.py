"""Chunk objects of a run: which exist, which a done unit must have.

One listing of the run's objects answers both "how big is it" and "is any
chunk of a done unit missing", so ``vitcnn ls`` reports missing chunks for the
price of the size it already showed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.errors import DamagedDataError
from vitcnn_store.store.layout import IMAGE_COORDS, environment_error, quiet_zarr, store_io

if TYPE_CHECKING:
    from vitcnn_store.store.reader import Store

__all__ = [
    "chunk_key",
    "list_object_info",
    "list_objects",
    "missing_unit_chunks",
    "unit_arrays",
    "walk_arrays",
]


def walk_arrays(group: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every array under ``group`` as ``(path, array)``, depth first, in name order."""
    try:
        with quiet_zarr():
            members = sorted(group.members(), key=lambda kv: kv[0])
    except Exception as e:  # a corrupt zarr.json below the group
        if environment_error("", e) is not None:
            raise
        raise DamagedDataError(
            f"metadata below {group.path or '/'} is unreadable ({type(e).__name__})"
        ) from e
    for key, node in members:
        path = f"{prefix}{key}"
        if hasattr(node, "members"):
            yield from walk_arrays(node, path + "/")
        else:
            yield path, node


def unit_arrays(group: Any) -> list[tuple[str, Any]]:
    """Arrays that work units write (chunked by unit along ``image``), skipping analyses."""
    out = []
    for path, arr in walk_arrays(group):
        name = path.rsplit("/", 1)[-1]
        if path.startswith("_") or "/_" in path or name in IMAGE_COORDS:
            continue
        dims = arr.metadata.dimension_names or ()
        if dims and dims[0] == "image":
            out.append((path, arr))
    return out


def chunk_key(array: Any, coords: tuple[int, ...]) -> str:
    """The storage key (relative to the array) of the chunk at grid ``coords``."""
    return str(array.metadata.encode_chunk_key(coords))


def list_object_info(store: Store, run_name: str, under: str = "") -> dict[str, dict[str, Any]]:
    """Every stored object of run ``run_name`` (below its folder ``under``) as ``{key
    relative to the run: the store's details (size, and where it has them mtime, etag)}``:
    the one listing of a run's objects. A folder that does not exist lists nothing."""
    with store_io(store.url):
        fs = store.fs
        base = f"{store.path}/{run_name}"
        try:
            found = fs.find(f"{base}/{under}".rstrip("/"), detail=True)
        except FileNotFoundError:
            found = {}
    prefix = fs._strip_protocol(base).rstrip("/") + "/"
    out = {}
    for name, info in dict(found).items():
        rel = fs._strip_protocol(name)
        out[rel[len(prefix) :] if rel.startswith(prefix) else rel] = dict(info)
    return out


def list_objects(store: Store, run_name: str) -> dict[str, int]:
    """Every stored object of run ``run_name`` as ``{key relative to the run: size in bytes}``."""
    return {
        key: int(info.get("size") or 0) for key, info in list_object_info(store, run_name).items()
    }


def missing_unit_chunks(
    group: Any, done: np.ndarray, objects: dict[str, int]
) -> list[tuple[str, int]]:
    """``(array path, unit)`` for each chunk a done unit should have and the store lacks."""
    missing = []
    for path, arr in unit_arrays(group):
        rest = (0,) * (len(arr.shape) - 1)
        for unit in np.flatnonzero(done):
            if f"{path}/{chunk_key(arr, (int(unit), *rest))}" not in objects:
                missing.append((path, int(unit)))
    return missing


def grid(array: Any) -> Iterator[tuple[int, ...]]:
    """Grid coordinates of every chunk of ``array``."""
    return itertools.product(*(range(n) for n in array.cdata_shape))
