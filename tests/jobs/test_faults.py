"""Fault tolerance: killed actors, a killed driver, half-written units, run leases."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray

from jobs.extract import ExtractConfig, extract, plan_extraction, prepare_store
from jobs.ray_pool import release_idle_actors
from jobs.worker import UnitExtractor
from tests.conftest import TINY_VIT
from tests.helpers import assert_runs_identical
from vitcnn_store import open_store
from vitcnn_store.errors import RunLockedError
from vitcnn_store.store.lease import acquire_lease, current_lease, release_lease

# Every test here needs a 192-image extraction; the killed jobs need Ray as well.
pytestmark = pytest.mark.slow

# Enough small units that a job is still running when the test strikes.
JOB = {"images": "builtin:photos", "limit": 192, "chunk_size": 4, "layers": "preset:blocks"}


def config(url: str, run: str, **changes: object) -> ExtractConfig:
    from vitcnn_store.models import ModelSpec

    model = ModelSpec(TINY_VIT["name"], img_size=64, model_args=TINY_VIT["model_args"])
    options: dict[str, object] = {**JOB, "progress": False, **changes}
    return ExtractConfig(model=model, store=url, run=run, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("clean") / "acts.zarr")
    extract(config(url, "r"))
    return url


def n_done(url: str, run: str) -> int:
    try:
        return int(open_store(url)[run].done.sum())
    except Exception:
        return 0


def wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def actor_pids() -> list[int]:
    """Extraction actors of this process's Ray cluster (not another test process's)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("ExtractionActor" in part for part in p.cmdline()):
                found.append(p.pid)
    return found


@pytest.mark.usefixtures("ray_cluster")
def test_killed_actor_job_completes_identically(clean: str, tmp_path: Path) -> None:
    url = str(tmp_path / "acts.zarr")
    release_idle_actors()  # the job's actor is then the only one to strike
    result: dict[str, object] = {}
    # One Ray actor: killed, restarted by Ray, loaded again by the driver.
    job = threading.Thread(
        target=lambda: result.update(summary=extract(config(url, "r", workers=1)))
    )
    job.start()
    wait_for(lambda: n_done(url, "r") >= 2 and bool(actor_pids()))
    total = len(open_store(url)["r"].done)
    done_at_kill = n_done(url, "r")
    os.kill(actor_pids()[0], signal.SIGKILL)
    job.join(timeout=300)
    assert done_at_kill < total, "the job ended before the actor was killed"
    assert "summary" in result
    assert open_store(url)["r"].complete
    assert_runs_identical(url, "r", clean, "r")


@pytest.mark.usefixtures("ray_cluster")
def test_killed_driver_resume_completes_identically(clean: str, tmp_path: Path) -> None:
    url = str(tmp_path / "acts.zarr")
    address = ray.get_runtime_context().gcs_address
    release_idle_actors()  # the other driver's actors need the CPUs this one's idle ones hold
    argv = [
        sys.executable,
        "-m",
        "vitcnn_store.cli",
        "extract",
        TINY_VIT["name"],
        "--img-size",
        "64",
        "--model-arg",
        "depth=2",
        "--images",
        JOB["images"],
        "--limit",
        str(JOB["limit"]),
        "--chunk-size",
        str(JOB["chunk_size"]),
        "--layers",
        JOB["layers"],
        "--store",
        url,
        "--run",
        "r",
        "--address",
        address,
        "--workers",
        "1",  # what a dead driver leaves does not depend on its actors' number
        "--lease-ttl",
        "3",
        "--no-progress",
    ]
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: n_done(url, "r") >= 2 or driver.poll() is not None)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read() if driver.stderr else ""
    done_before = open_store(url)["r"].done
    assert not done_before.all()
    lease = current_lease(url, "r")  # the dead driver's lease is still there, unexpired,
    assert lease is not None and not lease.released  # but its process is gone on this host:
    assert lease.abandoned and lease.expired  # --resume takes over at once, not after the TTL
    summary = extract(config(url, "r", resume=True))
    assert summary.units_written == int((~done_before).sum())
    assert current_lease(url, "r") is None
    assert_runs_identical(url, "r", clean, "r")


def test_half_written_unit_is_never_done_and_is_rewritten(clean: str, tmp_path: Path) -> None:
    url = str(tmp_path / "acts.zarr")
    cfg = config(url, "r")
    template = plan_extraction(cfg)
    writer = prepare_store(cfg, template)
    UnitExtractor(template.plan, template.model).run_unit(0)
    # A writer that died mid-unit: one array's chunk written, one chunk file torn.
    start, stop = writer.units[1]
    writer._arrays["blocks.0/activation"][start:stop] = np.ones((stop - start, 17, 192))
    torn = Path(url) / "r" / "blocks.1" / "activation" / "c" / "1" / "0" / "0"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"\x02\x01garbage")
    run = open_store(url)["r"]
    assert list(run.done[:2]) == [True, False]
    assert not run.valid[start:stop].any()
    # Reads of finished units are unaffected by the leftovers.
    np.testing.assert_array_equal(
        run["blocks.1"].isel(image=slice(0, start)).values,
        open_store(clean)["r"]["blocks.1"].isel(image=slice(0, start)).values,
    )
    extract(config(url, "r", resume=True))
    assert_runs_identical(url, "r", clean, "r")


def test_live_lease_refuses_a_second_job(clean: str) -> None:
    from tests.jobs.test_refusal import snapshot

    # A long lease, so that a slow (shared) machine cannot let it lapse mid-test.
    acquire_lease(clean, "r", "job-other", ttl=300)
    before = snapshot(Path(clean))
    with pytest.raises(RunLockedError, match="job-other"):
        extract(config(clean, "r", resume=True))
    with pytest.raises(RunLockedError, match="job-other"):
        extract(config(clean, "r", overwrite=True))
    assert snapshot(Path(clean)) == before  # refused: not a byte changed
    release_lease(clean, "r", "job-other")
    acquire_lease(clean, "r", "job-other", ttl=0.5)  # a crashed job's lease ...
    time.sleep(1.0)  # ... now stale
    # Nothing left to do: the finished run is not touched, the stale lease stays expired.
    assert extract(config(clean, "r", resume=True)).units_written == 0
    lease = current_lease(clean, "r")
    assert lease is None or lease.expired
