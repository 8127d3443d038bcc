"""Per-head comparison (paper Sec. 5, Fig. 5): each ViT head's CKA with a CNN's lower
layers against the head's mean attention distance.

The heads' outputs are the layers ``<attention module>.norm`` stored by
``vitcnn extract --attention-heads`` (channel ``h · head_dim + d``; the group's
``heads``/``head_dim`` attributes say how to split it). Head h of such a layer is
the representation ``x[..., h·d:(h+1)·d]`` flattened over tokens. Each head is
compared with every chosen layer of the second run (by default its residual
stream up to half depth) by minibatch CKA (unbiased HSIC₁ summed over equal
batches drawn without replacement, images paired by ``image_id``): one dask
task per batch builds a :class:`~vitcnn_store.analysis.cka.MinibatchCKAMatrix`
and the driver adds them up. Each head's mean attention distance comes from
the stored attention of its module (``--attention``), with the conventions of
``vitcnn analyze attention`` (prefix tokens dropped, not renormalized).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.analyze.depth import block_depth, select_by_role
from jobs.analyze.executor import Executor, LazyTasks
from jobs.analyze.layers import layer_attrs, token_positions
from jobs.analyze.options import HeadsConfig, cap_batch_size
from jobs.analyze.pipeline import AnalysisResult, run_analysis
from jobs.analyze.runs import align_images, open_runs, usable_mask
from jobs.analyze.tasks import chunk_tasks, row_pieces, take_rows
from vitcnn_store.analysis.attention import AttentionAccumulator
from vitcnn_store.analysis.cka import MinibatchCKAMatrix, sample_batches
from vitcnn_store.errors import UsageError
from vitcnn_store.models import match_patterns
from vitcnn_store.store.schema import string_coord

if TYPE_CHECKING:
    import xarray as xr

    from vitcnn_store.store.reader import Run

__all__ = ["HeadsConfig", "head_layers", "run_heads"]


def head_layers(run: Run, patterns: str | None) -> list[str]:
    """The run's per-head output layers (``--attention-heads``), optionally by pattern."""
    attrs = {n: layer_attrs(run, n) for n in run.layers}
    found = [n for n in run.layers if "heads" in attrs[n] and "head_dim" in attrs[n]]
    if not found:
        raise UsageError(
            f"run {run.name!r} has no per-head attention outputs: extract with --attention-heads"
        )
    return match_patterns(found, patterns, "head layer (--layers)") if patterns else found


def _batch(pieces_a: list[Any], pieces_b: list[Any], splits: list[tuple[int, int]]) -> Any:
    """One batch: every head of every head layer against every layer of the other run."""
    heads = []
    for (pieces, perm), (h, d) in zip(pieces_a, splits, strict=True):
        x = take_rows(pieces, perm)
        heads += [x[..., k * d : (k + 1) * d] for k in range(h)]
    others = [take_rows(pieces, perm) for pieces, perm in pieces_b]
    acc = MinibatchCKAMatrix()
    acc.update(heads, others)
    return acc


def _distance(block: Any, token_yx: np.ndarray) -> AttentionAccumulator:
    acc = AttentionAccumulator(token_yx, entropy=False)
    acc.update(np.asarray(block))
    return acc


