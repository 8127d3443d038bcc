"""``/api/``: runs, one run, layer slices and analysis results, as JSON (and npy, CSV, netCDF).

Every answer is read from the store when asked (replicas keep no state); an
opened run (and each layer's lazy array) is reused for a few seconds, so a
burst of slice requests does not re-read the coordinates each time, and a new
unit or analysis shows within seconds.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from vitcnn_store.serve.errors import ApiError
from vitcnn_store.serve.slices import check_size, encode_json, encode_npy, plain, select
from vitcnn_store.store.layout import check_name

__all__ = ["router"]

router = APIRouter(prefix="/api", tags=["api"])
_RUN_TTL = 2.0  # seconds an opened run answers before it is reopened (new units, analyses)
_cache: dict[tuple[str, ...], tuple[float, Any]] = {}
_cache_lock = threading.Lock()


def _store(request: Request) -> Any:
    from vitcnn_store.store import open_store

    return open_store(request.app.state.config.store)


def _cached(key: tuple[str, ...], make: Any) -> Any:
    """``make()``, reused for :data:`_RUN_TTL` seconds under ``key``."""
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and now - hit[0] < _RUN_TTL:
        return hit[1]
    value = make()
    with _cache_lock:
        if len(_cache) > 256:  # stale entries of many runs and layers: start afresh
            _cache.clear()
        _cache[key] = (now, value)
    return value


def _run(request: Request, name: str) -> Any:
    """The run ``name`` (404 when absent, 409 when broken), reused for :data:`_RUN_TTL` s."""
    try:
        check_name(name)
    except ValueError as e:
        raise ApiError(404, str(e)) from None
    store = request.app.state.config.store
    return _cached((store, name), lambda: _store(request)[name])


def _run_summary(run: Any, sizes: bool) -> dict[str, Any]:
    done = run.done
    summary = {
        "name": run.name,
        "created": True,
        "model": run.attrs.get("model"),
        "n_images": run.n_images,
        "n_layers": len(run.layers),
        "n_attention_layers": len(run.attention_layers),
        "units_done": int(done.sum()),
        "units_total": int(done.size),
        "complete": bool(done.all()),
        "n_failed_images": len(run.failed),
        "analyses": run.analyses,
        "provenance": plain(run.attrs),
    }
    if sizes:
        summary["stored_bytes"] = run.nbytes_stored()
    return summary


@router.get("/runs", summary="Every run: provenance, completeness, sizes")
def list_runs(
    request: Request,
    sizes: bool = Query(True, description="add stored bytes (lists the run's objects)"),
) -> dict[str, Any]:
    """Runs of the store; broken runs are listed with the reason."""
    store = _store(request)
    runs: list[dict[str, Any]] = []
    for entry in store.entries:
        if not entry.created:
            runs.append({"name": entry.name, "created": False, "problem": entry.problem})
        else:
            runs.append(_run_summary(store[entry.name], sizes))
    return {"store": request.app.state.config.store, "runs": runs}


def _layer_info(run: Any, layer: str, array: str) -> dict[str, Any]:
    with_quiet = run.group[layer]
    arr = with_quiet[array]
    group_attrs = dict(with_quiet.attrs)
    return {
        "name": layer,
        "array": array,
        "dims": list(arr.metadata.dimension_names or ()),
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "chunks": list(arr.chunks),
        "kind": group_attrs.get("kind"),
        "depth_index": group_attrs.get("depth_index"),
        "depth_fraction": group_attrs.get("depth_fraction"),
        "module_type": group_attrs.get("module_type"),
    }


@router.get("/runs/{run}", summary="One run: layers, shapes, analyses")
def get_run(run: str, request: Request) -> dict[str, Any]:
    """Provenance, layers with shapes, attention layers, analyses and failed images."""
    from vitcnn_store.store.layout import quiet_zarr

    r = _run(request, run)
    with quiet_zarr():
        layers = [_layer_info(r, name, "activation") for name in r.layers]
        attention = [_layer_info(r, name, "attention") for name in r.attention_layers]
    return {
        **_run_summary(r, sizes=False),
        "layers": layers,
        "attention_layers": attention,
        "failed_images": r.failed,
        "chunk_size": r.chunk_size,
    }


@router.get("/runs/{run}/images", summary="Image ids, labels and which images hold data")
def get_images(run: str, request: Request) -> dict[str, Any]:
    r = _run(request, run)
    return {
        "image_id": r.image_ids.tolist(),
        "label": plain(r.labels),
        "valid": plain(r.valid),
        "image_sha256": r.image_sha256.tolist(),
    }


@router.get(
    "/runs/{run}/layers/{layer}",
    summary="A slice of a layer, cut on the server",
    responses={
        200: {
            "content": {"application/json": {}, "application/octet-stream": {}},
            "description": "JSON (dims, coords, data; NaN as null) or a .npy file",
        },
        413: {"description": "the slice is over the response limit"},
    },
)
def get_slice(
    run: str,
    layer: str,
    request: Request,
    array: str = Query("activation", description="activation or attention"),
    images: str | None = Query(None, description="image indices START:STOP[:STEP] or i,j,k"),
    ids: str | None = Query(None, description="image ids, comma-separated (instead of images)"),
    tokens: str | None = Query(None, description="token range (token, or query and key)"),
    format: str = Query("json", description="json or npy"),
) -> Response:
    """Only the selected values are read and sent. Any dimension can be selected by its
    name too (``channel=0:64``, ``head=2``, ``y=0:4``)."""
    if format not in ("json", "npy"):
        raise ApiError(400, f"format={format!r}: want json or npy")
    params = dict(request.query_params)
    r = _run(request, run)
    data = select(
        r,
        layer,
        params,
        lambda array: _cached(
            (r.store.url, run, layer, array), lambda: _layer_array(r, layer, array)
        ),
    )
    check_size(data, format, request.app.state.config.max_response_bytes)
    raw = data.data
    values = raw.compute(scheduler="synchronous") if hasattr(raw, "dask") else raw
    if format == "npy":
        headers = {"X-Dims": ",".join(map(str, data.dims))}
        return Response(encode_npy(values), media_type="application/octet-stream", headers=headers)
    return Response(encode_json(data, values), media_type="application/json")


def _layer_array(run: Any, layer: str, array: str) -> Any:
    if array == "activation":
        return run[layer]
    if array == "attention":
        return run.attention(layer)
    raise ApiError(400, f"array={array!r}: want activation or attention")


@router.get("/runs/{run}/analyses", summary="Names of a run's analysis results")
def list_analyses(run: str, request: Request) -> dict[str, Any]:
    return {"run": run, "analyses": _run(request, run).analyses}


@router.get(
    "/runs/{run}/analyses/{name}",
    summary="One analysis result: JSON with coordinates, CSV or netCDF",
    responses={
        200: {"content": {"application/json": {}, "text/csv": {}, "application/x-netcdf": {}}}
    },
)
def get_result(
    run: str,
    name: str,
    request: Request,
    format: str = Query("json", description="json, csv or netcdf"),
    var: str | None = Query(None, description="CSV: the variable to tabulate"),
) -> Response:
    from vitcnn_store.serve.results import FORMATS, result_csv, result_json, result_netcdf

    if format not in FORMATS:
        raise ApiError(400, f"format={format!r}: want {', '.join(FORMATS)}")
    ds = _run(request, run).analysis(name)
    limit = request.app.state.config.max_response_bytes
    if ds.nbytes * (4 if format != "netcdf" else 1) > limit:
        raise ApiError(413, f"result {name!r} is {ds.nbytes} bytes, over the limit of {limit}")
    if format == "json":
        body = result_json(ds)
    elif format == "csv":
        body = result_csv(ds, var)
    else:
        body = result_netcdf(ds)
    headers = {}
    if format != "json":
        ext = "nc" if format == "netcdf" else "csv"
        headers["Content-Disposition"] = f'attachment; filename="{run}_{name}.{ext}"'
    return Response(body, media_type=FORMATS[format], headers=headers)
