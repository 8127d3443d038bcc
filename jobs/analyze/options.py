"""Options every analysis job takes, and checks of option values against the data."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

from vitcnn_store.errors import UsageError

__all__ = ["EXECUTION_OPTIONS", "AnalysisOptions", "AnalysisWarning", "cap_batch_size"]

# Options that change how a result is computed, never what it is: left out of the
# parameter dict compared for reuse.
EXECUTION_OPTIONS = frozenset(
    {"store", "recompute", "dask_address", "threads", "progress", "gram_tile", "gather_bytes"}
)


class AnalysisWarning(UserWarning):
    """A job adjusted an option (e.g. capped the batch size); the CLI prints one line."""


@dataclass(frozen=True, kw_only=True)
class AnalysisOptions:
    """Options every analysis job takes (see ``vitcnn analyze --help``).

    Parameters
    ----------
    store, run : str
        Store URL and run name (the result is written under this run).
    name : str or None
        Result name under ``<run>/_analyses/``; each job has a default.
    recompute : bool
        Recompute even when a result with the same parameters is stored.
    allow_incomplete : bool
        Use the written units of an unfinished run (the result says so).
    dask_address : str or None
        ``tcp://...`` of a dask scheduler; ``None`` runs on local threads.
    threads : int or None
        Local thread count (default: one per core).
    progress : bool
        Show a progress bar on stderr.

    Examples
    --------
    >>> AnalysisOptions(store="acts.zarr", run="vit", threads=2).parameters()
    {'run': 'vit', 'name': None, 'allow_incomplete': False}
    """

    store: str
    run: str
    name: str | None = None
    recompute: bool = False
    allow_incomplete: bool = False
    dask_address: str | None = None
    threads: int | None = None
    progress: bool = True

    def parameters(self) -> dict[str, Any]:
        """The options that define the result (compared to decide on reuse)."""
        return {k: v for k, v in asdict(self).items() if k not in EXECUTION_OPTIONS}


def cap_batch_size(requested: int, n: int, what: str = "--batch-size") -> int:
    """The batch size to use: ``requested`` capped to ``n`` (with a warning), at least 4.

    The unbiased HSIC₁ needs 4 images per batch; a batch larger than the usable
    images is shrunk to all of them and :class:`AnalysisWarning` says so.

    Examples
    --------
    >>> cap_batch_size(16, 40)
    16
    """
    if requested < 4:
        raise UsageError(f"{what} must be >= 4 for the unbiased estimator, got {requested}")
    if n < 4:
        raise UsageError(f"the unbiased estimator needs at least 4 usable images, got {n}")
    if requested > n:
        warnings.warn(
            f"{what} {requested} is more than the {n} usable images: using {n}",
            AnalysisWarning,
            stacklevel=2,
        )
        return n
    return requested
