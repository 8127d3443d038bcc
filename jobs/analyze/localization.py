"""Spatial localization maps (paper §7): CKA between a token and every input patch.

For each chosen token (a ViT patch token, or a spatial position of a CNN
layer) of one layer, ``map[p] = CKA(X_t, Y_p)`` with ``X_t`` the token's
representation over images and ``Y_p`` the raw pixels of input patch ``p``.
Pixels come from the stored ``input``, which is normalized with the run's
mean/std: the job undoes it (``pixels = x · std + mean``). For a ViT the patch
grid is the token grid; for a CNN layer with a gy × gx grid the input is cut
into patches of its stride ``H / gy``.

Estimate: unbiased minibatch HSIC₁ over equal batches of images sampled
without replacement (:func:`~vitcnn_store.analysis.cka.sample_batches`): one
dask task per batch builds a
:class:`~vitcnn_store.analysis.localization.MinibatchLocalization` and the
driver merges them. All batches are one dask graph, so each stored chunk is
read once although every batch draws rows from nearly every chunk; the graph
holds at most the target tokens and the input pixels of the usable images, as
stored (float16: 2 bytes × (targets × channels + H × W × 3) per image).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.executor import Executor, LazyTasks
from jobs.analyze.layers import (
    layer_info,
    patch_grid,
    refuse_reduced,
    run_roles,
    stored_grid,
    stored_kind,
    stored_sizes,
)
from jobs.analyze.options import LocalizationConfig, TokenSpec, cap_batch_size
from jobs.analyze.pipeline import AnalysisResult, run_analysis
from jobs.analyze.protocol import sampling
from jobs.analyze.runs import open_runs, usable_mask
from jobs.analyze.tasks import row_pieces, take_rows
from vitcnn_store.analysis.cka import sample_batches
from vitcnn_store.analysis.localization import (
    MinibatchLocalization,
    batch_bootstrap_interval,
    image_to_patches,
)
from vitcnn_store.errors import UsageError
from vitcnn_store.models.families import is_block_output
from vitcnn_store.store import schema
from vitcnn_store.store.layout import quiet_zarr
from vitcnn_store.store.schema import string_coord

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "LocalizationConfig",
    "TokenSpec",
    "default_targets",
    "resolve_targets",
    "run_localization",
]


def default_targets(gy: int, gx: int) -> list[tuple[int, int]]:
    """A few positions spread over the grid: the four quadrant centres and the centre.

    Examples
    --------
    >>> default_targets(14, 14)
    [(3, 3), (3, 10), (7, 7), (10, 3), (10, 10)]
    """
    rows = [gy // 4, gy // 4, gy // 2, (3 * gy) // 4, (3 * gy) // 4]
    cols = [gx // 4, (3 * gx) // 4, gx // 2, gx // 4, (3 * gx) // 4]
    return sorted(set(zip(rows, cols, strict=True)))


def resolve_targets(tokens: Sequence[TokenSpec], gy: int, gx: int) -> list[tuple[int, int]]:
    """Grid positions of ``tokens`` (``(row, col)`` or flat patch indices) on a gy × gx grid.

    Duplicates are dropped; positions outside the grid raise :class:`UsageError`.

    Examples
    --------
    >>> resolve_targets([(0, 1), 5, (0, 1)], 2, 3)
    [(0, 1), (1, 2)]
    """
    out: list[tuple[int, int]] = []
    for item in tokens:
        if isinstance(item, tuple):
            r, c = item
        else:
            if not 0 <= item < gy * gx:
                raise UsageError(f"--tokens: patch index {item} not in 0..{gy * gx - 1}")
            r, c = divmod(item, gx)
        if not (0 <= r < gy and 0 <= c < gx):
            raise UsageError(f"--tokens: position {r}:{c} outside the {gy}×{gx} grid")
        if (r, c) not in out:
            out.append((r, c))
    if not out:
        raise UsageError("--tokens names no token")
    return out


def _default_layer(run: Any) -> str:
    kinds = (schema.KIND_TOKEN, schema.KIND_SPATIAL)
    candidates = [n for n in run.layers if stored_kind(run, n) in kinds]
    if not candidates:
        raise UsageError(f"run {run.name!r} has no token or spatial layer to localize")
    roles = run_roles(run)
    blocks = [n for n in candidates if is_block_output(n, roles.get(n))]
    return (blocks or candidates)[-1]


def _accumulate(
    tokens: Any, inputs: Any, mean: np.ndarray, std: np.ndarray, patch: int, own: list[int]
) -> tuple[MinibatchLocalization, MinibatchLocalization]:
    """One batch: ``tokens`` and ``inputs`` are ``(pieces, perm)`` from ``row_pieces``;
    ``own`` is each target's own patch. Returns the maps and the input baseline: the
    same maps with each target's own input patch in place of the token."""
    # Undo the stored normalization in float32 (half the memory of float64; the
    # kernel casts each patch to float64 before its Gram).
    pixels = take_rows(*inputs).astype(np.float32) * std + mean
    patches = image_to_patches(pixels, patch)
    reps = take_rows(*tokens)
    acc = MinibatchLocalization()
    acc.update([reps[:, t] for t in range(reps.shape[1])], patches)
    base = MinibatchLocalization()
    base.update([patches[:, p] for p in own], patches)
    return acc, base


