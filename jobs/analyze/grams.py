"""Compute (or reuse) the Gram cache of a run's layers: each stored chunk read once.

A layer's images are cut into panels of ``tile`` images (whole work units);
one dask task loads a panel (its usable rows, reduced and flattened, as stored:
float16 stays float16), and one task per tile ``(p, q)``, ``p <= q``, computes
``K[P, Q]`` of the features less their mean μ over the first panel
(:func:`~vitcnn_store.analysis.gram.gram_linear`, float64 accumulation over
blocks of feature columns; the shift changes no CKA estimate and keeps the
stored numbers small), writes it into the store
(:mod:`vitcnn_store.store.grams`) and hands back only its row and column sums.
All tiles of a layer are one dask graph, so a panel is read once and shared by
its tiles; a worker holds two panels and one tile at a time, and the graph at
most the layer's usable activations as stored. The Gram itself never travels:
tiles go straight from the worker that computed them to the store, which is
what lets a cluster whose workers are each smaller than one Gram compute it.

A stored Gram is reused while its source state (the run's creation id, its
units' done flags and content fingerprints, and the usable images;
:func:`vitcnn_store.store.grams.source_state`) is unchanged, and recomputed otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jobs.analyze.executor import Executor
from jobs.analyze.layers import reduce_layer
from vitcnn_store.analysis.gram import gram_linear, row_dots
from vitcnn_store.errors import UsageError
from vitcnn_store.store.grams import GramInfo, create_gram, find_grams, finish_gram, write_tile
from vitcnn_store.store.index import refresh_derived
from vitcnn_store.store.layout import GRAMS
from vitcnn_store.store.reader import Run

__all__ = ["DEFAULT_TILE", "ensure_grams", "tile_size"]

DEFAULT_TILE = 512  # images per tile side: 2 MiB float64 tiles, two panels per task


def tile_size(chunk: int, n: int, requested: int | None = None) -> int:
    """Images per tile: ``requested`` (default 512) rounded to whole units, at most all images.

    Examples
    --------
    >>> tile_size(32, 10_000), tile_size(48, 10_000, 100), tile_size(32, 40)
    (512, 96, 64)
    """
    want = DEFAULT_TILE if requested is None else requested
    if want < 1:
        raise UsageError(f"--gram-tile must be >= 1, got {want}")
    units = -(-n // chunk)
    return chunk * max(1, min(units, round(want / chunk)))


def _panel(*parts: Any) -> np.ndarray:
    """A panel's usable rows as one (rows, features) array: ``parts`` alternate a stored
    chunk (as read) and the rows of it to keep."""
    chunks, rows = parts[0::2], parts[1::2]
    pieces = [np.asarray(c)[r] for c, r in zip(chunks, rows, strict=True)]
    if not pieces:  # no usable image in the panel: its tiles are all NaN
        return np.zeros((0, 1))
    x = np.concatenate(pieces)
    return x.reshape(x.shape[0], -1)


def _feature_mean(*panels: np.ndarray) -> np.ndarray:
    """Mean feature vector (float64) of the first panel with usable rows: the shift μ."""
    for x in panels:
        if x.shape[0]:
            return np.asarray(np.mean(x, axis=0, dtype=np.float64))
    return np.zeros(panels[0].shape[1])


def _tile(
    info: GramInfo,
    p: int,
    q: int,
    xp: np.ndarray,
    xq: np.ndarray,
    use_p: np.ndarray,
    use_q: np.ndarray,
    mu: np.ndarray,
) -> tuple[int, int, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Compute tile (p, q) of ``(X − μ)(X − μ)ᵀ`` from two panels and write it; return its
    row and column sums and, on the diagonal, the offsets ``x_i·μ − ‖μ‖²/2`` of its rows."""
    (r0, r1), (c0, c1) = info.panels[p], info.panels[q]
    block = np.full((r1 - r0, c1 - c0), np.nan)
    rows = np.zeros(r1 - r0)
    cols = None if p == q else np.zeros(c1 - c0)
    offsets = None if p != q else np.full(r1 - r0, np.nan)
    if use_p.size and use_q.size:
        g = gram_linear(xp, shift=mu) if p == q else gram_linear(xp, xq, shift=mu)
        if not np.isfinite(g).all():
            raise UsageError(f"layer {info.layer!r} has NaN/inf values among the usable images")
        block[np.ix_(use_p, use_q)] = g
        rows[use_p] = g.sum(axis=1)
        if cols is not None:
            cols[use_q] = g.sum(axis=0)
        if offsets is not None:
            offsets[use_p] = row_dots(xp, mu) - float(mu @ mu) / 2.0
    write_tile(info, p, q, block)
    return p, q, rows, cols, offsets


