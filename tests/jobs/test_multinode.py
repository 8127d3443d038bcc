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
# in this one, without the session cluster: tests/jobs/test_extract.py shows that a
# one-actor Ray run equals the in-process run, so two nodes must equal it too.
@pytest.mark.ray
def test_two_nodes_identical_to_one(tmp_path: Path) -> None:
    url = str(tmp_path / "acts.zarr")
    result = subprocess.run(
        [sys.executable, "-m", "tests.jobs.multinode_job", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    nodes = {line[5:] for line in result.stdout.splitlines() if line.startswith("node:")}
    assert len(nodes) == 2, result.stdout
    extract_tiny(
        url,
        "single",
        "vit",
        layers="preset:paper",
        attention=True,
        inputs=True,
        dtype="float32",
    )
    assert_runs_identical(url, "multi", url, "single")
