"""Failures of the environment end in one line and exit code 1, and leave a usable store.

A full disk and a read-only store are real: small tmpfs mounts (skipped where
the tests cannot mount, i.e. without root). Missing object-store credentials
run in a subprocess with every credential source removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.store.test_integrity import chunk
from tests.store.test_store import fill_run, make_run
from vitcnn_store import open_store
from vitcnn_store.cli import main

TINY = ["vit_tiny_patch16_224", "--img-size", "32", "--model-arg", "depth=1"]


def mount(path: Path, options: str) -> None:
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mount point the test can resize and remount read-only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "disk"
    path.mkdir()
    mount(path, "size=40k")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def extract_args(store: Path, *extra: str) -> list[str]:
    return [
        "extract",
        *TINY,
        "--images",
        "builtin:faces",
        "--limit",
        "64",
        "--chunk-size",
        "8",
        "--store",
        str(store),
        "--run",
        "r",
        "--no-progress",
        *extra,
    ]


def test_disk_full_during_creation_then_recovered(
    small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = small_disk / "s.zarr"
    assert main(extract_args(store)) == 1
    assert "disk full writing" in one_line(capsys)
    assert main(["ls", str(store)]) == 0  # the half-created run is listed, nothing crashes
    assert "BROKEN: creation interrupted" in capsys.readouterr().out
    remount(small_disk, "size=16m")
    assert main(extract_args(store, "--resume")) == 0
    capsys.readouterr()
    assert open_store(str(store))["r"].complete
    assert main(["verify", str(store), "--no-progress"]) == 0


def test_disk_full_while_writing_units_then_resumed(
    small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    remount(small_disk, "size=400k")  # room for the run, not for all its units
    store = small_disk / "s.zarr"
    assert main(extract_args(store)) == 1
    # The full disk may take the lease's release too: this host's --resume below still
    # takes over at once, since the lease's job is known to be gone.
    assert "disk full writing" in one_line(capsys)
    run = open_store(str(store))["r"]
    assert not run.complete and run.missing_chunks() == []  # done only where fully written
    remount(small_disk, "size=16m")
    assert main(extract_args(store, "--resume")) == 0
    capsys.readouterr()
    assert open_store(str(store))["r"].complete
    assert main(["verify", str(store), "--no-progress"]) == 0


def test_read_only_store(small_disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    remount(small_disk, "size=16m")
    store = small_disk / "s.zarr"
    make_run(str(store))
    fill_run(str(store))
    chunk(str(store), "r", "layer1.0/activation", 1).unlink()
    remount(small_disk, "ro")
    assert main(extract_args(store, "--run", "new")) == 1
    assert "read-only file system" in one_line(capsys)
    assert main(["verify", str(store), "--repair", "--no-progress"]) == 1
    assert "read-only file system" in one_line(capsys)
    # Reading still works.
    assert main(["ls", str(store)]) == 0 and "DAMAGED" in capsys.readouterr().out


def test_s3_without_credentials(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        HOME=str(tmp_path),
    )
    for args in (
        ["ls", "s3://vitcnn-nobody/acts.zarr"],
        ["verify", "s3://vitcnn-nobody/acts.zarr"],
        extract_args(Path("s3://vitcnn-nobody/acts.zarr")),
    ):
        args = [a.replace("s3:/v", "s3://v") for a in args]
        result = subprocess.run(
            [sys.executable, "-m", "vitcnn_store.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no credentials for s3://vitcnn-nobody" in lines[0], lines
