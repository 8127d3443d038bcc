"""Analysis jobs over HTTP: they write what the CLI writes; refusals write nothing; a
restarted server reports a job that was running as failed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from tests.serve.conftest import TOKEN, ThreadServer, snapshot
from vitcnn_store import open_store
from vitcnn_store.serve.config import ServeConfig
from vitcnn_store.serve.jobs import JobManager, JobRecord


def wait_for(server: ThreadServer, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = server.json(f"/api/jobs/{job_id}")
        if job["status"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def test_a_job_writes_the_same_result_as_the_cli(
    token_server: ThreadServer, serve_store: str
) -> None:
    body = {"analysis": "attention", "run": "vit", "options": {"name": "api_attn"}}
    job = token_server.json("/api/jobs", method="POST", body=body)
    assert job["status"] == "queued"
    job = wait_for(token_server, job["id"])
    assert job["status"] == "succeeded", job
    assert (
        job["result"]["group"].startswith("vit/_analyses/api_attn/") and not job["result"]["reused"]
    )
    assert job["progress"]["tasks_done"] == job["progress"]["tasks_scheduled"] > 0
    run = open_store(serve_store)["vit"]
    api, cli = run.analysis("api_attn"), run.analysis("cli_attn")
    assert sorted(api.data_vars) == sorted(cli.data_vars)
    for name in cli.variables:
        np.testing.assert_array_equal(api[name].values, cli[name].values)
    assert {**api.attrs["parameters"], "name": None} == {**cli.attrs["parameters"], "name": None}
    # ... and it is served like any result; the job list knows it.
    assert token_server.json(job["result"]["url"])["attrs"]["analysis"] == "attention"
    assert job["id"] in [j["id"] for j in token_server.json("/api/jobs")["jobs"]]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"analysis": "attention", "run": "vit", "options": {"dask_address": "tcp://x:1"}}, 400),
        ({"analysis": "attention", "run": "vit", "options": {"typo": 1}}, 400),
        ({"analysis": "cka", "run": "vit", "options": {"batch_size": 2}}, 400),
        ({"analysis": "cka", "run": "vit", "options": {"estimator": "magic"}}, 400),
        ({"analysis": "localization", "run": "vit", "options": {"tokens": "x:y"}}, 400),
        ({"analysis": "attention", "run": "vit", "options": {"name": "../x"}}, 400),
        ({"analysis": "skip", "run": "vit", "run2": "resnet"}, 400),
        ({"analysis": "telepathy", "run": "vit"}, 400),
        ({"analysis": "attention", "run": "nope"}, 404),
        ({"kind": "extract", "run": "x", "args": ["resnet18", "--images", "builtin:faces"]}, 501),
        ({"kind": "extract", "run": "x", "args": ["resnet18", "--images", "x", "--store=/t"]}, 400),
        ({"kind": "extract", "run": "a/b", "args": ["resnet18", "--images", "builtin:faces"]}, 400),
        ({"kind": "extract", "run": "x", "args": ["resnet18", "--limit", "3"]}, 400),
        ({"kind": "extract", "args": ["resnet18", "--images", "builtin:faces"]}, 400),
        ({"kind": "weird"}, 400),
    ],
)
def test_refused_jobs_write_nothing(
    token_server: ThreadServer, serve_store: str, body: dict, status: int
) -> None:
    before = snapshot(serve_store)
    got, _, answer = token_server.request("/api/jobs", method="POST", body=body)
    assert got == status, answer
    assert json.loads(answer)["error"]
    assert snapshot(serve_store) == before


def test_without_allow_jobs_nothing_is_submitted(
    open_server: ThreadServer, serve_store: str
) -> None:
    before = snapshot(serve_store)
    status, _, body = open_server.request(
        "/api/jobs", method="POST", body={"analysis": "skip", "run": "vit"}
    )
    assert status == 403 and "--allow-jobs" in json.loads(body)["error"]
    assert snapshot(serve_store) == before


def test_a_restarted_server_reports_a_running_job_as_failed(
    serve_store: str, tmp_path: Path
) -> None:
    config = ServeConfig(store=serve_store, token=TOKEN, allow_jobs=True, jobs_dir=str(tmp_path))
    # What a server that died mid-job leaves behind: its record, still "running".
    JobManager(config).save(
        JobRecord(
            id="0123456789abcdef", kind="analysis", request={"analysis": "cka"}, status="running"
        )
    )
    server = ThreadServer(config)
    try:
        job = server.json("/api/jobs/0123456789abcdef")
        assert job["status"] == "failed" and "stopped" in job["error"]
    finally:
        server.stop()
