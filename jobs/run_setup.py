"""Before the first byte: every check that can refuse a job, then the run's creation.

:func:`check_store` makes the checks that need only the store and the options
(store writable, run name, lease, an existing or broken run without
``--resume``/``--overwrite``, a format-1 run with ``--resume``) before any model
is built or image hashed. :func:`check_run` decides what the job will do with the store — create the
run, replace it, or resume it — refusing bad names, unwritable stores, live
leases, mismatching or changed images and undecodable images (``--strict``)
without writing anything. :func:`create_run_from` writes the run once the job
is certain to start (the caller has its workers ready), so a refused or failed
start leaves an existing run exactly as it was.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from vitcnn_store.errors import ImageSetError, RunExistsError, RunLockedError, VitcnnError
from vitcnn_store.store import RunWriter, check_writable, create_run, prepare_run
from vitcnn_store.store.lease import (
    Lease,
    acquire_lease,
    check_not_leased,
    new_owner,
    release_lease,
    renew_lease,
)
from vitcnn_store.store.runs import run_state
from vitcnn_store.store.writer import restore_run

if TYPE_CHECKING:
    from jobs.config import ExtractConfig
    from jobs.plan import RunTemplate

__all__ = [
    "LeaseKeeper",
    "RunSession",
    "check_run",
    "check_store",
    "create_run_from",
    "prepare_store",
    "restore_run_from",
]


def _refuse_if_leased(cfg: ExtractConfig) -> None:
    # Early, for a clear refusal before the model and workers start; the lease itself is
    # taken (atomically) by RunSession.open, before anything is created or deleted.
    check_not_leased(cfg.store, cfg.run)


def _prepare_run(cfg: ExtractConfig, provenance: dict[str, Any] | None, **images: Any) -> bool:
    """:func:`prepare_run` for this job, its refusal told truthfully under a race."""
    try:
        return prepare_run(
            cfg.store,
            cfg.run,
            provenance,
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            **images,
        )
    except RunExistsError:
        # The run may have appeared after the lease was checked: a live job taking it and
        # creating it meanwhile leaves a run "broken" until its marker lands. Its holder,
        # not the half-made run, is the reason to give.
        _refuse_if_leased(cfg)
        raise


def check_store(cfg: ExtractConfig) -> None:
    """The store-side checks that need no model and no image (writes nothing).

    A job runs these first, so refusing an existing run costs what ``vitcnn ls``
    does; :func:`check_run` repeats them with the template (and compares a
    ``--resume``'s provenance and images).
    """
    check_writable(cfg.store)
    _refuse_if_leased(cfg)
    _prepare_run(cfg, None)


def check_run(cfg: ExtractConfig, template: RunTemplate) -> bool:
    """Every store-side check of a job; True when the run must be (re)created. Writes nothing."""
    check_writable(cfg.store)
    _refuse_if_leased(cfg)
    images = template.plan.images
    create = _prepare_run(
        cfg,
        template.provenance,
        image_ids=[r.image_id for r in images.records],
        image_sha256=template.image_sha256,
    )
    if cfg.strict:
        bad = images.check_all(progress=cfg.progress)
        if bad:
            first = "; ".join(f"{images.records[i].image_id}: {why}" for i, why in bad[:3])
            raise ImageSetError(
                f"--strict: {len(bad)} image(s) cannot be decoded ({first}); nothing was written"
            )
    return create


def create_run_from(cfg: ExtractConfig, template: RunTemplate) -> None:
    """Create (or replace) the run from its template; the creation marker comes last."""
    create_run(cfg.store, cfg.run, attrs=template.provenance, **_layout(cfg, template))


def restore_run_from(cfg: ExtractConfig, template: RunTemplate) -> list[str]:
    """Recreate what a resumed run lost (missing arrays, unreadable coordinates)."""
    return restore_run(cfg.store, cfg.run, **_layout(cfg, template))


def _layout(cfg: ExtractConfig, template: RunTemplate) -> dict[str, Any]:
    """What a run is made of — images, chunking, dtype, arrays, codecs — as both
    creating it and restoring what it lost lay it out."""
    records = template.plan.images.records
    return {
        "image_ids": [r.image_id for r in records],
        "labels": [r.label for r in records],
        "image_sha256": template.image_sha256,
        "chunk": template.chunk_size,
        "dtype": cfg.dtype,
        "arrays": template.specs,
        "compression": cfg.compression,
    }


def prepare_store(cfg: ExtractConfig, template: RunTemplate) -> RunWriter:
    """Check, then create the run if needed, without Ray (tests and benchmarks)."""
    if check_run(cfg, template):
        create_run_from(cfg, template)
    return RunWriter(cfg.store, cfg.run)


class LeaseKeeper:
    """Holds a run's lease for one job, renewing it from a background thread."""

    def __init__(self, url: str, run: str, ttl: float) -> None:
        self.url, self.run, self.ttl = url, run, ttl
        self.lease: Lease = acquire_lease(self.url, self.run, new_owner(), self.ttl)
        self._stop = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._renew, daemon=True, name="vitcnn-lease")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.lease = renew_lease(self.url, self.run, self.lease, self.ttl)
            except Exception as e:  # surfaced by check() on the driver's thread
                self._error = e
                return

    def check(self) -> None:
        """Raise if the lease was lost (another job took the run over)."""
        if self._error is not None:
            raise self._error

    def release(self) -> bool:
        """Stop renewing and drop the lease; False if it could not be dropped (e.g. disk
        full): it then expires on its own at ``self.lease.expires_at``."""
        self._stop.set()
        self._thread.join()
        try:
            release_lease(self.url, self.run, self.lease.owner)
        except (VitcnnError, OSError):
            return False
        return True


