"""Actors outlive a job that ended well: the driver's next job reuses them, nothing else does.

Every test starts from an empty park (:func:`release_idle_actors`) on the session's
two-CPU Ray cluster, and looks at actors through their handles: ``unload`` on a
parked actor is a no-op that returns its process id, and raises for a dead one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from ray.exceptions import RayActorError

from jobs import ray_pool
from jobs.ray_pool import ActorOptions, parked_actors, release_idle_actors
from jobs.sizing import ExecutionPlan
from tests.conftest import extract_tiny
from tests.helpers import assert_runs_identical

# A job's worth of actors: 16 images in two units.
SMALL: dict[str, object] = {"limit": 16, "chunk_size": 8}


@pytest.fixture
def empty_park(ray_cluster: None) -> Iterator[None]:
    release_idle_actors()
    wait_for(lambda: ray.available_resources().get("CPU", 0) == 2)
    yield
    release_idle_actors()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def pids(actors: list[Any]) -> set[int]:
    return set(ray.get([a.unload.remote() for a in actors], timeout=60))


def is_dead(actor: Any) -> bool:
    try:
        ray.get(actor.unload.remote(), timeout=60)
    except RayActorError:
        return True
    return False


@pytest.mark.usefixtures("empty_park")
def test_the_next_job_reuses_the_actors_other_options_kill_them_idle_ones_die(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parked actors hold their CPUs and would outlive this test: a job that waited for
    # them would fail after READY_TIMEOUT instead of succeeding.
    monkeypatch.setattr(ray_pool, "IDLE_SECONDS", 600.0)
    monkeypatch.setattr(ray_pool, "READY_TIMEOUT", 60.0)
    url = str(tmp_path / "acts.zarr")
    extract_tiny(url, "vit", workers=2, cpus_per_worker=1, **SMALL)
    first = parked_actors()
    assert len(first) == 2
    assert ray.available_resources().get("CPU", 0) == 0, "parked actors hold their CPUs"
    before = pids(first)
    # Another model on the same actors: `load` replaces what the last job left.
    extract_tiny(url, "resnet", "resnet", workers=2, cpus_per_worker=1, **SMALL)
    assert pids(parked_actors()) == before
    # A job whose actors are made otherwise kills the parked ones before it starts its own.
    monkeypatch.setattr(ray_pool, "IDLE_SECONDS", 0.5)
    extract_tiny(url, "wide", "resnet", workers=1, cpus_per_worker=2, **SMALL)
    assert all(is_dead(a) for a in first)
    # Its actor was parked with the idle time now in force: without the timer it would
    # hold both CPUs until released.
    wait_for(lambda: ray.available_resources().get("CPU", 0) == 2, timeout=10.0)
    assert parked_actors() == [] and release_idle_actors() == 0
    # The reused actors wrote what a job in this process writes (as new actors do:
    # tests/jobs/test_extract.py).
    extract_tiny(url, "here", "resnet", workers=0, **SMALL)
    assert_runs_identical(url, "resnet", url, "here")
    assert_runs_identical(url, "wide", url, "here")


def test_release_kills_parked_actors_at_once(ray_cluster: None, tmp_path: Path) -> None:
    url = str(tmp_path / "acts.zarr")
    release_idle_actors()
    extract_tiny(url, "vit", workers=1, cpus_per_worker=2, **SMALL)
    parked = parked_actors()
    assert len(parked) == 1
    assert release_idle_actors() == 1
    assert parked_actors() == []
    # ray.kill only asks the cluster: a call sent right after may still reach the process.
    # Dead within seconds, not after the session's SESSION_IDLE_SECONDS.
    wait_for(lambda: is_dead(parked[0]), timeout=10.0)


class FailsOnWorkers(torch.nn.Module):
    """Runs in the driver (the job's template) and fails in any other process."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.pid = os.getpid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.getpid() != self.pid:
            raise RuntimeError("this model runs only on the driver")
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.usefixtures("empty_park")
def test_a_failed_jobs_actors_are_killed_not_parked(tmp_path: Path) -> None:
    import vitcnn_store

    url = str(tmp_path / "acts.zarr")
    extract_tiny(url, "vit", workers=1, cpus_per_worker=2, **SMALL)
    (parked,) = parked_actors()
    with pytest.raises(Exception, match="runs only on the driver"):
        vitcnn_store.extract(
            FailsOnWorkers(),
            "builtin:faces",
            url,
            "bad",
            layers="fc",
            workers=1,
            cpus_per_worker=2,
            progress=False,
            data_config={"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3},
            **SMALL,
        )
    assert parked_actors() == []
    # The failed job took the parked actor and killed it (ray.kill: dead within seconds).
    wait_for(lambda: is_dead(parked), timeout=10.0)


def test_only_actors_created_alike_are_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    sizing = ExecutionPlan("ray", 2, 1, 1.0, 0.0, "cpu", "--workers 2")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    plain = ActorOptions.of(sizing)
    assert plain == ActorOptions.of(sizing)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-account")
    with_key = ActorOptions.of(sizing)
    assert with_key != plain and "another-account" not in repr(with_key)
    assert with_key.ray_options()["runtime_env"]["env_vars"]["AWS_ACCESS_KEY_ID"]
    wider = ExecutionPlan("ray", 1, 2, 2.0, 0.0, "cpu", "--workers 1")
    assert ActorOptions.of(wider) != with_key