def run_heads(cfg: HeadsConfig) -> AnalysisResult:
    """Compute (or reuse) per-head CKA with the second run's layers, and each head's mean
    attention distance.

    The result (``<run>/_analyses/heads__<run2>``) holds ``cka`` (head_layer, head,
    layer_b), ``cka_lower`` (head_layer, head; the mean over ``layer_b``),
    ``mean_distance`` (head_layer, head) in input pixels, and the batches
    (``batch_image``, ``batch_image_b``).
    """
    run, other = open_runs(cfg.store, [cfg.run, cfg.run2])
    mask, mask_b = usable_mask(run, cfg.allow_incomplete), usable_mask(other, cfg.allow_incomplete)
    layers = head_layers(run, cfg.layers)
    attrs = {n: layer_attrs(run, n) for n in layers}
    modules = [str(attrs[n]["head_output_of"]) for n in layers]
    if not set(modules) <= set(run.attention_layers):
        raise UsageError(
            f"run {run.name!r} has per-head outputs but not the attention of "
            f"{', '.join(modules)}: mean attention distance needs --attention"
        )
    if cfg.layers2:
        others, _ = select_by_role(other, cfg.layers2, "stream", "--layers2")
    else:
        stream, _ = select_by_role(other, None, "stream")
        depth, _ = block_depth(other, stream)
        others = [n for n, f in zip(stream, depth, strict=True) if f <= 0.5]
    idx_a, idx_b = align_images(run, mask, other, mask_b)
    batch = cap_batch_size(cfg.batch_size, int(idx_a.size))
    (batches,) = sample_batches(idx_a.size, batch, 1, cfg.seed, cfg.max_batches)
    splits = [(int(attrs[n]["heads"]), int(attrs[n]["head_dim"])) for n in layers]

    def compute(executor: Executor) -> xr.Dataset:
        from dask import delayed

        attention = [run.attention(m) for m in modules]  # opened only to compute
        data_a = [run[n].data for n in layers]
        data_b = [other[n].data for n in others]

        def task(i: int) -> Any:
            rows_a, rows_b = idx_a[batches[i]], idx_b[batches[i]]
            return delayed(_batch, pure=True)(
                [row_pieces(x, rows_a) for x in data_a],
                [row_pieces(y, rows_b) for y in data_b],
                splits,
            )

        acc = MinibatchCKAMatrix()
        for _, part in executor.imap(
            LazyTasks(len(batches), task), desc=f"heads {cfg.run}", window=len(batches)
        ):
            acc.merge(part)
        cka = acc.result()
        # Mean attention distance per head, over every usable image of the run.
        tasks, owner = [], []
        for j, a in enumerate(attention):
            yx, _ = token_positions(run, a)
            new = chunk_tasks([a.data], mask, _distance, yx)
            tasks += new
            owner += [j] * len(new)
        accs: list[AttentionAccumulator | None] = [None] * len(layers)
        for i, part in executor.imap(tasks, desc=f"heads {cfg.run} distance"):
            current = accs[owner[i]]
            accs[owner[i]] = part if current is None else current.merge(part)
        distances = [a.mean_distance() if a is not None else None for a in accs]
        return _dataset(
            cfg, layers, others, splits, cka, distances, idx_a, idx_b, batches, int(mask.sum())
        )

    return run_analysis(
        cfg,
        analysis="heads",
        default_name=f"heads__{cfg.run2}",
        sources=[(run, mask), (other, mask_b)],
        compute=compute,
        extra_parameters={"layers": layers, "layers_b": others},
    )


def _dataset(
    cfg: HeadsConfig,
    layers: list[str],
    others: list[str],
    splits: list[tuple[int, int]],
    cka: np.ndarray,
    distances: list[Any],
    idx_a: np.ndarray,
    idx_b: np.ndarray,
    batches: list[np.ndarray],
    n_attention: int,
) -> xr.Dataset:
    import xarray as xr

    heads = max(h for h, _ in splits)
    table = np.full((len(layers), heads, len(others)), np.nan)
    dist = np.full((len(layers), heads), np.nan)
    row = 0
    for j, (h, _) in enumerate(splits):
        table[j, :h] = cka[row : row + h]
        row += h
        if distances[j] is not None:
            dist[j, :h] = distances[j]
    members = np.asarray(batches)
    ds = xr.Dataset(
        {
            "cka": (("head_layer", "head", "layer_b"), table),
            "cka_lower": (("head_layer", "head"), np.nanmean(table, axis=2)),
            "mean_distance": (("head_layer", "head"), dist),
            "batch_image": (("batch", "member"), idx_a[members]),
            "batch_image_b": (("batch", "member"), idx_b[members]),
        },
        coords={
            "head_layer": string_coord(layers),
            "head": np.arange(heads),
            "layer_b": string_coord(others),
        },
    )
    ds["cka"].attrs["long_name"] = "minibatch CKA of each head's output with each layer"
    ds["cka_lower"].attrs["long_name"] = "mean over layer_b of cka"
    ds["mean_distance"].attrs.update(units="input pixels", long_name="mean attention distance")
    ds.attrs.update(
        run_a=cfg.run,
        run_b=cfg.run2,
        estimator="unbiased-minibatch",
        n=int(idx_a.size),
        n_attention=n_attention,
        batch_size=int(members.shape[1]),
        n_batches=int(members.shape[0]),
        seed=cfg.seed,
        layers_b_selection="as given by --layers2"
        if cfg.layers2
        else ("the second run's residual stream up to half depth (its lower layers)"),
        attention="prefix tokens dropped, rows not renormalized",
        summary=(
            f"{sum(h for h, _ in splits)} heads of {len(layers)} layers × {len(others)} layers "
            f"of {cfg.run2}, n={idx_a.size} (batch {members.shape[1]} × {members.shape[0]})"
        ),
    )
    return ds
