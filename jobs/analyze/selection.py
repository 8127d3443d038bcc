"""What an analysis reads: runs, usable images, layers and their reductions.

Everything here is lazy: layers come back as dask arrays from the store
reader; :func:`chunk_tasks` turns them into one dask task per stored image
chunk, and :func:`row_pieces` gathers a batch of rows from the chunks holding
them, so no job ever holds a whole layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.errors import IncompleteRunError, StoreError, UsageError
from vitcnn_store.models.layers import match_patterns
from vitcnn_store.store import open_store
from vitcnn_store.store.layout import check_name
from vitcnn_store.store.reader import Run

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "AnalysisWarning",
    "LayerInfo",
    "align_images",
    "cap_batch_size",
    "chunk_tasks",
    "layer_info",
    "open_runs",
    "reduce_layer",
    "row_pieces",
    "select_layers",
    "str_array",
    "str_coord",
    "take_rows",
    "usable_mask",
]


class AnalysisWarning(UserWarning):
    """A job adjusted an option (e.g. capped the batch size); the CLI prints one line."""


def open_runs(url: str, names: Sequence[str]) -> list[Run]:
    """Open runs of one store, validating their names first."""
    for name in names:
        check_name(name)
    store = open_store(url)
    return [store[name] for name in names]


def usable_mask(run: Run, allow_incomplete: bool) -> np.ndarray:
    """Per image: usable (its unit is written and it decoded).

    Raises :class:`IncompleteRunError` for an unfinished run unless
    ``allow_incomplete``, and :class:`StoreError` when nothing is usable.
    """
    if not run.complete and not allow_incomplete:
        done = run.done
        raise IncompleteRunError(
            f"run {run.name!r} is incomplete ({int(done.sum())}/{done.size} units written): "
            "finish it with `vitcnn extract ... --resume`, or pass --allow-incomplete to "
            "analyse the written units only"
        )
    mask = np.asarray(run.valid, dtype=bool)
    if not mask.any():
        raise StoreError(f"run {run.name!r} has no usable images (none written and decoded)")
    return mask


def align_images(
    run_a: Run, mask_a: np.ndarray, run_b: Run, mask_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into each run of their common usable images, paired by ``image_id``.

    Pairs come in run ``a``'s image order. Raises :class:`UsageError` when the
    runs share no usable image.
    """
    ia_all, ib_all = np.flatnonzero(mask_a), np.flatnonzero(mask_b)
    _, ia, ib = np.intersect1d(
        run_a.image_ids[ia_all], run_b.image_ids[ib_all], return_indices=True
    )
    if not ia.size:
        raise UsageError(
            f"runs {run_a.name!r} and {run_b.name!r} share no usable image ids: "
            "cross-run analyses need runs over overlapping image sets"
        )
    order = np.argsort(ia_all[ia], kind="stable")
    return ia_all[ia][order], ib_all[ib][order]


def select_layers(run: Run, patterns: str | None, option: str = "--layers") -> list[str]:
    """Stored layers matching comma-separated glob patterns, in forward order."""
    layers = run.layers
    if not layers:
        raise StoreError(f"run {run.name!r} has no stored layer activations")
    if not patterns:
        return list(layers)
    return match_patterns(layers, patterns, f"stored layer of run {run.name!r} ({option})")


@dataclass(frozen=True)
class LayerInfo:
    """Shape facts of a stored layer: kind, token roles, spatial grid."""

    name: str
    kind: str  # "token" | "spatial" | "pooled"
    prefix: tuple[int, ...]  # token indices of CLS/register tokens
    patches: tuple[int, ...]  # token indices of patch tokens
    cls_index: int | None
    depth_fraction: float
    depth_index: int


def layer_info(x: xr.DataArray) -> LayerInfo:
    """Describe a layer's DataArray from :meth:`Run.__getitem__`."""
    dims = tuple(x.dims)
    prefix: tuple[int, ...] = ()
    patches: tuple[int, ...] = ()
    cls_index = None
    if "token" in dims:
        kind = "token"
        kinds = str_array(x.coords["token_kind"].values)
        prefix = tuple(int(i) for i in np.flatnonzero(kinds != "patch"))
        patches = tuple(int(i) for i in np.flatnonzero(kinds == "patch"))
        cls = np.flatnonzero(kinds == "cls")
        cls_index = int(cls[0]) if cls.size else None
    elif "y" in dims and "x" in dims:
        kind = "spatial"
    else:
        kind = "pooled"
    return LayerInfo(
        name=str(x.attrs.get("layer", x.name)),
        kind=kind,
        prefix=prefix,
        patches=patches,
        cls_index=cls_index,
        depth_fraction=float(x.attrs.get("depth_fraction", np.nan)),
        depth_index=int(x.attrs.get("depth_index", -1)),
    )


