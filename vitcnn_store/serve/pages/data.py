"""What the explorer reads from the store: runs, results, pixels, maps — each cached briefly.

Runs and results come through the API's short-lived cache (replicas stay
stateless: a new unit or result shows within seconds). An image's pixels are
the stored ``input`` un-normalized (exactly what the model saw); without it,
a built-in image is regenerated, or an image file of the run's folder is read
if its bytes still hash to the stored ``image_sha256``, and resized to the
model's input (the crop of preprocessing is not redone: the page says so).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vitcnn_store.errors import VitcnnError
from vitcnn_store.serve.api_routes import _run
from vitcnn_store.serve.errors import ApiError
from vitcnn_store.store import schema

if TYPE_CHECKING:
    import xarray as xr
    from fastapi import Request

    from vitcnn_store.store.reader import Run

__all__ = [
    "LRU",
    "Grid",
    "analyses",
    "analysis",
    "attention",
    "attention_map",
    "channel_map",
    "find_top_images",
    "image_pixels",
    "layer",
    "layer_grid",
    "open_run",
    "recent",
    "run_version",
]


class LRU:
    """A small thread-safe least-recently-used cache."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


_pixels = LRU(256)
#: Seconds the explorer reuses an opened run, its layers and results: pages that follow
#: each other read nothing twice, and a new unit or result shows within this time.
TTL = 10.0
_recent: dict[Any, tuple[float, Any]] = {}
_recent_lock = threading.Lock()


def recent(key: Any, make: Callable[[], Any]) -> Any:
    """``make()``, reused for :data:`TTL` seconds under ``key``."""
    now = time.monotonic()
    with _recent_lock:
        hit = _recent.get(key)
    if hit is not None and now - hit[0] < TTL:
        return hit[1]
    value = make()
    with _recent_lock:
        if len(_recent) > 1024:  # many runs and layers: start afresh
            _recent.clear()
        _recent[key] = (now, value)
    return value


def open_run(request: Request, name: str) -> Run:
    """Run ``name`` (404 when absent), reused for :data:`TTL` seconds."""
    store = request.app.state.config.store
    return recent((store, name), lambda: _run(request, name))


def analyses(run: Run) -> list[str]:
    """Names of the run's complete results (listing them reads every result's marker)."""
    return recent((run.store.url, run.name, "analyses"), lambda: run.analyses)


def layer(run: Run, name: str) -> xr.DataArray:
    """The lazy activation of layer ``name`` (its coordinates read once per :data:`TTL`)."""
    return recent((run.store.url, run.name, name, "activation"), lambda: run[name])


def attention(run: Run, name: str) -> xr.DataArray:
    """The lazy attention of layer ``name``."""
    return recent((run.store.url, run.name, name, "attention"), lambda: run.attention(name))


def run_version(run: Run) -> str:
    """Changes when the run is re-extracted, resumed or gets a new result."""
    done = int(run.done.sum())
    return f"{run.attrs.get('created_at')}|{done}|{','.join(analyses(run))}"


def analysis(run: Run, name: str) -> xr.Dataset:
    """Result ``name`` of ``run`` (404 when absent), reused for :data:`TTL` seconds."""
    if name not in analyses(run):
        raise ApiError(404, f"no analysis {name!r} in run {run.name!r}")
    return recent((run.store.url, run.name, "analysis", name), lambda: run.analysis(name))


def find_top_images(run: Run) -> tuple[str, xr.Dataset] | None:
    """The run's top-images result (name ``top_images``, or any whose name starts with top)."""
    names = [n for n in analyses(run) if n == "top_images"]
    names += [n for n in analyses(run) if n.startswith("top") and n != "top_images"]
    for name in names:
        ds = analysis(run, name)
        if ds.attrs.get("analysis") == "top-images":
            return name, ds
    return None


def check_image(run: Run, i: int) -> int:
    if not 0 <= i < run.n_images:
        raise ApiError(404, f"no image {i} in run {run.name!r} (0..{run.n_images - 1})")
    return i


def image_pixels(run: Run, i: int) -> tuple[np.ndarray, str]:
    """Image ``i`` as uint8 (y, x, rgb) in the model's input geometry, and where it came from."""
    check_image(run, i)
    key = (run.store.url, run.name, run_version(run), i)
    return _pixels.get(key, lambda: _load_pixels(run, i))


