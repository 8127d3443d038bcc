"""Layer slices cut on the server: only the selected values are read and sent.

A slice is chosen per dimension: ``images`` (or ``ids``, image ids) along
``image``, ``tokens`` along every token dimension (``token``, or ``query``
and ``key`` of attention), and any dimension by its own name (``channel=0:64``,
``head=1``, ``y=0:4``). Each selection is ``START:STOP[:STEP]`` or a list of
indices ``i,j,k``. The size is known before anything is read, so a slice
over the response limit is refused (413) without touching the data.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.serve.errors import ApiError

if TYPE_CHECKING:
    import xarray as xr

    from vitcnn_store.store.reader import Run

__all__ = ["SLICE_PARAMS", "encode_json", "encode_npy", "parse_indexer", "plain", "select"]

#: Query parameters of a slice besides per-dimension ones.
SLICE_PARAMS = ("array", "images", "ids", "tokens", "format")
_TOKEN_DIMS = ("token", "query", "key")
# JSON text takes about this many bytes per value (a float16 in decimal, a comma).
JSON_BYTES_PER_VALUE = 10


def parse_indexer(text: str, n: int, what: str) -> slice | list[int] | int:
    """``START:STOP[:STEP]``, ``i,j,k`` or ``i`` along a dimension of length ``n``.

    Examples
    --------
    >>> parse_indexer("2:8", 10, "image"), parse_indexer("1,3", 10, "image")
    (slice(2, 8, None), [1, 3])
    >>> parse_indexer("12", 10, "image")
    Traceback (most recent call last):
    ...
    vitcnn_store.serve.errors.ApiError: image=12: indices must be in 0..9
    """
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if not 2 <= len(parts) <= 3 or (len(parts) == 3 and parts[2] in (0,)):
                raise ValueError
            return slice(*parts)
        items = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ApiError(400, f"{what}={text!r}: want START:STOP[:STEP] or i,j,k") from None
    if not items:
        raise ApiError(400, f"{what}= selects nothing")
    if any(not 0 <= i < n for i in items):
        raise ApiError(400, f"{what}={text}: indices must be in 0..{n - 1}")
    return items[0] if len(items) == 1 and "," not in text else items


def select(
    run: Run, layer: str, params: Mapping[str, str], open_array: Callable[[str], xr.DataArray]
) -> xr.DataArray:
    """The lazy selection of ``run``'s ``layer`` that ``params`` ask for (nothing read);
    ``open_array("activation" | "attention")`` gives the whole lazy array."""
    data = open_array(params.get("array", "activation"))
    unknown = sorted(set(params) - set(SLICE_PARAMS) - set(data.dims))
    if unknown:
        raise ApiError(
            400,
            f"unknown parameter {unknown[0]!r}: use {', '.join(SLICE_PARAMS)} "
            f"or a dimension of {layer} ({', '.join(map(str, data.dims))})",
        )
    if "ids" in params and ("images" in params or "image" in params):
        raise ApiError(400, "give either ids= or images=, not both")
    indexers: dict[str, Any] = {}
    if "ids" in params:
        wanted = [i for i in params["ids"].split(",") if i]
        where = {v: k for k, v in enumerate(run.image_ids.tolist())}
        missing = [i for i in wanted if i not in where]
        if missing or not wanted:
            raise ApiError(
                404, f"unknown image id {missing[0] if missing else ''!r} in run {run.name!r}"
            )
        indexers["image"] = [where[i] for i in wanted]
    for name, text in params.items():
        dim = "image" if name == "images" else name
        if name in ("array", "ids", "format", "tokens"):
            continue
        indexers[dim] = parse_indexer(text, data.sizes[dim], dim)
    if "tokens" in params:
        token_dims = [d for d in _TOKEN_DIMS if d in data.dims]
        if not token_dims:
            raise ApiError(
                400, f"tokens=: {layer} has no token dimension ({', '.join(map(str, data.dims))})"
            )
        for d in token_dims:
            indexers[d] = parse_indexer(params["tokens"], data.sizes[d], d)
    return data.isel(indexers)


def check_size(data: xr.DataArray, fmt: str, limit: int) -> None:
    """Refuse (413) a selection whose answer would be over ``limit`` bytes."""
    size = data.size * JSON_BYTES_PER_VALUE if fmt == "json" else data.nbytes
    if size > limit:
        shape = "x".join(map(str, data.shape))
        raise ApiError(
            413,
            f"a {shape} {fmt} slice is about {size} bytes, over the limit of "
            f"{limit}: select fewer images or tokens",
        )


def plain(values: Any) -> Any:
    """``values`` as plain JSON: numpy scalars and arrays become lists, NaN and inf null."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "f":
            out = values.astype(object)
            out[~np.isfinite(values)] = None
            return out.tolist()
        if values.dtype.kind in "OUST":
            return [plain(v) for v in values.tolist()] if values.ndim else plain(values.item())
        return values.tolist()
    if isinstance(values, np.generic):
        return plain(values.item())
    if isinstance(values, float):
        return values if np.isfinite(values) else None
    if isinstance(values, Mapping):
        return {str(k): plain(v) for k, v in values.items()}
    if isinstance(values, (list, tuple)):
        return [plain(v) for v in values]
    if isinstance(values, bytes):
        return values.decode("utf-8", "replace")
    return values


def encode_json(data: xr.DataArray, values: np.ndarray) -> bytes:
    """A slice as JSON: dims, shape, dtype, coordinates and the values (NaN as null)."""
    coords = {
        str(name): {"dims": list(map(str, c.dims)), "data": plain(np.asarray(c.values))}
        for name, c in data.coords.items()
    }
    body = {
        "name": data.name,
        "dims": list(map(str, data.dims)),
        "shape": list(values.shape),
        "dtype": str(values.dtype),
        "coords": coords,
        "data": plain(values),
    }
    return json.dumps(body, allow_nan=False).encode()


def encode_npy(values: np.ndarray) -> bytes:
    """A slice as a ``.npy`` file (``numpy.load`` reads it)."""
    buf = io.BytesIO()
    np.save(buf, values, allow_pickle=False)
    return buf.getvalue()
