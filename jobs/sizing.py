"""How big a job is and how it uses the machine, decided before its plan is made.

:func:`shape_job` gives its size: images, images per unit, units.
:func:`size_job` gives where it runs: in this process or on Ray actors, with how
many threads, on which device (the job's one decision of its device).

``--workers auto`` and ``--cpus-per-worker auto`` are decided here, from what
was asked and what there is (:class:`Resources`):

- **No cluster address** (neither ``--address`` nor ``RAY_ADDRESS``) and at
  most one GPU: the job runs **in this process**. On the CPU: the forward on
  every CPU (torch threads), decoding on one helper thread and writing on
  another. On a GPU: two torch threads, the other CPUs decoding (a GPU forward
  outruns one decoding thread many times over), and :data:`GPU_WRITE_THREADS`
  units written at once.
  Starting Ray costs seconds (a 16-image job would spend most of its time
  there) and its actors add nothing a single process cannot do on one machine.
- **Several local GPUs**: a local Ray with **one actor per GPU**, the CPUs
  shared among them.
- **A cluster address**: Ray actors sized from the cluster's resources: one
  per GPU where there are GPUs; otherwise on each node actors of at most
  :data:`MAX_THREADS` threads that together cover the node's CPUs.
- ``--workers N`` (N ≥ 1) always means Ray with N actors (a local Ray when
  there is no address), each with ``--cpus-per-worker`` CPUs (auto: the CPUs
  divided among them); ``--workers 0`` always means this process.

The job prints :meth:`ExecutionPlan.describe` as one line before it starts.

Examples
--------
>>> size_job("auto", "auto", "auto", "auto", Resources(cpus=8, gpus=0), address=None).describe()
'in this process: 8 torch threads + 1 decode and 1 write thread, cpu (no cluster address)'
>>> size_job(3, "auto", "auto", "auto", Resources(cpus=8, gpus=0), address=None).workers
3
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from vitcnn_store.errors import UsageError
from vitcnn_store.options import AUTO

__all__ = [
    "MAX_THREADS",
    "ExecutionPlan",
    "JobShape",
    "NodeResources",
    "Resources",
    "local_resources",
    "shape_job",
    "size_job",
]

#: Torch threads per actor on CPU clusters: intra-op scaling flattens beyond this,
#: so a big node runs several actors instead of one wide one.
MAX_THREADS = 16
#: Units written at once next to a GPU forward (each unit's arrays in turn).
GPU_WRITE_THREADS = 4
#: Torch threads of a GPU forward in process (kernel launches and host copies).
GPU_TORCH_THREADS = 2


@dataclass(frozen=True, kw_only=True)
class JobShape:
    """How much work a job is: its images, cut into units of ``chunk_size`` images."""

    n_images: int
    #: Images per chunk (= work unit): ``--chunk-size``, capped at the number of images.
    chunk_size: int

    @property
    def n_units(self) -> int:
        return -(-self.n_images // self.chunk_size)


def shape_job(n_images: int, chunk_size: int) -> JobShape:
    """The shape of a job over ``n_images`` images with ``--chunk-size chunk_size``.

    Examples
    --------
    >>> shape = shape_job(20, 32)
    >>> shape.chunk_size, shape.n_units
    (20, 1)
    """
    # A chunk longer than the set would be allocated, and stored, at its full length.
    return JobShape(n_images=n_images, chunk_size=min(chunk_size, n_images))


@dataclass(frozen=True)
class NodeResources:
    """CPUs and GPUs of one Ray node."""

    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class Resources:
    """What there is: this machine's CPUs/GPUs, or a cluster's nodes."""

    cpus: float
    gpus: float = 0.0
    nodes: tuple[NodeResources, ...] = field(default=())

    def per_node(self) -> tuple[NodeResources, ...]:
        return self.nodes or (NodeResources(self.cpus, self.gpus),)


@dataclass(frozen=True)
class ExecutionPlan:
    """The decided shape of a job."""

    mode: str  # "in-process" or "ray"
    workers: int  # Ray actors (0 in process)
    threads: int  # torch threads of the forward (per actor on Ray)
    cpus_per_worker: float
    gpus_per_worker: float
    device: str
    reason: str
    decode_threads: int = 1  # per worker (in process: the decode stage)
    write_threads: int = 1  # in process: units written at once

    @property
    def on_ray(self) -> bool:
        return self.mode == "ray"

    def describe(self) -> str:
        """One line: where the job runs, with how many threads, on which device, and why."""
        if not self.on_ray:
            return (
                f"in this process: {self.threads} torch thread{'s' * (self.threads != 1)} + "
                f"{self.decode_threads} decode and {self.write_threads} write "
                f"thread{'s' * (self.write_threads != 1)}, {self.device} ({self.reason})"
            )
        gpus = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return (
            f"Ray: {self.workers} actor{'s' * (self.workers != 1)} × "
            f"{self.cpus_per_worker:g} CPU{gpus} ({self.threads} torch threads each), "
            f"{self.device} ({self.reason})"
        )


def local_resources() -> Resources:
    """CPUs this process may use (its affinity) and the CUDA devices torch sees."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - a broken CUDA install counts as none
        gpus = 0
    return Resources(cpus=float(cpus), gpus=float(gpus))


