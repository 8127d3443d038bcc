"""Analyses killed mid-write, and two analyses on one run at once (issue 16, hostile
cases 1 and 2), with real ``vitcnn analyze`` processes on a store that holds data.

A job is stopped at an exact point by a hook run in its own process: it SIGKILLs
itself (no cleanup, no ``finally``), or waits for the test to let it go on. The jobs
that follow it (reruns, refused rivals) run in the test's process: what they find is a
dead or another process's lock either way, and an interpreter costs a second or two.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.jobs.test_analyze_common import cli, copy_store, ids, make_run
from vitcnn_store import open_store
from vitcnn_store.interface.report import build_report
from vitcnn_store.store.analyses import list_results
from vitcnn_store.store.locks import analysis_lock, lock_holder
from vitcnn_store.store.verify import verify_store

ROOT = Path(__file__).resolve().parents[2]
CKA = ["--no-progress", "--no-figure", "--batch-size", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two runs of data and a first CKA result (other parameters) to keep; read-only."""
    url = str(tmp_path_factory.mktemp("crash") / "s.zarr")
    make_run(url, "vit", ids(32), depth=2, attention=False, inputs=False)
    make_run(url, "other", ids(32), depth=1, attention=False, inputs=False, seed=1)
    assert cli(["analyze", "cka", url, "vit", *CKA, "--seed", "1"]) == 0
    return url


@pytest.fixture()
def store(made: str, tmp_path: Path) -> str:
    """A private copy of :func:`made` (built once: its analysis takes seconds)."""
    return copy_store(made, tmp_path / "s.zarr")


