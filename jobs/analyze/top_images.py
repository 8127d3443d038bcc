"""The dataset examples of every channel: the ``k`` images that drive it most, and where.

For each selected layer and channel, an image scores the channel's maximum
over positions — patch tokens of a token layer (prefix tokens such as CLS are
not places in the image), every y·x position of a spatial layer, the one value
of a pooled layer — and the ``k`` best images are kept with the position of
their maximum (docs/science.md says why the maximum). One streaming pass: one
dask task per stored chunk (one work unit) per layer computes the chunk's
top-k (:func:`~vitcnn_store.analysis.top_images.chunk_top_k`), and the driver
merges the lists as they arrive (:func:`~vitcnn_store.analysis.top_images.merge_top_k`),
so each chunk is read once and no layer is ever held whole. The same pass sums
each channel's values for its mean and standard deviation over images and
positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.executor import Executor
from jobs.analyze.layers import layer_info, select_layers
from jobs.analyze.options import TopImagesConfig
from jobs.analyze.pipeline import AnalysisResult, run_analysis
from jobs.analyze.runs import open_runs, usable_mask
from jobs.analyze.tasks import chunk_tasks
from vitcnn_store.analysis.top_images import TopK, chunk_top_k, merge_top_k
from vitcnn_store.errors import UsageError
from vitcnn_store.store import schema
from vitcnn_store.store.schema import string_coord

if TYPE_CHECKING:
    import xarray as xr

    from vitcnn_store.store.reader import Run

__all__ = ["TopImagesConfig", "run_top_images", "scored_positions"]

#: What ranks an image for a channel (recorded with the result).
STATISTIC = (
    "maximum over positions (patch tokens of token layers, y·x of spatial layers), "
    "ties broken by the lower image index"
)


def scored_positions(x: xr.DataArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat positions a layer's images are scored over, and each flat position's pixel
    centre (y, x) in the model input (NaN for prefix tokens; empty for pooled layers)."""
    info = layer_info(x)
    if info.kind == schema.KIND_TOKEN:
        ys = np.asarray(x["token_y"].values, dtype=np.float64)
        xs = np.asarray(x["token_x"].values, dtype=np.float64)
        patches = np.asarray(info.patches, dtype=np.int64)
        return (patches if patches.size else np.arange(ys.size)), ys, xs
    if info.kind == schema.KIND_SPATIAL:
        gy = np.asarray(x[schema.Y].values, dtype=np.float64)
        gx = np.asarray(x[schema.X].values, dtype=np.float64)
        yy, xx = np.meshgrid(gy, gx, indexing="ij")
        return np.arange(yy.size), yy.ravel(), xx.ravel()
    return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)


def _chunk(block: Any, images: Any, positions: np.ndarray, k: int) -> TopK:
    x = np.asarray(block)
    return chunk_top_k(x.reshape(x.shape[0], -1, x.shape[-1]), np.asarray(images), positions, k)


def run_top_images(cfg: TopImagesConfig) -> AnalysisResult:
    """Compute (or reuse) the top-``k`` images of every channel of the selected layers.

    The result (``<run>/_analyses/top_images``) holds, per (layer, channel, rank),
    ``value`` (the score), ``image`` (index into the run's ``image``; -1 past a
    layer's channels), ``position`` (flat token or y·x index of the maximum; -1
    for pooled layers) and its pixel centre ``position_y``/``position_x``; per
    (layer, channel) ``mean`` and ``std`` over images and positions; per layer
    ``n_channels``, ``kind`` and depth.
    """
    (run,) = open_runs(cfg.store, [cfg.run])
    mask = usable_mask(run, cfg.allow_incomplete)
    layers = select_layers(run, cfg.layers)
    k = min(cfg.k, int(mask.sum()))

    def compute(executor: Executor) -> xr.Dataset:
        import dask.array as da

        arrays = [run[name] for name in layers]  # opened only to compute
        index = da.from_array(np.arange(run.n_images), chunks=(arrays[0].data.chunks[0],))
        tasks: list[Any] = []
        owner: list[int] = []
        setups = [scored_positions(a) for a in arrays]
        for j, (a, (positions, _, _)) in enumerate(zip(arrays, setups, strict=True)):
            if a.data.chunks[0] != index.chunks[0]:  # pragma: no cover - one chunking per run
                raise UsageError(f"layer {layers[j]!r} is chunked unlike the run's images")
            new = chunk_tasks([a.data, index], mask, _chunk, positions, k)
            tasks += new
            owner += [j] * len(new)
        tops: list[TopK | None] = [None] * len(layers)
        for i, top in executor.imap(tasks, desc=f"top-images {cfg.run}"):
            j = owner[i]
            current = tops[j]
            tops[j] = top if current is None else merge_top_k(current, top, k)
        return _dataset(cfg, run, layers, arrays, tops, setups, k, int(mask.sum()))

    return run_analysis(
        cfg,
        analysis="top-images",
        default_name="top_images",
        sources=[(run, mask)],
        compute=compute,
        extra_parameters={"layers": layers, "k_used": k},
    )


