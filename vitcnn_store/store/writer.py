"""Create runs from a template and write work units (DESIGN.md §2).

The driver calls :func:`create_run` once, up front, with the shape of every
array (from a dry-run forward pass): workers never create or resize arrays.
Workers use :class:`RunWriter` to write whole chunks — one work unit is one
chunk along ``image`` of every array — and set ``done[unit]`` last, so a unit
is either complete and flagged or absent. Writes are idempotent: rewriting a
unit overwrites the same chunk objects with the same bytes.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitcnn_store.errors import (
    DtypeOverflowError,
    NonFiniteActivationError,
    RunExistsError,
    RunMismatchError,
    StoreError,
    UsageError,
)
from vitcnn_store.store.layout import (
    ANALYSES,
    RUN_ARRAYS,
    check_name,
    open_root,
    quiet_zarr,
    unit_bounds,
)

__all__ = [
    "COMPRESSIONS",
    "RESUME_KEYS",
    "ArraySpec",
    "RunWriter",
    "check_peaks",
    "compressor",
    "consolidate",
    "create_run",
    "prepare_run",
]

# Provenance keys that must match for --resume to continue a run.
RESUME_KEYS = (
    "model", "model_args", "img_size", "weights_source", "weights_sha256", "input_size",
    "interpolation", "mean", "std", "crop_pct", "crop_mode", "image_set_sha256", "n_images",
    "layers", "attention_layers", "inputs", "dtype", "chunk_size",
)  # fmt: skip

FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class ArraySpec:
    """One image-indexed array of a run, described without its image axis.

    ``group`` is the layer path (``""`` for arrays directly under the run);
    ``coords`` are the group's own coordinate arrays, ``{name: (dims, values)}``;
    ``attrs`` are the group's attributes.
    """

    group: str
    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    coords: Mapping[str, tuple[tuple[str, ...], np.ndarray]] = field(default_factory=dict)
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}" if self.group else self.name


COMPRESSIONS = ("lz4", "zstd", "none")


def compressor(name: str = "lz4") -> Any:
    """Fast compression only: activations compress poorly, so speed wins.

    ``lz4`` (default): blosc-lz4 with byte shuffle; ``zstd``: zstd level 1 (smaller,
    slower); ``none``: raw chunks, for write-bound jobs (large CNN maps on few cores).
    """
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "lz4":
        return BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")
    if name == "zstd":
        return ZstdCodec(level=1)
    if name == "none":
        return None
    raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {name!r}")


def _json_safe(attrs: Mapping[str, Any]) -> dict[str, Any]:
    # Attributes are plain JSON, never pickles; fail early on anything else.
    return dict(json.loads(json.dumps(dict(attrs))))


def _coord_attr(names: Sequence[str]) -> dict[str, str]:
    return {"coordinates": " ".join(names)} if names else {}


def prepare_run(
    url: str, name: str, provenance: Mapping[str, Any], *, resume: bool, overwrite: bool
) -> bool:
    """Decide what to do with an existing run; returns True when the run must be created.

    Raises :class:`RunExistsError` when the run exists and neither flag is given,
    :class:`RunMismatchError` when ``resume`` meets a run made with other settings.
    Nothing is written here, so a refused job leaves the store unchanged.
    """
    check_name(name)
    root = open_root(url, mode="a", create=True)
    if name not in root:
        return True
    if overwrite:
        return True
    if not resume:
        raise RunExistsError(
            f"run {name!r} already exists in {url}; pass --resume to continue it "
            "or --overwrite to replace it"
        )
    stored = dict(root[name].attrs)
    diffs = [
        f"{k} (stored {stored.get(k)!r}, asked {provenance.get(k)!r})"
        for k in RESUME_KEYS
        if _json_safe({"v": stored.get(k)}) != _json_safe({"v": provenance.get(k)})
    ]
    if diffs:
        raise RunMismatchError(
            f"cannot resume run {name!r}: {'; '.join(diffs[:3])}"
            f"{' ...' if len(diffs) > 3 else ''} differ; use --overwrite to replace it"
        )
    return False


def create_run(
    url: str,
    name: str,
    *,
    image_ids: Sequence[str],
    labels: Sequence[int],
    chunk: int,
    dtype: str,
    arrays: Sequence[ArraySpec],
    attrs: Mapping[str, Any],
    compression: str = "lz4",
) -> None:
    """Create run ``name`` with every array it will ever hold (replacing any old one)."""

    check_name(name)
    n = len(image_ids)
    if n == 0:
        raise StoreError("cannot create a run over zero images")
    root = open_root(url, mode="a", create=True)
    with quiet_zarr():
        if name in root:
            del root[name]
        run = root.create_group(name)
        run.attrs.update(_json_safe({**attrs, "created_at": _now()}))
        image_coords = _coord_attr(["image_id", "label"])

        def plain(path: str, values: np.ndarray, dims: Sequence[str], **kw: Any) -> Any:
            arr = run.create_array(
                path, shape=values.shape, dtype=values.dtype if values.dtype != object else str,
                chunks=(chunk,) if dims == ("image",) else values.shape,
                dimension_names=list(dims), **kw,
            )  # fmt: skip
            arr[...] = values
            return arr

        plain("image", np.arange(n, dtype=np.int64), ("image",))
        plain("image_id", np.asarray(list(image_ids), dtype=object), ("image",))
        plain("label", np.asarray(labels, dtype=np.int64), ("image",))
        n_units = len(unit_bounds(n, chunk))
        done = run.create_array(
            "done", shape=(n_units,), chunks=(1,), dtype=bool, fill_value=False,
            dimension_names=["unit"],
        )  # fmt: skip
        done.attrs["long_name"] = "unit fully written (all arrays)"
        for key, kind, fill in (("failed", bool, False), ("failure", str, "")):
            arr = run.create_array(
                key, shape=(n,), chunks=(chunk,), dtype=kind, fill_value=fill,
                dimension_names=["image"], attributes=image_coords,
            )  # fmt: skip
        for spec in arrays:
            if spec.group in RUN_ARRAYS or spec.group.startswith((ANALYSES, "_")):
                raise StoreError(f"layer name {spec.group!r} collides with a run array name")
            group = run.require_group(spec.group) if spec.group else run
            if spec.group:
                group.attrs.update(_json_safe(spec.attrs))
            for cname, (cdims, values) in spec.coords.items():
                if cname in group:
                    continue
                arr = group.create_array(
                    cname, shape=values.shape,
                    dtype=str if values.dtype.kind in "OU" else values.dtype,
                    chunks=values.shape, dimension_names=list(cdims),
                )  # fmt: skip
                arr[...] = values
            own = [c for c in spec.coords]
            arr = group.create_array(
                spec.name,
                shape=(n, *spec.shape),
                chunks=(chunk, *spec.shape),
                dtype=dtype,
                fill_value=np.nan,
                compressors=compressor(compression),
                dimension_names=["image", *spec.dims],
                attributes=_coord_attr(own + (["image_id", "label"] if not spec.group else [])),
            )
    consolidate(url)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def consolidate(url: str) -> None:
    """Consolidate the store's metadata (a snapshot: call once arrays exist)."""
    import zarr

    with quiet_zarr():
        zarr.consolidate_metadata(url)