def _load_pixels(run: Run, i: int) -> tuple[np.ndarray, str]:
    attrs = run.attrs
    if "input" in run.group:
        x = np.asarray(run.inputs.data[i].compute(scheduler="synchronous"), dtype=np.float32)
        if attrs.get("input_normalized", True):
            x = x * np.asarray(attrs.get("std", 1.0)) + np.asarray(attrs.get("mean", 0.0))
        return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8), "stored input (what the model saw)"
    size = attrs.get("input_size") or [3, 224, 224]
    original = _original(run, i)
    if original is None:
        gray = np.full((int(size[1]), int(size[2]), 3), 128, dtype=np.uint8)
        gray[::8] = gray[:, ::8] = 96  # a visible grid: not blank, plainly not the image
        return gray, "no pixels: extract with --inputs, or keep the image files where they were"
    resized = original.convert("RGB").resize((int(size[2]), int(size[1])))
    return np.asarray(resized), "original image resized to the model input (crop not redone)"


def _original(run: Run, i: int) -> Any:
    """The original image as PIL, or None when it cannot be found or verified."""
    from PIL import Image

    image_set = str(run.attrs.get("image_set", ""))
    image_id = str(run.image_ids[i])
    try:
        if image_set.startswith("builtin:"):
            from vitcnn_store.data.builtin import load_builtin

            return load_builtin(f"builtin:{image_id}")
        root = Path(image_set)
        folder = root if root.is_dir() else root.parent
        path = (folder / image_id).resolve()
        if not path.is_relative_to(folder.resolve()) or not path.is_file():
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != str(run.image_sha256[i]):
            return None  # not the image that was extracted
        import io

        return Image.open(io.BytesIO(data))
    except (OSError, ValueError, VitcnnError):
        return None


class Grid:
    """A layer's positions on the input: rows × cols of patch or spatial centres.

    ``index`` maps (row, col) to the flat position (token index, or y·W + x).
    """

    def __init__(self, ys: np.ndarray, xs: np.ndarray, index: np.ndarray) -> None:
        self.ys, self.xs, self.index = ys, xs, index

    @property
    def shape(self) -> tuple[int, int]:
        return self.ys.size, self.xs.size


def layer_grid(x: xr.DataArray, prefix: str = "token") -> Grid | None:
    """The grid of a token layer (``prefix`` ``token``, ``query`` or ``key``) or spatial
    layer; None for pooled layers."""
    if f"{prefix}_y" in x.coords:
        ty = np.asarray(x[f"{prefix}_y"].values, dtype=float)
        tx = np.asarray(x[f"{prefix}_x"].values, dtype=float)
        ok = np.isfinite(ty) & np.isfinite(tx)
        ys, iy = np.unique(ty[ok], return_inverse=True)
        xs, ix = np.unique(tx[ok], return_inverse=True)
        index = np.full((ys.size, xs.size), -1, dtype=np.int64)
        index[iy, ix] = np.flatnonzero(ok)
        return Grid(ys, xs, index)
    if schema.Y in x.dims and schema.X in x.dims:
        ys = np.asarray(x[schema.Y].values, dtype=float)
        xs = np.asarray(x[schema.X].values, dtype=float)
        return Grid(ys, xs, np.arange(ys.size * xs.size).reshape(ys.size, xs.size))
    return None


def channel_map(run: Run, name: str, i: int, channel: int) -> np.ndarray:
    """Channel ``channel`` of layer ``name`` on image ``i`` over its grid (rows, cols)."""
    x = layer(run, name)
    grid = layer_grid(x)
    if grid is None:
        raise ApiError(400, f"layer {name!r} is pooled: it has no positions to map")
    if not 0 <= channel < x.shape[-1]:
        raise ApiError(404, f"no channel {channel} in {name!r} (0..{x.shape[-1] - 1})")
    check_image(run, i)
    values = np.asarray(x.data[i, ..., channel].compute(scheduler="synchronous"), dtype=float)
    return values.reshape(-1)[grid.index]


def attention_map(run: Run, name: str, i: int, head: int | None, query: int) -> np.ndarray:
    """Attention of ``query`` to every patch key of layer ``name`` on image ``i`` (rows,
    cols); ``head`` None averages the heads."""
    a = attention(run, name)
    grid = layer_grid(a, "key")
    if grid is None:
        raise ApiError(400, f"attention of {name!r} has no key positions")
    check_image(run, i)
    if not 0 <= query < a.sizes["query"]:
        raise ApiError(400, f"query={query}: want 0..{a.sizes['query'] - 1}")
    if head is not None and not 0 <= head < a.sizes["head"]:
        raise ApiError(404, f"no head {head} in {name!r} (0..{a.sizes['head'] - 1})")
    row = np.asarray(a.data[i, :, query, :].compute(scheduler="synchronous"), dtype=float)
    values = row.mean(axis=0) if head is None else row[head]
    return values[grid.index]
