"""Which stored layers an analysis reads, what they are, and how they are reduced.

Everything here is lazy: layers come back from the store reader as dask-backed
DataArrays, and a reduction is a lazy dask array of (image, ...) that the task
builders of :mod:`jobs.analyze.tasks` cut into chunks or batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.errors import StoreError, UsageError
from vitcnn_store.models.families import stored_roles
from vitcnn_store.models.layers import match_patterns
from vitcnn_store.store import schema
from vitcnn_store.store.grams import FEATURE_REDUCTIONS  # the keys of a Gram cache
from vitcnn_store.store.layout import quiet_zarr
from vitcnn_store.store.reader import Run

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "FEATURE_REDUCTIONS",
    "LayerInfo",
    "layer_attrs",
    "layer_info",
    "patch_grid",
    "reduce_layer",
    "refuse_reduced",
    "run_roles",
    "select_attention_layers",
    "select_layers",
    "stored_grid",
    "stored_kind",
    "stored_shape",
    "token_positions",
]


def select_layers(run: Run, patterns: str | None, option: str = "--layers") -> list[str]:
    """Stored layers matching comma-separated glob patterns, in forward order."""
    layers = run.layers
    if not layers:
        raise StoreError(f"run {run.name!r} has no stored layer activations")
    if not patterns:
        return list(layers)
    return match_patterns(layers, patterns, f"stored layer of run {run.name!r} ({option})")


def select_attention_layers(run: Run, patterns: str | None) -> list[str]:
    """Attention modules with stored probabilities matching ``patterns``, in forward order."""
    layers = run.attention_layers
    if not layers:
        raise UsageError(
            f"run {run.name!r} has no stored attention: extract it with --attention "
            "(attention modules only, e.g. ViTs)"
        )
    if not patterns:
        return list(layers)
    return match_patterns(layers, patterns, f"stored attention layer of run {run.name!r}")


def layer_attrs(run: Run, layer: str) -> dict[str, Any]:
    """The attributes of stored ``layer`` (as ``run[layer].attrs``), from the run's
    metadata alone: no array is opened and xarray is not imported."""
    with quiet_zarr():
        attrs = dict(run.group[layer].attrs)
    return {**attrs, "run": run.name, "layer": layer}


def stored_shape(run: Run, layer: str) -> tuple[int, ...]:
    """The shape of stored ``layer``'s activation (as ``run[layer].shape``), from the
    run's metadata alone."""
    with quiet_zarr():
        return tuple(int(s) for s in run.group[layer]["activation"].shape)


def stored_sizes(run: Run, layer: str, array: str = "activation") -> dict[str, int]:
    """Dimension name → size of a stored array (``input`` of the run with ``layer``
    ``"input"``), from the run's metadata alone; an unknown layer raises the reader's
    error."""
    if array == "activation" and layer not in run.layers:
        run[layer]  # raises RunNotFoundError naming the stored layers
    with quiet_zarr():
        arr = run.group[array] if layer == array else run.group[layer][array]
        dims = [str(d) for d in arr.metadata.dimension_names]
        return dict(zip(dims, (int(s) for s in arr.shape), strict=True))


def stored_kind(run: Run, layer: str) -> str:
    """The kind of stored ``layer`` (as :func:`layer_info`), from the run's metadata."""
    return schema.kind_of_dims(list(stored_sizes(run, layer)))


def stored_grid(run: Run, layer: str) -> tuple[int, int]:
    """Rows and columns of the patch (or y, x) grid of a token or spatial layer, as
    :func:`patch_grid` finds them, from the run's metadata and coordinates."""
    sizes = stored_sizes(run, layer)
    if schema.kind_of_dims(list(sizes)) != schema.KIND_TOKEN:
        return sizes[schema.Y], sizes[schema.X]
    group = run.group[layer]
    kinds = schema.as_str_array(run._coord(group, "token_kind", layer)[1])
    patches = kinds == schema.PATCH
    ty = np.asarray(run._coord(group, "token_y", layer)[1], float)[patches]
    tx = np.asarray(run._coord(group, "token_x", layer)[1], float)[patches]
    return int(np.unique(ty).size), int(np.unique(tx).size)


def run_roles(run: Run) -> dict[str, dict[str, Any]]:
    """Each stored layer's attributes with its role (stream, branch, ...), as recorded at
    extraction or, for older stores, derived by the family rule from the stored layer
    names (:func:`vitcnn_store.models.families.stored_roles`); this only reads the run's
    metadata."""
    attrs = {name: layer_attrs(run, name) for name in run.layers}
    return stored_roles(run.attrs.get("model_family"), attrs)


