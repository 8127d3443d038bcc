"""Skip-connection norm ratios ‖z‖/‖f(z)‖ per block from stored taps (paper §6, Fig. 7).

Which stored layer is a branch's output f(z), and which layers sum to its
skip-path input z, is read from the run: extraction records it as layer
attributes (``role``, ``block``, ``branches``, ``branch``, ``skip_input``;
:mod:`vitcnn_store.models.families`). Runs stored before those attributes
existed get them from the same module's name rules. For a ViT block that
means: the attention branch adds onto the block input, the MLP branch onto
the block input plus the attention branch's output; for a ResNet block (V1 or
the pre-activation V2 of BiT) the residual branch adds onto the block input or
its ``downsample``. A V1 block applies a ReLU to the sum, a V2 block does not:
the result's ``block_output`` attribute says which, since a V1 ratio compares
the two summands of a tensor the block does not output as such.

Ratios are per image and token (L2 norm over channels), averaged over images;
for token layers CLS is reported apart from the patch tokens, for spatial
layers the ratio is averaged over positions. One dask task per stored image
chunk and block reads the block's taps once and returns the sums of the
kernel :func:`~vitcnn_store.analysis.skip.skip_norm_ratio_per_image` for each of its
branches, and how many of its tokens have a branch output of exactly zero
(:func:`~vitcnn_store.analysis.skip.zero_norm_count`). A branch that is zero
on every image and token (a dead branch, e.g. timm's zero-initialised last
BatchNorm of a random-init ResNet block) has no ratio: it is stored as NaN,
with ``dead_fraction`` saying why. Blocks get a normalized depth
(:func:`~jobs.analyze.depth.block_depth`), so ViT and ResNet ratios share an
axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.depth import block_depth
from jobs.analyze.executor import Executor
from jobs.analyze.layers import layer_info, run_roles, stored_shape
from jobs.analyze.options import SkipConfig
from jobs.analyze.pipeline import AnalysisResult, run_analysis
from jobs.analyze.runs import open_runs, usable_mask
from jobs.analyze.tasks import chunk_tasks
from vitcnn_store.analysis.bootstrap import bootstrap_mean_interval
from vitcnn_store.analysis.skip import (
    cls_and_spatial_ratio,
    skip_norm_ratio_per_image,
    zero_norm_count,
)
from vitcnn_store.errors import UsageError
from vitcnn_store.models.families import (
    Branch,
    branches_from_roles,
    infer_family,
    output_activation,
)
from vitcnn_store.store import schema

if TYPE_CHECKING:
    import xarray as xr

    from vitcnn_store.store.reader import Run

__all__ = ["SkipConfig", "run_skip", "skip_branches"]


def _refuse_missing(run: Run, missing: Sequence[str]) -> None:
    missing = list(dict.fromkeys(missing))
    if missing:
        more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        raise UsageError(
            f"skip ratios need taps not stored in run {run.name!r}: "
            f"{', '.join(missing[:4])}{more}; extract with --layers preset:paper"
        )


def skip_branches(run: Run) -> list[Branch]:
    """The residual branches of the run's blocks, each with its stored taps checked."""
    roles = run_roles(run)
    found, missing = branches_from_roles(roles)
    if not found and not missing:
        raise UsageError(
            f"skip ratios need ViT (blocks.N) or ResNet (layerK.M) block taps; run {run.name!r} "
            "has neither: extract with --layers preset:paper"
        )
    _refuse_missing(run, missing + [z for b in found for z in b.skip_input if z not in roles])
    for b in found:  # shapes from the metadata: no layer opened before reuse is checked
        shape = stored_shape(run, b.output)[1:]
        for z in b.skip_input:
            if stored_shape(run, z)[1:] != shape:
                raise UsageError(
                    f"block {b.block!r}: skip input {z!r} {stored_shape(run, z)[1:]} and branch "
                    f"{b.output!r} {shape} differ; extract with --layers preset:paper "
                    "(which stores each block's downsample)"
                )
    return found


def _block_chunk(*args: Any) -> list[tuple[np.ndarray, int, np.ndarray, np.ndarray]]:
    """Per branch of one block: sums over the chunk's images of ‖z‖/‖f(z)‖ per token,
    the image count, per token the images with a zero branch output, and per image
    the CLS ratio (NaN without one) and the mean over spatial tokens (for the bootstrap).

    ``args`` are the block's taps over one chunk, then the plan: per branch, the
    indices of the taps summing to z and of its output; then the prefix tokens'
    count and the CLS token's index (None without one).
    """
    *arrays, plan, n_prefix, cls_index = args
    cast: dict[int, np.ndarray] = {}

    def f64(i: int) -> np.ndarray:
        if i not in cast:
            cast[i] = np.asarray(arrays[i], dtype=np.float64)
        return cast[i]

    out = []
    for skip, output in plan:
        # A later branch's z is the stream after the earlier ones (ViT: z' = z + attn).
        z = f64(skip[0]) if len(skip) == 1 else sum(f64(i) for i in skip)
        ratio = skip_norm_ratio_per_image(z, f64(output))
        cls = ratio[:, cls_index] if cls_index is not None else np.full(ratio.shape[0], np.nan)
        per_image = np.stack([cls, ratio[:, n_prefix:].mean(axis=1)], axis=1)
        out.append((ratio.sum(axis=0), ratio.shape[0], zero_norm_count(f64(output)), per_image))
    return out


