"""The extraction job: check everything, start the workers, then create the run and fill it.

The order is the job's promise that refusal changes nothing:

1. validate the options; open the image set and hash its images; build the
   model once for the template (:mod:`jobs.plan`);
2. check the store — writable, run name, lease, resume compatibility, changed
   images, ``--strict`` decoding (:mod:`jobs.run_setup`);
3. reach Ray within a bounded wait, check its resources, start every worker and
   wait until each has built its model and checked the weights hash
   (:mod:`jobs.ray_cluster`);
4. only then create (or, with ``--overwrite``, replace) the run, take its lease,
   and hand out the units not yet done, each actor holding at most two at a
   time so its write overlaps its next forward.

A job refused or failed in steps 1–3 leaves an existing run byte for byte as it was.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.plan import RunTemplate, plan_extraction
from jobs.ray_cluster import (
    check_resources,
    connect,
    disconnect,
    passthrough_env,
    unwrap,
)
from jobs.run_setup import LeaseKeeper, check_run, create_run_from, prepare_store
from jobs.worker import make_actor_class
from vitcnn_store import errors
from vitcnn_store.errors import ClusterError, UsageError, VitcnnError
from vitcnn_store.models import ModelSpec
from vitcnn_store.store import COMPRESSIONS, RunWriter, check_name, consolidate
from vitcnn_store.store.lease import DEFAULT_TTL

__all__ = [
    "ExtractConfig",
    "ExtractSummary",
    "extract",
    "plan_extraction",
    "prepare_store",
]

IN_FLIGHT_PER_ACTOR = 2  # one unit writing while the next one runs forward
#: Seconds to wait for every worker to build its model before giving up.
READY_TIMEOUT = 600.0


@dataclass(frozen=True)
class ExtractConfig:
    """Options of ``vitcnn extract`` (see its ``--help``)."""

    model: ModelSpec
    images: str
    store: str
    run: str
    layers: str = "preset:blocks"
    attention: bool = False
    attention_layers: str | None = None
    inputs: bool = False
    dtype: str = "float16"
    compression: str = "lz4"
    chunk_size: int = 32
    batch_size: int | None = None
    limit: int | None = None
    strict: bool = False
    resume: bool = False
    overwrite: bool = False
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    device: str = "auto"
    autocast: bool = False
    address: str | None = None
    progress: bool = True
    lease_ttl: float = DEFAULT_TTL
    extra_attrs: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        check_name(self.run)
        for name, value in (
            ("--workers", self.workers),
            ("--chunk-size", self.chunk_size),
            ("--batch-size", self.batch_size if self.batch_size is not None else 1),
            ("--cpus-per-worker", self.cpus_per_worker),
            ("--lease-ttl", self.lease_ttl),
        ):
            if not (math.isfinite(value) and value > 0):  # NaN compares false to everything
                raise UsageError(f"{name} must be positive, got {value}")
        if not (math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise UsageError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.dtype not in ("float16", "float32"):
            raise UsageError(f"--dtype must be float16 or float32, got {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise UsageError(
                f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}"
            )
        if self.resume and self.overwrite:
            raise UsageError("give either --resume or --overwrite, not both")
        if self.attention_layers and not self.attention:
            raise UsageError("--attention-layers needs --attention")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and self.gpus_per_worker <= 0:
            # Ray hides every GPU from an actor that asked for none.
            raise UsageError("--device cuda needs --gpus-per-worker > 0 (e.g. 1)")


@dataclass
class ExtractSummary:
    """What a job did, printed at its end."""

    run: str
    store: str
    n_images: int
    units_total: int
    units_written: int
    images_written: int
    failed: dict[str, str]
    seconds: float
    nodes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rate = self.images_written / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"run {self.run!r} in {self.store}: {self.n_images} images, "
            f"{self.units_written} of {self.units_total} units written now "
            f"({self.images_written} images in {self.seconds:.1f} s, {rate:.1f} img/s)",
        ]
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


def _last_error_line(e: BaseException) -> str:
    """The innermost ``SomeError: message`` line of a Ray error's text (its remote traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    found = [ln for ln in lines if re.match(r"^[A-Za-z_.]+(Error|Exception)\b.*:", ln)]
    if found:
        return found[-1][:300]
    return "its process died while building the model (rerun with --debug to see its log)"


