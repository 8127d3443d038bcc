"""Store URLs on S3 end to end (extraction, resume, reading) against a moto server on loopback."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from tests.conftest import extract_tiny
from tests.helpers import moto_s3, moto_server
from vitcnn_store import open_store
from vitcnn_store.errors import StoreError


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[str]:
    """An S3-compatible server on 127.0.0.1 (moto) with one bucket."""
    with moto_s3("vitcnn-test") as bucket:
        yield bucket


def test_extract_resume_and_read_on_s3(s3_bucket: str, tiny_store: str) -> None:
    url = f"{s3_bucket}/acts.zarr"
    # The layers read below: every array is one PUT per unit through moto.
    extract_tiny(url, "vit", "vit", layers="blocks.1", attention=True, limit=24, chunk_size=8)
    run = open_store(url)["vit"]
    assert run.complete and run.n_images == 24
    local = open_store(tiny_store)["vit"]
    np.testing.assert_array_equal(run["blocks.1"].values, local["blocks.1"].values[:24])
    np.testing.assert_array_equal(
        run.attention("blocks.0.attn").values, local.attention("blocks.0.attn").values[:24]
    )
    # Resume on S3 finds nothing left to do, and the store reads with plain xarray.
    assert (
        extract_tiny(
            url,
            "vit",
            "vit",
            layers="blocks.1",
            attention=True,
            limit=24,
            chunk_size=8,
            resume=True,
        ).units_written
        == 0
    )  # type: ignore[attr-defined]
    import xarray as xr

    tree = xr.open_datatree(url, engine="zarr")
    assert tree["vit"]["blocks.1"]["activation"].shape == (24, 5, 192)


def test_analyses_on_s3(s3_bucket: str, tmp_path: object) -> None:
    from jobs.analyze import AttentionConfig, CKAConfig, run_attention, run_cka
    from vitcnn_store.interface.cli_analyze import analyze

    url = f"{s3_bucket}/analyses.zarr"
    extract_tiny(url, "vit", "vit", layers="preset:blocks", attention=True, limit=24, chunk_size=8)
    figures = str(tmp_path)
    cka, figure = analyze(
        "cka", CKAConfig(store=url, run="vit", batch_size=12, progress=False), figures=figures
    )
    attention = run_attention(AttentionConfig(store=url, run="vit", progress=False))
    assert figure is not None and figure.exists()
    import xarray as xr

    stored = xr.open_zarr(url, group=cka.group)
    np.testing.assert_allclose(stored["cka"].values, cka.dataset["cka"].values, atol=1e-12)
    assert attention.dataset["mean_distance"].dims == ("layer", "head")
    again = run_cka(CKAConfig(store=url, run="vit", batch_size=12, progress=False))
    assert again.reused
    # The analysis lock is an object created only if absent (S3's conditional write).
    from vitcnn_store.errors import RunLockedError
    from vitcnn_store.store.locks import analysis_lock, lock_holder

    with analysis_lock(open_store(url), ["vit"], "vitcnn analyze cka vit"):
        assert "vitcnn analyze cka vit" in str(lock_holder(open_store(url), "vit"))
        with pytest.raises(RunLockedError, match=r"analysed by vitcnn analyze cka vit .*delete"):
            run_cka(CKAConfig(store=url, run="vit", batch_size=12, seed=9, progress=False))
    assert lock_holder(open_store(url), "vit") is None


def test_unreachable_object_store(monkeypatch: pytest.MonkeyPatch) -> None:
    # One attempt: botocore's retries of a refused connection only add seconds of backoff.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # nothing listens there
    try:
        with pytest.raises(StoreError):
            open_store("s3://nowhere/acts.zarr")
    finally:
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved


# -- storage options through the job, and two writers of one registry ---------------------

_AWS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


@pytest.fixture()
def private_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A second moto server whose endpoint and keys are known only through storage
    options: no AWS variable names it, so no worker can find it from its environment.
    Yields the options and, under ``bucket``, an empty bucket's name."""
    for k in _AWS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    with moto_server() as endpoint:
        opts = {"endpoint_url": endpoint, "key": "k", "secret": "s"}
        # moto's servers in one process share their buckets: a fresh name per test.
        bucket = f"private-{uuid.uuid4().hex[:12]}"
        import s3fs

        s3fs.S3FileSystem(**opts).mkdir(bucket)
        yield {**opts, "bucket": bucket}