def reduce_layer(x: xr.DataArray, how: str, *, cls_fallback: bool = False) -> tuple[Any, str]:
    """Lazy dask array of a layer under a reduction, and the one applied.

    ``flatten`` keeps every non-image dim (left unflattened: consumers reshape
    each batch to (image, feature)); ``gap`` averages patch tokens
    (prefix tokens excluded, as timm's average pooling does) or spatial
    positions, in float64; ``cls`` takes the CLS token. Layers without a CLS
    token raise :class:`UsageError` for ``cls`` unless ``cls_fallback``, which
    reduces them by ``gap`` instead.
    """
    info = layer_info(x)
    data = x.data
    if how == "cls" and info.cls_index is None:
        if not cls_fallback:
            raise UsageError(
                f"--reduce cls needs token layers with a CLS token; layer {info.name!r} is "
                f"{info.kind}{'' if info.kind != 'token' else ' without CLS'} "
                "(use --reduce gap/flatten or pick token layers with --layers)"
            )
        how = "gap"
    if how == "flatten":
        return data, how  # flattened inside the task: no reshape tasks in the graph
    if how == "cls":
        return data[:, info.cls_index, :], how
    if how == "gap":
        if info.kind == "token":
            if not info.patches:
                raise UsageError(f"layer {info.name!r} has no patch tokens to average")
            # Float64 before summing: float16 sums over 196 tokens lose digits.
            return data[:, list(info.patches)].astype(np.float64).mean(axis=1), how
        if data.ndim > 2:
            return data.astype(np.float64).mean(axis=tuple(range(1, data.ndim - 1))), how
        return data, how
    raise UsageError(f"unknown reduction {how!r}: use flatten, gap or cls")


def cap_batch_size(requested: int, n: int, what: str = "--batch-size") -> int:
    """The batch size to use: ``requested`` capped to ``n`` (with a warning), at least 4."""
    if requested < 4:
        raise UsageError(f"{what} must be >= 4 for the unbiased estimator, got {requested}")
    if n < 4:
        raise UsageError(f"the unbiased estimator needs at least 4 usable images, got {n}")
    if requested > n:
        warnings.warn(
            f"{what} {requested} is more than the {n} usable images: using {n}",
            AnalysisWarning,
            stacklevel=2,
        )
        return n
    return requested


def chunk_tasks(arrays: Sequence[Any], mask: np.ndarray, fn: Any, *args: Any) -> list[Any]:
    """One delayed ``fn(*blocks, *args)`` per image chunk holding usable images.

    ``arrays`` are dask arrays of one run, which share the stored chunking along
    ``image`` (one chunk = one work unit), so block ``i`` of each covers the same
    images. Unusable rows are dropped inside a chunk; chunks without usable rows
    are skipped.
    """
    from dask import delayed

    tasks = []
    start = 0
    for i, size in enumerate(arrays[0].chunks[0]):
        rows = np.flatnonzero(mask[start : start + size])
        start += size
        if not rows.size:
            continue
        blocks = [a.blocks[i] if rows.size == size else a.blocks[i][rows] for a in arrays]
        tasks.append(delayed(fn, pure=True)(*blocks, *args))
    return tasks


def row_pieces(data: Any, rows: np.ndarray) -> tuple[list[Any], np.ndarray | None]:
    """Lazy pieces of ``data`` holding ``rows`` (along axis 0), one per stored chunk touched.

    Returns the pieces, in chunk order, and the permutation that puts their
    concatenation back in the order of ``rows`` (``None`` when ``rows`` is
    sorted); :func:`take_rows` does both inside a task. One small getitem per
    chunk is far fewer tasks than dask's generic fancy indexing, and a chunk
    shared by several batches of one graph is still read once.
    """
    order = np.argsort(rows, kind="stable")
    ranked = np.asarray(rows)[order]
    bounds = np.cumsum((0, *data.chunks[0]))
    chunk_of = np.searchsorted(bounds, ranked, side="right") - 1
    pieces = []
    for c in np.unique(chunk_of):
        local = ranked[chunk_of == c] - bounds[c]
        block = data.blocks[int(c)]
        piece = block if local.size == block.shape[0] else block[local]
        # The piece's one chunk as a Delayed: no extra task to finalize a dask array.
        pieces.append(piece.to_delayed().ravel()[0])
    in_order = bool((order == np.arange(order.size)).all())
    return pieces, None if in_order else np.argsort(order)


def take_rows(pieces: Sequence[Any], perm: np.ndarray | None) -> np.ndarray:
    """Concatenate pieces from :func:`row_pieces` (computed) into the requested row order."""
    out = np.concatenate([np.asarray(p) for p in pieces])
    return out if perm is None else out[perm]


def str_array(values: Any) -> np.ndarray:
    """Plain ``str`` array from zarr's variable-width ``StringDType`` (or anything else)."""
    return np.array([str(v) for v in np.asarray(values).tolist()], dtype=str)


def str_coord(values: Any) -> np.ndarray:
    """Strings as an object array: zarr v3 stores those as portable variable-length strings."""
    return np.array([str(v) for v in values], dtype=object)