def _device(requested: str, gpus: float) -> str:
    if requested != AUTO:
        return requested
    return "cuda" if gpus > 0 else "cpu"


def _threads(cpus: float) -> int:
    return max(1, int(cpus))


def _cluster_pool(res: Resources, cpus: float | str, gpus: float | str) -> tuple[int, float, float]:
    """Actors × CPUs × GPUs covering a cluster (or several local GPUs).

    With GPUs: one actor per ``gpus`` GPUs on every node, the node's CPUs shared
    among its actors. Without: one actor width for the whole cluster (at most
    :data:`MAX_THREADS`, at most the smallest node), as many actors per node as fit.
    """
    nodes = [n for n in res.per_node() if n.cpus >= 1 or n.gpus > 0]
    if not nodes:
        raise UsageError("the Ray cluster has no CPUs: add a worker node")
    if gpus == AUTO:
        gpus = 1.0 if any(n.gpus >= 1 for n in nodes) else 0.0
    gpus = float(gpus)
    if gpus > 0:
        counts = [int(n.gpus // gpus) for n in nodes]
        shares = [n.cpus / c for n, c in zip(nodes, counts, strict=True) if c]
        if not shares:
            raise UsageError(
                f"the cluster has no node with {gpus:g} GPU(s) for one worker: "
                "lower --gpus-per-worker"
            )
        width = float(cpus) if cpus != AUTO else max(1.0, float(int(min(shares))))
        return sum(counts), width, gpus
    width = float(cpus) if cpus != AUTO else float(min(MAX_THREADS, *(int(n.cpus) for n in nodes)))
    width = max(width, 1.0) if cpus == AUTO else width
    workers = sum(max(1, int(n.cpus // width)) for n in nodes if n.cpus >= width) or 1
    return workers, width, 0.0


def size_job(
    workers: int | str,
    cpus_per_worker: float | str,
    gpus_per_worker: float | str,
    device: str,
    res: Resources,
    address: str | None,
) -> ExecutionPlan:
    """Decide in-process or Ray, the number of actors and their threads (see the module doc)."""
    if workers == 0 or (
        workers == AUTO and not address and res.gpus <= 1 and gpus_per_worker in (AUTO, 0)
    ):
        cpus = res.cpus if cpus_per_worker == AUTO else float(cpus_per_worker)
        dev = _device(device, res.gpus)
        if dev == "cuda" and res.gpus < 1:
            raise UsageError("--device cuda: this machine has no CUDA device")
        reason = "--workers 0" if workers == 0 else "no cluster address"
        if dev == "cuda":
            threads = min(GPU_TORCH_THREADS, _threads(cpus))
            decode = max(1, int(res.cpus) - threads)
            return ExecutionPlan(
                "in-process", 0, threads, cpus, 0.0, dev, reason, decode, GPU_WRITE_THREADS
            )
        return ExecutionPlan("in-process", 0, _threads(cpus), cpus, 0.0, dev, reason)
    if workers == AUTO:
        n, cpu, gpu = _cluster_pool(res, cpus_per_worker, gpus_per_worker)
        reason = f"sized from the cluster's {res.cpus:g} CPUs and {res.gpus:g} GPUs"
        if not address:
            reason = f"one actor per GPU of {res.gpus:g}" if gpu else reason
    else:
        n = int(workers)
        gpu = float(gpus_per_worker) if gpus_per_worker != AUTO else (1.0 if res.gpus >= n else 0.0)
        cpu = (
            float(cpus_per_worker)
            if cpus_per_worker != AUTO
            else max(1.0, float(int(res.cpus // n)))
        )
        reason = f"--workers {n}"
    dev = _device(device, gpu)
    if dev == "cuda" and gpu <= 0:
        # Ray hides every GPU from an actor that asked for none.
        raise UsageError("--device cuda needs --gpus-per-worker > 0 (e.g. 1)")
    # A GPU actor decodes on its CPUs while its GPU runs; a CPU actor keeps them for the
    # forward and decodes on one thread.
    decode = max(1, _threads(cpu) - 1) if dev == "cuda" else 1
    return ExecutionPlan("ray", n, _threads(cpu), cpu, gpu, dev, reason, decode)


def cluster_resources(nodes: Sequence[dict[str, object]]) -> Resources:
    """:class:`Resources` from ``ray.nodes()`` (alive nodes only)."""
    out = []
    for node in nodes:
        if not node.get("Alive", True):
            continue
        res = node.get("Resources") or {}
        assert isinstance(res, dict)
        out.append(NodeResources(float(res.get("CPU", 0)), float(res.get("GPU", 0))))
    return Resources(cpus=sum(n.cpus for n in out), gpus=sum(n.gpus for n in out), nodes=tuple(out))