class RunSession:
    """A job's hold on its run, from creation to the last unit.

    :meth:`open` takes the run's lease first — atomically, so of two jobs on one
    run exactly one gets it and the other is refused having written nothing —
    then, holding it, checks that the run is still as the job's checks saw it
    (``state``, from :func:`~vitcnn_store.store.runs.run_state`), and only then
    creates (or replaces) the run when the job must. It runs once, from
    whichever thread writes first (the in-process runner opens it from its write
    thread, so creating the run overlaps the first unit's decode and forward).
    :meth:`check` raises if the lease was lost; :meth:`close` drops it.
    """

    def __init__(
        self,
        cfg: ExtractConfig,
        template: RunTemplate,
        create: bool,
        state: object = None,
        restore: bool = False,
    ) -> None:
        self.cfg, self.template, self.create, self.state = cfg, template, create, state
        self.restore = restore  # a resumed run lost arrays: recreate them from the template
        self.keeper: LeaseKeeper | None = None
        self.seconds = 0.0  # spent creating the run and taking the lease
        self._lock = threading.Lock()
        self._failed: BaseException | None = None

    def open(self) -> None:
        import time

        with self._lock:
            if self._failed is not None:  # a second write thread: the first one failed
                raise self._failed
            if self.keeper is not None:
                return
            t = time.perf_counter()
            try:
                keeper = LeaseKeeper(self.cfg.store, self.cfg.run, self.cfg.lease_ttl)
            except BaseException as e:
                self._failed = e
                raise
            try:
                if run_state(self.cfg.store, self.cfg.run) != self.state:
                    raise RunLockedError(
                        f"run {self.cfg.run!r} was changed by another job while this one was "
                        "starting; nothing was written: run the command again"
                    )
                if self.create:  # the job holds the run: only now replace anything
                    create_run_from(self.cfg, self.template)
                elif self.restore:
                    restore_run_from(self.cfg, self.template)
            except BaseException as e:
                keeper.release()
                self._failed = e
                raise
            self.keeper = keeper
            self.seconds = time.perf_counter() - t

    def check(self) -> None:
        if self.keeper is not None:
            self.keeper.check()

    def close(self, error: BaseException | None = None) -> BaseException | None:
        """Drop the lease; returns ``error``, saying so when the lease could not be dropped
        (e.g. the disk is full: it then lapses on its own)."""
        if self.keeper is None:
            return error
        if not self.keeper.release() and isinstance(error, VitcnnError):
            return type(error)(
                f"{error}; the run's lease could not be dropped: --resume on this host can "
                f"take over at once, elsewhere after {self.keeper.lease.expires_at}"
            )
        return error
