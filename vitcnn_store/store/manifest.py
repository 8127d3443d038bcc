"""A run's manifest: every array it was created with, so that a lost one is noticed.

:func:`~vitcnn_store.store.writer.create_run` records, in the same metadata
write as the creation marker, the run attribute ``vitcnn_store.manifest``:
``{"creation_id": ..., "arrays": {path: {"shape", "data_type", "chunks"}}}``
for every array of the run (analyses and the Gram cache excepted: they are
derived and come and go). Listing a run checks its top-level names against it
(one listing of the run's folder); ``vitcnn verify`` checks every array's shape,
data type and chunks. Runs written before the manifest existed have none: for
them only the arrays every run has (``done``, ``image_id``) are required.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from vitcnn_store.store.layout import quiet_zarr, store_io

__all__ = [
    "MANIFEST_ATTR",
    "REQUIRED",
    "build_manifest",
    "manifest_arrays",
    "manifest_problems",
    "missing_names",
]

MANIFEST_ATTR = "vitcnn_store.manifest"
#: Arrays every run has: without them a run cannot be read or resumed.
REQUIRED = ("done", "image_id")


def build_manifest(group: Any, arrays: Iterable[tuple[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest of a freshly created run group (every array below it).

    ``arrays``: the run's ``(path, array)`` pairs as the caller just made them
    (saves listing the run again); by default every array found below ``group``.
    """
    if arrays is None:
        from vitcnn_store.store.chunks import walk_arrays

        arrays = walk_arrays(group)
    made = sorted(arrays, key=lambda kv: kv[0].split("/"))  # walk_arrays' order
    return {
        "creation_id": uuid.uuid4().hex,
        "arrays": {
            path: {
                "shape": list(arr.shape),
                "data_type": str(arr.metadata.to_dict()["data_type"]),
                "chunks": list(arr.chunks),
            }
            for path, arr in made
            if not path.startswith("_")
        },
    }


def manifest_arrays(attrs: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The ``{path: {shape, data_type, chunks}}`` a run was created with (None: no manifest)."""
    manifest = attrs.get(MANIFEST_ATTR)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("arrays"), dict):
        return None
    return manifest["arrays"]


def _top_names(attrs: Mapping[str, Any]) -> set[str]:
    arrays = manifest_arrays(attrs)
    if arrays is None:
        return set(REQUIRED)
    return {path.split("/", 1)[0] for path in arrays}


def missing_names(url: str | None, group: Any, name: str, attrs: Mapping[str, Any]) -> list[str]:
    """Top-level arrays and layers of the run that are gone (cheap: one listing).

    With ``url``, the run's folder is listed once; without, each name is looked
    up in ``group``.
    """
    wanted = _top_names(attrs)
    if url is not None:
        from vitcnn_store.store.layout import filesystem

        try:
            with store_io(url):
                fs, path = filesystem(url)
                listed = fs.ls(f"{path.rstrip('/')}/{name}", detail=False)
        except (FileNotFoundError, NotImplementedError):
            listed = None  # a server that cannot list folders: ask the run's metadata
        if listed is not None:
            present = {str(n).rstrip("/").rsplit("/", 1)[-1] for n in listed}
            return sorted(wanted - present)
    with quiet_zarr():
        return sorted(n for n in wanted if n not in group)


def manifest_problems(group: Any, attrs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(path, problem)`` for every array of the manifest that is missing or differs."""
    arrays = manifest_arrays(attrs)
    if arrays is None:
        with quiet_zarr():
            return [(n, "missing (every run has it)") for n in REQUIRED if n not in group]
    out = []
    for path, want in sorted(arrays.items()):
        try:
            with quiet_zarr():
                arr = group[path]
            have = {
                "shape": list(arr.shape),
                "data_type": str(arr.metadata.to_dict()["data_type"]),
                "chunks": list(arr.chunks),
            }
        except KeyError:
            out.append((path, "missing (recorded at the run's creation)"))
            continue
        except Exception as e:  # unreadable metadata
            out.append((path, f"metadata unreadable ({type(e).__name__})"))
            continue
        diffs = [
            f"{k} {have[k]} (created as {want.get(k)})"
            for k in ("shape", "data_type", "chunks")
            if have[k] != want.get(k)
        ]
        if diffs:
            out.append((path, "; ".join(diffs)))
    return out
