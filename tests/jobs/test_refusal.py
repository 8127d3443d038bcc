"""Refusal changes nothing: a job that fails before its first unit leaves the store as it was.

Each case runs ``vitcnn extract ... --overwrite`` against a store holding a
finished run, and compares a hash of every file of the store before and after.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import extract_tiny
from vitcnn_store import open_store
from vitcnn_store.cli import main
from vitcnn_store.errors import ClusterError

TINY = ["vit_tiny_patch16_224", "--img-size", "32", "--model-arg", "depth=2"]


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` with a hash of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    url = tmp_path_factory.mktemp("refusal") / "acts.zarr"
    extract_tiny(url, "v", limit=16, chunk_size=8)
    assert open_store(str(url))["v"].complete
    return url


def overwrite_args(store: Path, *extra: str, images: str = "builtin:faces") -> list[str]:
    return [
        "extract",
        *TINY,
        "--images",
        images,
        "--limit",
        "16",
        "--chunk-size",
        "8",
        "--store",
        str(store),
        "--run",
        "v",
        "--overwrite",
        "--no-progress",
        *extra,
    ]


def refused(args: list[str], store: Path, code: int, capsys: pytest.CaptureFixture[str]) -> str:
    before = snapshot(store)
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert snapshot(store) == before, "a refused job changed the store"
    assert open_store(str(store))["v"].complete
    return err


@pytest.mark.usefixtures("ray_cluster")  # the pool is checked against the connected cluster
@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--workers", "100"], 2, "need 100 CPUs"),
        (["--workers", "1", "--gpus-per-worker", "1"], 2, "need 1 GPUs"),
    ],
)
def test_refused_pool_keeps_the_finished_run(
    finished: Path, capsys: pytest.CaptureFixture[str], extra: list[str], code: int, message: str
) -> None:
    assert message in refused(overwrite_args(finished, *extra), finished, code, capsys)


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--gpus-per-worker", "1"], 2, "no node with 1 GPU(s)"),
        (["--lease-ttl", "nan"], 2, "--lease-ttl must be positive"),
        (["--device", "cuda"], 2, "--device cuda: this machine has no CUDA device"),
        (
            ["--workers", "1", "--device", "cuda", "--gpus-per-worker", "0"],
            2,
            "--device cuda needs --gpus-per-worker",
        ),
        (["--reduce", "blocks.*=cls", "--reduce", "blocks.1=mean"], 2, "both cls and mean"),
        (["--model-arg", "checkpoint_path=w.pth"], 2, "use --checkpoint"),
    ],
)
def test_refused_overwrite_keeps_the_finished_run(
    finished: Path, capsys: pytest.CaptureFixture[str], extra: list[str], code: int, message: str
) -> None:
    assert message in refused(overwrite_args(finished, *extra), finished, code, capsys)


class OnlyHere(torch.nn.Module):
    """A module that cannot be unpickled in any other process (as one whose code exists
    only on the driver's machine): every Ray worker fails to load it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.pid = os.getpid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))

    def __setstate__(self, state: dict) -> None:
        if state["pid"] != os.getpid():
            raise ImportError("OnlyHere exists on the driver only")
        super().__setstate__(state)


@pytest.mark.usefixtures("ray_cluster")
def test_workers_that_fail_to_start_leave_the_run(finished: Path) -> None:
    import vitcnn_store

    before = snapshot(finished)
    with pytest.raises(ClusterError, match="a worker failed to start"):
        vitcnn_store.extract(
            OnlyHere(),
            "builtin:faces",
            str(finished),
            "v",
            layers="fc",
            overwrite=True,
            workers=1,
            limit=16,
            chunk_size=8,
            progress=False,
            data_config={"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3},
        )
    assert snapshot(finished) == before, "a refused job changed the store"
    assert open_store(str(finished))["v"].complete


def test_unreachable_address_is_refused_within_bounded_time(
    finished: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs import ray_cluster

    # The job waits CONNECT_TIMEOUT (15 s) by default; the test waits 2 s of it, not 15.
    assert ray_cluster.probe_address.__defaults__ == (ray_cluster.CONNECT_TIMEOUT,)
    assert ray_cluster.CONNECT_TIMEOUT <= 30
    monkeypatch.setattr(ray_cluster.probe_address, "__defaults__", (2.0,))
    t0 = time.monotonic()
    err = refused(overwrite_args(finished, "--address", "127.0.0.1:9"), finished, 1, capsys)
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in err and "waited 2 s" in err
    assert 2.0 <= time.monotonic() - t0 < 60  # it waited, then gave up; model and images the rest


def test_bad_label_and_bad_name_are_refused(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"{tmp_path / 'a.png'},99999999999999999999999\n")
    err = refused(overwrite_args(finished, images=str(manifest)), finished, 2, capsys)
    assert "too large" in err
    args = overwrite_args(finished)
    args[args.index("--run") + 1] = "v" * 300
    assert "300 characters" in refused(args, finished, 2, capsys)
    args[args.index("--run") + 1] = "zarr.json"
    assert "zarr uses that name" in refused(args, finished, 2, capsys)


def test_overwrite_that_starts_replaces_the_run(finished: Path, tmp_path: Path) -> None:
    import shutil

    url = tmp_path / "copy.zarr"
    shutil.copytree(finished, url)
    before = open_store(str(url))["v"].attrs["created_at"]
    time.sleep(1.1)
    assert main(overwrite_args(url, "--limit", "8")) == 0
    run = open_store(str(url))["v"]
    assert run.complete and run.n_images == 8 and run.attrs["created_at"] != before
