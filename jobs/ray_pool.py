"""Run a job's units on Ray actors: start the pool, hand out units, collect results.

The driver puts its model and the workers' plan into the object store once;
every actor is created empty and then loaded from that one copy (no actor
rebuilds or rehashes the model). The driver holds both references until the
job ends, so an actor that Ray restarts after a crash is simply loaded again
when it answers :class:`~jobs.worker.NotLoadedError`, and its unit handed out
again. Each actor holds at most two units at a time, so its write overlaps its
next forward.

A new actor costs seconds (a Ray worker process that imports torch and timm),
so the actors of a job that ended without error are *parked*: they drop the
job's model and plan and wait, holding their CPUs/GPUs, for the next job of
this driver (a notebook, ``vitcnn demo``, the test suite: job after job on one
Ray connection). A job takes parked actors created with its own options
(:class:`ActorOptions`) and kills every other parked actor before it creates
its own, so it never waits on idle actors of its own driver. Parked actors die
after :data:`IDLE_SECONDS` without a job (so another driver never waits long
for their resources), when Ray is disconnected (:func:`jobs.ray_cluster.disconnect`),
at interpreter exit, or at once with :func:`release_idle_actors`. Actors of a
failed or refused job, and actors Ray restarted during a job, are never parked.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobs.ray_cluster import on_disconnect, passthrough_env, unwrap
from jobs.sizing import ExecutionPlan
from jobs.worker import ExtractionPlan, NotLoadedError, make_actor_class
from vitcnn_store import errors
from vitcnn_store.errors import ClusterError, VitcnnError

__all__ = [
    "IDLE_SECONDS",
    "IN_FLIGHT_PER_ACTOR",
    "READY_TIMEOUT",
    "ActorOptions",
    "Pool",
    "drive",
    "parked_actors",
    "release_idle_actors",
    "start_actors",
    "stop_actors",
]

IN_FLIGHT_PER_ACTOR = 2  # one unit writing while the next one runs forward
MAX_RESTARTS = 2  # per actor, after a crash (Ray restarts it; the driver reloads it)
#: Seconds to wait for every worker to load its model before giving up.
READY_TIMEOUT = 600.0
#: Seconds a parked actor waits for the next job of its driver before it is killed.
IDLE_SECONDS = 15.0
#: Seconds to wait for an actor to drop its job's model when it is parked.
UNLOAD_TIMEOUT = 30.0


@dataclass(frozen=True)
class ActorOptions:
    """What an actor is created with: only an actor created alike is reused."""

    num_cpus: float
    num_gpus: float
    #: Credentials and endpoints passed through (never shown).
    env: tuple[tuple[str, str], ...] = field(repr=False)
    max_concurrency: int = IN_FLIGHT_PER_ACTOR
    max_restarts: int = MAX_RESTARTS

    @classmethod
    def of(cls, sizing: ExecutionPlan) -> ActorOptions:
        """The options of a job sized as ``sizing``, in this driver's environment now."""
        env = tuple(sorted(passthrough_env().items()))
        return cls(sizing.cpus_per_worker, sizing.gpus_per_worker, env)

    def ray_options(self) -> dict[str, Any]:
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "max_concurrency": self.max_concurrency,
            "max_restarts": self.max_restarts,
            # A retried unit rewrites the same chunks: idempotent.
            "max_task_retries": self.max_restarts,
            "runtime_env": {"env_vars": dict(self.env)},
        }


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
    #: (plan, model) in the object store, sizing, and the job's token (see ``load``).
    objects: tuple[Any, ...] = field(default=())
    nodes: list[str] = field(default_factory=list)
    options: ActorOptions | None = None
    #: The process of each actor (by ``id()``) as the job found it: one that Ray
    #: restarted during the job has another, and is never parked.
    pids: dict[int, int] = field(default_factory=dict)

    def reload(self, actor: Any) -> None:
        """Load a restarted actor again (a no-op for one that holds the model)."""
        import ray

        ray.get(actor.load.remote(*self.objects))


def _connection() -> tuple[str, str, str] | None:
    """This driver's Ray connection (``None``: none, or one that cannot say which it
    is): a parked actor serves only the connection it was created on, not one made
    after ``ray.shutdown`` (a new cluster has another node, a new driver another job)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        ctx = ray.get_runtime_context()
        return (str(ctx.gcs_address), str(ctx.get_job_id()), str(ctx.get_node_id()))
    except Exception:  # e.g. a Ray Client connection: nothing is parked
        return None


@dataclass(eq=False)
class _Parked:
    actor: Any
    options: ActorOptions
    connection: tuple[str, str, str] | None


class _Park:
    """Idle actors of this driver, each taken by one job at most."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Parked] = []
        self._exit_hook = False

    def put(self, actors: Sequence[Any], options: ActorOptions, idle_seconds: float) -> None:
        entries = [_Parked(a, options, _connection()) for a in actors]
        with self._lock:
            self._idle += entries
            if not self._exit_hook:
                # Registered after Ray's own exit hook, so it runs first, while connected.
                atexit.register(release_idle_actors)
                self._exit_hook = True
        timer = threading.Timer(idle_seconds, self._expire, args=(entries,))
        timer.daemon = True  # never keeps the interpreter alive
        timer.start()

    def take(self, options: ActorOptions, n: int) -> list[Any]:
        """Up to ``n`` parked actors created with ``options``; every parked actor of
        other options is killed first, so that the job can have their resources."""
        now = _connection()
        with self._lock:
            # An actor parked on an earlier connection died with it: dropped, not used.
            current = [p for p in self._idle if p.connection == now]
            same = [p for p in current if p.options == options]
            other = [p for p in current if p.options != options]
            taken, self._idle = same[:n], same[n:]
        _kill([p.actor for p in other])
        return [p.actor for p in taken]

    def _expire(self, entries: list[_Parked]) -> None:
        with self._lock:
            left = [p for p in self._idle if p not in entries]
            gone, self._idle = [p for p in self._idle if p in entries], left
        _kill_parked(gone)

    def release(self) -> int:
        with self._lock:
            gone, self._idle = self._idle, []
        _kill_parked(gone)
        return len(gone)

    def actors(self) -> list[Any]:
        with self._lock:
            return [p.actor for p in self._idle]


