"""The extraction job: check everything, start the workers, then create the run and fill it.

The order is the job's promise that refusal changes nothing, and that a refusal
costs no more than it must:

1. validate the options (:mod:`jobs.config`) and make every check that needs only
   the store and the options — store writable, run name, lease, an existing or
   broken run without ``--resume``/``--overwrite``, a format-1 run with
   ``--resume`` (:func:`jobs.run_setup.check_store`) — before torch is imported,
   any model built or any image hashed; open the image set (a missing folder is
   refused here); size the job (:mod:`jobs.sizing`): its images and units, and
   where it runs — in this process, or on Ray actors — on which device;
2. hash the images; get the model once (build a timm name, or take the module
   handed in) and run the template (:mod:`jobs.plan`): the plan is made once, whole;
3. check the store again with the template — resume compatibility, changed
   images, ``--strict`` decoding (:mod:`jobs.run_setup`);
4. start the workers: in process, move the model to its device; on Ray (reached
   within a bounded wait while steps 2–3 run on another thread), start every
   actor and wait until each holds the model (:mod:`jobs.ray_pool`);
5. only then take the run's lease (atomically: a second job on the run is
   refused here), check the run is as step 1 saw it, create (or, with
   ``--overwrite``, replace) the run, print the plan in one line, and write the units not yet done
   (:mod:`jobs.inprocess` or :mod:`jobs.ray_pool`).

A job refused or failed in steps 1–4 leaves an existing run byte for byte as it was.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jobs.config import ExtractConfig
from jobs.run_setup import RunSession, check_run, check_store, prepare_store
from jobs.sizing import ExecutionPlan, JobShape, Resources, local_resources, shape_job, size_job
from vitcnn_store.models.factory import ModelSpec
from vitcnn_store.store import consolidate, unit_bounds
from vitcnn_store.store.runs import run_state

if TYPE_CHECKING:
    # jobs.plan imports torch and timm: loaded once the store's checks passed (see step 1).
    from jobs.plan import RunTemplate, plan_extraction
    from vitcnn_store.data import ImageSet

__all__ = [
    "ExtractConfig",
    "ExtractSummary",
    "extract",
    "plan_extraction",
    "prepare_store",
]


def __getattr__(name: str) -> Any:
    # PEP 562: `from jobs.extract import plan_extraction` without importing torch up front.
    if name == "plan_extraction":
        from jobs.plan import plan_extraction

        return plan_extraction
    raise AttributeError(f"module 'jobs.extract' has no attribute {name!r}")


@dataclass(kw_only=True)
class ExtractSummary:
    """What a job did, printed at its end; the counts start at zero and grow as it goes."""

    run: str
    store: str
    n_images: int = 0
    units_total: int = 0
    units_written: int = 0
    images_written: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    nodes: list[str] = field(default_factory=list)
    plan: str = ""
    #: Seconds from the call to the first unit's start (validation, model, template,
    #: store checks, workers, run creation).
    startup_seconds: float = 0.0
    #: Seconds of each step (model, template, weights hash, image hashes, store checks,
    #: workers, run creation, units, consolidate): where a job's time goes.
    timings: dict[str, float] = field(default_factory=dict)

    def lap(self, name: str, since: float) -> float:
        """Add the seconds since ``since`` to step ``name``; returns now."""
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - since
        return now

    def __str__(self) -> str:
        rate = self.images_written / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"run {self.run!r} in {self.store}: {self.n_images} images, "
            f"{self.units_written} of {self.units_total} units written now "
            f"({self.images_written} images in {self.seconds:.1f} s, {rate:.1f} img/s; "
            f"start-up {self.startup_seconds:.1f} s)",
        ]
        if self.plan:
            lines.append(f"plan: {self.plan}")
        if self.failed:
            lines.append(f"{len(self.failed)} image(s) failed to decode:")
            lines += [f"  {k}: {v}" for k, v in list(self.failed.items())[:10]]
        return "\n".join(lines)


def _units_to_write(cfg: ExtractConfig, create: bool, n_units: int) -> list[int]:
    """Units the job will write (read-only: the run is not touched yet).

    A resumed run's unfinished units, plus finished units with a chunk object
    missing (found by one listing of the run; damaged chunks need `vitcnn verify`).
    """
    if create:
        return list(range(n_units))
    from vitcnn_store.errors import StoreUnavailableError
    from vitcnn_store.store import open_store

    run = open_store(cfg.store)[cfg.run]
    todo = {int(u) for u in (~run.done.astype(bool)).nonzero()[0]}
    try:
        missing = {u for _, u in run.missing_chunks()}
    except (StoreUnavailableError, OSError, NotImplementedError):
        missing = set()  # a store that cannot be listed: `vitcnn verify` finds these
    if missing - todo:
        print(
            f"vitcnn extract: {len(missing - todo)} finished unit(s) of {cfg.run!r} have missing "
            "chunks: rewriting them",
            file=sys.stderr,
        )
    return sorted(todo | missing)


def _lost_arrays(cfg: ExtractConfig) -> bool:
    """True when the run to resume lost arrays of its manifest (``--resume`` restores them)."""
    from vitcnn_store.store import open_root
    from vitcnn_store.store.runs import run_entry

    entry = run_entry(open_root(cfg.store), cfg.run, cfg.store)
    if entry is None or not entry.damaged:
        return False
    print(
        f"vitcnn extract: run {cfg.run!r} is {entry.problem}: restoring it and rewriting "
        "every unit",
        file=sys.stderr,
    )
    return True


@dataclass(frozen=True, kw_only=True)
class _Prepared:
    template: RunTemplate
    create: bool
    units: list[int]
    state: Any = None  # the run as the checks saw it (store.runs.run_state)
    restore: bool = False  # resume a run that lost arrays: recreate them first


def _prepare(cfg: ExtractConfig, shape: JobShape, state: Any, images: ImageSet) -> _Prepared:
    """Steps 2 and 3: the template and every store-side check (writes nothing).

    ``state`` is the run as the job found it when it began: the job writes only if
    the run is still so once it holds the lease.
    """
    from jobs.plan import plan_extraction

    template = plan_extraction(cfg, images=images, shape=shape)
    t = time.perf_counter()
    create = check_run(cfg, template)
    restore = not create and _lost_arrays(cfg)
    units = list(range(shape.n_units)) if restore else _units_to_write(cfg, create, shape.n_units)
    template.timings["store checks"] = time.perf_counter() - t
    return _Prepared(template=template, create=create, units=units, state=state, restore=restore)


def _announce(cfg: ExtractConfig, summary: ExtractSummary, t0: float) -> None:
    """The plan in one line on stderr, with the progress bar (``--no-progress``: quiet;
    the summary repeats it)."""
    summary.startup_seconds = time.perf_counter() - t0
    if cfg.progress:
        print(f"vitcnn extract: {summary.plan}", file=sys.stderr, flush=True)


@contextmanager
def _writing(
    cfg: ExtractConfig, prep: _Prepared, summary: ExtractSummary, t0: float
) -> Iterator[tuple[RunSession, Callable[[int, int], None]]]:
    """The run's session (creation, lease) and a progress bar while units are written.

    Yields ``(session, on_written)`` for the runner, which opens the session
    before its first write.
    """
    from tqdm.auto import tqdm

    session = RunSession(cfg, prep.template, prep.create, prep.state, prep.restore)
    _announce(cfg, summary, t0)
    lock = threading.Lock()
    bounds = unit_bounds(len(prep.template.plan.images), prep.template.chunk_size)
    bar = tqdm(
        total=sum(bounds[u][1] - bounds[u][0] for u in prep.units),
        unit="img",
        desc=f"extract {cfg.run}",
        disable=not cfg.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def on_written(unit: int, n: int) -> None:
        with lock:  # the in-process runner calls this from its write thread
            summary.units_written += 1
            summary.images_written += n
            bar.update(n)

    t = time.perf_counter()
    error: BaseException | None = None
    try:
        yield session, on_written
    except BaseException as e:
        error = e
        raise
    finally:
        bar.close()
        # In process the run is created on the write thread while the first unit runs:
        # "units" then includes that overlap.
        summary.timings["run creation"] = session.seconds
        summary.lap("units", t)
        reported = session.close(error)
        if reported is not None and reported is not error:
            raise reported from error


def _in_process(
    cfg: ExtractConfig, sizing: ExecutionPlan, prep: _Prepared, summary: ExtractSummary, t0: float
) -> None:
    from jobs.inprocess import run_units
    from jobs.worker import UnitExtractor

    plan = prep.template.plan
    t = time.perf_counter()
    extractor = UnitExtractor(plan, prep.template.model, sizing)  # the model on its device
    summary.lap("workers", t)
    try:
        with _writing(cfg, prep, summary, t0) as (session, on_written):
            bounds = unit_bounds(len(plan.images), prep.template.chunk_size)
            runner = run_units(
                extractor,
                prep.units,
                bounds,
                on_written,
                session.open,
                write_threads=sizing.write_threads,
            )
            for _ in runner:
                session.check()
    finally:
        extractor.close()


@contextmanager
def _as_found(model: Any) -> Iterator[None]:
    """Give a module handed in from Python back on its device, in its memory format
    and training mode (the job puts it in eval mode, moves it to the job's device,
    channels last for a CNN); a timm name's model is the job's own."""
    if isinstance(model, ModelSpec):
        yield
        return
    import torch

    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    conv = next((p for p in model.parameters() if p.dim() == 4), None)
    channels_last = (
        conv is not None
        and not conv.is_contiguous()
        and conv.is_contiguous(memory_format=torch.channels_last)
    )
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    training = model.training
    try:
        yield
    finally:
        model.to(device=device, memory_format=fmt).train(training)


def _on_ray(
    cfg: ExtractConfig,
    sizing: ExecutionPlan,
    shape: JobShape,
    address: str | None,
    summary: ExtractSummary,
    t0: float,
    state: Any,
    images: ImageSet,
) -> _Prepared:
    import ray

    from jobs.ray_cluster import check_resources, connect, disconnect
    from jobs.ray_pool import drive, start_actors, stop_actors
    from jobs.sizing import cluster_resources

    box: dict[str, Any] = {}

    def prepare() -> None:  # step 2-3 while Ray starts or connects
        try:
            box["prep"] = _prepare(cfg, shape, state, images)
        except BaseException as e:
            box["error"] = e

    planner = threading.Thread(target=prepare, name="vitcnn-plan", daemon=True)
    planner.start()
    started = False
    t = time.perf_counter()
    try:
        started = connect(cfg.address)
        summary.lap("ray connect (while planning)", t)
    finally:
        planner.join()
    try:
        if "error" in box:
            raise box["error"]
        prep: _Prepared = box["prep"]
        if not prep.units:
            return prep
        if address and "auto" in (cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker):
            # Sized again from the cluster now reached; the plan says what to extract,
            # not where, so it stands as it was made.
            sizing = _size(cfg, cluster_resources(ray.nodes()), address)
        check_resources(sizing.workers, sizing.cpus_per_worker, sizing.gpus_per_worker)
        summary.plan = sizing.describe()
        n = min(sizing.workers, len(prep.units))
        t = time.perf_counter()
        pool = start_actors(prep.template.plan, prep.template.model, sizing, n)
        summary.lap("workers", t)
        ended_well = False
        try:
            with _writing(cfg, prep, summary, t0) as (session, on_written):
                session.open()
                summary.nodes = drive(pool, prep.units, cfg.store, on_written, session.check)
            ended_well = True
        finally:
            # A job that ended without error leaves its actors to this driver's next
            # job (jobs.ray_pool: parked, killed when idle), unless the job started Ray
            # itself and shuts it down now; any other job kills them.
            stop_actors(pool, park=ended_well and not started)
        return prep
    finally:
        disconnect(started)


def _size(cfg: ExtractConfig, resources: Resources, address: str | None) -> ExecutionPlan:
    """Where the job runs and on which device, from its options and ``resources``."""
    return size_job(
        cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker, cfg.device, resources, address
    )


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Run an extraction job to completion and return its summary.

    Examples
    --------
    >>> from vitcnn_store.models import ModelSpec
    >>> cfg = ExtractConfig(ModelSpec("resnet18"), "builtin:faces", "acts.zarr", "r18")
    >>> print(extract(cfg))  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    cfg.validate()
    # The run as this job finds it: compared again once the job holds the run's lease,
    # so a job started before another replaced or created the run never writes.
    state = run_state(cfg.store, cfg.run)
    check_store(cfg)  # no torch, no model, no image yet: a refusal here costs `vitcnn ls`
    from vitcnn_store.data import open_image_set

    images = open_image_set(cfg.images, limit=cfg.limit)  # lists; decodes nothing
    shape = shape_job(len(images), cfg.chunk_size)
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    sizing = _size(cfg, local_resources(), address)
    summary = ExtractSummary(
        run=cfg.run,
        store=cfg.store,
        n_images=shape.n_images,
        units_total=shape.n_units,
        plan=sizing.describe(),
    )
    with _as_found(cfg.model):
        if sizing.on_ray:
            prep = _on_ray(cfg, sizing, shape, address, summary, t0, state, images)
        else:
            prep = _prepare(cfg, shape, state, images)
            if prep.units:
                _in_process(cfg, sizing, prep, summary, t0)
    summary.timings = {**prep.template.timings, **summary.timings}
    if prep.units:
        t = time.perf_counter()
        consolidate(cfg.store)
        summary.lap("consolidate", t)
    from vitcnn_store.store import open_store

    summary.failed = open_store(cfg.store)[cfg.run].failed
    summary.seconds = time.perf_counter() - t0
    return summary
