"""Run a job's units on Ray actors: start the pool, hand out units, collect results.

The driver puts its model and the workers' plan into the object store once;
every actor is created empty and then loaded from that one copy (no actor
rebuilds or rehashes the model). The driver holds both references until the
job ends, so an actor that Ray restarts after a crash is simply loaded again
when it answers :class:`~jobs.worker.NotLoadedError`, and its unit handed out
again. Each actor holds at most two units at a time, so its write overlaps its
next forward.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.ray_cluster import passthrough_env, unwrap
from jobs.sizing import ExecutionPlan
from jobs.worker import ExtractionPlan, NotLoadedError, make_actor_class
from vitcnn_store import errors
from vitcnn_store.errors import ClusterError, VitcnnError

__all__ = ["IN_FLIGHT_PER_ACTOR", "READY_TIMEOUT", "Pool", "drive", "start_actors", "stop_actors"]

IN_FLIGHT_PER_ACTOR = 2  # one unit writing while the next one runs forward
MAX_RESTARTS = 2  # per actor, after a crash (Ray restarts it; the driver reloads it)
#: Seconds to wait for every worker to load its model before giving up.
READY_TIMEOUT = 600.0


def _last_error_line(e: BaseException) -> str:
    """The innermost ``SomeError: message`` line of a Ray error's text (its remote traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    found = [ln for ln in lines if re.match(r"^[A-Za-z_.]+(Error|Exception)\b.*:", ln)]
    if found:
        return found[-1][:300]
    return "its process died while loading the model (rerun with --debug to see its log)"


def _startup_error(e: BaseException, url: str) -> BaseException:
    cause = unwrap(e, url)
    if isinstance(cause, VitcnnError):
        return cause
    line = _last_error_line(e)
    ours = re.match(r"vitcnn_store\.errors\.(\w+): (.*)", line)
    kind = getattr(errors, ours.group(1), None) if ours else None
    if ours and isinstance(kind, type) and issubclass(kind, VitcnnError):
        # An actor's creation error arrives as text: rebuild our typed error.
        return kind(ours.group(2))
    return ClusterError(f"a worker failed to start: {line}")


@dataclass
class Pool:
    """Started actors, and the object references they were given (kept alive here)."""

    actors: list[Any]
    objects: tuple[Any, ...] = field(default=())  # (plan, model) in the object store, sizing
    nodes: list[str] = field(default_factory=list)

    def reload(self, actor: Any) -> None:
        """Load a restarted actor again (a no-op for one that holds the model)."""
        import ray

        ray.get(actor.load.remote(*self.objects))


def _get_all(refs: Sequence[Any], url: str) -> list[Any]:
    import ray

    out = []
    for ref in refs:
        try:
            out.append(ray.get(ref))
        except Exception as e:
            raise _startup_error(e, url) from None
    return out


def start_actors(plan: ExtractionPlan, model: Any, sizing: ExecutionPlan, n: int) -> Pool:
    """Start ``n`` actors and wait until each has loaded the driver's model."""
    import ray

    actor_cls = make_actor_class().options(
        num_cpus=sizing.cpus_per_worker,
        num_gpus=sizing.gpus_per_worker,
        max_concurrency=IN_FLIGHT_PER_ACTOR,
        max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_RESTARTS,  # a retried unit rewrites the same chunks: idempotent
        runtime_env={"env_vars": passthrough_env()},
    )
    # One copy of the plan and the model for every actor, and for restarts; the sizing
    # (device, threads) is small and goes as it is.
    objects = (ray.put(plan), ray.put(model), sizing)
    actors = [actor_cls.remote() for _ in range(n)]
    pool = Pool(actors, objects)
    try:
        refs = [a.load.remote(*objects) for a in actors]
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=READY_TIMEOUT)
        if pending:
            raise ClusterError(
                f"{len(pending)} of {n} worker(s) did not start within {READY_TIMEOUT:.0f} s: "
                "the cluster has no node with the CPUs/GPUs one worker asks for"
            )
        pool.nodes = [node for node, _ in _get_all(done, plan.url)]
    except BaseException:
        stop_actors(pool)
        raise
    return pool


def stop_actors(pool: Pool) -> None:
    import ray

    for actor in pool.actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)


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


def drive(
    pool: Pool,
    units: Sequence[int],
    url: str,
    on_written: Callable[[int, int], None],
    between: Callable[[], None],
) -> list[str]:
    """Hand ``units`` to the pool's actors until all are written; returns their nodes.

    ``on_written(unit, n_images)`` is called per finished unit and ``between()``
    after each (the job checks its lease there).
    """
    import ray

    queue = list(units)
    in_flight: dict[Any, tuple[Any, int]] = {}
    reloads = 0

    def submit(actor: Any) -> None:
        if queue:
            unit = queue.pop(0)
            in_flight[actor.run_unit.remote(unit)] = (actor, unit)

    for actor in pool.actors:
        for _ in range(IN_FLIGHT_PER_ACTOR):
            submit(actor)
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        actor, unit = in_flight.pop(ready[0])
        try:
            _unit, n, _secs = ray.get(ready[0])
        except Exception as e:
            restarted = isinstance(getattr(e, "cause", None), NotLoadedError)
            if not restarted or reloads > MAX_RESTARTS * len(pool.actors):
                _settle(list(in_flight))
                raise unwrap(e, url) from None
            # Ray restarted this actor after a crash: load it again and redo the unit.
            reloads += 1
            pool.reload(actor)
            queue.insert(0, unit)
        else:
            on_written(unit, n)
            between()
        submit(actor)
    return sorted(set(pool.nodes))
