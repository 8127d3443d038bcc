"""`vitcnn submit extract` against a real Ray head started by the test (Ray Jobs API)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.submit import entrypoint_args
from vitcnn_store import open_store

BIN = Path(sys.executable).parent


def test_entrypoint_is_the_parsed_config() -> None:
    """The job's command line is made from the parsed config: it parses back to the same
    config, without the client's options (--address, --wait, --pip, --job-id)."""
    from vitcnn_store.interface.cli import _extract_config, build_parser

    argv = [
        "submit",
        "extract",
        "resnet50",
        "--address=http://h:8265",
        "--pip",
        "x",
        "--wait",
        "--images",
        "builtin:faces",
        "--store",
        "s3://b/a.zarr",
        "--run",
        "r",
        "--model-arg",
        "depth=2",
        "--model-arg",
        "act='relu'",
        "--reduce",
        "layer*=mean",
        "--workers",
        "3",
        "--no-progress",
        "--overwrite",
    ]
    cfg = _extract_config(build_parser().parse_args(argv))
    args = entrypoint_args(cfg)
    assert "--address" not in args and "--wait" not in args and "--pip" not in args
    again = _extract_config(build_parser().parse_args(["extract", *args]))
    assert again == cfg.__class__(**{**cfg.__dict__, "address": None})


def test_submit_and_wait(ray_head: str, tmp_path: Path) -> None:
    store = tmp_path / "acts.zarr"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vitcnn_store.cli",
            "submit",
            "extract",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--model-arg",
            "depth=1",
            "--images",
            "builtin:faces",
            "--limit",
            "16",
            "--chunk-size",
            "8",
            "--store",
            str(store),
            "--run",
            "sub",
            "--address",
            ray_head,
            # The job extracts in its own process on the head: a submitted job's Ray
            # actors are tests/serve/test_extract_jobs.py's (an actor costs seconds).
            "--workers",
            "0",
            "--wait",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted Ray job" in result.stdout and "SUCCEEDED" in result.stdout
    assert "ray job logs" in result.stdout
    run = open_store(str(store))["sub"]
    assert run.complete and run.n_images == 16


def test_submit_refuses_bad_input_locally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vitcnn_store.cli import main

    store = str(tmp_path / "s.zarr")
    args = ["--images", "builtin:faces", "--store", store, "--run", "a/b"]
    assert main(["submit", "extract", "resnet18", *args, "--address", "http://127.0.0.1:9"]) == 2
    assert "invalid run name" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()