def run_skip(cfg: SkipConfig) -> AnalysisResult:
    """Compute (or reuse) skip-connection norm ratios per block.

    The result (``<run>/_analyses/skip``) holds ``ratio_spatial`` and
    ``dead_fraction`` (branch, block) and, for token layers (ViTs),
    ``ratio_cls`` (branch, block) and ``ratio`` (branch, block, position); with
    ``bootstrap`` resamples their intervals ``*_lo``/``*_hi``.
    """
    (run,) = open_runs(cfg.store, [cfg.run])
    mask = usable_mask(run, cfg.allow_incomplete)
    found = skip_branches(run)
    blocks = list(dict.fromkeys(b.block for b in found))

    def compute(executor: Executor) -> xr.Dataset:
        info = layer_info(run[found[0].output])  # opened only to compute
        tokens = info.kind == schema.KIND_TOKEN
        prefix = (len(info.prefix), info.cls_index) if tokens else (0, None)
        tasks: list[Any] = []
        owner: list[int] = []
        for j, block in enumerate(blocks):
            mine = [b for b in found if b.block == block]
            layers = list(dict.fromkeys(n for b in mine for n in (*b.skip_input, b.output)))
            plan = [([layers.index(z) for z in b.skip_input], layers.index(b.output)) for b in mine]
            new = chunk_tasks([run[n].data for n in layers], mask, _block_chunk, plan, *prefix)
            tasks += new
            owner += [j] * len(new)
        done: dict[int, Any] = dict(executor.imap(tasks, desc=f"skip {cfg.run}"))
        # In task order (image order within a block): the bootstrap's rows line up.
        sums: list[list[Any]] = [
            [done[i] for i in sorted(done) if owner[i] == j] for j in range(len(blocks))
        ]
        ds = _dataset(run, found, blocks, sums, int(mask.sum()))
        _intervals(cfg, ds, found, blocks, sums)
        return ds

    return run_analysis(
        cfg,
        analysis="skip",
        default_name="skip",
        sources=[(run, mask)],
        compute=compute,
        extra_parameters={
            "branches": [[b.block, b.name, b.output, list(b.skip_input)] for b in found]
        },
    )


def _block_output(run: Run, family: str | None, blocks: list[str]) -> str:
    """What each block outputs in terms of z and f(z), in words (families.output_activation)."""
    types = [str(run[b].attrs.get("module_type", "")) if b in run.layers else "" for b in blocks]
    relu = {output_activation(family, t) == "relu" for t in types}
    if relu == {False}:
        return "z + f(z): nothing is applied after the sum (ViT, pre-activation ResNetV2)"
    what = "ReLU(z + f(z)): the block applies a ReLU after the sum (timm ResNet V1 blocks)"
    return what if relu == {True} else what.replace("the block", "some blocks")


def _intervals(
    cfg: SkipConfig, ds: xr.Dataset, found: list[Branch], blocks: list[str], sums: list[list[Any]]
) -> None:
    """``ratio_spatial_lo``/``_hi`` (and ``ratio_cls_*``): percentile bootstrap over images,
    the same resamples for every branch and block; NaN where the ratio is."""
    if not cfg.bootstrap:
        return
    names = [str(v) for v in ds["branch"].values]
    n = sum(p[0][1] for p in sums[0])
    values = np.full((n, 2, len(names), len(blocks)), np.nan)  # (image, cls|spatial, ...)
    for j, (block, parts) in enumerate(zip(blocks, sums, strict=True)):
        for k, b in enumerate(b for b in found if b.block == block):
            values[:, :, names.index(b.name), j] = np.concatenate([p[k][3] for p in parts])
    lo, hi = bootstrap_mean_interval(values, n_boot=cfg.bootstrap, level=cfg.ci_level, seed=0)
    for i, var in ((1, "ratio_spatial"), (0, "ratio_cls")):
        if var not in ds:
            continue
        undefined = ~np.isfinite(ds[var].values)
        for end, v in (("lo", lo[i]), ("hi", hi[i])):
            ds[f"{var}_{end}"] = (("branch", "block"), np.where(undefined, np.nan, v))
            ds[f"{var}_{end}"].attrs["long_name"] = (
                f"{'lower' if end == 'lo' else 'upper'} end of the {cfg.ci_level:g} percentile "
                f"bootstrap interval over images ({cfg.bootstrap} resamples)"
            )
    ds.attrs.update(ci_level=cfg.ci_level, bootstrap_resamples=cfg.bootstrap, bootstrap_seed=0)