def _dataset(
    cfg: TopImagesConfig,
    run: Run,
    layers: list[str],
    arrays: list[Any],
    tops: list[TopK | None],
    setups: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    k: int,
    n: int,
) -> xr.Dataset:
    import xarray as xr

    channels = max(int(a.shape[-1]) for a in arrays)
    shape = (len(layers), channels, k)
    value = np.full(shape, np.nan, dtype=np.float32)
    image = np.full(shape, -1, dtype=np.int64)
    position = np.full(shape, -1, dtype=np.int64)
    pos_y = np.full(shape, np.nan, dtype=np.float32)
    pos_x = np.full(shape, np.nan, dtype=np.float32)
    mean = np.full(shape[:2], np.nan)
    std = np.full(shape[:2], np.nan)
    for j, top in enumerate(tops):
        if top is None:  # pragma: no cover - usable_mask guarantees images
            raise UsageError(f"no usable images for layer {layers[j]!r}")
        c = top.value.shape[1]
        value[j, :c] = top.value.T
        image[j, :c] = top.image.T
        position[j, :c] = top.position.T
        _, ys, xs = setups[j]
        if ys.size:
            pos_y[j, :c] = ys[top.position.T]
            pos_x[j, :c] = xs[top.position.T]
        mean[j, :c] = top.mean
        std[j, :c] = top.std
    kinds = [layer_info(a).kind for a in arrays]
    ds = xr.Dataset(
        {
            "value": (("layer", "channel", "rank"), value),
            "image": (("layer", "channel", "rank"), image),
            "position": (("layer", "channel", "rank"), position),
            "position_y": (("layer", "channel", "rank"), pos_y),
            "position_x": (("layer", "channel", "rank"), pos_x),
            "mean": (("layer", "channel"), mean),
            "std": (("layer", "channel"), std),
            "n_channels": (("layer",), np.array([int(a.shape[-1]) for a in arrays])),
        },
        coords={
            "layer": string_coord(layers),
            "channel": np.arange(channels),
            "rank": np.arange(k),
            "kind": ("layer", string_coord(kinds)),
            "depth_fraction": (
                "layer",
                [float(a.attrs.get("depth_fraction", np.nan)) for a in arrays],
            ),
            "depth_index": ("layer", [int(a.attrs.get("depth_index", -1)) for a in arrays]),
        },
    )
    ds["value"].attrs["long_name"] = "the channel's maximum over the image's positions"
    ds["image"].attrs["long_name"] = "index into the run's image coordinate (-1: no channel)"
    ds["position"].attrs["long_name"] = (
        "flat index of the maximum: token index, or y * width + x (-1: pooled layer)"
    )
    for v in ("position_y", "position_x"):
        ds[v].attrs.update(units="input pixels", long_name="centre of the maximum's position")
    ds["mean"].attrs["long_name"] = "mean over images and every position"
    ds["std"].attrs["long_name"] = "standard deviation over images and every position"
    ds.attrs.update(
        n=n,
        k=k,
        statistic=STATISTIC,
        summary=(
            f"top {k} of {n} images for each channel of {len(layers)} layer(s) "
            f"({sum(int(a.shape[-1]) for a in arrays)} channels), ranked by the maximum "
            "over positions"
        ),
    )
    return ds