def check_peaks(peaks: Iterable[tuple[str, float]], dtype: str) -> None:
    """Refuse NaN/inf activations, and values beyond float16 when storing float16.

    ``peaks`` pairs an array key (``layer/activation``) with its largest magnitude.
    Float16 overflow is an error for that layer, never a silent inf.
    """
    for key, peak in peaks:
        layer = key.rsplit("/", 1)[0]
        if np.isnan(peak):
            raise NonFiniteActivationError(
                f"layer {layer!r} produced NaN activations; check the weights or checkpoint"
            )
        # Peaks taken after the float16 cast show an overflow as inf.
        if dtype == "float16" and peak > FLOAT16_MAX:
            raise DtypeOverflowError(
                f"layer {layer!r} has values up to {peak:.4g}, beyond float16's "
                f"{FLOAT16_MAX:g}; extract with --dtype float32"
            )
        if np.isinf(peak):
            raise NonFiniteActivationError(
                f"layer {layer!r} produced inf activations; check the weights or checkpoint"
            )


class RunWriter:
    """Writes whole work units of one run. Safe to use from several threads."""

    def __init__(self, url: str, run: str) -> None:
        import zarr

        root = open_root(url, mode="r+")
        # Skip zarr's scan of every chunk for "all fill value" before writing it: our
        # chunks are never empty, and the scan costs as much as the compression.
        with quiet_zarr(), zarr.config.set({"array.write_empty_chunks": True}):
            self.group = root[run]
            self.chunk = int(self.group.attrs["chunk_size"])
            self.n_images = int(self.group["image"].shape[0])
            self._arrays: dict[str, Any] = {}
            self._visit(self.group, "")
            self.done = self.group["done"]

    def _visit(self, group: Any, prefix: str) -> None:
        for key, node in group.members():
            path = f"{prefix}/{key}" if prefix else key
            if key == ANALYSES:
                continue
            if hasattr(node, "members"):
                self._visit(node, path)
            elif node.shape and node.metadata.dimension_names[0] == "image":
                self._arrays[path] = node

    @property
    def units(self) -> list[tuple[int, int]]:
        return unit_bounds(self.n_images, self.chunk)

    def pending_units(self) -> list[int]:
        """Units not yet flagged done."""
        with quiet_zarr():
            done = np.asarray(self.done[:])
        return [int(u) for u in np.flatnonzero(~done)]

    def write_unit(
        self,
        unit: int,
        values: Mapping[str, np.ndarray],
        failed: np.ndarray,
        failure: Sequence[str],
    ) -> None:
        """Write every array of ``unit`` (keys like ``blocks.3/activation``), then flag it done."""
        start, stop = self.units[unit]
        expected = {k for k in self._arrays if k not in ("image", "image_id", "label")}
        given = set(values) | {"failed", "failure"}
        if given != expected:
            raise StoreError(f"unit {unit}: arrays {sorted(expected ^ given)} missing or unknown")
        with quiet_zarr():
            for key, v in values.items():
                arr = self._arrays[key]
                if v.shape != (stop - start, *arr.shape[1:]):
                    raise StoreError(f"unit {unit}: {key} has shape {v.shape}, not chunk-aligned")
                arr[start:stop] = v
            self._arrays["failed"][start:stop] = np.asarray(failed, dtype=bool)
            self._arrays["failure"][start:stop] = np.asarray(list(failure), dtype=object)
            # Last: the flag says every array of the unit is on disk.
            self.done[unit] = True
