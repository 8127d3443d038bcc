"""Dask task builders: one task per stored image chunk, or per batch of rows.

Layers come back from the store reader as lazy dask arrays chunked like the
store (one chunk along ``image`` = one work unit). :func:`chunk_tasks` makes
one delayed call per chunk holding usable images; :func:`row_pieces` gathers a
batch of rows from the chunks holding them, and :func:`take_rows` puts them
together inside the task. No job ever holds a whole layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["chunk_tasks", "row_pieces", "take_rows"]


def chunk_tasks(arrays: Sequence[Any], mask: np.ndarray, fn: Any, *args: Any) -> list[Any]:
    """One delayed ``fn(*blocks, *args)`` per image chunk holding usable images.

    ``arrays`` are dask arrays of one run, which share the stored chunking along
    ``image`` (one chunk = one work unit), so block ``i`` of each covers the same
    images. Unusable rows are dropped inside a chunk; chunks without usable rows
    are skipped.
    """
    from dask import delayed

    tasks = []
    start = 0
    for i, size in enumerate(arrays[0].chunks[0]):
        rows = np.flatnonzero(mask[start : start + size])
        start += size
        if not rows.size:
            continue
        blocks = [a.blocks[i] if rows.size == size else a.blocks[i][rows] for a in arrays]
        tasks.append(delayed(fn, pure=True)(*blocks, *args))
    return tasks


def row_pieces(data: Any, rows: np.ndarray) -> tuple[list[Any], np.ndarray | None]:
    """Lazy pieces of ``data`` holding ``rows`` (along axis 0), one per stored chunk touched.

    Returns the pieces, in chunk order, and the permutation that puts their
    concatenation back in the order of ``rows`` (``None`` when ``rows`` is
    sorted); :func:`take_rows` does both inside a task. One small getitem per
    chunk is far fewer tasks than dask's generic fancy indexing, and a chunk
    shared by several batches of one graph is still read once.
    """
    order = np.argsort(rows, kind="stable")
    ranked = np.asarray(rows)[order]
    bounds = np.cumsum((0, *data.chunks[0]))
    chunk_of = np.searchsorted(bounds, ranked, side="right") - 1
    pieces = []
    for c in np.unique(chunk_of):
        local = ranked[chunk_of == c] - bounds[c]
        block = data.blocks[int(c)]
        piece = block if local.size == block.shape[0] else block[local]
        # The piece's one chunk as a Delayed: no extra task to finalize a dask array.
        pieces.append(piece.to_delayed().ravel()[0])
    in_order = bool((order == np.arange(order.size)).all())
    return pieces, None if in_order else np.argsort(order)


def take_rows(pieces: Sequence[Any], perm: np.ndarray | None) -> np.ndarray:
    """Concatenate pieces from :func:`row_pieces` (computed) into the requested row order.

    Examples
    --------
    >>> take_rows([np.array([1, 2]), np.array([5])], np.array([2, 0, 1])).tolist()
    [5, 1, 2]
    """
    out = np.concatenate([np.asarray(p) for p in pieces])
    return out if perm is None else out[perm]