def _layer_tasks(info: GramInfo, data: Any, mask: np.ndarray) -> list[Any]:
    """The dask tasks of one layer's Gram: panels shared by the tiles that need them."""
    from dask import delayed

    chunk_len = data.chunks[0]
    bounds = np.cumsum((0, *chunk_len))
    blocks = data.to_delayed().reshape(len(chunk_len), -1)[:, 0]
    panels, usable = [], []
    for s, e in info.panels:
        parts: list[Any] = []
        for c in range(int(np.searchsorted(bounds, s)), int(np.searchsorted(bounds, e))):
            rows = np.flatnonzero(mask[bounds[c] : bounds[c + 1]])
            if rows.size:  # a chunk without usable rows (an unwritten unit) is never read
                parts += [blocks[c], rows]
        panels.append(delayed(_panel, pure=True)(*parts))
        usable.append(np.flatnonzero(mask[s:e]))
    P = len(info.panels)
    # The shift μ: the mean of the first panel holding usable images (any μ gives the same
    # CKA; one near the data's mean keeps the stored Gram small, see store/grams.py).
    first = next((k for k in range(P) if usable[k].size), 0)
    mu = delayed(_feature_mean, pure=True)(panels[first])
    return [
        delayed(_tile, pure=True)(info, p, q, panels[p], panels[q], usable[p], usable[q], mu)
        for p in range(P)
        for q in range(p, P)
    ]


def _features(data: Any) -> int:
    return int(np.prod(data.shape[1:], dtype=np.int64))


def ensure_grams(
    executor: Executor,
    run: Run,
    layers: Sequence[str],
    reduce: str,
    mask: np.ndarray,
    states: dict[str, dict[str, Any]],
    *,
    tile: int | None = None,
    dtype: str = "float64",
    label: str = "",
) -> tuple[list[GramInfo], list[str]]:
    """The Gram of each layer over the usable images ``mask``: reused when its source
    state is ``states[layer]``, computed otherwise. Returns the Grams and the layers
    computed now."""
    size = tile_size(int(run.attrs["chunk_size"]), run.n_images, tile)
    infos: list[GramInfo | None] = find_grams(run, list(layers), reduce, states, dtype)
    todo = [i for i, info in enumerate(infos) if info is None]
    for k, i in enumerate(todo):
        layer = layers[i]
        data, _ = reduce_layer(run[layer], reduce)
        info = create_gram(
            run,
            layer,
            reduce,
            n=run.n_images,
            tile=size,
            features=_features(data),
            state=states[layer],
            dtype=dtype,
        )
        tasks = _layer_tasks(info, data, mask)
        sums = np.zeros(info.n)
        offset = np.full(info.n, np.nan)
        desc = f"{label or 'grams'} {run.name}/{layer} ({k + 1}/{len(todo)})"
        # One graph per layer: every panel is loaded once and shared by its tiles.
        for _, (p, q, rows, cols, offsets) in executor.imap(tasks, desc=desc, window=len(tasks)):
            (r0, r1), (c0, c1) = info.panels[p], info.panels[q]
            sums[r0:r1] += rows
            if cols is not None:
                sums[c0:c1] += cols
            if offsets is not None:
                offset[r0:r1] = offsets
        row_mean = np.where(mask, sums / max(int(mask.sum()), 1), np.nan)
        finish_gram(info, row_mean, np.where(mask, offset, np.nan))
        infos[i] = info
    if todo:
        refresh_derived(run.store.url, run.name, GRAMS)
    return [info for info in infos if info is not None], [layers[i] for i in todo]
