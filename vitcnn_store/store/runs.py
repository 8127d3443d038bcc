"""Which runs a store holds, which of them are fully created, and what a new job may do.

A format-2 run is *created* once its ``vitcnn_store.created`` attribute is true
(written last by :func:`~vitcnn_store.store.writer.create_run`); a format-1 run
once its ``done`` array exists. Anything else under the store's root — a run
group whose creation was interrupted, or whose metadata cannot be read — is
*broken*: listed as such, refused by readers, recovered by ``--overwrite`` or
``--resume``. Nothing here writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vitcnn_store.errors import (
    RunExistsError,
    RunMismatchError,
    StoreError,
    VitcnnError,
)
from vitcnn_store.store.layout import (
    CREATED_ATTR,
    check_name,
    filesystem,
    is_empty_location,
    open_root,
    quiet_zarr,
    store_io,
)
from vitcnn_store.store.manifest import MANIFEST_ATTR, missing_names

__all__ = [
    "RESUME_KEYS",
    "RunEntry",
    "list_runs",
    "prepare_run",
    "run_entry",
    "run_format",
    "run_names",
    "run_state",
]

# Provenance keys that must match for --resume to continue a run.
RESUME_KEYS = (
    "model",
    "model_args",
    "img_size",
    "weights_source",
    "weights_sha256",
    "input_size",
    "interpolation",
    "mean",
    "std",
    "crop_pct",
    "crop_mode",
    "image_set_sha256",
    "n_images",
    "layers",
    "attention_layers",
    "inputs",
    "dtype",
    "chunk_size",
    # Absent unless used (so older runs still resume): --reduce, a Python transform, and
    # the whole configuration of a module handed in from Python.
    "reductions",
    "transform",
    "module_sha256",
)


@dataclass(frozen=True)
class RunEntry:
    """A run group under the store's root: created, or broken and why.

    A created run with a ``problem`` is *damaged*: it lacks an array of its
    manifest (or, before manifests, one every run has); ``vitcnn verify``
    says what, ``--resume`` restores it.
    """

    name: str
    created: bool
    problem: str = ""
    # The run's group as opened to check it, for a reader to keep (not read twice).
    group: Any = field(default=None, compare=False, repr=False)

    @property
    def damaged(self) -> bool:
        return self.created and bool(self.problem)


def run_format(attrs: Mapping[str, Any]) -> int:
    """The format a run was written in (its provenance ``format``; 1 when absent)."""
    value = attrs.get("format", 1)
    return value if isinstance(value, int) else 1


def run_entry(root: Any, name: str, url: str | None = None) -> RunEntry | None:
    """The run ``name`` of an open root group, or None when there is no such child.

    A created run is checked for lost arrays or layers (one listing of its
    folder when ``url`` is given).
    """
    try:
        with quiet_zarr():
            group = root[name]
            attrs = dict(group.attrs)
    except KeyError:
        return None
    except Exception as e:  # unreadable metadata must not hide the other runs
        return RunEntry(name, False, f"metadata unreadable ({type(e).__name__})")
    if not hasattr(group, "members"):
        return RunEntry(name, False, "an array, not a run group")
    created = attrs.get(CREATED_ATTR) is True
    if not created and run_format(attrs) == 1 and CREATED_ATTR not in attrs:
        with quiet_zarr():
            created = "done" in group
    if not created:
        return RunEntry(name, False, "creation interrupted")
    missing = missing_names(url, group, name, attrs)
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        shown = ", ".join(missing[:4]) + more
        return RunEntry(name, True, f"damaged: {shown} missing", group)
    return RunEntry(name, True, group=group)


def run_names(url: str) -> list[str]:
    """Names of the store's runs, sorted, from what writers recorded (no listing needed).

    The run registry (store/index.py) first; a store made before it is listed
    where the storage can list, else read from the root's consolidated metadata.
    """
    from vitcnn_store.store.index import listed_runs, registered_runs

    names = registered_runs(url)
    if names is None:
        try:
            names = listed_runs(url)
        except (FileNotFoundError, NotImplementedError):
            names = _consolidated_runs(url)
    return sorted(n for n in set(names) if n and not n.startswith(("_", ".")))


def _consolidated_runs(url: str) -> list[str]:
    """Top-level groups named in the root's consolidated metadata ([] when there is none)."""
    fs, path = filesystem(url)
    try:
        with store_io(url):
            doc = json.loads(fs.cat_file(f"{str(path).rstrip('/')}/zarr.json"))
    except (FileNotFoundError, ValueError):
        return []
    children = ((doc.get("consolidated_metadata") or {}).get("metadata") or {}).items()
    return [k for k, v in children if "/" not in k and v.get("node_type") == "group"]


def list_runs(url: str, root: Any | None = None) -> list[RunEntry]:
    """Every run of the store, sorted by name (names starting ``_``/``.`` skipped).

    Names come from :func:`run_names`; one run with corrupt metadata is reported
    as broken instead of breaking the listing, and a registered run whose group is
    gone (deleted by hand) is left out.
    """
    root = root if root is not None else open_root(url, mode="r")
    out = []
    for name in run_names(url):
        entry = run_entry(root, name, url)
        if entry is not None:
            out.append(entry)
    return out


