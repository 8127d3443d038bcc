"""Extraction spread over two Ray nodes writes one store, identical to a one-node run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import extract_tiny
from tests.helpers import assert_runs_identical

ROOT = Path(__file__).resolve().parents[2]


# Ray runs in the job's own process (a two-node cluster); the reference run is extracted
# in this one meanwhile, into a store of its own, without the session cluster:
# tests/jobs/test_extract.py shows that a one-actor Ray run equals the in-process run, so
# two nodes must equal it too.
@pytest.mark.ray
def test_two_nodes_identical_to_one(tmp_path: Path) -> None:
    url, single = str(tmp_path / "acts.zarr"), str(tmp_path / "single.zarr")
    # Files, not pipes: nobody reads a pipe while this process extracts.
    out_file, err_file = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_file, "w") as stdout, open(err_file, "w") as stderr:
        job = subprocess.Popen(
            [sys.executable, "-m", "tests.jobs.multinode_job", url],
            cwd=ROOT,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
    try:
        extract_tiny(
            single,
            "single",
            "vit",
            layers="preset:paper",
            attention=True,
            inputs=True,
            dtype="float32",
        )
        job.wait(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    out = out_file.read_text()
    assert job.returncode == 0, err_file.read_text()[-3000:]
    nodes = {line[5:] for line in out.splitlines() if line.startswith("node:")}
    assert len(nodes) == 2, out
    assert_runs_identical(url, "multi", single, "single")