@pytest.mark.usefixtures("ray_cluster")  # the session's: a Ray of its own costs seconds
def test_ray_actors_write_with_the_jobs_storage_options(private_endpoint: dict[str, str]) -> None:
    """Extraction on Ray actors into a bucket whose endpoint and credentials reach the
    actors only in the job (the plan), not through any environment variable (the private
    server's address and keys were never in one)."""
    from vitcnn_store.store.layout import storage_options_scope, use_storage_options

    opts = dict(private_endpoint)
    url = f"s3://{opts.pop('bucket')}/acts.zarr"
    with storage_options_scope():
        use_storage_options(url, opts)
        summary = extract_tiny(url, "vit", "vit", limit=16, chunk_size=8, workers=1)
        assert summary.plan.startswith("Ray: 1 actor")  # type: ignore[attr-defined]
        run = open_store(url, storage_options=opts)["vit"]
        assert run.complete and run.n_images == 16
        assert np.isfinite(run[run.layers[-1]].values).all()


def test_plan_carries_resolved_options_but_never_shows_them() -> None:
    from jobs.worker import ExtractionPlan
    from vitcnn_store.data import open_image_set
    from vitcnn_store.store.layout import storage_options_scope, use_storage_options

    with storage_options_scope():
        use_storage_options("s3://b/a.zarr", {"key": "AK", "secret": "SECRET"})
        images = open_image_set("builtin:faces", limit=2)
        plan = ExtractionPlan(
            "0" * 64, None, images, "s3://b/a.zarr", "r", (), (), False, "float32", 2, (3, 32, 32)
        )
    assert plan.storage_options == {"key": "AK", "secret": "SECRET"}
    assert "SECRET" not in repr(plan)


# Says "ready" once imported, then reads the instant to start registering from stdin.
_REGISTER = """
import sys, time
from vitcnn_store.store.index import register_run
from vitcnn_store.store.layout import use_storage_options
url, endpoint, prefix = sys.argv[1:4]
use_storage_options(url, {"endpoint_url": endpoint, "key": "k", "secret": "s"})
print("ready", flush=True)
go = float(sys.stdin.readline())
while time.time() < go:
    time.sleep(0.001)
for i in range(4):
    register_run(url, f"{prefix}{i}")
"""


def test_two_processes_registering_runs_at_once_are_both_listed(
    private_endpoint: dict[str, str], tmp_path: object
) -> None:
    """Two jobs creating different runs of one bucket at the same moment: the registry
    (entries created only if absent) keeps every run of both."""
    import subprocess
    import sys
    import threading
    import time

    from vitcnn_store.store.index import registered_runs
    from vitcnn_store.store.layout import storage_options_scope, use_storage_options

    opts = dict(private_endpoint)
    url = f"s3://{opts.pop('bucket')}/race.zarr"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    argv = [sys.executable, "-c", _REGISTER, url, private_endpoint["endpoint_url"]]
    procs = [
        subprocess.Popen(
            [*argv, prefix],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for prefix in ("a", "b")
    ]
    # Once both are imported, both start registering at one instant, a moment from now.
    watchdog = threading.Timer(120, lambda: [p.kill() for p in procs])  # never hang
    watchdog.start()
    try:
        ready = [p.stdout.readline() for p in procs]  # type: ignore[union-attr]
        go = f"{time.time() + 0.5}\n"
        errors = [p.communicate(go, timeout=120)[1] for p in procs]
    finally:
        watchdog.cancel()
    assert ready == ["ready\n"] * 2, errors
    assert [p.returncode for p in procs] == [0, 0], errors
    with storage_options_scope():
        use_storage_options(url, opts)
        runs = registered_runs(url)
    assert sorted(runs or []) == [f"{p}{i}" for p in "ab" for i in range(4)]
