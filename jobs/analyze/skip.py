"""Skip-connection norm ratios ‖z‖/‖f(z)‖ per block from stored taps (paper §6, Fig. 7).

ViT block ``i`` computes ``x + attn(norm1(x))`` then ``x' + mlp(norm2(x'))``:

* attention branch: ``z`` = block input (``norm_pre`` for block 0, else
  ``blocks.{i-1}``), ``f(z)`` = ``blocks.{i}.attn``;
* MLP branch: ``z' = z + f(z)`` and ``f(z')`` = ``blocks.{i}.mlp``.

Layer scale (``ls1``/``ls2``) is the identity in these models (timm's default
``init_values=None``); when ``blocks.{i}.ls1``/``ls2`` taps are stored they are
used as the branch outputs instead. Ratios are per image and token, averaged
over images, and CLS is reported apart from the patch tokens.

ResNet block ``layerK.M``: ``z`` = the block input (``maxpool`` for
``layer1.0``, else the previous block), or the ``downsample`` output when the
block has one (that is what the skip path adds); ``f(z)`` = the residual branch
output, the block's last BatchNorm (``bn3`` for bottlenecks, ``bn2`` for basic
blocks). Ratios are per spatial position, averaged over images and positions.

One dask task per stored image chunk and block returns sums from the kernel's
:func:`~vitcnn_store.analysis.skip.skip_norm_ratio_sum`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.common import AnalysisOptions, AnalysisResult, run_analysis
from jobs.analyze.executor import Executor
from jobs.analyze.selection import (
    chunk_tasks,
    layer_info,
    open_runs,
    str_array,
    str_coord,
    usable_mask,
)
from vitcnn_store.analysis.skip import skip_norm_ratio_sum
from vitcnn_store.errors import UsageError

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["SkipConfig", "resnet_taps", "run_skip", "vit_taps"]

_VIT = re.compile(r"blocks\.(\d+)(?:\..+)?")
_RESNET = re.compile(r"layer(\d+)\.(\d+)(?:\..+)?")


@dataclass(frozen=True, kw_only=True)
class SkipConfig(AnalysisOptions):
    """Options of ``vitcnn analyze skip`` (the common ones only)."""


def _missing(run: Any, need: list[str]) -> None:
    missing = [name for name in dict.fromkeys(need) if name not in run.layers]
    if missing:
        more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        shown = ", ".join(missing[:4]) + more
        raise UsageError(
            f"skip ratios need taps not stored in run {run.name!r}: {shown}; "
            "extract with --layers preset:paper"
        )


def vit_taps(run: Any) -> list[tuple[str, str, str, str]]:
    """Per ViT block: (block, z, attention branch, MLP branch) layer names."""
    stored = set(run.layers)
    blocks = sorted({int(m.group(1)) for n in run.layers if (m := _VIT.fullmatch(n))})
    taps, need = [], []
    for i in blocks:
        z = "norm_pre" if i == 0 else f"blocks.{i - 1}"
        attn = f"blocks.{i}.ls1" if f"blocks.{i}.ls1" in stored else f"blocks.{i}.attn"
        mlp = f"blocks.{i}.ls2" if f"blocks.{i}.ls2" in stored else f"blocks.{i}.mlp"
        taps.append((f"blocks.{i}", z, attn, mlp))
        need += [z, attn, mlp]
    _missing(run, need)
    return taps


def resnet_taps(run: Any) -> list[tuple[str, str, str]]:
    """Per ResNet block: (block, z, residual branch) layer names."""
    stored = set(run.layers)
    found = {(int(g.group(1)), int(g.group(2))) for n in run.layers if (g := _RESNET.fullmatch(n))}
    blocks = sorted(found)
    taps, need = [], []
    for stage, index in blocks:
        name = f"layer{stage}.{index}"
        if f"{name}.downsample" in stored:
            z = f"{name}.downsample"
        elif index > 0:
            z = f"layer{stage}.{index - 1}"
        elif stage == 1:
            z = "maxpool"
        else:
            # First block of a stage: its input is the previous stage's last block.
            before = [j for s, j in blocks if s == stage - 1]
            z = f"layer{stage - 1}.{max(before) if before else 0}"
        module = run[name].attrs.get("module_type") if name in stored else None
        if module == "BasicBlock" or (module != "Bottleneck" and f"{name}.bn3" not in stored):
            branch = f"{name}.bn2"
        else:
            branch = f"{name}.bn3"
        taps.append((name, z, branch))
        need += [z, branch]
    _missing(run, need)
    for name, z, branch in taps:
        if run[z].shape[1:] != run[branch].shape[1:]:
            raise UsageError(
                f"block {name!r}: skip input {z!r} {run[z].shape[1:]} and branch {branch!r} "
                f"{run[branch].shape[1:]} differ; extract with --layers preset:paper "
                f"(which stores {name}.downsample)"
            )
    return taps


def _vit_chunk(z: Any, attn: Any, mlp: Any) -> tuple[np.ndarray, np.ndarray, int]:
    z64, a64 = np.asarray(z, np.float64), np.asarray(attn, np.float64)
    s_attn, n = skip_norm_ratio_sum(z64, a64)
    s_mlp, _ = skip_norm_ratio_sum(z64 + a64, mlp)  # the MLP's skip input z' = z + attn(z)
    return s_attn, s_mlp, n


def _resnet_chunk(z: Any, branch: Any) -> tuple[np.ndarray, int]:
    return skip_norm_ratio_sum(z, branch)


def run_skip(cfg: SkipConfig) -> AnalysisResult:
    """Compute (or reuse) skip-connection norm ratios per block.

    The result (``<run>/_analyses/skip``) holds ``ratio_spatial`` (branch, block)
    and, for ViTs, ``ratio_cls`` (branch, block) and ``ratio`` (branch, block, position).
    """
    (run,) = open_runs(cfg.store, [cfg.run])
    mask = usable_mask(run, cfg.allow_incomplete)
    if any(_VIT.fullmatch(n) for n in run.layers):
        vit, taps = True, [tuple(t) for t in vit_taps(run)]
    elif any(_RESNET.fullmatch(n) for n in run.layers):
        vit, taps = False, [tuple(t) for t in resnet_taps(run)]
    else:
        raise UsageError(
            f"skip ratios need ViT (blocks.N) or ResNet (layerK.M) block taps; run {run.name!r} "
            "has neither: extract with --layers preset:paper"
        )

    def compute(executor: Executor) -> xr.Dataset:
        tasks: list[Any] = []
        owner: list[int] = []
        fn = _vit_chunk if vit else _resnet_chunk
        for j, tap in enumerate(taps):
            new = chunk_tasks([run[name].data for name in tap[1:]], mask, fn)
            tasks += new
            owner += [j] * len(new)
        sums: list[list[Any]] = [[] for _ in taps]
        for i, out in executor.imap(tasks, desc=f"skip {cfg.run}"):
            sums[owner[i]].append(out)
        return _dataset(run, taps, sums, vit, int(mask.sum()))

    from vitcnn_store import plots

    return run_analysis(
        cfg,
        analysis="skip",
        default_name="skip",
        sources=[(run, mask)],
        compute=compute,
        plot=plots.plot_skip,
        extra_parameters={"taps": [list(t) for t in taps]},
    )


def _dataset(
    run: Any, taps: list[tuple[str, ...]], sums: list[list[Any]], vit: bool, n: int
) -> xr.Dataset:
    import xarray as xr

    blocks = [t[0] for t in taps]
    frac = [
        float(run[b].attrs.get("depth_fraction", np.nan)) if b in run.layers else np.nan
        for b in blocks
    ]
    coords: dict[str, Any] = {
        "block": str_coord(blocks),
        "block_index": ("block", np.arange(len(blocks))),
        "depth_fraction": ("block", np.array(frac)),
        "skip_tap": ("block", str_coord([t[1] for t in taps])),
    }
    if vit:
        branches = ["attn", "mlp"]
        per_block = []
        for parts in sums:
            count = sum(p[2] for p in parts)
            per_block.append([sum(p[0] for p in parts) / count, sum(p[1] for p in parts) / count])
        ratio = np.stack([np.stack(b) for b in per_block], axis=1)  # (branch, block, position)
        x = run[taps[0][1]]
        info = layer_info(x)
        spatial = ratio[:, :, list(info.patches)].mean(axis=-1)
        cls = ratio[:, :, info.cls_index] if info.cls_index is not None else np.nan * spatial
        data: dict[str, Any] = {
            "ratio": (("branch", "block", "position"), ratio),
            "ratio_cls": (("branch", "block"), cls),
            "ratio_spatial": (("branch", "block"), spatial),
        }
        coords.update(
            position=np.arange(ratio.shape[-1]),
            position_kind=("position", str_coord(str_array(x["token_kind"].values))),
            position_y=("position", np.asarray(x["token_y"].values, float)),
            position_x=("position", np.asarray(x["token_x"].values, float)),
            branch_tap=(
                ("branch", "block"),
                np.array([[t[2] for t in taps], [t[3] for t in taps]], dtype=object),
            ),
        )
    else:
        branches = ["residual"]
        spatial = np.array(
            [[(sum(p[0] for p in parts) / sum(p[1] for p in parts)).mean() for parts in sums]]
        )
        data = {"ratio_spatial": (("branch", "block"), spatial)}
        coords["branch_tap"] = (("branch", "block"), np.array([[t[2] for t in taps]], dtype=object))
    coords["branch"] = str_coord(branches)
    ds = xr.Dataset(data, coords=coords)
    ds["ratio_spatial"].attrs["long_name"] = "mean over images and spatial tokens of ‖z‖/‖f(z)‖"
    if vit:
        ds["ratio_cls"].attrs["long_name"] = "mean over images of ‖z‖/‖f(z)‖ at the CLS token"
        ds["ratio"].attrs["long_name"] = "mean over images of ‖z‖/‖f(z)‖ per token"
    ds.attrs.update(
        n=n,
        family="vit" if vit else "resnet",
        norm="L2 over channels per token/position; ratio per image, then averaged",
        skip_input=(
            "attn: z = block input (norm_pre for block 0, else previous block); "
            "mlp: z' = z + attn output"
            if vit
            else "z = block input (maxpool for layer1.0, else previous block), "
            "or the downsample output when present"
        ),
        layer_scale=(
            "identity in these models (timm init_values=None); ls1/ls2 taps used when stored"
            if vit
            else "n/a"
        ),
        summary=(
            f"{len(blocks)} blocks, n={n}; spatial ratio "
            + ", ".join(
                f"{b} {spatial[j].min():.2f}..{spatial[j].max():.2f}"
                for j, b in enumerate(branches)
            )
        ),
    )
    return ds
