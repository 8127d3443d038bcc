"""Analysis locks: one analysis job at a time writes a run's derived data.

An analysis writes a run's Gram cache (``_grams``) and its results
(``_analyses``); two jobs doing so at once would delete and create the same
arrays under each other. So a job takes the run's *analysis lock* first — a
small JSON object ``<store>/_leases/_analysis/<run>.json`` naming its holder,
outside the run group (``_``-prefixed names are never runs) — and a second job
is refused with one line naming the holder, having written nothing.

The lock is created atomically, if absent:

- on a local store, the file is created and held with ``flock``; the
  operating system releases it when the holder exits, even when killed, so a
  crashed job never blocks the next one;
- on other file systems, with fsspec's exclusive create (``mode="xb"``; object
  stores with conditional writes make it atomic). A job that died leaves its
  lock object: the refusal says which object to delete.

Examples
--------
>>> store = open_store("acts.zarr")  # doctest: +SKIP
>>> with analysis_lock(store, ["vitb16"], "vitcnn analyze cka"):  # doctest: +SKIP
...     pass  # compute and write vitb16's Grams and results
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from vitcnn_store.errors import RunLockedError
from vitcnn_store.store.layout import check_name, store_io

if TYPE_CHECKING:
    from vitcnn_store.store.reader import Store

__all__ = ["LOCKS", "analysis_lock", "lock_holder", "lock_location"]

#: Folder of the analysis locks under the store's root.
LOCKS = "_leases/_analysis"  # "_": never a run name, so never a run's lease folder


def lock_location(store: Store, run_name: str) -> tuple[Any, str]:
    """``(filesystem, path)`` of run ``run_name``'s analysis lock."""
    return store.fs, f"{store.path}/{LOCKS}/{check_name(run_name)}.json"


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _holder(job: str) -> dict[str, Any]:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "since": now}


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"{h['job']} (host {h['host']}, pid {h['pid']}, since {h['since']})"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "another job (starting)"


def lock_holder(store: Store, run_name: str) -> str | None:
    """Who holds run ``run_name``'s analysis lock, or None when it is free."""
    fs, path = lock_location(store, run_name)
    with store_io(store.url):
        if _is_local(fs):
            return _local_holder(path)
        try:
            with fs.open(path, "rb") as f:
                return _describe(f.read())
        except FileNotFoundError:
            return None


def _local_holder(path: str) -> str | None:
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(os.pread(fd, 4096, 0))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # a file nobody holds (its holder is between unlink and close)
    finally:
        os.close(fd)


def _refusal(run_name: str, holder: str, path: str, local: bool) -> RunLockedError:
    gone = "" if local else f"; if that job is gone, delete {path}"
    return RunLockedError(
        f"run {run_name!r} is being analysed by {holder}: wait for it to finish{gone}"
    )


@contextmanager
def _local_lock(run_name: str, path: str, job: str) -> Iterator[None]:
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise _refusal(run_name, holder, path, local=True) from None
        try:  # the file may have been released and unlinked between open and flock
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder(job)).encode(), 0)
        yield
    finally:
        # Unlink while still holding it: a job that opened the old file sees it is gone.
        try:
            os.unlink(path)
        finally:
            os.close(fd)


@contextmanager
def _remote_lock(run_name: str, fs: Any, path: str, job: str) -> Iterator[None]:
    body = json.dumps(_holder(job)).encode()
    try:
        with fs.open(path, "xb") as f:
            f.write(body)
    except FileExistsError:
        try:
            with fs.open(path, "rb") as f:
                holder = _describe(f.read())
        except FileNotFoundError:
            holder = "another job (finishing)"
        raise _refusal(run_name, holder, path, local=False) from None
    try:
        yield
    finally:
        fs.rm(path)


@contextmanager
def analysis_lock(store: Store, run_names: Iterable[str], job: str) -> Iterator[None]:
    """Hold the analysis lock of every run named in ``run_names`` (in name order) while in
    the block.

    Raises :class:`~vitcnn_store.errors.RunLockedError` (one line naming the holder)
    when another job holds one of them; the locks taken so far are released.
    """
    with ExitStack() as stack:
        for run_name in sorted(set(run_names)):
            fs, path = lock_location(store, run_name)
            with store_io(store.url):
                if _is_local(fs):
                    stack.enter_context(_local_lock(run_name, path, job))
                else:
                    stack.enter_context(_remote_lock(run_name, fs, path, job))
        yield
