"""Run lists of dask tasks on local threads or a ``distributed`` scheduler."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from vitcnn_store.errors import UsageError

__all__ = ["Executor", "LazyTasks"]


class LazyTasks(Sequence[Any]):
    """``size`` dask tasks built only when :meth:`Executor.imap` submits them.

    A job with many batches would otherwise hold every batch's graph on the
    driver at once (tens of thousands of small dask objects).
    """

    def __init__(self, size: int, build: Callable[[int], Any]) -> None:
        self.size = size
        self.build = build

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list[Any]: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self.build(j) for j in range(*i.indices(self.size))]
        if not -self.size <= i < self.size:
            raise IndexError(i)
        return self.build(i % self.size)


class Executor:
    """Runs lists of dask tasks on local threads or a ``distributed`` scheduler.

    :meth:`imap` runs tasks in rounds of ``window`` (one or two rounds in
    flight) and yields results as they finish, so memory stays bounded by the
    window however many tasks a job has, and the driver merges the small
    accumulators as they arrive. Local threads run with one BLAS thread each.

    Parameters
    ----------
    address : str or None
        ``tcp://...`` of a dask scheduler; ``None`` runs on local threads.
    threads : int or None
        Local thread count (default: one per core).
    progress : bool
        Show a tqdm bar on stderr.
    """

    def __init__(
        self, address: str | None = None, threads: int | None = None, progress: bool = True
    ) -> None:
        if threads is not None and threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        self.address = address
        self.threads = threads
        self.progress = progress
        self.client: Any = None

    def __enter__(self) -> Executor:
        if self.address:
            from distributed import Client

            try:
                self.client = Client(self.address, set_as_default=False, timeout="20s")
            except (OSError, TimeoutError, ValueError) as e:
                raise UsageError(
                    f"cannot reach the dask scheduler at {self.address}: {e}"
                ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def share(self, value: Any) -> Any:
        """``value`` as an input many tasks take: sent to every worker once (a scattered
        future on a cluster, one graph key locally), not once per task or per round."""
        if self.client is not None:
            return self.client.scatter(value, broadcast=True, hash=False)
        from dask import delayed

        return delayed(value, pure=True, traverse=False)

    @property
    def slots(self) -> int:
        """Tasks that can run at once."""
        if self.client is not None:
            return max(1, sum(self.client.nthreads().values()))
        import os

        return self.threads or os.cpu_count() or 1

    def imap(
        self, tasks: Sequence[Any], *, desc: str, window: int | None = None
    ) -> Iterator[tuple[int, Any]]:
        """Compute dask ``tasks``; yield ``(index, result)`` as they finish.

        Tasks run in rounds of ``window`` (default: two per slot), each round one
        dask graph, so data several tasks of a round read (a stored chunk) is
        read once; memory is bounded by what one or two rounds hold.
        """
        from tqdm.auto import tqdm

        window = max(1, window or 2 * self.slots)
        bar = tqdm(
            total=len(tasks),
            desc=desc,
            disable=not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )
        try:
            if self.client is None:
                import dask
                from threadpoolctl import threadpool_limits

                for start in range(0, len(tasks), window):
                    group = tasks[start : start + window]
                    # One BLAS thread per dask thread: tasks already run in parallel, and
                    # nested BLAS threads oversubscribe the cores (as dask workers do).
                    with threadpool_limits(1 if self.slots > 1 else None):
                        results = dask.compute(
                            *group, scheduler="threads", num_workers=self.threads
                        )
                    for i, result in enumerate(results):
                        bar.update(1)
                        yield start + i, result
            else:
                yield from self._imap_distributed(tasks, window, bar)
        finally:
            bar.close()

    def _imap_distributed(self, tasks: Sequence[Any], window: int, bar: Any) -> Iterator[Any]:
        from distributed import as_completed

        # Rounds of `window` tasks go to the scheduler as one graph, so chunks that
        # several tasks read are loaded once; two rounds in flight keep workers busy.
        rounds = [range(s, min(s + window, len(tasks))) for s in range(0, len(tasks), window)]
        index: dict[Any, tuple[int, int]] = {}
        left = [len(r) for r in rounds]
        pending = as_completed(loop=self.client.loop)

        def submit(k: int) -> None:
            futures = self.client.compute([tasks[i] for i in rounds[k]])
            for i, future in zip(rounds[k], futures, strict=True):
                index[future] = (k, i)
                pending.add(future)

        submitted = min(2, len(rounds))
        for k in range(submitted):
            submit(k)
        for future in pending:
            k, i = index.pop(future)
            result = future.result()  # re-raises the task's own exception
            future.release()
            left[k] -= 1
            if not left[k] and submitted < len(rounds):
                submit(submitted)
                submitted += 1
            bar.update(1)
            yield i, result
