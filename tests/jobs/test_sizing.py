"""Auto sizing: in this process or on Ray, how many actors, how many threads."""

from __future__ import annotations

import os

import pytest

from jobs.sizing import (
    MAX_THREADS,
    NodeResources,
    Resources,
    cluster_resources,
    local_resources,
    size_job,
)
from vitcnn_store.errors import UsageError

AUTO = "auto"


def size(workers="auto", cpus="auto", gpus="auto", device="auto", *, res, address=None):  # type: ignore[no-untyped-def]
    return size_job(workers, cpus, gpus, device, res, address)


def test_local_machine_without_address_runs_in_process_on_every_cpu() -> None:
    plan = size(res=Resources(cpus=2))
    assert (plan.mode, plan.workers, plan.threads, plan.device) == ("in-process", 0, 2, "cpu")
    assert plan.describe() == (
        "in this process: 2 torch threads + 1 decode and 1 write thread, cpu (no cluster address)"
    )
    assert size(res=Resources(cpus=64)).threads == 64


def test_one_gpu_runs_in_process_on_it_with_the_cpus_decoding() -> None:
    plan = size(res=Resources(cpus=16, gpus=1))
    assert (plan.mode, plan.device, plan.threads) == ("in-process", "cuda", 2)
    assert (plan.decode_threads, plan.write_threads) == (14, 4)


def test_cpus_per_worker_sets_the_threads_in_process() -> None:
    assert size(cpus=1.0, res=Resources(cpus=8)).threads == 1


def test_several_local_gpus_get_one_actor_each() -> None:
    plan = size(res=Resources(cpus=16, gpus=4))
    assert (plan.mode, plan.workers, plan.gpus_per_worker, plan.cpus_per_worker) == (
        "ray",
        4,
        1.0,
        4.0,
    )
    assert plan.device == "cuda" and "one actor per GPU of 4" in plan.describe()


def test_explicit_workers_mean_ray_with_the_cpus_shared() -> None:
    plan = size(workers=3, res=Resources(cpus=8))
    assert (plan.mode, plan.workers, plan.cpus_per_worker, plan.threads) == ("ray", 3, 2.0, 2)
    assert size(workers=4, cpus=1.5, res=Resources(cpus=8)).cpus_per_worker == 1.5
    assert size(workers=5, res=Resources(cpus=2)).cpus_per_worker == 1.0  # never below one


def test_workers_zero_is_in_process_even_with_an_address() -> None:
    plan = size(workers=0, res=Resources(cpus=4), address="ray://head:10001")
    assert plan.mode == "in-process" and plan.reason == "--workers 0"


def test_cpu_cluster_is_covered_by_actors_of_bounded_width() -> None:
    nodes = (NodeResources(64), NodeResources(8))
    plan = size(res=Resources(cpus=72, nodes=nodes), address="head:6379")
    # One width for every actor (the smallest node, at most MAX_THREADS): 8 + 1 actors.
    assert (plan.mode, plan.workers) == ("ray", 9)
    assert plan.cpus_per_worker == 8.0 and plan.threads == 8 <= MAX_THREADS


def test_gpu_cluster_gets_one_actor_per_gpu() -> None:
    nodes = (NodeResources(16, 2), NodeResources(16, 2), NodeResources(4, 0))
    plan = size(res=Resources(cpus=36, gpus=4, nodes=nodes), address="head:6379")
    assert (plan.workers, plan.gpus_per_worker, plan.cpus_per_worker, plan.device) == (
        4,
        1.0,
        8.0,
        "cuda",
    )


def test_impossible_plans_are_refused() -> None:
    with pytest.raises(UsageError, match="--device cuda: this machine has no CUDA device"):
        size(device="cuda", res=Resources(cpus=2))
    with pytest.raises(UsageError, match="no node with 1 GPU"):
        size(gpus=1.0, res=Resources(cpus=2))
    with pytest.raises(UsageError, match="--device cuda needs --gpus-per-worker"):
        size(workers=2, gpus=0.0, device="cuda", res=Resources(cpus=2))


def test_cluster_resources_from_ray_nodes() -> None:
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
        {"Alive": False, "Resources": {"CPU": 8.0}},
        {"Alive": True, "Resources": {"CPU": 4.0}},
    ]
    res = cluster_resources(nodes)
    assert (res.cpus, res.gpus, len(res.nodes)) == (12.0, 1.0, 2)


def test_local_resources_are_this_process_cpus() -> None:
    res = local_resources()
    assert res.cpus == len(os.sched_getaffinity(0)) and res.gpus >= 0
