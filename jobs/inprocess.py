"""Run a job's units in this process: decode, forward and write on three threads.

The forward runs on the calling thread with every torch thread the job was
given; a decode thread prepares the next unit's batch (with a pool of decoding
threads next to a GPU) and a write thread (several next to a GPU) checks,
compresses, checksums and stores the previous one, each with a single torch
thread, so neither takes the forward's thread pool. Bounded queues (one unit
waiting at each hand-over) keep at most four units in memory, plus one per
extra write thread. The first error on any thread stops them all and is
raised on the calling thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from jobs.worker import UnitExtractor

__all__ = ["run_units"]

_DONE = object()


class _Stage(threading.Thread):
    """A daemon thread running ``work`` with one torch thread, remembering its error."""

    def __init__(self, name: str, work: Callable[[], None], stop: threading.Event) -> None:
        super().__init__(name=f"vitcnn-{name}", daemon=True)
        self.work, self.stop = work, stop
        self.error: BaseException | None = None

    def run(self) -> None:
        import torch

        torch.set_num_threads(1)  # per thread: the forward keeps its own pool
        try:
            self.work()
        except BaseException as e:
            self.error = e
            self.stop.set()


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue[Any], stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return _DONE


def run_units(
    extractor: UnitExtractor,
    units: Sequence[int],
    bounds: Sequence[tuple[int, int]],
    on_written: Callable[[int, int], None],
    before_first_write: Callable[[], None] = lambda: None,
    write_threads: int = 1,
) -> Iterator[None]:
    """Extract and write ``units``; call ``on_written(unit, n_images)`` from the writer.

    ``before_first_write`` runs on the write thread before anything is written
    (the job creates its run there, while the first unit is decoded and run).
    A generator: it yields after each forward so that the caller (the job) can
    check its lease between units; exhaust it to run the job.
    """
    stop = threading.Event()
    decoded: queue.Queue[Any] = queue.Queue(maxsize=1)
    forwarded: queue.Queue[Any] = queue.Queue(maxsize=1)

    def decode() -> None:
        for u in units:
            start, stop_ = bounds[u]
            if not _put(decoded, (u, extractor.decode(start, stop_)), stop):
                return
        _put(decoded, _DONE, stop)

    opened = threading.Lock()

    def write() -> None:
        with opened:  # the first writer opens the run; the others wait for it
            before_first_write()
        while (item := _get(forwarded, stop)) is not _DONE:
            on_written(item.unit, extractor.write(item))

    writers = [_Stage(f"write-{i}", write, stop) for i in range(max(1, write_threads))]
    stages = [_Stage("decode", decode, stop), *writers]
    for stage in stages:
        stage.start()
    try:
        while (item := _get(decoded, stop)) is not _DONE:
            unit, images = item
            values = images.unit_values(unit, extractor.forward(images.batch))
            if not _put(forwarded, values, stop):
                break
            yield
        for _ in writers:
            _put(forwarded, _DONE, stop)
        for writer in writers:
            writer.join()
    except BaseException:
        stop.set()
        raise
    finally:
        stop.set()
        for stage in stages:
            stage.join()
    for stage in stages:
        if stage.error is not None:
            raise stage.error