def _kill(actors: Sequence[Any]) -> None:
    import ray

    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)


def _kill_parked(entries: Sequence[_Parked]) -> None:
    """Kill parked actors of the connection now open (those of a closed one are gone)."""
    if entries:
        now = _connection()
        _kill([p.actor for p in entries if now is not None and p.connection == now])


_PARK = _Park()


def release_idle_actors() -> int:
    """Kill every parked actor of this driver now; returns how many there were.

    For a caller that needs the cluster's CPUs/GPUs free at once (another driver
    is about to ask for them) rather than after :data:`IDLE_SECONDS`.
    """
    return _PARK.release()


def parked_actors() -> list[Any]:
    """The actors of this driver parked for its next job (Ray actor handles)."""
    return _PARK.actors()


on_disconnect(release_idle_actors)


def _load(pool: Pool, actors: Sequence[Any], reused: Sequence[Any], url: str) -> list[Any]:
    """Load ``actors`` with the pool's job, noting their nodes and processes; returns
    those of ``reused`` that died while parked (killed here), for new ones to replace."""
    import ray
    from ray.exceptions import RayActorError

    refs = {actor.load.remote(*pool.objects): actor for actor in actors}
    done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=READY_TIMEOUT)
    if pending:
        raise ClusterError(
            f"{len(pending)} of {len(pool.actors)} worker(s) did not start within "
            f"{READY_TIMEOUT:.0f} s: the cluster has no node with the CPUs/GPUs one worker asks for"
        )
    lost = []
    for ref in done:
        try:
            node, pid = ray.get(ref)
        except Exception as e:
            if isinstance(e, RayActorError) and any(refs[ref] is a for a in reused):
                lost.append(refs[ref])
                continue
            raise _startup_error(e, url) from None
        else:
            pool.nodes.append(node)
            pool.pids[id(refs[ref])] = pid
    _kill(lost)
    return lost


def start_actors(plan: ExtractionPlan, model: Any, sizing: ExecutionPlan, n: int) -> Pool:
    """Start ``n`` actors, parked ones of this driver first, and wait until each has
    loaded the driver's model."""
    import ray

    options = ActorOptions.of(sizing)
    actor_cls = make_actor_class().options(**options.ray_options())
    # One copy of the plan and the model for every actor, and for restarts; the sizing
    # (device, threads) is small and goes as it is; the token names this job.
    objects = (ray.put(plan), ray.put(model), sizing, uuid.uuid4().hex)
    reused = _PARK.take(options, n)
    fresh = [actor_cls.remote() for _ in range(n - len(reused))]
    pool = Pool([*reused, *fresh], objects, options=options)
    try:
        lost = _load(pool, pool.actors, reused, plan.url)
        if lost:  # killed while parked, beyond Ray's restarts: new actors instead
            pool.actors = [a for a in pool.actors if not any(a is b for b in lost)]
            fresh = [actor_cls.remote() for _ in lost]
            pool.actors += fresh
            _load(pool, fresh, (), plan.url)
    except BaseException:
        stop_actors(pool)
        raise
    return pool


def stop_actors(pool: Pool, park: bool = False) -> None:
    """Kill the pool's actors, or with ``park`` (the job ended without error) park
    those Ray did not restart during the job, for the driver's next job."""
    import ray

    if not (park and pool.options is not None and _connection()):
        _kill(pool.actors)
        return
    keep = pool.actors
    # Each drops the job's model before it waits: a parked actor holds no memory of it.
    refs = {a.unload.remote(): a for a in keep}
    done, _late = ray.wait(list(refs), num_returns=len(refs), timeout=UNLOAD_TIMEOUT)
    unloaded = []
    for ref in done:
        with contextlib.suppress(Exception):
            if ray.get(ref) == pool.pids.get(id(refs[ref])):  # the process the job loaded
                unloaded.append(refs[ref])
    _kill([a for a in keep if not any(a is u for u in unloaded)])
    if unloaded:
        assert pool.options is not None
        _PARK.put(unloaded, pool.options, IDLE_SECONDS)


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