def run_localization(cfg: LocalizationConfig) -> AnalysisResult:
    """Compute (or reuse) localization maps of chosen tokens of one layer.

    The result (``<run>/_analyses/localization``) holds ``localization``
    (target, grid_y, grid_x), its input baseline ``localization_input``, the
    batches (``batch_image``, ``batch_image_id``) and, with ``bootstrap``
    resamples and two batches or more, ``localization_lo``/``_hi`` (over batches).
    """
    (run,) = open_runs(cfg.store, [cfg.run])
    mask = usable_mask(run, cfg.allow_incomplete)
    # What the parameters need comes from the run's metadata; the layer and the
    # pixels are opened only when the result is not reused (prepare).
    if "input" not in run.group:
        raise UsageError(
            f"run {run.name!r} has no stored input: localization needs the pixels; "
            "extract with --inputs"
        )
    layer = cfg.layer or _default_layer(run)
    if stored_kind(run, layer) not in (schema.KIND_TOKEN, schema.KIND_SPATIAL):
        raise UsageError(f"layer {layer!r} is pooled: localization needs a token or spatial layer")
    with quiet_zarr():  # before the grid: a reduced layer has none worth checking
        node = run.group[layer]
        refuse_reduced(layer, {**node.attrs, **node["activation"].attrs})
    gy, gx = stored_grid(run, layer)
    input_sizes = stored_sizes(run, "input", "input")
    h, w = input_sizes["input_y"], input_sizes["input_x"]
    if h % gy or w % gx or h // gy != w // gx:
        raise UsageError(
            f"layer {layer!r} has a {gy}×{gx} grid that does not tile the {h}×{w} input "
            "into square patches"
        )
    patch = h // gy
    targets = resolve_targets(cfg.tokens, gy, gx) if cfg.tokens else default_targets(gy, gx)
    usable = np.flatnonzero(mask)
    batch = cap_batch_size(cfg.batch_size, int(usable.size))
    (batches,) = sample_batches(usable.size, batch, 1, cfg.seed)
    mean = np.asarray(run.attrs["mean"], dtype=np.float32)
    std = np.asarray(run.attrs["std"], dtype=np.float32)

    opened: dict[str, Any] = {}

    def prepare() -> None:
        x = run[layer]
        info = layer_info(x)
        ys, xs, where = patch_grid(x, info)  # refuses a layer stored reduced
        opened.update(
            x=x, info=info, ys=ys, xs=xs, inputs=run.inputs, index=[where[t] for t in targets]
        )

    def compute(executor: Executor) -> xr.Dataset:
        from dask import delayed

        x, info, inputs, index = opened["x"], opened["info"], opened["inputs"], opened["index"]
        ys, xs = opened["ys"], opened["xs"]
        token = info.kind == schema.KIND_TOKEN
        data = x.data if token else x.data.reshape(x.shape[0], gy * gx, -1)
        chosen = data[:, index]  # the target tokens only travel between tasks

        own = [r * gx + c for r, c in targets]

        def task(i: int) -> Any:
            rows = usable[batches[i]]
            return delayed(_accumulate, pure=True)(
                row_pieces(chosen, rows), row_pieces(inputs.data, rows), mean, std, patch, own
            )

        tasks = LazyTasks(len(batches), task)
        # One graph for every batch: a chunk that several batches sample is read once.
        window = len(batches)
        parts: dict[int, tuple[MinibatchLocalization, MinibatchLocalization]] = dict(
            executor.imap(tasks, desc=f"localization {cfg.run}", window=window)
        )
        ordered = [parts[i] for i in sorted(parts)]  # batch order: the bootstrap's rows
        acc, base = MinibatchLocalization(), MinibatchLocalization()
        for part, part_base in ordered:
            acc.merge(part)
            base.merge(part_base)
        shape = (len(targets), gy, gx)
        maps = acc.result().reshape(shape)
        ds = _dataset(
            cfg, layer, targets, index, maps, ys, xs, patch, usable.size, batch, len(batches)
        )
        ds["localization_input"] = (("target", "grid_y", "grid_x"), base.result().reshape(shape))
        ds["localization_input"].attrs["long_name"] = (
            "baseline: CKA between the target's own input patch and each input patch (what "
            "an identity map gives: neighbouring patches are correlated)"
        )
        members = usable[np.asarray(batches)]
        ds["batch_image"] = (("batch", "member"), members)
        member_ids = string_coord(run.image_ids[members.ravel()]).reshape(members.shape)
        ds["batch_image_id"] = (("batch", "member"), member_ids)
        ds["batch_image"].attrs["long_name"] = f"image index in run {run.name!r} of each member"
        if cfg.bootstrap and len(batches) < 2:
            ds.attrs["bootstrap"] = "no interval: one batch, nothing to resample"
        elif cfg.bootstrap:
            lo, hi = batch_bootstrap_interval(
                [p for p, _ in ordered], n_boot=cfg.bootstrap, level=cfg.ci_level, seed=cfg.seed
            )
            for end, v in (("lo", lo), ("hi", hi)):
                ds[f"localization_{end}"] = (("target", "grid_y", "grid_x"), v.reshape(shape))
                ds[f"localization_{end}"].attrs["long_name"] = (
                    f"{'lower' if end == 'lo' else 'upper'} end of the {cfg.ci_level:g} "
                    f"percentile bootstrap interval over the {len(batches)} batches "
                    f"({cfg.bootstrap} resamples)"
                )
            ds.attrs.update(
                ci_level=cfg.ci_level,
                bootstrap_resamples=cfg.bootstrap,
                bootstrap_seed=cfg.seed,
                bootstrap_unit="batch (disjoint random image sets)",
            )
        return ds

    return run_analysis(
        cfg,
        analysis="localization",
        default_name="localization",
        sources=[(run, mask)],
        compute=compute,
        prepare=prepare,
        extra_parameters={"layer": layer, "targets": [list(t) for t in targets]},
    )


