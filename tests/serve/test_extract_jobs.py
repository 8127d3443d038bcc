"""Extraction jobs over HTTP, run by a real Ray head's job server: the run they write is
the one ``vitcnn extract`` writes, and a server restarted mid-job re-attaches to it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from tests.serve.conftest import TOKEN, ThreadServer
from vitcnn_store import open_store
from vitcnn_store.serve.config import ServeConfig

# The `vit` run of the served store, as `vitcnn extract` arguments (TINY_VIT, 16 faces).
ARGS = [
    "vit_tiny_patch16_224",
    "--img-size",
    "32",
    "--model-arg",
    "depth=2",
    "--layers",
    "blocks.*",
    "--attention",
    "--images",
    "builtin:faces",
    "--limit",
    "16",
    "--chunk-size",
    "8",
    "--no-progress",
]


def test_an_extraction_job_runs_on_ray_and_survives_a_restart(
    ray_head: str,
    serve_store: str,
    tmp_path: Path,
) -> None:
    store = str(tmp_path / "acts.zarr")
    shutil.copytree(serve_store, store)
    config = ServeConfig(
        store=store,
        token=TOKEN,
        allow_jobs=True,
        jobs_dir=str(tmp_path / "jobs"),
        ray_address=ray_head,
    )
    first = ThreadServer(config)
    try:
        job = first.json(
            "/api/jobs", method="POST", body={"kind": "extract", "run": "sub", "args": ARGS}
        )
        assert job["status"] == "running" and job["ray_job_id"] == f"vitcnn-{job['id']}"
    finally:
        first.stop()  # the server goes away mid-job; the Ray job goes on
    second = ThreadServer(config)  # a new server over the same job records
    try:
        deadline = time.monotonic() + 600
        while True:
            got = second.json(f"/api/jobs/{job['id']}")
            if got["status"] in ("succeeded", "failed"):
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.2)
        assert got["status"] == "succeeded", got
        assert got["result"]["url"] == "/api/runs/sub" and got["logs_tail"]
        summary = second.json("/api/runs/sub")
        assert summary["complete"] and summary["n_images"] == 16
    finally:
        second.stop()
    # The same run as the in-process extraction of the same arguments made.
    runs = open_store(store)
    sub, vit = runs["sub"], runs["vit"]
    assert sub.layers == vit.layers and sub.attention_layers == vit.attention_layers
    for layer in vit.layers:
        np.testing.assert_array_equal(sub[layer].values, vit[layer].values)


def test_a_record_whose_ray_job_is_unknown_is_reported_failed(
    ray_head: str,
    serve_store: str,
    tmp_path: Path,
) -> None:
    """What a server finds after the Ray cluster itself was replaced: a running record
    whose submission id Ray does not know."""
    from vitcnn_store.serve.jobs import JobManager, JobRecord

    config = ServeConfig(
        store=serve_store,
        token=TOKEN,
        allow_jobs=True,
        jobs_dir=str(tmp_path),
        ray_address=ray_head,
    )
    JobManager(config).save(
        JobRecord(
            id="00000000000000ff",
            kind="extract",
            request={"run": "gone"},
            status="running",
            ray_job_id="vitcnn-00000000000000ff",
        )
    )
    server = ThreadServer(config)
    try:
        job = server.json("/api/jobs/00000000000000ff")
        assert job["status"] == "failed" and "knows no job" in job["error"], job
    finally:
        server.stop()