def _json_equal(a: Any, b: Any) -> bool:
    return bool(json.loads(json.dumps(a)) == json.loads(json.dumps(b)))


def _changed_images(group: Any, image_ids: Sequence[str], hashes: Sequence[str]) -> None:
    import numpy as np

    try:
        with quiet_zarr():
            if "image_sha256" not in group:
                return
            stored_ids = [str(v) for v in np.asarray(group["image_id"][...]).tolist()]
            if stored_ids != list(image_ids):
                return  # a different image set: reported as an image_set_sha256 mismatch
            stored = [str(v) for v in np.asarray(group["image_sha256"][...]).tolist()]
    except Exception:
        # Damaged or missing coordinates: the provenance's image_set_sha256 (ids, labels
        # and content hashes) still decides, and resuming rewrites them (restore_run).
        return
    changed = [i for i, (a, b) in enumerate(zip(stored, hashes, strict=True)) if a != b]
    if changed:
        first = ", ".join(image_ids[i] for i in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise RunMismatchError(
            f"cannot resume run {group.basename!r}: {len(changed)} image(s) changed since it "
            f"was created ({first}{more}); use --overwrite to re-extract"
        )


def prepare_run(
    url: str,
    name: str,
    provenance: Mapping[str, Any] | None,
    *,
    resume: bool,
    overwrite: bool,
    image_ids: Sequence[str] | None = None,
    image_sha256: Sequence[str] | None = None,
) -> bool:
    """Decide what to do with an existing run; returns True when the run must be created.

    Raises :class:`RunExistsError` when the run exists and neither flag is given,
    :class:`RunMismatchError` when ``resume`` meets a run made with other settings,
    other images (content compared when ``image_sha256`` is given) or an older
    format. A broken run (interrupted creation) is recreated by either flag.
    Nothing is written here, so a refused job leaves the store unchanged.

    ``provenance=None`` makes only the checks that need no model and no image (a
    job's first look at the store, so that refusing an existing run costs what
    ``vitcnn ls`` does); a ``--resume`` is then compared by a second call.
    """
    check_name(name)
    with store_io(url):
        if is_empty_location(url):
            return True
    root = open_root(url, mode="r")
    entry = {e.name: e for e in list_runs(url, root)}.get(name)
    if entry is None:
        # Not listed, yet it may exist by now: another job creating it since the listing
        # (a run, refused below like any other) or something else of that name.
        entry = run_entry(root, name, url)
        if entry is None:
            return True
        with quiet_zarr():
            if not hasattr(root[name], "members"):  # an array: not ours to replace
                raise StoreError(f"{url}/{name} exists but is not a run; choose another name")
    if not resume and not overwrite:
        state = "exists" if entry.created else f"exists but is broken ({entry.problem})"
        raise RunExistsError(
            f"run {name!r} {state} in {url}; pass --resume to continue it "
            "or --overwrite to replace it"
        )
    if overwrite or not entry.created:
        return True
    from vitcnn_store.store.index import run_group

    # The run as stored (not its metadata snapshot): a lost array must read as lost.
    group = run_group(url, name, consolidated=False)
    with quiet_zarr():
        stored = dict(group.attrs)
    if run_format(stored) < 2:
        raise RunMismatchError(
            f"cannot resume run {name!r}: it was written in store format {run_format(stored)}; "
            "use --overwrite to re-extract it in the current format"
        )
    if provenance is None:
        return False
    if image_ids is not None and image_sha256 is not None:
        _changed_images(group, image_ids, image_sha256)
    diffs = [
        f"{k} (stored {stored.get(k)!r}, asked {provenance.get(k)!r})"
        for k in RESUME_KEYS
        if not _json_equal(stored.get(k), provenance.get(k))
    ]
    if diffs:
        raise RunMismatchError(
            f"cannot resume run {name!r}: {'; '.join(diffs[:3])}"
            f"{' ...' if len(diffs) > 3 else ''} differ; use --overwrite to replace it"
        )
    return False


def run_state(url: str, name: str) -> Any:
    """A snapshot of what run ``name`` is now (None: no such run), to compare later.

    A job takes its checks with this snapshot and compares it again once it
    holds the run's lease: if another job created, replaced or advanced the run
    in between, the checks no longer hold and the job must not write.
    """
    import numpy as np

    try:
        with store_io(url):
            if is_empty_location(url):
                return None
        root = open_root(url, mode="r")
    except VitcnnError as e:  # not a store (yet): the job's own checks say why, later
        return ("unreadable", type(e).__name__)
    entry = run_entry(root, name)
    if entry is None:
        return None
    try:
        with quiet_zarr():
            group = root[name]
            attrs = dict(group.attrs)
    except Exception:  # unreadable metadata: run_entry said why
        return (entry.created, entry.problem)
    try:
        with quiet_zarr():
            done = np.asarray(group["done"][...]).astype(bool).tolist()
    except Exception:  # damaged or missing flags: the attributes still tell a replacement
        done = None
    manifest = attrs.get(MANIFEST_ATTR)
    creation = manifest.get("creation_id") if isinstance(manifest, dict) else None
    return (entry.created, entry.problem, attrs.get("created_at"), creation, done)
