"""``/png/...``: pictures drawn from the store on request (PIL), cached, with ETags.

Images, heat maps over images (where a channel fires, where a query patch
attends, localization maps) and result heat maps (CKA matrices, CLS attention
maps). A picture is drawn once per store state and kept in a small in-memory
LRU keyed by its URL and the run's version; its ETag is the hash of its bytes,
so a browser revalidates with ``If-None-Match`` and gets 304.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response

from vitcnn_store.serve.errors import ApiError
from vitcnn_store.serve.pages import data

__all__ = ["colorize", "router"]

router = APIRouter(prefix="/png", tags=["explorer"], include_in_schema=False)
_pictures = data.LRU(1024)
SIZES = (32, 640)


def _colormap(name: str) -> np.ndarray:
    """256 RGB rows of a matplotlib colormap (loaded once)."""

    def make() -> np.ndarray:
        from matplotlib import colormaps

        return (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)

    return _cmaps.get(name, make)


_cmaps = data.LRU(8)


def colorize(values: np.ndarray, lo: float, hi: float, cmap: str = "viridis") -> np.ndarray:
    """RGB (…, 3) uint8 of ``values`` scaled from [lo, hi]; NaN drawn light grey."""
    span = hi - lo if hi > lo else 1.0
    scaled = np.clip((np.nan_to_num(values, nan=lo) - lo) / span, 0, 1)
    rgb = _colormap(cmap)[(scaled * 255).astype(int)]
    rgb[~np.isfinite(values)] = 230
    return rgb


def _png(rgb: np.ndarray, size: int | None = None, smooth: bool = True) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(rgb))
    if size is not None:
        h, w = rgb.shape[:2]
        scale = size / max(h, w)
        target = (max(1, round(w * scale)), max(1, round(h * scale)))
        im = im.resize(target, Image.Resampling.BICUBIC if smooth else Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def overlay(pixels: np.ndarray, grid: np.ndarray, size: int, cmap: str = "inferno") -> bytes:
    """``grid`` (rows, cols) as a heat map over ``pixels``: each cell covers its patch,
    opaque where the map is high, so the image shows through where it is low."""
    from PIL import Image

    base = Image.fromarray(pixels).convert("RGB")
    h, w = pixels.shape[:2]
    scale = size / max(h, w)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = base.resize(target, Image.Resampling.BICUBIC)
    finite = grid[np.isfinite(grid)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    norm = np.clip((np.nan_to_num(grid, nan=lo) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    heat = Image.fromarray(colorize(grid, lo, hi, cmap)).resize(target, Image.Resampling.NEAREST)
    alpha = Image.fromarray((40 + 170 * norm).astype(np.uint8)).resize(
        target, Image.Resampling.NEAREST
    )
    base.paste(heat, (0, 0), alpha)
    buf = io.BytesIO()
    base.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _answer(request: Request, run: Any, draw: Any) -> Response:
    """The cached picture of this URL for the run's current state (304 when unchanged)."""
    key = (run.store.url, data.run_version(run), request.url.path, str(request.url.query))
    body, etag = _pictures.get(key, lambda: _with_etag(draw()))
    headers = {"ETag": etag, "Cache-Control": "private, max-age=60"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="image/png", headers=headers)


def _with_etag(body: bytes) -> tuple[bytes, str]:
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _size(size: int) -> int:
    if not SIZES[0] <= size <= SIZES[1]:
        raise ApiError(400, f"size={size}: want {SIZES[0]}..{SIZES[1]}")
    return size


@router.get("/runs/{run}/images/{i}")
def image_png(run: str, i: int, request: Request, size: int = Query(192)) -> Response:
    r = data.open_run(request, run)
    return _answer(request, r, lambda: _png(data.image_pixels(r, i)[0], _size(size)))


@router.get("/runs/{run}/images/{i}/channel")
def channel_png(
    run: str, i: int, request: Request, layer: str, c: int, size: int = Query(192)
) -> Response:
    r = data.open_run(request, run)
    if layer not in r.layers:
        raise ApiError(404, f"no layer {layer!r} in run {run!r}")

    def draw() -> bytes:
        return overlay(data.image_pixels(r, i)[0], data.channel_map(r, layer, i, c), _size(size))

    return _answer(request, r, draw)


@router.get("/runs/{run}/images/{i}/attention")
def attention_png(
    run: str,
    i: int,
    request: Request,
    layer: str,
    q: int,
    head: str = Query("mean"),
    size: int = Query(192),
) -> Response:
    r = data.open_run(request, run)
    if layer not in r.attention_layers:
        raise ApiError(404, f"no attention layer {layer!r} in run {run!r}")
    h = None if head == "mean" else _int(head, "head")

    def draw() -> bytes:
        grid = data.attention_map(r, layer, i, h, q)
        return overlay(data.image_pixels(r, i)[0], grid, _size(size), "viridis")

    return _answer(request, r, draw)


@router.get("/runs/{run}/images/{i}/localization")
def localization_png(
    run: str, i: int, request: Request, name: str, target: int, size: int = Query(192)
) -> Response:
    r = data.open_run(request, run)
    ds = data.analysis(r, name)
    if "localization" not in ds or not 0 <= target < ds.sizes["target"]:
        raise ApiError(404, f"no localization target {target} in {name!r}")
    grid = np.asarray(ds["localization"].values[target], dtype=float)
    return _answer(
        request, r, lambda: overlay(data.image_pixels(r, i)[0], grid, _size(size), "magma")
    )


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ApiError(400, f"{what}={text!r}: want an integer") from None


@router.get("/runs/{run}/analyses/{name}/matrix")
def matrix_png(
    run: str, name: str, request: Request, var: str = Query("cka"), cell: int = Query(12)
) -> Response:
    """A (rows, cols) result variable as a heat map, one ``cell``-px square per value,
    first row at the top; CKA in [0, 1] on viridis."""
    r = data.open_run(request, run)
    ds = data.analysis(r, name)
    if var not in ds or ds[var].ndim != 2:
        raise ApiError(404, f"no 2-d variable {var!r} in {name!r}")
    if not 2 <= cell <= 64:
        raise ApiError(400, f"cell={cell}: want 2..64")
    values = np.asarray(ds[var].values, dtype=float)

    def draw() -> bytes:
        rgb = colorize(values, 0.0, 1.0, "viridis")
        rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
        return _png(rgb)

    return _answer(request, r, draw)


@router.get("/runs/{run}/analyses/{name}/grid")
def grid_png(
    run: str,
    name: str,
    request: Request,
    var: str,
    at: str = Query("", description="indices of the leading dims, comma-separated"),
    size: int = Query(96),
) -> Response:
    """A result variable ending in (grid_y, grid_x), at integer indices of its other dims."""
    r = data.open_run(request, run)
    ds = data.analysis(r, name)
    if var not in ds or tuple(ds[var].dims[-2:]) != ("grid_y", "grid_x"):
        raise ApiError(404, f"no grid variable {var!r} in {name!r}")
    lead = [str(d) for d in ds[var].dims[:-2]]
    picks = [_int(p, "at") for p in at.split(",") if p.strip()]
    if len(picks) != len(lead) or any(
        not 0 <= p < ds.sizes[d] for p, d in zip(picks, lead, strict=True)
    ):
        raise ApiError(400, f"at={at!r}: want one index per dimension of {', '.join(lead)}")
    grid = np.asarray(ds[var].values[tuple(picks)], dtype=float)

    def draw() -> bytes:
        finite = grid[np.isfinite(grid)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        return _png(colorize(grid, lo, hi, "magma"), _size(size), smooth=False)

    return _answer(request, r, draw)