def _dataset(
    run: Run, found: list[Branch], blocks: list[str], sums: list[list[Any]], n: int
) -> xr.Dataset:
    import xarray as xr

    names = list(dict.fromkeys(b.name for b in found))
    where = {(b.block, b.name): b for b in found}
    x = run[found[0].output]
    info = layer_info(x)
    tokens = info.kind == schema.KIND_TOKEN  # ViT: every block has the same tokens
    n_prefix = len(info.prefix) if tokens else 0
    shape = (len(names), len(blocks))
    ratio = np.full((*shape, x.shape[1]), np.nan) if tokens else None
    cls, spatial = np.full(shape, np.nan), np.full(shape, np.nan)
    dead = np.full(shape, np.nan)
    for j, (block, parts) in enumerate(zip(blocks, sums, strict=True)):
        for k, b in enumerate(b for b in found if b.block == block):
            i = names.index(b.name)
            count = sum(p[k][1] for p in parts)
            zeros = sum(p[k][2] for p in parts)
            dead[i, j] = float(np.sum(zeros)) / (count * zeros.size)
            if dead[i, j] == 1.0:
                continue  # f(z) ≡ 0: no ratio (NaN), dead_fraction says why
            per_token = sum(p[k][0] for p in parts) / count
            c, spatial[i, j] = cls_and_spatial_ratio(
                per_token, n_prefix, cls_index=info.cls_index or 0
            )
            if ratio is not None:
                ratio[i, j] = per_token
                cls[i, j] = c if info.cls_index is not None else np.nan

    def taps(pick: Any) -> np.ndarray:
        return np.array(
            [
                [pick(where[block, name]) if (block, name) in where else "" for block in blocks]
                for name in names
            ],
            dtype=object,
        )

    stored = [b for b in blocks if b in run.layers]
    depth, depth_axis = block_depth(run, stored)
    frac = [float(depth[stored.index(b)]) if b in stored else np.nan for b in blocks]
    first = [next(b for b in found if b.block == block) for block in blocks]
    coords: dict[str, Any] = {
        "block": schema.string_coord(blocks),
        "block_index": ("block", np.arange(len(blocks))),
        "depth_fraction": ("block", np.array(frac)),
        "skip_tap": ("block", schema.string_coord(" + ".join(b.skip_input) for b in first)),
        "branch": schema.string_coord(names),
        "branch_tap": (("branch", "block"), taps(lambda b: b.output)),
        "skip_taps": (("branch", "block"), taps(lambda b: " + ".join(b.skip_input))),
    }
    data: dict[str, Any] = {
        "ratio_spatial": (("branch", "block"), spatial),
        "dead_fraction": (("branch", "block"), dead),
    }
    if ratio is not None:
        data["ratio"] = (("branch", "block", "position"), ratio)
        data["ratio_cls"] = (("branch", "block"), cls)
        coords.update(
            position=np.arange(ratio.shape[-1]),
            position_kind=(
                "position",
                schema.string_coord(schema.as_str_array(x["token_kind"].values)),
            ),
            position_y=("position", np.asarray(x["token_y"].values, float)),
            position_x=("position", np.asarray(x["token_x"].values, float)),
        )
    ds = xr.Dataset(data, coords=coords)
    ds["ratio_spatial"].attrs["long_name"] = "mean over images and spatial tokens of ‖z‖/‖f(z)‖"
    ds["skip_taps"].attrs["long_name"] = "stored layers whose sum is z on the skip path"
    ds["dead_fraction"].attrs["long_name"] = "share of (image, token) with f(z) exactly 0"
    ds["depth_fraction"].attrs["long_name"] = depth_axis
    if tokens:
        ds["ratio_cls"].attrs["long_name"] = "mean over images of ‖z‖/‖f(z)‖ at the CLS token"
        ds["ratio"].attrs["long_name"] = "mean over images of ‖z‖/‖f(z)‖ per token"
    layer_scale = "n/a"
    if any(b.output.endswith((".ls1", ".ls2")) for b in found):
        layer_scale = "layer scale on: ls1/ls2 outputs are the branch outputs"
    elif tokens:
        layer_scale = "identity (timm's init_values=None): attn/mlp outputs are the branch outputs"
    n_dead = int(np.sum(dead == 1.0))
    family = run.attrs.get("model_family") or infer_family(
        run.layers, {name: str(run[name].attrs.get("module_type", "")) for name in run.layers}
    )
    ds.attrs.update(
        n=n,
        family=family,
        block_output=_block_output(run, family, blocks),
        depth_axis=depth_axis,
        dead_branches=(
            f"{n_dead} of {int(np.sum(np.isfinite(dead)))} branches output exactly 0 on every "
            "image (ratio undefined, NaN)"
            if n_dead
            else "none"
        ),
        norm="L2 over channels per token/position; ratio per image, then averaged",
        skip_input="z = sum of the layers in skip_taps (per branch, as recorded at extraction)",
        layer_scale=layer_scale,
        summary=(
            f"{len(blocks)} blocks, n={n}; spatial ratio "
            + ", ".join(
                f"{b} {np.nanmin(spatial[j]):.2f}..{np.nanmax(spatial[j]):.2f}"
                if np.isfinite(spatial[j]).any()
                else f"{b} undefined"
                for j, b in enumerate(names)
            )
            + (f"; {n_dead} dead branch(es): f(z) ≡ 0" if n_dead else "")
        ),
    )
    return ds