def _dataset(
    cfg: LocalizationConfig,
    layer: str,
    targets: list[tuple[int, int]],
    index: list[int],
    maps: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    patch: int,
    n: int,
    batch: int,
    n_batches: int,
) -> xr.Dataset:
    import xarray as xr

    rows = np.array([r for r, _ in targets])
    cols = np.array([c for _, c in targets])
    centres = (np.arange(ys.size) + 0.5) * patch, (np.arange(xs.size) + 0.5) * patch
    ds = xr.Dataset(
        {"localization": (("target", "grid_y", "grid_x"), maps)},
        coords={
            "target": np.arange(len(targets)),
            "target_row": ("target", rows),
            "target_col": ("target", cols),
            "target_index": ("target", np.array(index)),
            "target_y": ("target", ys[rows]),
            "target_x": ("target", xs[cols]),
            "grid_y": centres[0],
            "grid_x": centres[1],
        },
    )
    ds["localization"].attrs["long_name"] = "CKA between the target token and each input patch"
    ds["target_index"].attrs["long_name"] = "index along the layer's token (or flattened y·x) axis"
    ds["grid_y"].attrs["units"] = ds["grid_x"].attrs["units"] = "input pixels (patch centre)"
    ds.attrs.update(
        layer=layer,
        patch_size=patch,
        estimator="unbiased-minibatch",
        n=int(n),
        batch_size=batch,
        batch_size_requested=cfg.batch_size,
        n_batches=n_batches,
        seed=cfg.seed,
        pixels="stored input un-normalized: x * std + mean",
    )
    ds.attrs["summary"] = (
        f"layer {layer}: {len(targets)} target token(s) on a {ys.size}×{xs.size} grid of "
        f"{patch}-px patches, n={n} ({sampling(ds.attrs)})"
    )
    return ds