@dataclass(frozen=True)
class LayerInfo:
    """Shape facts of a stored layer: kind, token roles, spatial grid."""

    name: str
    kind: str  # one of schema.LAYER_KINDS
    prefix: tuple[int, ...]  # token indices of CLS/register tokens
    patches: tuple[int, ...]  # token indices of patch tokens
    cls_index: int | None
    depth_fraction: float
    depth_index: int


def layer_info(x: xr.DataArray) -> LayerInfo:
    """Describe a layer's DataArray from :meth:`Run.__getitem__`."""
    kind = schema.kind_of_dims([str(d) for d in x.dims])
    prefix: tuple[int, ...] = ()
    patches: tuple[int, ...] = ()
    cls_index = None
    if kind == schema.KIND_TOKEN:
        kinds = schema.as_str_array(x.coords["token_kind"].values)
        prefix = tuple(int(i) for i in np.flatnonzero(kinds != schema.PATCH))
        patches = tuple(int(i) for i in np.flatnonzero(kinds == schema.PATCH))
        cls = np.flatnonzero(kinds == schema.CLS)
        cls_index = int(cls[0]) if cls.size else None
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
            token = info.kind == schema.KIND_TOKEN
            raise UsageError(
                f"--reduce cls needs token layers with a CLS token; layer {info.name!r} is "
                f"{info.kind}{' without CLS' if token else ''} "
                "(use --reduce gap/flatten or pick token layers with --layers)"
            )
        how = "gap"
    if how == "flatten":
        return data, how  # flattened inside the task: no reshape tasks in the graph
    if how == "cls":
        return data[:, info.cls_index, :], how
    if how == "gap":
        if info.kind == schema.KIND_TOKEN:
            if not info.patches:
                raise UsageError(f"layer {info.name!r} has no patch tokens to average")
            # Float64 before summing: float16 sums over 196 tokens lose digits.
            return data[:, list(info.patches)].astype(np.float64).mean(axis=1), how
        if data.ndim > 2:
            return data.astype(np.float64).mean(axis=tuple(range(1, data.ndim - 1))), how
        return data, how
    raise UsageError(f"unknown reduction {how!r}: use {', '.join(FEATURE_REDUCTIONS)}")


def token_positions(run: Run, attention: xr.DataArray) -> tuple[np.ndarray, int | None]:
    """Token pixel centres (token, 2) of an attention array, NaN for prefix tokens, and
    the CLS index.

    Positions are stored with the attention module's activation; a module
    stored for attention only has none, so they are borrowed from any token
    layer of the run with as many tokens (every ViT block shares them).
    """
    if "query_y" in attention.coords:
        y, x, kinds = attention["query_y"], attention["query_x"], attention["query_kind"]
    else:
        for name in run.layers:
            t = run[name]
            if schema.TOKEN in t.dims and t.sizes[schema.TOKEN] == attention.sizes[schema.QUERY]:
                y, x, kinds = t["token_y"], t["token_x"], t["token_kind"]
                break
        else:
            raise UsageError(
                f"attention layer {attention.attrs.get('layer')!r} has no stored token "
                "positions: extract a token layer too (e.g. --layers preset:blocks)"
            )
    yx = np.stack([np.asarray(y.values, float), np.asarray(x.values, float)], axis=1)
    cls = np.flatnonzero(schema.as_str_array(kinds.values) == schema.CLS)
    return yx, int(cls[0]) if cls.size else None


def refuse_reduced(layer: str, attrs: Any) -> None:
    """Refuse a layer reduced at extraction (``--reduce``, recorded in its ``attrs``): its
    tokens are gone, so no map can be made of them."""
    if attrs.get("reduction"):
        raise UsageError(
            f"layer {layer!r} was stored reduced (--reduce ...={attrs['reduction']}): "
            "localization needs its tokens; re-extract the layer without --reduce"
        )


def patch_grid(
    x: xr.DataArray, info: LayerInfo
) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, int], int]]:
    """Pixel centres of a layer's grid rows and columns, and (row, col) → index along
    its flattened token (or y·x) axis. Refuses a layer reduced at extraction
    (``--reduce``): its tokens are gone, so no map can be made of them."""
    refuse_reduced(info.name, x.attrs)
    if info.kind == schema.KIND_TOKEN:
        ty = np.asarray(x["token_y"].values, float)[list(info.patches)]
        tx = np.asarray(x["token_x"].values, float)[list(info.patches)]
        ys, iy = np.unique(ty, return_inverse=True)
        xs, ix = np.unique(tx, return_inverse=True)
        where = {(int(r), int(c)): t for r, c, t in zip(iy, ix, info.patches, strict=True)}
        return ys, xs, where
    ys, xs = np.asarray(x[schema.Y].values, float), np.asarray(x[schema.X].values, float)
    where = {(r, c): r * xs.size + c for r in range(ys.size) for c in range(xs.size)}
    return ys, xs, where