def snapshot(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def analyze(url: str, *args: str, hook: str = "") -> subprocess.Popen[str]:
    """``vitcnn analyze cka URL vit ...`` in a new process, ``hook`` run first."""
    code = textwrap.dedent(hook) + (
        "\nimport sys\nfrom vitcnn_store.cli import main\n"
        f"sys.exit(main(['analyze', 'cka', {url!r}, 'vit', *{[*CKA, *args]!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# SIGKILL the process at a function of ours: after what it wrote, before what follows.
KILL_AT = """
import os, signal, importlib
module, name = {where!r}.rsplit(".", 1)
mod = importlib.import_module(module)
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(mod, name, killed)
"""
# After every array of the result is written, before its commit marker (the result is
# built in memory; the marker is the one object written with ``complete: true``).
KILL_RESULT = """
import os, signal
import vitcnn_store.store.result_write as w
put = w._put
def put_unless_marker(url, objects):
    if any(b'"vitcnn_store.complete": true' in data for data in objects.values()):
        os.kill(os.getpid(), signal.SIGKILL)
    put(url, objects)
w._put = put_unless_marker
"""


def test_killed_while_writing_result_never_reused(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Killed after every array of the result is written, before its commit marker.
    job = analyze(store, hook=KILL_RESULT)
    assert job.wait(timeout=300) == -9, job.stderr.read() if job.stderr else ""
    (earlier,) = [r for r in list_results(open_store(store), "vit", "cka") if r.complete]
    (partial,) = [r for r in list_results(open_store(store), "vit", "cka") if not r.complete]
    assert "incomplete" in partial.problem
    # Readers see the earlier result only; verify names the partial one.
    assert open_store(store)["vit"].analysis("cka").attrs["seed"] == 1
    report = verify_store(store)
    assert [p.layer for p in report.problems] == [partial.group.split("/", 1)[1]]
    assert "incomplete" in report.problems[0].problem
    # The report is made from what is complete, and says what it left out.
    page = build_report(store, tmp_path / "report").read_text(encoding="utf-8")
    assert partial.group in page and "Left out" in page
    # The rerun (in this process) computes it again (the lock died with the killed
    # process), never "reused".
    capsys.readouterr()
    code = cli(["analyze", "cka", store, "vit", *CKA])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"wrote {store}/{partial.group}\n" in out and "reused" not in out
    assert "kept 1 earlier result(s)" in out and earlier.group in out
    ds = open_store(store)["vit"].analysis("cka")
    assert ds.attrs["seed"] == 0 and np.isfinite(ds["cka"].values).all()
    assert verify_store(store).ok
    # A committed result that lost an array: verify names it, the report leaves it out.
    shutil.rmtree(Path(store, partial.group, "cka"))
    assert [p.layer for p in verify_store(store).problems] == [partial.group.split("/", 1)[1]]
    page = build_report(store, tmp_path / "report2").read_text(encoding="utf-8")
    assert f"{partial.group}: damaged: array(s) cka missing" in page
    assert open_store(store)["vit"].analysis("cka").attrs["seed"] == 1  # the one left


def test_killed_while_writing_a_gram_recomputes_it(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Killed after every tile of the first Gram is written, before it is marked complete
    # (token-mean Grams: the fixture's analysis cached only the flattened ones).
    kill = KILL_AT.format(where="jobs.analyze.grams.finish_gram")
    job = analyze(store, "--reduce", "gap", hook=kill)
    assert job.wait(timeout=300) == -9
    bad = verify_store(store).problems
    assert len(bad) == 1 and "incomplete cached Gram" in bad[0].problem, bad
    assert bad[0].layer.startswith("_grams/") and bad[0].layer.endswith("/gram_gap")
    # The incomplete Gram is never used: the rerun (in this process) computes it.
    assert cli(["analyze", "cka", store, "vit", *CKA, "--reduce", "gap"]) == 0, capsys.readouterr()
    ds = open_store(store)["vit"].analysis("cka")
    assert "vit/" + bad[0].layer.split("/")[1] in ds.attrs["grams_computed"]
    assert np.isfinite(ds["cka"].values).all() and verify_store(store).ok
    # Or verify --repair drops it.
    job = analyze(store, "--reduce", "gap", "--gram-dtype", "float32", hook=kill)
    assert job.wait(timeout=300) == -9
    assert not verify_store(store).ok
    assert any("dropped" in note for note in verify_store(store, repair=True).notes)
    assert verify_store(store).ok


# Hold the lock in a real job: wait inside the analysis until the test says go.
PAUSE = """
import time
from pathlib import Path
import jobs.analyze.executor as ex
enter = ex.Executor.__enter__
def paused(self):
    Path({ready!r}).touch()
    while not Path({go!r}).exists():
        time.sleep(0.05)
    return enter(self)
ex.Executor.__enter__ = paused
"""


def test_two_analyses_on_one_run_one_winner_one_refusal(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ready, go = tmp_path / "ready", tmp_path / "go"
    winner = analyze(store, hook=PAUSE.format(ready=str(ready), go=str(go)))
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert winner.poll() is None and time.monotonic() < deadline, winner.stderr
        time.sleep(0.05)
    assert "vitcnn analyze cka vit" in str(lock_holder(open_store(store), "vit"))
    before = snapshot(Path(store))
    # Another analysis of that run (in this process), with the same or other
    # parameters: refused.
    capsys.readouterr()
    for args in ([], ["--seed", "5"]):
        code = cli(["analyze", "cka", store, "vit", *CKA, *args])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", (out, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "run 'vit' is being analysed by vitcnn analyze cka vit" in err
        assert f"pid {winner.pid}" in err
    assert snapshot(Path(store)) == before  # the refused jobs wrote nothing
    go.touch()
    out, err = winner.communicate(timeout=300)
    assert winner.returncode == 0, err
    assert "wrote" in out and lock_holder(open_store(store), "vit") is None
    assert len([r for r in list_results(open_store(store), "vit", "cka") if r.complete]) == 2
    assert verify_store(store).ok
    # Free again: the next job reuses what the winner wrote.
    assert cli(["analyze", "cka", store, "vit", *CKA]) == 0
    assert "reused" in capsys.readouterr().out


def test_cross_run_analysis_locks_both_runs(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(Path(store))
    with analysis_lock(open_store(store), ["other"], "vitcnn analyze cka other"):
        # `cka vit other` writes other's Gram cache too: refused while other is analysed.
        assert cli(["analyze", "cka", store, "vit", "other", *CKA]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "run 'other' is being analysed" in err
        # Reading needs no lock: a stored result is reused.
        assert cli(["analyze", "cka", store, "vit", *CKA, "--seed", "1"]) == 0
        assert "reused" in capsys.readouterr().out
        assert verify_store(store).ok
    after = snapshot(Path(store))
    assert after == before  # the lock lives outside the runs and is gone with its holder


def test_show_lists_the_runs_analyses(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["analyze", "cka", store, "vit", *CKA, "--repeats", "2"]) == 0
    job = analyze(store, "--seed", "4", hook=KILL_RESULT)
    assert job.wait(timeout=300) == -9
    capsys.readouterr()
    assert cli(["show", store, "vit"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("cka ")]
    results = {r.key: r for r in list_results(open_store(store), "vit", "cka")}
    assert len(rows) == 3 == len(results) and "3 result(s), 1 not usable" in out
    for key, result in results.items():
        (row,) = [r for r in rows if key in r]
        assert result.computed_at[:19] in row if result.complete else "incomplete" in row
    latest = [r for r in rows if "complete (latest)" in r]
    assert len(latest) == 1 and "repeats=2" in latest[0] and "seed=0" in latest[0]
    assert sum("seed=1" in r and "complete" in r for r in rows) == 1
    assert cli(["show", store, "other"]) == 0
    assert "analyses: none" in capsys.readouterr().out
