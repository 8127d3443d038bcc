"""Two real jobs on one run at once: one winner, one one-line refusal, a run that verifies.

Two processes (in-process extraction, a tiny ViT) race on a store that already
holds data, released together by a cue file, over several trials: two
``--overwrite`` of one run, and two fresh extracts to one new run. The loser
must be refused with one line naming the holder (or saying the run changed
under it), never crash, and never leave a run created without ``done``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import TINY_VIT, extract_tiny
from vitcnn_store import open_store
from vitcnn_store.cli import main

TINY = [
    str(TINY_VIT["name"]),
    "--img-size",
    "32",
    "--model-arg",
    "depth=2",
    "--images",
    "builtin:faces",
    "--limit",
    "24",
    "--chunk-size",
    "8",
    "--no-progress",
]
REFUSALS = ("is being written by", "was changed by another job", "exists in")


def _wait(predicate: Callable[[], bool], timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out waiting for the racing jobs"
        time.sleep(0.05)


def test_two_jobs_on_one_run_give_one_winner(tmp_path: Path) -> None:
    store = tmp_path / "acts.zarr"
    extract_tiny(store, "v", limit=24, chunk_size=8)
    extract_tiny(store, "other", limit=16, chunk_size=8)
    other = open_store(str(store))["other"]["blocks.1"].values
    trials = [
        ("overwrite-1", ["extract", *TINY, "--store", str(store), "--run", "v", "--overwrite"]),
        ("overwrite-2", ["extract", *TINY, "--store", str(store), "--run", "v", "--overwrite"]),
        ("fresh-1", ["extract", *TINY, "--store", str(store), "--run", "new1"]),
        ("fresh-2", ["extract", *TINY, "--store", str(store), "--run", "new2"]),
    ]
    cues = tmp_path / "cues"
    cues.mkdir()
    (cues / "trials.tsv").write_text("\n".join("\t".join([t, *a]) for t, a in trials))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.jobs.concurrent_job", str(cues), name],
            env=env,
            stderr=subprocess.PIPE,
        )
        for name in ("a", "b")
    ]
    try:
        _wait(lambda: all((cues / f"ready-{n}").exists() for n in "ab"))
        for trial, args in trials:
            (cues / f"go-{trial}").touch()
            _wait(lambda t=trial: all((cues / f"{t}-{n}.json").exists() for n in "ab"))
            outcomes = [json.loads((cues / f"{trial}-{n}.json").read_text()) for n in "ab"]
            codes = sorted(o["code"] for o in outcomes)
            assert codes == [0, 2], (trial, outcomes)
            loser = next(o for o in outcomes if o["code"] == 2)["stderr"].strip()
            assert len(loser.splitlines()) == 1 and "Traceback" not in loser, loser
            assert any(r in loser for r in REFUSALS), loser
            run = args[args.index("--run") + 1]
            assert open_store(str(store))[run].complete
            assert main(["verify", str(store), "--no-progress"]) == 0, trial
    except BaseException:
        for job in jobs:
            job.kill()
        raise
    finally:
        for job in jobs:
            job.wait(timeout=120)
    for job in jobs:
        assert job.returncode == 0, job.stderr.read() if job.stderr else ""
    # The run nobody touched is as it was.
    assert (open_store(str(store))["other"]["blocks.1"].values == other).all()


@pytest.mark.parametrize("fresh", [False, True])
def test_refused_job_writes_nothing_while_a_lease_is_held(
    tmp_path: Path, fresh: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.jobs.test_refusal import snapshot
    from vitcnn_store.store.lease import acquire_lease

    store = tmp_path / "acts.zarr"
    extract_tiny(store, "v", limit=16, chunk_size=8)
    run = "new" if fresh else "v"
    acquire_lease(str(store), run, "job-holder", ttl=300)
    before = snapshot(store)
    flags = [] if fresh else ["--overwrite"]
    assert main(["extract", *TINY, "--store", str(store), "--run", run, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"run {run!r} is being written by job-holder" in err
    assert snapshot(store) == before


def test_a_run_taken_between_the_checks_is_refused_naming_its_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The race the two-job test meets now and then, made to happen every time.

    Another job takes the lease and starts creating the run right after this job's
    lease check: the half-made run must not be reported as broken (inviting
    ``--overwrite``) but its holder named, and this job must write nothing.
    """
    import zarr

    from jobs import run_setup
    from tests.jobs.test_refusal import snapshot
    from vitcnn_store.store.lease import acquire_lease

    store = tmp_path / "acts.zarr"
    extract_tiny(store, "v", limit=16, chunk_size=8)
    real_check = run_setup.check_not_leased
    after_other_job: dict[str, object] = {}

    def then_another_job_starts(url: str, run: str, owner: str | None = None) -> None:
        real_check(url, run, owner)
        if not after_other_job:  # the other job: its lease, then its run being created
            acquire_lease(url, run, "job-holder", ttl=300)
            zarr.open_group(url, mode="r+").create_group(run)
            after_other_job["store"] = snapshot(store)

    monkeypatch.setattr(run_setup, "check_not_leased", then_another_job_starts)
    assert main(["extract", *TINY, "--store", str(store), "--run", "new"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run 'new' is being written by job-holder" in err, err
    assert snapshot(store) == after_other_job["store"]