def _start_workers(cfg: ExtractConfig, template: RunTemplate, n: int) -> list[Any]:
    """Start ``n`` actors and wait until each has built its model and checked its weights."""
    import ray

    actor_cls = make_actor_class().options(
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker,
        max_concurrency=IN_FLIGHT_PER_ACTOR,
        max_restarts=2,
        max_task_retries=2,  # a retried unit rewrites the same chunks: idempotent
        runtime_env={"env_vars": passthrough_env()},
    )
    # The plan goes by value: an actor restarted after a crash must not depend on an
    # object-store copy that may be gone.
    actors = [actor_cls.remote(template.plan) for _ in range(n)]
    try:
        refs = [a.ready.remote() for a in actors]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=READY_TIMEOUT)
        if pending:
            raise ClusterError(
                f"{len(pending)} of {n} worker(s) did not start within {READY_TIMEOUT:.0f} s: "
                "the cluster has no node with the CPUs/GPUs one worker asks for"
            )
        for ref in done:
            try:
                ray.get(ref)
            except Exception as e:
                cause = unwrap(e, cfg.store)
                if isinstance(cause, VitcnnError):
                    raise cause from None
                line = _last_error_line(e)
                ours = re.match(r"vitcnn_store\.errors\.(\w+): (.*)", line)
                kind = getattr(errors, ours.group(1), None) if ours else None
                if ours and isinstance(kind, type) and issubclass(kind, VitcnnError):
                    # An actor's creation error arrives as text: rebuild our typed error.
                    raise kind(ours.group(2)) from None
                raise ClusterError(f"a worker failed to start: {line}") from e
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    return actors


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Run an extraction job to completion and return its summary.

    Examples
    --------
    >>> spec = ModelSpec("resnet18")
    >>> cfg = ExtractConfig(spec, "builtin:faces", "acts.zarr", "r18")  # doctest: +SKIP
    >>> print(extract(cfg))  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    template = plan_extraction(cfg)
    create = check_run(cfg, template)
    n_images = len(template.plan.images)
    n_units = -(-n_images // cfg.chunk_size)
    summary = ExtractSummary(cfg.run, cfg.store, n_images, n_units, 0, 0, {}, 0.0)
    units = _units_to_write(cfg, create, n_units)
    if units:
        started = connect(cfg.address)
        try:
            check_resources(cfg.workers, cfg.cpus_per_worker, cfg.gpus_per_worker)
            actors = _start_workers(cfg, template, min(cfg.workers, len(units)))
            try:
                if create:  # the job is certain to start: only now replace anything
                    create_run_from(cfg, template)
                _drive(cfg, RunWriter(cfg.store, cfg.run), actors, summary, units)
            finally:
                import ray

                for actor in actors:
                    ray.kill(actor)
        finally:
            disconnect(started)
    consolidate(cfg.store)
    from vitcnn_store.store import open_store

    summary.failed = open_store(cfg.store)[cfg.run].failed
    summary.seconds = time.perf_counter() - t0
    return summary


def _settle(refs: list[Any], timeout: float = 10.0) -> None:
    """Let units in flight finish or fail before the actors are killed.

    Killing an actor with a unit in flight makes Ray print a retry notice; a
    failed job should end with its own one-line error only.
    """
    import ray

    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref)  # queued units never start
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout)


def _drive(cfg: ExtractConfig, writer: RunWriter, actors: list[Any], summary: ExtractSummary,
           units: list[int]) -> None:  # fmt: skip
    import ray
    from tqdm.auto import tqdm

    keeper = LeaseKeeper(cfg.store, cfg.run, cfg.lease_ttl)
    released = False
    try:
        queue = list(units)
        in_flight: dict[Any, Any] = {}
        total = sum(writer.units[u][1] - writer.units[u][0] for u in queue)
        bar = tqdm(total=total, unit="img", desc=f"extract {cfg.run}", disable=not cfg.progress,
                   file=sys.stderr, dynamic_ncols=True)  # fmt: skip
        try:
            summary.nodes = sorted({n for n, _ in ray.get([a.ready.remote() for a in actors])})
            for actor in actors:
                for _ in range(IN_FLIGHT_PER_ACTOR):
                    if queue:
                        in_flight[actor.run_unit.remote(queue.pop(0))] = actor
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                actor = in_flight.pop(ready[0])
                try:
                    _unit, n, _secs = ray.get(ready[0])
                except Exception as e:
                    _settle(list(in_flight))
                    raise unwrap(e, cfg.store) from None
                summary.units_written += 1
                summary.images_written += n
                bar.update(n)
                keeper.check()
                if queue:
                    in_flight[actor.run_unit.remote(queue.pop(0))] = actor
        finally:
            bar.close()
    except VitcnnError as e:
        released = keeper.release()
        if not released:  # e.g. the disk is full: the lease lapses on its own
            raise type(e)(
                f"{e}; the run's lease could not be dropped, so --resume can take over "
                f"after {keeper.lease.expires_at}"
            ) from e
        raise
    finally:
        if not released:
            keeper.release()
