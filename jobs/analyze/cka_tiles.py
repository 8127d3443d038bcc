"""One pass over the Gram tiles of one or two runs: the sums behind every CKA estimate.

The job compares N images, its *positions* ``0..N-1``: run a's usable images,
or the images two runs share (paired by ``image_id``, in run a's order), and
``index[side][k]`` is position k's image in that side's run. Positions are cut
into panels along run a's Gram tiles, and one dask task per panel pair
``(P, Q)``, ``P <= Q``, reads that block of every layer's Gram (each stored tile
of run a once, every layer's at once: :func:`~vitcnn_store.store.grams.read_blocks`) and
returns

* :func:`~vitcnn_store.analysis.tiles.tile_part`: the block's share of every
  batch's HSIC sums, for the linear estimators, and
* :func:`~vitcnn_store.analysis.tiles.gather_part`: its entries of requested
  whole batch Grams, for estimators that need them whole (the RBF kernel, the
  permutation null).

The driver adds the parts up as they arrive (:class:`TiledHSIC`,
:class:`GatheredGrams`); only those small sums travel, never a Gram.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.analyze.executor import Executor, LazyTasks
from vitcnn_store.analysis.tiles import (
    BatchLayout,
    GatheredGrams,
    TiledHSIC,
    TilePart,
    centring_shift,
    gather_part,
    tile_part,
)
from vitcnn_store.store.grams import GramInfo, read_blocks, read_vector_kinds

__all__ = ["GramSide", "TilePass", "panels_of", "run_tile_pass"]


@dataclass(frozen=True)
class GramSide:
    """One side of a comparison: a Gram per layer and each position's image in its run."""

    grams: tuple[GramInfo, ...]
    index: np.ndarray  # (N,) image index in the side's run, per position


@dataclass
class TilePass:
    """What one pass computes: streamed HSIC sums (``layout`` given) and gathered Grams."""

    side_a: GramSide
    side_b: GramSide | None  # None: side a against itself
    layout: BatchLayout | None = None
    unbiased: bool = True
    requests_a: Sequence[np.ndarray] = ()
    requests_b: Sequence[np.ndarray] = ()


def _shifts_and_offsets(sides: Sequence[GramSide]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per side, the (L, N) centring shifts of its Grams at its positions (from the
    stored row means) and the (L, N) offsets ``a`` of its stored Grams
    (``X Xᵀ = gram + a_i + a_j``): every side's vectors read in one round of requests."""
    got = read_vector_kinds([g for side in sides for g in side.grams], ("row_mean", "offset"))
    out, start = [], 0
    for side in sides:
        end = start + len(side.grams)
        means = np.stack([v[side.index] for v in got["row_mean"][start:end]])
        offsets = np.stack([v[side.index] for v in got["offset"][start:end]])
        out.append((centring_shift(means), offsets))
        start = end
    return out


def panels_of(side: GramSide) -> list[tuple[int, int]]:
    """Position ranges whose images fall in one tile row of the side's first Gram.

    ``side.index`` must be increasing (run a's order), so each range is contiguous.

    Examples
    --------
    >>> from vitcnn_store.store.grams import GramInfo
    >>> info = GramInfo("s", "r", "l", "flatten", n=10, tile=4)
    >>> panels_of(GramSide((info,), np.array([0, 2, 3, 5, 9])))
    [(0, 3), (3, 4), (4, 5)]
    """
    if np.any(np.diff(side.index) <= 0):
        raise ValueError("positions must follow the first run's image order")
    tile = side.grams[0].tile
    tiles = side.index // tile
    starts = np.flatnonzero(np.r_[True, tiles[1:] != tiles[:-1]])
    ends = np.r_[starts[1:], tiles.size]
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def _read(side: GramSide, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(L, len(rows), len(cols)) blocks of a side's Grams at positions ``rows`` × ``cols``."""
    return read_blocks(side.grams, side.index[rows], side.index[cols])


def _task(
    job: TilePass, shift_a: np.ndarray, shift_b: np.ndarray | None, span_p: Any, span_q: Any
) -> tuple[TilePart | None, list[Any], list[Any], bool]:
    """One panel pair: read both sides' blocks once, stream and gather from them."""
    diagonal = span_p == span_q
    rows = np.arange(*span_p)
    cols = rows if diagonal else np.arange(*span_q)
    raw_a = _read(job.side_a, rows, cols)
    raw_b = None if job.side_b is None else _read(job.side_b, rows, cols)
    part = None
    if job.layout is not None:
        part = tile_part(
            job.layout,
            rows,
            None if diagonal else cols,
            raw_a,
            shift_a,
            raw_b,
            shift_b,
            unbiased=job.unbiased,
        )
    c = None if diagonal else cols
    pieces_a = gather_part(job.requests_a, rows, c, raw_a) if job.requests_a else []
    pieces_b = (
        gather_part(job.requests_b, rows, c, raw_a if raw_b is None else raw_b)
        if job.requests_b
        else []
    )
    return part, pieces_a, pieces_b, diagonal


def run_tile_pass(
    executor: Executor, job: TilePass, *, desc: str
) -> tuple[TiledHSIC | None, GatheredGrams | None, GatheredGrams | None]:
    """Run one pass over the tiles; returns the streamed sums and the gathered Grams."""
    from dask import delayed

    panels = panels_of(job.side_a)
    pairs = [(p, q) for p in range(len(panels)) for q in range(p, len(panels))]
    # Shared inputs (the batches, the shifts) travel to each worker once, not once per task.
    shared_job = executor.share(job)
    # Both sides' row means (the shifts) and offsets (needed at the end), in one round.
    vectors = _shifts_and_offsets([job.side_a] + ([] if job.side_b is None else [job.side_b]))
    (raw_shift_a, off_a), (raw_shift_b, off_b) = vectors[0], vectors[-1]
    shift_a = executor.share(raw_shift_a)
    shift_b = None if job.side_b is None else executor.share(raw_shift_b)
    tasks = LazyTasks(
        len(pairs),
        lambda i: delayed(_task, pure=True)(
            shared_job, shift_a, shift_b, panels[pairs[i][0]], panels[pairs[i][1]]
        ),
    )
    n_a = len(job.side_a.grams)
    n_b = None if job.side_b is None else len(job.side_b.grams)
    acc = None
    if job.layout is not None:
        acc = TiledHSIC(job.layout, n_a, n_b, unbiased=job.unbiased)
    gathered_a = GatheredGrams(job.requests_a, n_a) if job.requests_a else None
    gathered_b = GatheredGrams(job.requests_b, n_b or n_a) if job.requests_b else None
    # Each task reads its own tiles, so rounds only bound how many parts are in flight.
    window = max(8, 2 * executor.slots)
    for _, (part, pieces_a, pieces_b, diagonal) in executor.imap(tasks, desc=desc, window=window):
        if acc is not None and part is not None:
            acc.add(part)
        if gathered_a is not None:
            gathered_a.add(pieces_a, diagonal=diagonal)
        if gathered_b is not None:
            gathered_b.add(pieces_b, diagonal=diagonal)
    # Stored Grams are shifted (store/grams.py): raw traces for the scales, raw batch Grams
    # for whatever takes them whole, exactly as if computed from the activations.
    if acc is not None:
        acc.unshift(off_a, None if job.side_b is None else off_b)
    if gathered_a is not None:
        gathered_a.unshift(off_a)
    if gathered_b is not None:
        gathered_b.unshift(off_b)
    return acc, gathered_a, gathered_b
