"""Which runs and images an analysis reads: opening, usable images, cross-run pairing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitcnn_store.errors import IncompleteRunError, StoreError, UsageError
from vitcnn_store.store import open_store
from vitcnn_store.store.layout import check_name
from vitcnn_store.store.reader import Run

__all__ = ["align_images", "open_runs", "usable_mask"]


def open_runs(
    url: str, names: Sequence[str], preload: Sequence[str] = ("done", "failed", "image_id")
) -> list[Run]:
    """Open runs of one store, validating their names first.

    Each run is :meth:`~vitcnn_store.store.reader.Run.pinned`: a job reads its
    progress once, so its mask, Gram keys and provenance agree with each other.
    The run-level arrays ``preload`` (what every job reads next: its usable images)
    are read at once, one round of requests on object storage.
    """
    for name in names:
        check_name(name)
    store = open_store(url)
    runs = [store[name].pinned() for name in names]
    for run in runs:
        run.preload(preload)
    return runs


def usable_mask(run: Run, allow_incomplete: bool) -> np.ndarray:
    """Per image: usable (its unit is written and it decoded).

    Raises :class:`IncompleteRunError` for an unfinished run unless
    ``allow_incomplete``, and :class:`StoreError` when nothing is usable.
    """
    if not run.complete and not allow_incomplete:
        done = run.done
        raise IncompleteRunError(
            f"run {run.name!r} is incomplete ({int(done.sum())}/{done.size} units written): "
            "finish it with `vitcnn extract ... --resume`, or pass --allow-incomplete to "
            "analyse the written units only"
        )
    mask = np.asarray(run.valid, dtype=bool)
    if not mask.any():
        raise StoreError(f"run {run.name!r} has no usable images (none written and decoded)")
    return mask


def align_images(
    run_a: Run, mask_a: np.ndarray, run_b: Run, mask_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into each run of their common usable images, paired by ``image_id``.

    Pairs come in run ``a``'s image order. Raises :class:`UsageError` when the
    runs share no usable image.
    """
    ia_all, ib_all = np.flatnonzero(mask_a), np.flatnonzero(mask_b)
    _, ia, ib = np.intersect1d(
        run_a.image_ids[ia_all], run_b.image_ids[ib_all], return_indices=True
    )
    if not ia.size:
        raise UsageError(
            f"runs {run_a.name!r} and {run_b.name!r} share no usable image ids: "
            "cross-run analyses need runs over overlapping image sets"
        )
    order = np.argsort(ia_all[ia], kind="stable")
    return ia_all[ia][order], ib_all[ib][order]
