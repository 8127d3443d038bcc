"""Attention statistics per layer and head from stored attention probabilities.

Mean attention distance (input pixels), attention entropy (nats) and the mean
CLS attention map on the patch grid (docs/science.md), accumulated over image chunks:
one dask task per stored chunk (one work unit) per attention layer builds an
:class:`~vitcnn_store.analysis.attention.AttentionAccumulator`, and the driver
merges them. Prefix tokens are dropped from queries and keys; rows are not
renormalized unless asked (the reference convention), and the choice is
recorded in the result. Each layer also records the baseline: what uniform
attention over all its tokens reads under the same convention, at the run's
resolution and patch size
(:func:`~vitcnn_store.analysis.attention.uniform_attention_baseline`), and
per head the mass the patch queries put on the CLS key (``cls_key_mass``) and
on all prefix keys (``prefix_key_mass``), from the rows as stored: without
renormalization that mass drops out of the distance, so a head attending to
CLS would otherwise read as local.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.executor import Executor
from jobs.analyze.layers import select_attention_layers, token_positions
from jobs.analyze.options import AttentionConfig
from jobs.analyze.pipeline import AnalysisResult, run_analysis
from jobs.analyze.runs import open_runs, usable_mask
from jobs.analyze.tasks import chunk_tasks
from vitcnn_store.analysis.attention import AttentionAccumulator, uniform_attention_baseline
from vitcnn_store.analysis.bootstrap import bootstrap_mean_interval
from vitcnn_store.errors import UsageError
from vitcnn_store.store.schema import string_coord

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["AttentionConfig", "run_attention"]


def _accumulate(
    block: Any, token_yx: np.ndarray, renormalize: bool, cls_index: int | None
) -> tuple[AttentionAccumulator, np.ndarray]:
    """The chunk's sums, and each image's mean distance per head (for the bootstrap):
    one accumulator per image, merged, so nothing is computed twice."""
    acc = AttentionAccumulator(token_yx, renormalize=renormalize, cls_index=cls_index)
    block = np.asarray(block)
    per_image = []
    for i in range(block.shape[0]):
        one = AttentionAccumulator(token_yx, renormalize=renormalize, cls_index=cls_index)
        one.update(block[i : i + 1])
        per_image.append(one.mean_distance())
        acc.merge(one)
    return acc, np.stack(per_image)


def run_attention(cfg: AttentionConfig) -> AnalysisResult:
    """Compute (or reuse) attention statistics of every stored attention layer.

    The result (``<run>/_analyses/attention``) holds ``mean_distance`` and
    ``entropy`` (layer, head), their uniform-attention baselines
    ``uniform_distance`` and ``uniform_entropy`` (layer), ``prefix_key_mass``
    (layer, head) and, when the layers have a CLS token, ``cls_key_mass``
    (layer, head) and ``cls_attention`` (layer, head, grid_y, grid_x); with
    ``bootstrap`` resamples, ``mean_distance_lo``/``_hi`` (layer, head).
    """
    (run,) = open_runs(cfg.store, [cfg.run])
    mask = usable_mask(run, cfg.allow_incomplete)
    layers = select_attention_layers(run, cfg.layers)

    def compute(executor: Executor) -> xr.Dataset:
        arrays = [run.attention(name) for name in layers]  # opened only to compute
        tasks: list[Any] = []
        owner: list[int] = []
        setups = [token_positions(run, a) for a in arrays]
        for j, (a, (yx, cls_index)) in enumerate(zip(arrays, setups, strict=True)):
            new = chunk_tasks([a.data], mask, _accumulate, yx, cfg.renormalize, cls_index)
            tasks += new
            owner += [j] * len(new)
        accs: list[AttentionAccumulator | None] = [None] * len(layers)
        per_image: dict[int, np.ndarray] = {}
        for i, (acc, distances) in executor.imap(tasks, desc=f"attention {cfg.run}"):
            j = owner[i]
            current = accs[j]
            accs[j] = acc if current is None else current.merge(acc)
            per_image[i] = distances
        ds = _dataset(cfg, run, layers, arrays, accs, setups, int(mask.sum()))
        _distance_interval(cfg, ds, owner, per_image)
        return ds

    return run_analysis(
        cfg,
        analysis="attention",
        default_name="attention",
        sources=[(run, mask)],
        compute=compute,
        extra_parameters={"layers": layers},
    )


def _distance_interval(
    cfg: AttentionConfig, ds: xr.Dataset, owner: list[int], per_image: dict[int, np.ndarray]
) -> None:
    """``mean_distance_lo``/``_hi``: percentile bootstrap over images (the same resamples
    for every layer and head), from each image's mean distance per head."""
    if not cfg.bootstrap:
        return
    layers, heads = ds.sizes["layer"], ds.sizes["head"]
    columns = []  # per layer: (image, head) in task order, i.e. image order
    for j in range(layers):
        rows = np.concatenate([per_image[i] for i in sorted(per_image) if owner[i] == j])
        columns.append(np.pad(rows, ((0, 0), (0, heads - rows.shape[1])), constant_values=np.nan))
    lo, hi = bootstrap_mean_interval(
        np.stack(columns, axis=1), n_boot=cfg.bootstrap, level=cfg.ci_level, seed=0
    )
    for name, values in (("mean_distance_lo", lo), ("mean_distance_hi", hi)):
        ds[name] = (("layer", "head"), values)
        ds[name].attrs.update(
            units="input pixels",
            long_name=(
                f"{'lower' if name.endswith('lo') else 'upper'} end of the {cfg.ci_level:g} "
                f"percentile bootstrap interval over images ({cfg.bootstrap} resamples)"
            ),
        )
    ds.attrs.update(ci_level=cfg.ci_level, bootstrap_resamples=cfg.bootstrap, bootstrap_seed=0)


def _dataset(
    cfg: AttentionConfig,
    run: Any,
    layers: list[str],
    arrays: list[Any],
    accs: list[AttentionAccumulator | None],
    setups: list[tuple[np.ndarray, int | None]],
    n: int,
) -> xr.Dataset:
    import xarray as xr

    heads = max(a.sizes["head"] for a in arrays)
    dist = np.full((len(layers), heads), np.nan)
    ent = np.full((len(layers), heads), np.nan)
    cls_mass = np.full((len(layers), heads), np.nan)
    prefix_mass = np.full((len(layers), heads), np.nan)
    maps: list[np.ndarray | None] = []
    for j, acc in enumerate(accs):
        if acc is None:  # pragma: no cover - usable_mask guarantees images
            raise UsageError(f"no usable images for attention layer {layers[j]!r}")
        h = acc.mean_distance().size
        dist[j, :h] = acc.mean_distance()
        ent[j, :h] = acc.entropy()
        prefix_mass[j, :h] = acc.prefix_key_mass()
        if setups[j][1] is not None:
            cls_mass[j, :h] = acc.cls_key_mass()
        maps.append(acc.cls_map() if setups[j][1] is not None else None)
    # Patch grid (pixel centres) of the first layer; every ViT block shares it.
    yx = setups[0][0]
    patch = yx[~np.isnan(yx).any(axis=1)]
    grid_y, grid_x = np.unique(patch[:, 0]), np.unique(patch[:, 1])
    baselines = np.array(
        [uniform_attention_baseline(yx_j, renormalize=cfg.renormalize) for yx_j, _ in setups]
    )
    data: dict[str, Any] = {
        "mean_distance": (("layer", "head"), dist),
        "entropy": (("layer", "head"), ent),
        "uniform_distance": (("layer",), baselines[:, 0]),
        "uniform_entropy": (("layer",), baselines[:, 1]),
        "prefix_key_mass": (("layer", "head"), prefix_mass),
    }
    has_cls = any(cls_index is not None for _, cls_index in setups)
    if has_cls:
        data["cls_key_mass"] = (("layer", "head"), cls_mass)
    shape = (heads, grid_y.size, grid_x.size)
    if all(m is not None and m.shape[1:] == shape[1:] for m in maps):
        cls = np.full((len(layers), *shape), np.nan)
        for j, m in enumerate(maps):
            assert m is not None
            cls[j, : m.shape[0]] = m
        data["cls_attention"] = (("layer", "head", "grid_y", "grid_x"), cls)
    ds = xr.Dataset(
        data,
        coords={
            "layer": string_coord(layers),
            "head": np.arange(heads),
            "depth_fraction": (
                "layer",
                [float(a.attrs.get("depth_fraction", np.nan)) for a in arrays],
            ),
            "depth_index": ("layer", [int(a.attrs.get("depth_index", -1)) for a in arrays]),
            "grid_y": grid_y,
            "grid_x": grid_x,
        },
    )
    ds["mean_distance"].attrs.update(units="input pixels", long_name="mean attention distance")
    ds["entropy"].attrs.update(units="nats", long_name="mean attention entropy per query")
    ds["uniform_distance"].attrs.update(
        units="input pixels", long_name="mean distance of uniform attention over all tokens"
    )
    ds["uniform_entropy"].attrs.update(
        units="nats", long_name="entropy of uniform attention over all tokens"
    )
    if "cls_attention" in ds:
        ds["cls_attention"].attrs["long_name"] = "mean CLS attention to each patch"
    ds["prefix_key_mass"].attrs["long_name"] = (
        "mean over images and patch queries of the attention on prefix keys (CLS, registers),"
        " rows as stored"
    )
    if has_cls:
        ds["cls_key_mass"].attrs["long_name"] = (
            "mean over images and patch queries of the attention on the CLS key, rows as stored"
        )
    ds["grid_y"].attrs["units"] = ds["grid_x"].attrs["units"] = "input pixels (patch centre)"
    mean = np.nanmean(dist, axis=1)
    top_mass = float(np.nanmax(cls_mass)) if has_cls and np.isfinite(cls_mass).any() else None
    side = f"{grid_y.size}×{grid_x.size}"
    patch = float(np.diff(grid_x)[0]) if grid_x.size > 1 else float("nan")
    ds.attrs.update(
        n=n,
        grid=f"{side} patches of {patch:g} px",
        baseline=(
            f"uniform attention over all {int(yx.shape[0])} tokens on the {side} grid of "
            f"{patch:g}-px patches: {baselines[0, 0]:.2f} px, {baselines[0, 1]:.2f} nats "
            f"(same convention: {'renormalized' if cfg.renormalize else 'not renormalized'})"
        ),
        renormalize=cfg.renormalize,
        prefix_tokens="dropped from queries and keys",
        rows="renormalized over patch keys" if cfg.renormalize else "not renormalized",
        cls_key=(
            "mass on CLS (cls_key_mass) rescaled away: distances are over patch keys only"
            if cfg.renormalize
            else "mass on CLS (cls_key_mass) dropped, not renormalized: it adds 0 px, so a "
            "head attending to CLS reads as local"
        ),
        summary=(
            f"{len(layers)} attention layers × {heads} heads, n={n}; mean distance "
            f"{mean[0]:.1f} px (first) → {mean[-1]:.1f} px (last); uniform attention "
            f"{baselines[0, 0]:.1f} px"
            + (f"; CLS-key mass up to {top_mass:.1%} (one head)" if top_mass is not None else "")
        ),
    )
    return ds
